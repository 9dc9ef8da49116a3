"""The sample scene as a 4diffusion input: an RGBA object video from one fixed camera, and ground-truth orbit views.

``ns-4d-sample-scene DIR --object-video`` (or :func:`write_object_video`) writes, under ``DIR/object/``:

- ``frames/00000.png ...``: ``num_frames`` RGBA frames (transparent background) of the three moving spheres, scaled
  by ``scale`` to fit 4Diffusion's cameras, seen from the input view (elevation 0, azimuth -90, distance 1.1, fovy
  45 deg; threestudio's convention, :mod:`ns_4d_methods.render.orbit_cameras`); frame ``i`` shows the scene at time
  ``time_span * i / (num_frames - 1)`` (by default one cycle of the sample scene's motion: the red sphere bounces, the
  blue one circles within its own outline, the green one spins). ``ns-train 4diffusion --data
  DIR/object/frames`` reads it.
- ``video.webm``: the same frames as VP9 with alpha (when the bundled ffmpeg can encode it).
- ``gt_views/views.json`` and ``gt_views/azXXX/NNN.png``: ground-truth videos at ``gt_azimuths`` (default: the
  other three anchor views, azimuths 0, 90 and 180; same elevation, distance and fovy), for ``--pipeline.gt-views``.
  Their ``times`` are 4diffusion's instants: the video's 8 sampled frames ``int(N / 8 * i)`` become the instants
  ``i / 7``, so an instant ``tau`` shows the scene at time ``time_span * tau * int(N / 8 * 7) / (N - 1)``
  (:func:`scene_time`); the views sample ``gt_instants`` instants evenly, the 8 fitted ones and those in between.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Sequence

import imageio_ffmpeg
import numpy as np
from PIL import Image

from ns_4d_methods.cli.sample_scene import render
from ns_4d_methods.data.object_video import MIN_FRAMES, sample_indices
from ns_4d_methods.render.orbit_cameras import orbit_c2w

OBJECT_SCALE = 0.3
"""The spheres span about 1.45 units from the origin; 4Diffusion's cameras (distance 1.1, fovy 45) see 0.45."""
TIME_SPAN = 1.0
"""Part of the sample scene's motion (times [0, 1]) that the object video shows."""


def render_object(
    elevation: float,
    azimuth: float,
    distance: float,
    fovy: float,
    time: float,
    resolution: int,
    scale: float = OBJECT_SCALE,
) -> np.ndarray:
    """RGBA uint8 [S, S, 4] of the spheres scaled by ``scale`` at scene time ``time`` from an orbit camera.

    Scaling the scene by ``s`` looks the same as moving the camera to ``1 / s`` times its distance."""
    c2w = orbit_c2w(elevation, azimuth, distance / scale).double().numpy()
    return render(c2w, time, resolution, np.deg2rad(fovy))  # square images: horizontal fov = vertical fov


def scene_time(instant: float, num_frames: int, time_span: float = TIME_SPAN, num_sampled: int = MIN_FRAMES) -> float:
    """Scene time shown at 4diffusion's ``instant`` when it samples ``num_sampled`` of the ``num_frames`` frames of a
    video covering ``time_span`` of the scene's motion."""
    last = sample_indices(num_frames, num_sampled)[-1]
    return time_span * instant * last / (num_frames - 1)


def write_object_video(
    output_dir: Path,
    num_frames: int = 25,
    resolution: int = 128,
    elevation: float = 0.0,
    azimuth: float = -90.0,
    distance: float = 1.1,
    fovy: float = 45.0,
    scale: float = OBJECT_SCALE,
    time_span: float = TIME_SPAN,
    gt_azimuths: Sequence[float] = (0.0, 90.0, 180.0),
    gt_instants: int = 15,
) -> Path:
    """Writes the object video, its webm and the ground-truth views (see the module docstring); returns the folder."""
    frames_dir = output_dir / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    frames = []
    for index in range(num_frames):
        time = time_span * index / (num_frames - 1)
        frame = render_object(elevation, azimuth, distance, fovy, time, resolution, scale)
        Image.fromarray(frame).save(frames_dir / f"{index:05d}.png")
        frames.append(frame)
    _write_webm(output_dir / "video.webm", frames)

    gt_dir = output_dir / "gt_views"
    instants = np.linspace(0.0, 1.0, gt_instants).tolist()
    views = []
    for view_azimuth in gt_azimuths:
        name = f"az{int(round(view_azimuth)):03d}"
        (gt_dir / name).mkdir(parents=True, exist_ok=True)
        for k, instant in enumerate(instants):
            time = scene_time(instant, num_frames, time_span)
            frame = render_object(elevation, view_azimuth, distance, fovy, time, resolution, scale)
            Image.fromarray(frame).save(gt_dir / name / f"{k:03d}.png")
        views.append(
            {
                "name": name,
                "elevation": elevation,
                "azimuth": view_azimuth,
                "distance": distance,
                "fovy": fovy,
                "frames": [f"{name}/{k:03d}.png" for k in range(len(instants))],
                "times": instants,
            }
        )
    (gt_dir / "views.json").write_text(json.dumps({"views": views}, indent=1) + "\n")
    return output_dir


def _write_webm(path: Path, frames: Sequence[np.ndarray]) -> None:
    """VP9 with an alpha plane (yuva420p); skipped when the bundled ffmpeg has no libvpx-vp9 encoder."""
    height, width = frames[0].shape[:2]
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-loglevel",
        "error",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgba",
        "-s",
        f"{width}x{height}",
        "-r",
        "12",
        "-i",
        "-",
        "-c:v",
        "libvpx-vp9",
        "-pix_fmt",
        "yuva420p",
        "-lossless",
        "1",
        str(path),
    ]
    result = subprocess.run(command, input=np.stack(frames).tobytes(), capture_output=True)
    if result.returncode != 0:
        path.unlink(missing_ok=True)
