"""Benchmark (not a test): how much instruct4d's refresh passes move the training targets, with the pass's seed per
window reused (instruct4d's schedule) or drawn fresh per pass, and what a pass costs per frame.

Frames are the NR-NeRF handheld capture (``../shared/data/nrnerf_example_sequence``, the first ``--frames`` frames
at ``--width`` px); the editor is the tiny random InstructPix2Pix of ``tests/tiny_models.py`` with instruct4d's
default edit settings (DDIM, anchor_self attention with shared GroupNorm, key frame 20 steps from noise, windows of 5
repainted at strength 0.65 of 8 steps) and DIS flow. Pass 1 propagates the key frame's edit through warped windows;
refresh passes repaint every window from "renders", here the previous pass's targets themselves (a model that fitted
its targets exactly: the change measured is the editor's own, not the model's). Printed: the mean absolute change of
the targets (RGB in [0, 1], frames after the key frame) from each pass to the next, and seconds per frame.

    python tests/benchmarks/instruct4d_refresh.py [--frames 17] [--width 64] [--passes 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

from tiny_models import build_tiny_ip2p_pipeline  # noqa: E402

from ns_4d_methods.editing.flow_propagation import propagate  # noqa: E402
from ns_4d_methods.editing.optical_flow import build_flow_estimator  # noqa: E402
from ns_4d_methods.guidance.frame_editor import FrameEditor  # noqa: E402
from ns_4d_methods.guidance.ip2p_editor import InstructPix2PixEditor  # noqa: E402
from ns_4d_methods.pipelines.instruct4d_pipeline import Instruct4DPipelineConfig  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared"
FRAMES = SHARED / "data" / "nrnerf_example_sequence" / "images"
PROMPT = "turn him into a bronze statue"


class Frames:
    """A FrameSource over a list of originals, the current targets and what "renders" return."""

    def __init__(self, originals: list[torch.Tensor]) -> None:
        self.originals = originals
        self.targets = list(originals)

    def original(self, frame: int) -> torch.Tensor:
        return self.originals[frame]

    def current(self, frame: int) -> torch.Tensor:
        return self.targets[frame]

    def edited(self, frame: int) -> torch.Tensor:
        return self.targets[frame]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=17, help="frames from the start of the capture")
    parser.add_argument("--width", type=int, default=64, help="frame width (height keeps the 4:3 aspect)")
    parser.add_argument("--passes", type=int, default=4, help="pass 1 and the refresh passes after it")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = Instruct4DPipelineConfig()
    size = (args.width, args.width * 3 // 4)
    paths = sorted(FRAMES.glob("*.png"))[: args.frames]
    originals = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize(size, Image.BILINEAR)) / 255.0)
                 .float() for p in paths]

    with tempfile.TemporaryDirectory() as folder:
        build_tiny_ip2p_pipeline(folder)
        editor = FrameEditor(InstructPix2PixEditor(folder), max_resolution=0)
    flow = build_flow_estimator("dis")

    def edit(conditions, inits, *, strength, steps, seed):
        return editor(conditions, inits, prompt=PROMPT, strength=strength, num_inference_steps=steps,
                      guidance_scale=config.guidance_scale, image_guidance_scale=config.image_guidance_scale,
                      anchor=config.anchor, seed=seed)

    def repaint(conditions, inits, *, seed):
        return edit(conditions, inits, strength=config.refine_strength, steps=config.refine_steps, seed=seed)

    def run_pass(source: Frames, seed: int, from_current: bool) -> float:
        started, updates = time.perf_counter(), {}
        for window in propagate(list(range(len(originals))), source, repaint, flow, window_size=config.window_size,
                                overlap=config.window_overlap, seed=seed, from_current=from_current):
            updates.update(zip(window.frames, window.images))
            if not from_current:  # pass 1 reads its bridges from the targets as it goes, as the pipeline does
                source.targets[window.frames[-1]] = window.images[-1]
        for frame, image in updates.items():
            source.targets[frame] = image
        return (time.perf_counter() - started) / len(updates)

    source = Frames(originals)
    source.targets[0] = edit(originals[0][None], originals[0][None], strength=1.0, steps=config.full_edit_steps,
                             seed=1)[0]
    seconds = run_pass(source, seed=7, from_current=False)
    first = list(source.targets)
    edit_size = float(torch.stack([(a - b).abs().mean() for a, b in zip(first[1:], originals[1:])]).mean())
    print(f"{len(originals)} frames of {size[0]}x{size[1]}; pass 1 (warped windows): {seconds:.2f} s/frame, "
          f"targets differ from the originals by {edit_size:.4f} (mean |delta|)")
    for label, fresh in (("seed reused", False), ("fresh seeds", True)):
        source.targets = list(first)
        changes, times = [], []
        for number in range(2, args.passes + 1):
            before = list(source.targets)
            times.append(run_pass(source, seed=7 + (1000 * number if fresh else 0), from_current=True))
            changes.append(float(torch.stack([(a - b).abs().mean() for a, b in zip(source.targets[1:], before[1:])])
                                 .mean()))
        steps = ", ".join(f"{n - 1}->{n}: {c:.4f}" for n, c in zip(range(2, args.passes + 1), changes))
        print(f"refresh passes, {label}: mean |delta| of the targets {steps}; {np.mean(times):.2f} s/frame")


if __name__ == "__main__":
    main()
