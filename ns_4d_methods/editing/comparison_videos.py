"""Original | edited comparison videos of an editing run, and the edit metrics scored on them.

At the end of training every editing method (instruct4d, unified-edit) writes ``<run>/edit_videos/``: one mp4 per
camera with the original training frames on the left and the edited ones on the right, in time order, and an
``index.json`` with the prompt, the source prompt and whether the frames are a sequence in time (monocular and
multi-camera videos) or unordered views (a static scene). :func:`run_metrics` scores those videos with
:func:`~ns_4d_methods.editing.edit_metrics.edit_metrics`, per camera and over all frames; the methods call it after
writing the videos and ``ns-4d-edit run RUN_DIR`` calls it on any finished run.

The videos are H.264 at crf 0 (``quality=10``) in yuv420p, so players show them; the chroma subsampling is the only
loss and it touches the original and the edited half alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import imageio_ffmpeg
import numpy as np
import torch

from ns_4d_methods.editing.edit_metrics import ClipEmbedder, edit_metrics
from ns_4d_methods.errors import InputError

FOLDER = "edit_videos"
INDEX = "index.json"
VIDEO_QUALITY = 10  # imageio-ffmpeg's scale: 10 is crf 0


@dataclass
class ComparisonGroup:
    """One video: a camera's training images in time order."""

    name: str
    """File stem of the video (the camera's name)."""
    indices: List[int]
    """Dataset image indices, in the order the video shows them."""


def write_comparison_videos(
    run_dir: Path,
    groups: Sequence[ComparisonGroup],
    original: Callable[[int], torch.Tensor],
    edited: Callable[[int], torch.Tensor],
    *,
    prompt: str,
    source_prompt: str,
    temporal: bool,
    fps: int,
) -> Path:
    """Writes ``<run_dir>/edit_videos/<group>.mp4`` (original | edited, one frame in memory at a time) and the index.

    ``original`` and ``edited`` give an image index's frames as [H, W, 3] floats in [0, 1]. Returns the folder.
    """
    folder = Path(run_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for group in groups:
        height, width = original(group.indices[0]).shape[:2]
        writer = imageio_ffmpeg.write_frames(
            str(folder / f"{group.name}.mp4"), (2 * width, height), fps=fps, quality=VIDEO_QUALITY,
            macro_block_size=2, ffmpeg_log_level="error",
        )
        writer.send(None)  # start ffmpeg
        try:
            for index in group.indices:
                pair = torch.cat([original(index), edited(index)], dim=1)
                writer.send(np.ascontiguousarray((pair.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()))
        finally:
            writer.close()
    index = {
        "prompt": prompt, "source_prompt": source_prompt, "temporal": temporal,
        "videos": [f"{group.name}.mp4" for group in groups],
    }
    (folder / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return folder


def read_pairs(video: Path) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(original, edited) uint8 frames [H, W, 3] of a comparison video, one pair at a time."""
    capture = cv2.VideoCapture(str(video))
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            half = frame.shape[1] // 2
            yield np.ascontiguousarray(frame[:, :half]), np.ascontiguousarray(frame[:, half : 2 * half])
    finally:
        capture.release()


def read_index(run_dir: Path) -> Dict:
    """The ``edit_videos/index.json`` of a run, with a one-line error when the run has none."""
    path = Path(run_dir) / FOLDER / INDEX
    if not path.is_file():
        raise InputError(
            f"{path}: not found; expected the run directory of a finished instruct4d or unified-edit run "
            "(the folder holding config.yml)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: invalid JSON ({error.msg}, line {error.lineno})") from None


def run_metrics(
    run_dir: Path, clip: Optional[ClipEmbedder], prompt: Optional[str] = None, source_prompt: Optional[str] = None
) -> Dict[str, object]:
    """Edit metrics of a run's comparison videos: ``{"cameras": {name: report}, "all": report}``.

    ``prompt`` and ``source_prompt`` default to the run's own. ``all`` is the frame-weighted mean of every camera's
    numbers (the warp errors weighted by the pixels they were measured on), plus the total frame count.
    """
    index = read_index(run_dir)
    prompt = index["prompt"] if prompt is None else prompt
    source_prompt = index["source_prompt"] if source_prompt is None else source_prompt
    cameras: Dict[str, Dict[str, object]] = {}
    for name in index["videos"]:
        video = Path(run_dir) / FOLDER / name
        if not video.is_file():
            raise InputError(f"{video}: listed in {FOLDER}/{INDEX} but missing")
        cameras[Path(name).stem] = edit_metrics(read_pairs(video), prompt, source_prompt, clip, index["temporal"])
    return {"prompt": prompt, "cameras": cameras, "all": _combine(list(cameras.values()))}


def _combine(reports: List[Dict[str, object]]) -> Dict[str, object]:
    frames = sum(int(report["frames"]) for report in reports)
    combined: Dict[str, object] = {"frames": frames}
    names = [name for name in reports[0] if name != "frames"] if reports else []
    for name in names:
        if name.startswith("warp_") and name != "warp_valid_fraction":
            weights = [float(r["warp_valid_fraction"]) * int(r["frames"]) for r in reports if name in r]
        else:
            weights = [int(r["frames"]) for r in reports if name in r]
        values = [float(r[name]) for r in reports if name in r]
        if sum(weights) > 0:
            combined[name] = float(np.dot(values, weights) / sum(weights))
    return combined
