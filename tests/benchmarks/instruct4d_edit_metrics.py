"""Benchmark (not a test): the edit metrics of a whole instruct4d propagation pass with tiny random models on a real
monocular capture, for comparing two versions of the code on the same input.

A tiny nerfacto-4d reconstruction of ``../shared/data/nrnerf_example_sequence`` (86 frames, 64x48 at
``--scale 0.125``) is edited by ``ns-train instruct4d`` with the tiny InstructPix2Pix of ``tests/tiny_models.py``, one
edit unit per step until the key frame and every window are done, and the run's ``edit_metrics.json`` (CLIP
direction with a tiny random CLIP, flow warp error of the edited training images, the unedited frames' warp error as
the floor) is printed. ``--repo`` runs another checkout's code (e.g. a worktree at an older commit) with the same
models and arguments; flags the older code lacks are left out with ``--flow dis`` and without ``--raft-weights``.
The edited training images do not depend on the training loss (refresh passes start after 2,000 steps), so code
that only changes training gives the same figures.

    python tests/benchmarks/instruct4d_edit_metrics.py --out /tmp/after [--repo ../before] [--flow raft|dis]
    python tests/benchmarks/instruct4d_edit_metrics.py --partial /tmp/after /tmp/before   # frames both have so far

Random tiny models say little about edit quality: the figures compare mechanisms (propagation, flow), not looks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

from tiny_models import TINY_NERFACTO_4D, build_tiny_clip, build_tiny_ip2p_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "nrnerf_example_sequence" / "transforms_nerfstudio_derived.json"
RAFT_SMALL = SHARED / "weights" / "raft-small.pth"


def train(repo: Path, method: str, out: Path, name: str, iters: int, *extra: str) -> None:
    args = [
        sys.executable, "-m", "nerfstudio.scripts.train", method, "--output-dir", str(out), "--experiment-name", "exp",
        "--timestamp", name, "--max-num-iterations", str(iters), "--machine.device-type", "cpu", "--vis",
        "tensorboard", "--steps-per-eval-batch", "100000", "--steps-per-eval-image", "100000",
        "--steps-per-eval-all-images", "100000", "--steps-per-save", "100000", *TINY_NERFACTO_4D, "--data", str(DATA),
        *extra, "ns4d-data", "--eval-mode", "all",
    ]
    env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1")
    # run in the checkout: `python -m` puts the working directory first on sys.path, before PYTHONPATH
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=repo)
    (out / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"error: {method} failed, see {out / f'{name}.log'}:\n{result.stderr[-2000:]}")


def partial_metrics(outs: list[Path]) -> None:
    """The metrics of runs still going (or stopped): the edited frames every run has, from frame 0 on."""
    import numpy as np
    from PIL import Image

    from ns_4d_methods.editing.edit_metrics import ClipEmbedder, edit_metrics

    edits = [out / "exp" / "instruct4d" / "edit" / "edits" / "cam00" for out in outs]
    count = 0
    while all((folder / f"frame{count:05d}.png").is_file() for folder in edits):
        count += 1
    originals = sorted((DATA.parent / "images").glob("*.png"))[:count]
    for out, folder in zip(outs, edits):
        edited = [np.asarray(Image.open(folder / f"frame{f:05d}.png").convert("RGB")) for f in range(count)]
        size = edited[0].shape[1::-1]  # nerfstudio's downscale: bicubic
        pairs = [(np.asarray(Image.open(o).convert("RGB").resize(size, Image.BICUBIC)), e)
                 for o, e in zip(originals, edited)]
        report = edit_metrics(pairs, "turn him into a bronze statue", "", ClipEmbedder(str(out / "clip"), "cpu"))
        print(f"{out}: frames 0-{count - 1}: " + json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partial", type=Path, nargs="+", help="only score the common edited frames of these --out "
                        "folders (runs still going or stopped)")
    parser.add_argument("--out", type=Path, help="folder for the models, runs and logs")
    parser.add_argument("--repo", type=Path, default=ROOT, help="checkout whose code runs (PYTHONPATH)")
    parser.add_argument("--flow", choices=["raft", "dis"], default="raft", help="raft: RAFT-small by path")
    parser.add_argument("--scale", type=float, default=0.125)
    parser.add_argument("--units", type=int, default=25, help="instruct4d steps, one edit unit each")
    parser.add_argument("--extra", default="", help="more instruct4d flags, e.g. for the LPIPS term of newer code: "
                        "'--pipeline.datamanager.train-num-rays-per-batch 1024' (and its AlexNet in the torch cache)")
    args = parser.parse_args()
    if args.partial:
        partial_metrics(args.partial)
        return
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_ip2p_pipeline(out / "ip2p")
    build_tiny_clip(out / "clip")
    scale = ["--pipeline.datamanager.camera-res-scale-factor", str(args.scale)]
    started = time.perf_counter()
    train(args.repo, "nerfacto-4d", out, "recon", 2, *scale)
    flow = ["--pipeline.flow-backend", args.flow] + (["--pipeline.raft-weights", str(RAFT_SMALL)]
                                                      if args.flow == "raft" else [])
    train(args.repo, "instruct4d", out, "edit", args.units, *scale,
          "--load-dir", str(out / "exp" / "nerfacto-4d" / "recon" / "nerfstudio_models"),
          "--pipeline.prompt", "turn him into a bronze statue", "--pipeline.ip2p-model-id", str(out / "ip2p"),
          "--pipeline.clip-model", str(out / "clip"), "--pipeline.steps-per-edit-unit", "1",
          "--pipeline.full-edit-steps", "2", "--pipeline.refine-steps", "2", "--pipeline.refine-strength", "0.5",
          "--pipeline.datamanager.train-num-images-to-sample-from", "10", *flow, *args.extra.split())
    report = json.loads((out / "exp" / "instruct4d" / "edit" / "edit_metrics.json").read_text())
    print(json.dumps(report.get("all", report), indent=2))
    print(f"{time.perf_counter() - started:.0f} s (code: {args.repo}, flow: {args.flow})")


if __name__ == "__main__":
    main()
