"""``ns-4d-sample-scene``: render a small synthetic dynamic scene in the D-NeRF format.

Three textured spheres move over time (one bounces, one orbits, one turns back and forth) and are ray-cast analytically
from cameras on the upper hemisphere, one camera per instant, as in D-NeRF's monocular "teleporting" captures. The
output is ``transforms_{train,val,test}.json`` plus RGBA PNGs with a transparent background, readable by
nerfstudio's ``dnerf-data`` parser, so ``ns-train nerfacto-4d --data DIR`` runs on it with no download. A sparse
point cloud on the spheres' surfaces at time 0, with their colours (``points3d.ply``, named by
``transforms_train.json``'s ``ply_file_path`` as nerfstudio names one), lets ``dnerf-points-data`` start Gaussian
models on the surfaces, as structure from motion would for a real capture.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
import tyro
from PIL import Image

from ns_4d_methods.errors import InputError

LIGHT = np.array([0.4, 0.3, 0.85]) / np.linalg.norm([0.4, 0.3, 0.85])


@dataclass
class SampleScene:
    """Render a small synthetic moving scene in the D-NeRF format."""

    output_dir: tyro.conf.Positional[Path]
    """Directory to write the scene to (created; must be empty or absent)."""
    resolution: int = 128
    """Width and height of every image in pixels."""
    num_train: int = 100
    """Training frames (one camera per instant, times evenly spread over [0, 1])."""
    num_val: int = 10
    """Validation frames."""
    num_test: int = 10
    """Test frames (cameras and times not in the training set)."""
    camera_distance: float = 4.0
    """Distance of every camera from the scene centre."""
    camera_angle_x: float = 0.6911
    """Horizontal field of view in radians (D-NeRF's value)."""
    num_points: int = 10000
    """Points of the sparse point cloud (0: none). 10,000 is splatfacto-4d's cap without CUDA (the compact preset),
    so the Gaussian count, and with it the step time, is the same from the first step to the last."""
    seed: int = 0
    """Seed for the camera positions and the points."""
    object_video: bool = False
    """Also write a 4diffusion input under OUTPUT_DIR/object: an RGBA video of the spheres from one fixed camera and
    ground-truth orbit views (see ns_4d_methods.cli.sample_object_video)."""

    def main(self) -> None:
        if self.output_dir.exists() and any(self.output_dir.iterdir()):
            raise InputError(f"{self.output_dir}: directory is not empty (expected a new or empty directory)")
        if self.resolution < 8:
            raise InputError(f"--resolution {self.resolution}: expected at least 8 pixels")
        rng = np.random.default_rng(self.seed)
        for split, count in (("train", self.num_train), ("val", self.num_val), ("test", self.num_test)):
            write_split(self, split, count, rng)
        if self.num_points > 0:
            write_points(self.output_dir, self.num_points, rng)
        if self.object_video:
            from ns_4d_methods.cli.sample_object_video import write_object_video  # it renders with this module

            write_object_video(self.output_dir / "object", resolution=self.resolution)
        print(f"Wrote a {self.resolution}px dynamic scene to {self.output_dir}")


def spheres_at(t: float) -> List[Tuple[np.ndarray, float, np.ndarray, float]]:
    """(centre, radius, colour, spin angle) of each sphere at time t in [0, 1].

    Each sphere moves less than its own size: a deformation field learns such motion from the photometric loss in a
    few thousand steps. In the first version of this scene one sphere orbited 5 radii away and another spun whole
    turns under stripes that repeat every 60 degrees; the reconstruction lost the first and blurred the second (the
    stripes look the same every 60 degrees, so the turn is ambiguous), so one orbits within its radius and the other
    turns back and forth by 20 degrees.
    """
    angle = 2 * math.pi * t
    return [
        (np.array([-0.6, 0.0, 0.35 + 0.25 * abs(math.sin(angle))]), 0.35, np.array([0.9, 0.25, 0.2]), 0.0),  # bounces
        (np.array([0.85 + 0.25 * math.cos(angle), 0.25 * math.sin(angle), 0.15]), 0.3, np.array([0.2, 0.45, 0.95]), 0.0),
        (np.array([0.3, 0.0, -0.55]), 0.45, np.array([0.25, 0.8, 0.3]), math.radians(20) * math.sin(angle)),  # turns
    ]


def surface_colour(normal: np.ndarray, colour: np.ndarray, spin: float) -> np.ndarray:
    """Shaded colour [..., 3] of a sphere's surface at unit normals [..., 3]: stripes in the sphere's own frame (they
    make rotation and motion visible to the reconstruction) under a fixed light, the same from every view."""
    azimuth = np.arctan2(normal[..., 1], normal[..., 0]) - spin
    latitude = np.arcsin(np.clip(normal[..., 2], -1.0, 1.0))
    stripes = 0.65 + 0.35 * np.sign(np.sin(6 * azimuth)) * np.sign(np.sin(5 * latitude))
    shade = 0.35 + 0.65 * np.clip(normal @ LIGHT, 0.0, 1.0)
    return colour * (stripes * shade)[..., None]


def look_at(position: np.ndarray) -> np.ndarray:
    """Camera-to-world matrix (OpenGL/Blender: the camera looks down -z, +y up) looking at the origin."""
    back = position / np.linalg.norm(position)
    right = np.cross([0.0, 0.0, 1.0], back)
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, back, position
    return c2w


def render(c2w: np.ndarray, t: float, resolution: int, camera_angle_x: float) -> np.ndarray:
    """RGBA uint8 image of the scene at time t seen from ``c2w``."""
    focal = 0.5 * resolution / math.tan(0.5 * camera_angle_x)
    j, i = np.meshgrid(np.arange(resolution) + 0.5, np.arange(resolution) + 0.5, indexing="ij")
    dirs = np.stack([(i - resolution / 2) / focal, -(j - resolution / 2) / focal, -np.ones_like(i)], -1)
    dirs = dirs @ c2w[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    origin = c2w[:3, 3]
    depth = np.full(dirs.shape[:2], np.inf)
    rgb = np.zeros(dirs.shape)
    for centre, radius, colour, spin in spheres_at(t):
        oc = origin - centre
        b = dirs @ oc
        disc = b**2 - (oc @ oc - radius**2)
        hit_t = -b - np.sqrt(np.maximum(disc, 0.0))
        hit = (disc > 0) & (hit_t > 0) & (hit_t < depth)
        normal = (origin + hit_t[..., None] * dirs - centre) / radius
        rgb = np.where(hit[..., None], surface_colour(normal, colour, spin), rgb)
        depth = np.where(hit, hit_t, depth)
    alpha = np.isfinite(depth)
    rgba = np.concatenate([np.clip(rgb, 0, 1), alpha[..., None]], -1)
    return (rgba * 255 + 0.5).astype(np.uint8)


def write_split(scene: SampleScene, split: str, count: int, rng: np.random.Generator) -> None:
    (scene.output_dir / split).mkdir(parents=True, exist_ok=True)
    frames = []
    for k in range(count):
        t = k / max(count - 1, 1)
        azimuth, elevation = rng.uniform(0, 2 * math.pi), rng.uniform(math.radians(10), math.radians(60))
        position = scene.camera_distance * np.array(
            [math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)]
        )
        c2w = look_at(position)
        name = f"r_{k:03d}"
        Image.fromarray(render(c2w, t, scene.resolution, scene.camera_angle_x)).save(
            scene.output_dir / split / f"{name}.png"
        )
        frames.append({"file_path": f"./{split}/{name}", "time": t, "transform_matrix": c2w.tolist()})
    meta = {"camera_angle_x": scene.camera_angle_x, "frames": frames}
    (scene.output_dir / f"transforms_{split}.json").write_text(json.dumps(meta, indent=2))


def surface_points(count: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """``count`` points [count, 3] float32 spread uniformly over the spheres' surfaces at time 0, and their colours
    [count, 3] uint8."""
    spheres = spheres_at(0.0)
    areas = np.array([radius**2 for _, radius, _, _ in spheres])
    owners = rng.choice(len(spheres), size=count, p=areas / areas.sum())
    normals = rng.normal(size=(count, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    points, colours = np.empty((count, 3)), np.empty((count, 3))
    for k, (centre, radius, colour, spin) in enumerate(spheres):
        mine = owners == k
        points[mine] = centre + radius * normals[mine]
        colours[mine] = surface_colour(normals[mine], colour, spin)
    return points.astype(np.float32), (np.clip(colours, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def write_points(output_dir: Path, count: int, rng: np.random.Generator) -> None:
    """``points3d.ply``: :func:`surface_points`; ``transforms_train.json`` names it under ``ply_file_path``."""
    import open3d as o3d  # imported here: it takes a second, and only the point cloud needs it

    points, colours = surface_points(count, rng)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
    cloud.colors = o3d.utility.Vector3dVector(colours.astype(np.float64) / 255.0)
    o3d.io.write_point_cloud(str(output_dir / "points3d.ply"), cloud)
    meta_path = output_dir / "transforms_train.json"
    meta = json.loads(meta_path.read_text())
    meta["ply_file_path"] = "points3d.ply"
    meta_path.write_text(json.dumps(meta, indent=2))


def entrypoint() -> None:
    tyro.cli(SampleScene).main()


if __name__ == "__main__":
    entrypoint()
