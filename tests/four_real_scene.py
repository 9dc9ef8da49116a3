"""Videos of ``ns-4d-sample-scene``'s analytic spheres for the 4real tests: a reference video (one camera, time
moving) and a freeze-time video (the camera orbiting, time still), rendered exactly, optionally over a textured
ground plane so that structure from motion finds features; and the stage artefacts of a 4real run written directly
from the true cameras (no structure from motion), as the cameras stage would write them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image

from ns_4d_methods.cli.sample_scene import look_at, render
from ns_4d_methods.guidance.video_models import save_video

CAMERA_ANGLE_X = 0.6911
DISTANCE = 4.0
GROUND_Z = -1.05


def camera_pose(azimuth_deg: float, elevation_deg: float, distance: float = DISTANCE) -> np.ndarray:
    """OpenGL camera-to-world [4, 4] on a sphere around the scene, looking at its centre."""
    azimuth, elevation = math.radians(azimuth_deg), math.radians(elevation_deg)
    position = distance * np.array(
        [math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)]
    )
    return look_at(position)


def _ground_colour(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A fixed, non-repeating colour texture on the ground plane: random-coloured cells plus sinusoids."""
    rng = np.random.default_rng(7)
    palette = rng.uniform(0.15, 0.95, size=(64, 64, 3))
    cells = palette[np.floor(x / 0.18).astype(int) % 64, np.floor(y / 0.18).astype(int) % 64]
    waves = sum(
        np.sin(fx * x + fy * y + phase)[..., None] * amplitude
        for fx, fy, phase, amplitude in zip(
            rng.uniform(-25, 25, 6), rng.uniform(-25, 25, 6), rng.uniform(0, 6.3, 6), rng.uniform(0.03, 0.08, (6, 3))
        )
    )
    return np.clip(cells + waves, 0.0, 1.0)


def render_rgb(c2w: np.ndarray, t: float, resolution: int, ground: bool) -> np.ndarray:
    """uint8 RGB [resolution, resolution, 3]: the spheres at time ``t`` over white, or over a textured ground plane
    (the spheres stay above it, so seen from above they are always in front of it)."""
    rgba = render(c2w, t, resolution, CAMERA_ANGLE_X).astype(np.float64) / 255.0
    alpha = rgba[..., 3:]
    background = np.ones((resolution, resolution, 3))
    if ground:
        focal = 0.5 * resolution / math.tan(0.5 * CAMERA_ANGLE_X)
        j, i = np.meshgrid(np.arange(resolution) + 0.5, np.arange(resolution) + 0.5, indexing="ij")
        dirs = np.stack([(i - resolution / 2) / focal, -(j - resolution / 2) / focal, -np.ones_like(i)], -1)
        dirs = dirs @ c2w[:3, :3].T
        origin = c2w[:3, 3]
        distance = (GROUND_Z - origin[2]) / np.where(np.abs(dirs[..., 2]) > 1e-9, dirs[..., 2], -1e-9)
        hit = distance > 0
        x, y = origin[0] + distance * dirs[..., 0], origin[1] + distance * dirs[..., 1]
        background = np.where(hit[..., None], _ground_colour(x, y), np.array([0.75, 0.85, 0.95]))
    rgb = alpha * rgba[..., :3] + (1 - alpha) * background
    return (rgb * 255 + 0.5).astype(np.uint8)


def reference_video(pose: np.ndarray, num_frames: int, resolution: int, ground: bool) -> np.ndarray:
    """[num_frames, res, res, 3]: the fixed camera ``pose``, times k / (num_frames - 1)."""
    return np.stack([render_rgb(pose, k / (num_frames - 1), resolution, ground) for k in range(num_frames)])


def freeze_time_video(
    azimuths: Sequence[float], elevation: float, time: float, resolution: int, ground: bool
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Frames and poses of the camera orbiting over ``azimuths`` (degrees) at a fixed ``time``."""
    poses = [camera_pose(azimuth, elevation) for azimuth in azimuths]
    return np.stack([render_rgb(pose, time, resolution, ground) for pose in poses]), poses


def write_run_artefacts(
    run_dir: Path,
    reference: np.ndarray,
    freeze: np.ndarray,
    poses: Sequence[np.ndarray],
    canonical_index: int,
    points: np.ndarray,
    colours: np.ndarray,
) -> None:
    """Stages 1-3 of a 4real run with the true cameras, in the layout the stages write (videos by
    ``save_video``, ``cameras/transforms.json`` + ``sparse_pc.ply`` as the cameras stage writes them)."""
    save_video(reference, run_dir / "reference_video", 8, {"source": "analytic spheres"})
    save_video(freeze, run_dir / "freeze_time", 8, {"canonical_index": canonical_index, "source": "analytic spheres"})
    cameras = run_dir / "cameras"
    (cameras / "images").mkdir(parents=True)
    resolution = freeze.shape[1]
    focal = 0.5 * resolution / math.tan(0.5 * CAMERA_ANGLE_X)
    frames = []
    for index, (frame, pose) in enumerate(zip(freeze, poses)):
        Image.fromarray(frame).save(cameras / "images" / f"{index:05d}.png")
        frames.append({"file_path": f"images/{index:05d}.png", "transform_matrix": pose.tolist(), "frame_index": index})
    transforms = {
        "w": resolution, "h": resolution, "fl_x": focal, "fl_y": focal, "cx": resolution / 2, "cy": resolution / 2,
        "camera_model": "SIMPLE_PINHOLE", "frames": frames, "ply_file_path": "sparse_pc.ply",
        "num_video_frames": len(freeze),
    }  # fmt: skip
    (cameras / "transforms.json").write_text(json.dumps(transforms, indent=2))
    header = (
        f"ply\nformat ascii 1.0\nelement vertex {len(points)}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    rows = "\n".join(f"{x:.6f} {y:.6f} {z:.6f} {r} {g} {b}" for (x, y, z), (r, g, b) in zip(points, colours))
    (cameras / "sparse_pc.ply").write_text(header + rows + "\n")
