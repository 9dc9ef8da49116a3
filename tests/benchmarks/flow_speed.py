"""Benchmark (not a test): optical-flow time per frame for RAFT-small and OpenCV DIS at two resolutions.

Runs on the Sintel demo frames in ../shared/data with the original RAFT-small checkpoint in ../shared/weights and
prints one table row per backend and resolution: milliseconds per frame pair (after one warm-up pair) and the mean
photometric error of the warped previous frame relative to not warping (lower is better).

    python tests/benchmarks/flow_speed.py [--pairs 4] [--widths 512 1024] [--device cpu] [--threads N]

On a machine shared with other busy processes, PyTorch's CPU thread pool can slow down by an order of magnitude
(its threads wait on each other); compare ``--threads 1`` there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import torch

from ns_4d_methods.editing.optical_flow import DisFlow, RaftFlow
from ns_4d_methods.editing.warping import backward_warp

SHARED = Path(__file__).resolve().parents[3] / "shared"


def load_frames(width: int, count: int) -> list[torch.Tensor]:
    frames = []
    for path in sorted((SHARED / "data" / "sintel_demo_frames").glob("frame_*.png"))[:count]:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        height = round(rgb.shape[0] * width / rgb.shape[1])
        frames.append(torch.from_numpy(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)).float() / 255)
    return frames


def measure(estimator, frames: list[torch.Tensor]) -> tuple[float, float]:
    """(ms per pair, warped / unwarped photometric error) over consecutive pairs, flow current -> previous."""
    estimator.estimate_flow(frames[1], frames[0])  # warm-up: allocations, OpenCV/torch thread pools
    seconds, unwarped, warped = 0.0, 0.0, 0.0
    for previous, current in zip(frames[:-1], frames[1:]):
        start = time.perf_counter()
        flow = estimator.estimate_flow(current, previous)
        if flow.is_cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        unwarped += (previous - current).abs().mean().item()
        warped += (backward_warp(previous, flow) - current).abs().mean().item()
    return 1000 * seconds / (len(frames) - 1), warped / unwarped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4, help="consecutive frame pairs per measurement")
    parser.add_argument("--widths", type=int, nargs=2, default=[512, 1024], help="image widths (aspect kept)")
    parser.add_argument("--device", default="cpu", help="device for RAFT")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and OpenCV")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)

    estimators = {
        "RAFT-small (12 it.)": RaftFlow(SHARED / "weights" / "raft-small.pth", device=args.device),
        "DIS medium": DisFlow("medium"),
    }
    print(f"torch threads: {torch.get_num_threads()}, OpenCV threads: {cv2.getNumThreads()}, RAFT on {args.device}")
    print(f"{'backend':<22}{'resolution':>12}{'ms/frame':>10}{'warp err':>10}")
    for width in args.widths:
        frames = load_frames(width, args.pairs + 1)
        resolution = f"{frames[0].shape[1]}x{frames[0].shape[0]}"
        for name, estimator in estimators.items():
            milliseconds, ratio = measure(estimator, frames)
            print(f"{name:<22}{resolution:>12}{milliseconds:>10.1f}{ratio:>9.2f}x")


if __name__ == "__main__":
    main()
