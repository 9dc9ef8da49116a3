"""Benchmark (not a test): instruct4d's flow-guided sliding-window propagation, time and memory against window length
and frame count, and optical-flow time per frame.

Frames stream from a real video (``../shared/data/videos/car-turn.mp4``, 480 x 480, decoded one frame per request);
the editor is the tiny random InstructPix2Pix of ``tests/tiny_models.py`` behind the same :class:`FrameEditor` the
pipeline uses, editing at a small resolution (``--edit-resolution``) with the pipeline's partial-edit settings scaled
down (``--steps``), so that the frames themselves (2.6 MiB each at 480 px) dominate what a sequence could hold.

For every window length and frame count it prints seconds per window and per frame, the most source frames alive at
once (counted exactly) and how much the resident memory grew from the first window to the last (sampled after every
window, so a window's own transient peak is not counted, and anything kept across windows is). Time must grow
linearly with the frame count and memory must stay flat: it is bounded by the window, not the sequence. A control
row runs the same propagation through a source that keeps every frame it hands out (what caching the sequence
would cost). A second table gives flow time per frame (both directions, as propagation needs) for OpenCV DIS and
RAFT-small (``../shared/weights/raft-small.pth``).

    python tests/benchmarks/instruct4d.py [--size 480] [--edit-resolution 64] [--windows 3 5 8] [--frames 10 20 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import weakref
from pathlib import Path

import cv2
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

from tiny_models import build_tiny_ip2p_pipeline  # noqa: E402

from ns_4d_methods.editing.flow_propagation import propagate, window_ranges  # noqa: E402
from ns_4d_methods.editing.optical_flow import build_flow_estimator  # noqa: E402
from ns_4d_methods.guidance.frame_editor import FrameEditor  # noqa: E402
from ns_4d_methods.guidance.ip2p_editor import InstructPix2PixEditor  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared"
VIDEO = SHARED / "data" / "videos" / "car-turn.mp4"
RAFT_SMALL = SHARED / "weights" / "raft-small.pth"


class VideoFrames:
    """A FrameSource that decodes each requested frame from the video and counts the frames alive at once.

    With ``keep_all`` it also keeps every frame it hands out (the control: a source that caches the sequence).
    """

    def __init__(self, path: Path, size: int, keep_all: bool = False) -> None:
        self.capture = cv2.VideoCapture(str(path))
        self.size = size
        self.kept: list[torch.Tensor] | None = [] if keep_all else None
        self.alive = self.peak_alive = 0

    def _read(self, frame: int) -> torch.Tensor:
        self.capture.set(cv2.CAP_PROP_POS_FRAMES, frame)
        readable, bgr = self.capture.read()
        if not readable:
            raise ValueError(f"{VIDEO} has no frame {frame}")
        rgb = cv2.cvtColor(cv2.resize(bgr, (self.size, self.size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
        image = torch.from_numpy(rgb).float() / 255.0
        self.alive += 1
        self.peak_alive = max(self.peak_alive, self.alive)
        weakref.finalize(image, self._release)
        if self.kept is not None:
            self.kept.append(image)
        return image

    def _release(self) -> None:
        self.alive -= 1

    def original(self, frame: int) -> torch.Tensor:
        return self._read(frame)

    def current(self, frame: int) -> torch.Tensor:
        return self._read(frame)

    def edited(self, frame: int) -> torch.Tensor:
        # a stand-in key edit (the key view is edited before propagation starts)
        return self._read(frame).mul_(-1.0).add_(1.0)


def propagation_row(editor: FrameEditor, flow, window: int, frames: int, args, keep_all: bool = False) -> dict:
    source = VideoFrames(VIDEO, args.size, keep_all)
    process = psutil.Process()

    def repaint(conditions, inits, *, seed):
        return editor(conditions, inits, prompt="make it snowy", strength=0.65, num_inference_steps=args.steps,
                      guidance_scale=7.5, image_guidance_scale=1.5, anchor="anchor_self", seed=seed)

    resident = []  # after every window
    started = time.perf_counter()
    for result in propagate(list(range(frames)), source, repaint, flow, window_size=window, overlap=1):
        del result
        resident.append(process.memory_info().rss)
    elapsed = time.perf_counter() - started
    assert len(resident) == len(window_ranges(frames, window, 1))
    return {
        "window": window, "frames": frames, "windows": len(resident), "s/window": elapsed / len(resident),
        "s/frame": elapsed / (frames - 1), "frames held": source.peak_alive,
        "RSS growth MiB": (max(resident) - resident[0]) / 2**20,
    }


def flow_rows(size: int, pairs: int) -> list[dict]:
    source = VideoFrames(VIDEO, size)
    frames = [source.original(f) for f in range(pairs + 1)]
    backends = [("dis", None)] + ([("raft", RAFT_SMALL)] if RAFT_SMALL.is_file() else [])
    rows = []
    for backend, checkpoint in backends:
        flow = build_flow_estimator(backend, raft_weights=checkpoint)
        flow.estimate_flow(frames[0], frames[1])  # warm-up
        started = time.perf_counter()
        for previous, current in zip(frames, frames[1:]):
            flow.estimate_flow(current, previous)
            flow.estimate_flow(previous, current)
        per_frame = (time.perf_counter() - started) / pairs
        name = "RAFT-small" if backend == "raft" else "DIS (medium)"
        rows.append({"flow": name, "size": f"{size}x{size}", "ms/frame (fwd+bwd)": 1000 * per_frame})
    return rows


class Table:
    """Prints rows as they are measured (a long run shows progress), columns sized from the header."""

    def __init__(self, columns: list[str], width: int = 12) -> None:
        self.columns, self.widths = columns, [max(width, len(c)) for c in columns]
        print(" | ".join(c.rjust(w) for c, w in zip(columns, self.widths)))
        print("-+-".join("-" * w for w in self.widths), flush=True)

    def add(self, row: dict) -> None:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in self.columns]
        print(" | ".join(v.rjust(w) for v, w in zip(cells, self.widths)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=480, help="frame side in pixels")
    parser.add_argument("--edit-resolution", type=int, default=64, help="long side the editor works at")
    parser.add_argument("--windows", type=int, nargs="+", default=[3, 5, 8])
    parser.add_argument("--frames", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--steps", type=int, default=4, help="schedule steps of a partial edit (x 0.65 run)")
    parser.add_argument("--flow-sizes", type=int, nargs="+", default=[96, 240, 480])
    parser.add_argument("--flow-pairs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as folder:
        build_tiny_ip2p_pipeline(folder)
        editor = FrameEditor(InstructPix2PixEditor(folder), max_resolution=args.edit_resolution)
    flow = build_flow_estimator("dis")
    propagation_row(editor, flow, 3, 3, args)  # warm-up: first calls allocate caches

    print(f"flow-guided propagation: {args.size}x{args.size} frames of {VIDEO.name}, DIS flow, tiny IP2P at "
          f"{args.edit_resolution} px, {int(args.steps * 0.65)} denoising steps per window")
    columns = ["window", "frames", "windows", "s/window", "s/frame", "frames held", "RSS growth MiB"]
    table = Table(columns)
    for window in args.windows:
        for frames in args.frames:
            table.add(propagation_row(editor, flow, window, frames, args))
    print("\ncontrol: a frame source that keeps every frame it hands out")
    table = Table(columns)
    for frames in args.frames:
        table.add(propagation_row(editor, flow, args.windows[0], frames, args, keep_all=True))

    print("\noptical flow per frame")
    table = Table(["flow", "size", "ms/frame (fwd+bwd)"])
    for size in args.flow_sizes:
        for row in flow_rows(size, args.flow_pairs):
            table.add(row)


if __name__ == "__main__":
    main()
