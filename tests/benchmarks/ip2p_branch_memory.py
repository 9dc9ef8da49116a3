"""Benchmark (not a test): peak CPU memory of one anchor-aware InstructPix2Pix window edit with the 3 guidance
branches as one UNet batch and one after the other (``sequential_branches``), with the tiny random InstructPix2Pix
of ``tests/tiny_models.py`` (its VAE downsamples 2x, so a 192x128 frame is a 96x64 latent).

Each mode runs in a fresh subprocess; the figure is the growth of the process's peak resident memory (``ru_maxrss``)
during the edit, over what it held after loading the models and the frames. Weights are a few MB here, so the
growth is the activations (UNet, VAE) of the edit; with the real 860M-parameter UNet the weights come on top, the
same in both modes. CPU only: GPU memory was not measured (no GPU where this was written).

    python tests/benchmarks/ip2p_branch_memory.py [--frames 5] [--height 128] [--width 192] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models


def measure(model_dir: str, sequential: bool, frames: int, height: int, width: int, steps: int) -> dict:
    import torch

    from ns_4d_methods.guidance.ip2p_editor import InstructPix2PixEditor

    torch.set_num_threads(1)
    editor = InstructPix2PixEditor(model_dir, sequential_branches=sequential)
    images = torch.rand(frames, 3, height, width, generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    edited = editor.edit(images, "make it snowy", strength=1.0, num_inference_steps=steps, anchor="anchor_self")
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"sequential": sequential, "growth MiB": (peak - before) / 1024, "peak MiB": peak / 1024,
            "seconds": seconds, "checksum": float(edited.double().sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5, help="frames of the window (the default window)")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "SEQUENTIAL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row = measure(args.child[0], args.child[1] == "1", args.frames, args.height, args.width, args.steps)
        print(json.dumps(row))
        return

    from tiny_models import build_tiny_ip2p_pipeline

    with tempfile.TemporaryDirectory() as folder:
        build_tiny_ip2p_pipeline(folder)
        print(f"{args.frames} frames of {args.width}x{args.height}, {args.steps} steps, anchor_self, one thread")
        for sequential in (False, True):
            command = [sys.executable, __file__, "--frames", str(args.frames), "--height", str(args.height),
                       "--width", str(args.width), "--steps", str(args.steps), "--child", folder, str(int(sequential))]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            print(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
