"""How a generated 4D object is scored (4Diffusion's table): CLIP-I, CLIP-C and, against ground-truth novel-view
videos, PSNR / SSIM / LPIPS.

- **CLIP-I**: mean cosine similarity of the CLIP image embeddings of the renders at the input view and the input
  frames they should match (same instants).
- **CLIP-C**: mean cosine similarity of the CLIP image embeddings of consecutive frames of each rendered view's video
  (temporal consistency), averaged over the views.
- **Ground-truth views** (``--pipeline.gt-views DIR``): ``DIR/views.json`` lists the views, each with its camera on
  the orbit (threestudio convention, see :mod:`ns_4d_methods.render.orbit_cameras`) and its frames with their
  instants::

      {"views": [{"name": "az090", "elevation": 0.0, "azimuth": 90.0, "distance": 1.1, "fovy": 45.0,
                  "frames": ["az090/000.png", ...], "times": [0.0, ...]}, ...]}

  Frames are RGBA (composited on white) or RGB on white; renders at those cameras and instants are compared with
  :func:`~ns_4d_methods.models.image_metrics.image_metrics` (LPIPS only when its weights are on disk).

CLIP comes from :class:`~ns_4d_methods.editing.edit_metrics.ClipEmbedder` (skipped with one line when its weights
cannot be loaded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ns_4d_methods.editing.edit_metrics import ClipEmbedder
from ns_4d_methods.errors import InputError

Frame = np.ndarray  # [H, W, 3] uint8 RGB

VIEWS_FILE = "views.json"


def clip_similarity(frames: Sequence[Frame], references: Sequence[Frame], clip: ClipEmbedder) -> float:
    """CLIP-I: mean cosine similarity of paired frames."""
    return float((clip.images(list(frames)) * clip.images(list(references))).sum(-1).mean())


def clip_consistency(videos: Sequence[Sequence[Frame]], clip: ClipEmbedder) -> float:
    """CLIP-C: mean cosine similarity of consecutive frames, averaged over the videos."""
    scores = []
    for video in videos:
        embeddings = clip.images(list(video))
        scores.append(float((embeddings[1:] * embeddings[:-1]).sum(-1).mean()))
    return float(np.mean(scores))


@dataclass
class GroundTruthView:
    """One ground-truth novel-view video."""

    name: str
    """The view's name (for reports)."""
    elevation: float
    """Elevation in degrees."""
    azimuth: float
    """Azimuth in degrees (threestudio convention)."""
    distance: float
    """Camera distance from the origin."""
    fovy: float
    """Vertical field of view in degrees."""
    frames: List[Path]
    """The frame images."""
    times: List[float]
    """The instant of each frame, in [0, 1]."""


def read_gt_views(folder: Path) -> List[GroundTruthView]:
    """The views of a ground-truth folder (format in the module docstring); one-line errors for bad input."""
    field_name = "--pipeline.gt-views"
    index = folder / VIEWS_FILE
    if not index.is_file():
        raise InputError(f"{field_name} {folder}: no {VIEWS_FILE} (expected the views' cameras and frames)")
    try:
        entries = json.loads(index.read_text())["views"]
        views = [
            GroundTruthView(
                str(entry["name"]),
                float(entry["elevation"]),
                float(entry["azimuth"]),
                float(entry["distance"]),
                float(entry["fovy"]),
                [folder / name for name in entry["frames"]],
                [float(t) for t in entry["times"]],
            )
            for entry in entries
        ]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{field_name} {index}: not a valid views file ({type(error).__name__}: {error})") from None
    for view in views:
        if len(view.frames) != len(view.times) or not view.frames:
            raise InputError(f"{field_name} {index}: view {view.name} needs one time per frame and at least one frame")
        missing = [str(path) for path in view.frames if not path.is_file()]
        if missing:
            raise InputError(f"{field_name} {index}: view {view.name}: missing frame {missing[0]}")
    return views


def read_on_white(path: Path, size: int) -> torch.Tensor:
    """An RGB(A) image composited on white, then resized (area filter) to [size, size, 3] in [0, 1]."""
    try:
        with Image.open(path) as image:
            rgba = torch.from_numpy(np.asarray(image.convert("RGBA")).astype(np.float32) / 255.0)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise InputError(f"{path}: cannot read an image ({type(error).__name__})") from error
    rgb = (rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])).permute(2, 0, 1)[None]
    if rgb.shape[-1] != size or rgb.shape[-2] != size:
        rgb = torch.nn.functional.interpolate(rgb, size=(size, size), mode="area")
    return rgb[0].permute(1, 2, 0).clamp(0.0, 1.0)
