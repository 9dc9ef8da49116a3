"""Benchmark (not a test): time and peak memory of the self-attention injection editor against frame count and
resolution, on the tiny random Stable Diffusion of ``tests/tiny_models.py``.

Each configuration runs in a fresh process so that its peak memory is its own: peak resident set size
(``getrusage``) on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA. "model" is the resident size right after
loading, so ``peak - model`` is what editing added; with frames streamed in batches it should not grow with the
frame count. The reference's per-step K/V cache is reported separately. "CPU s/frame" is the process's CPU time
(all threads, reference included) per frame: on a shared machine it is steadier than the wall-clock columns.

    python tests/benchmarks/unified_edit.py [--frames 4 8 16] [--sizes 64 128] [--steps 10] [--batch-size 4]
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

from tiny_models import build_tiny_sd_pipeline  # noqa: E402

from ns_4d_methods.guidance.attention_injection import AttentionInjectionConfig, AttentionInjectionEditor  # noqa: E402

MIB = 2**20


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_one(model: str, frames: int, size: int, steps: int, batch_size: int, device: str) -> dict:
    config = AttentionInjectionConfig(
        model=model, num_inference_steps=steps, inversion_steps=steps, batch_size=batch_size
    )
    editor = AttentionInjectionEditor(config, device)
    model_bytes = peak_bytes(device)
    images = torch.rand(frames, 3, size, size, generator=torch.Generator().manual_seed(0))
    start, cpu_start = time.perf_counter(), time.process_time()
    _, context = editor.edit_reference(images[frames // 2 : frames // 2 + 1], "a red car")
    reference_seconds = time.perf_counter() - start
    for first in range(0, frames, batch_size):
        editor.edit_batch(images[first : first + batch_size], "a red car", context)
    if device == "cuda":
        torch.cuda.synchronize()
    total, cpu_total = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "frames": frames, "size": size, "reference_s": reference_seconds,
        "per_frame_s": (total - reference_seconds) / frames, "total_s": total, "cpu_per_frame_s": cpu_total / frames,
        "model_mib": model_bytes / MIB, "peak_mib": peak_bytes(device) / MIB, "kv_cache_mib": context.nbytes / MIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=2, type=int, metavar=("FRAMES", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process: one configuration
        print(json.dumps(run_one(args.model, *args.one, args.steps, args.batch_size, args.device)))
        return

    with tempfile.TemporaryDirectory() as model:
        build_tiny_sd_pipeline(model)
        print(f"tiny SD, {args.steps} DDIM steps (inversion as many), t_resnet 0.8, t_edit 0.5, t_context 0.5, "
              f"batch {args.batch_size}, {args.device}")
        header = f"{'frames':>6} {'px':>4} {'ref s':>7} {'s/frame':>8} {'total s':>8} {'CPU s/frame':>12} " \
                 f"{'model MiB':>10} {'peak MiB':>9} {'K/V cache MiB':>14}"
        print(header)
        for size in args.sizes:
            for frames in args.frames:
                command = [sys.executable, __file__, "--one", str(frames), str(size), "--model", model,
                           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--device", args.device]
                child = subprocess.run(command, capture_output=True, text=True, check=True)
                row = json.loads(child.stdout.strip().splitlines()[-1])
                print(f"{row['frames']:>6} {row['size']:>4} {row['reference_s']:>7.2f} {row['per_frame_s']:>8.3f} "
                      f"{row['total_s']:>8.2f} {row['cpu_per_frame_s']:>12.3f} {row['model_mib']:>10.0f} "
                      f"{row['peak_mib']:>9.0f} {row['kv_cache_mib']:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
