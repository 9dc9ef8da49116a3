"""``dnerf-points-data``: nerfstudio's D-NeRF parser plus an optional sparse point cloud.

``transforms_train.json`` may name a PLY file under ``ply_file_path`` (nerfstudio's key for the same thing in
``transforms.json``), relative to the scene directory. Its points and colours become the outputs'
``points3D_xyz``/``points3D_rgb`` metadata, which nerfstudio's pipeline hands to Gaussian models as seed points
(``ns-4d-sample-scene`` writes one, on the spheres' surfaces). Without the key everything is ``dnerf-data``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Type

import numpy as np
import torch
from nerfstudio.data.dataparsers.base_dataparser import DataparserOutputs
from nerfstudio.data.dataparsers.dnerf_dataparser import DNeRF, DNeRFDataParserConfig
from nerfstudio.plugins.registry_dataparser import DataParserSpecification
from nerfstudio.utils.io import load_from_json

from ns_4d_methods.errors import InputError


@dataclass
class DNeRFPointsDataParserConfig(DNeRFDataParserConfig):
    """D-NeRF synthetic scene, with the sparse point cloud that ``transforms_train.json`` names, if any."""

    _target: Type = field(default_factory=lambda: DNeRFPoints)
    load_3D_points: bool = True
    """Whether to read the point cloud named by ``ply_file_path`` (seed points for Gaussian models)."""


def read_points(path: Path, scale_factor: float) -> dict:
    """``points3D_xyz`` [N, 3] float32 (scaled like the camera origins) and ``points3D_rgb`` [N, 3] uint8 of a PLY."""
    import open3d as o3d  # imported here: it takes a second, and only point clouds need it

    if not path.is_file():
        raise InputError(f"{path}: point cloud named by ply_file_path not found")
    cloud = o3d.io.read_point_cloud(str(path))
    if not cloud.has_points():
        raise InputError(f"{path}: no points read (expected a PLY point cloud with x, y, z)")
    points = torch.from_numpy(np.asarray(cloud.points, dtype=np.float32)) * scale_factor
    colors = np.asarray(cloud.colors) if cloud.has_colors() else np.full((len(points), 3), 0.5)
    return {"points3D_xyz": points, "points3D_rgb": torch.from_numpy((colors * 255 + 0.5).astype(np.uint8))}


class DNeRFPoints(DNeRF):
    """:class:`DNeRF` whose training outputs carry the point cloud of ``ply_file_path``."""

    config: DNeRFPointsDataParserConfig

    def _generate_dataparser_outputs(self, split: str = "train") -> DataparserOutputs:
        outputs = super()._generate_dataparser_outputs(split)
        meta = load_from_json(self.data / f"transforms_{split}.json")
        if self.config.load_3D_points and "ply_file_path" in meta:
            outputs.metadata.update(read_points(self.data / meta["ply_file_path"], self.scale_factor))
        return outputs


dnerf_points_dataparser = DataParserSpecification(
    config=DNeRFPointsDataParserConfig(),
    description="D-NeRF synthetic scene plus the sparse point cloud its transforms_train.json names (ply_file_path)",
)
