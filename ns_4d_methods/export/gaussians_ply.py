"""Per-frame 3DGS ``.ply`` files: a deformable-Gaussian model at chosen times, each frame in the INRIA layout that
splat viewers read (x y z, nx ny nz, f_dc_0..2, f_rest_0.., opacity as a logit, scale_0..2 as logs, rot_0..3 as a
w-first quaternion), plus ``index.json`` naming the frames, their times and the run.

The deformation is applied to everything it changes: positions, rotations, scales and opacities are the model's
values at the frame's time (4DGaussians' ``export_perframe_3DGS.py`` writes the undeformed opacity, its issue #229).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from plyfile import PlyData, PlyElement

from ns_4d_methods.export.deformed_gaussians import Gaussians, gaussians_at
from ns_4d_methods.models.splatfacto_4d import Splatfacto4DModel

INDEX_NAME = "index.json"


def write_gaussians_ply(gaussians: Gaussians, path: Path) -> None:
    """Writes ``gaussians`` as a binary little-endian 3DGS ``.ply`` at ``path``."""
    n, k = len(gaussians), gaussians.sh.shape[1]
    # INRIA's f_rest order is channel-major: all of red's higher coefficients, then green's, then blue's.
    rest = gaussians.sh[:, 1:].transpose(1, 2).reshape(n, 3 * (k - 1))
    columns: Dict[str, np.ndarray] = {}
    for axis, name in enumerate("xyz"):
        columns[name] = gaussians.means[:, axis].numpy()
    for name in ("nx", "ny", "nz"):
        columns[name] = np.zeros(n, dtype=np.float32)
    for c in range(3):
        columns[f"f_dc_{c}"] = gaussians.sh[:, 0, c].numpy()
    for i in range(rest.shape[1]):
        columns[f"f_rest_{i}"] = rest[:, i].numpy()
    columns["opacity"] = torch.logit(gaussians.opacities.double(), eps=1e-7).float().numpy()
    for i in range(3):
        columns[f"scale_{i}"] = torch.log(gaussians.scales[:, i]).numpy()
    for i in range(4):
        columns[f"rot_{i}"] = gaussians.quats[:, i].numpy()
    vertices = np.empty(n, dtype=[(name, "f4") for name in columns])
    for name, values in columns.items():
        vertices[name] = values
    PlyData([PlyElement.describe(vertices, "vertex")], byte_order="<").write(str(path))


def read_gaussians_ply(path: Path) -> Gaussians:
    """A 3DGS ``.ply`` read back with ``plyfile`` (the inverse of :func:`write_gaussians_ply`)."""
    vertex = PlyData.read(str(path))["vertex"]
    column = lambda name: torch.from_numpy(np.asarray(vertex[name], dtype=np.float32))  # noqa: E731
    names = [p.name for p in vertex.properties]
    num_rest = sum(name.startswith("f_rest_") for name in names) // 3
    n = len(vertex.data)
    rest = torch.stack([column(f"f_rest_{i}") for i in range(3 * num_rest)], -1) if num_rest else torch.zeros(n, 0)
    sh = torch.cat([torch.stack([column(f"f_dc_{c}") for c in range(3)], -1)[:, None],
                    rest.reshape(n, 3, num_rest).transpose(1, 2)], dim=1)
    return Gaussians(
        means=torch.stack([column(a) for a in "xyz"], -1),
        quats=torch.stack([column(f"rot_{i}") for i in range(4)], -1),
        scales=torch.exp(torch.stack([column(f"scale_{i}") for i in range(3)], -1)),
        opacities=torch.sigmoid(column("opacity")),
        sh=sh,
    )


def frame_name(index: int) -> str:
    return f"frame_{index:05d}.ply"


def export_gaussian_frames(
    model: Splatfacto4DModel, times: Sequence[float], output_dir: Path, source: str
) -> List[Path]:
    """One ``.ply`` per time in ``output_dir`` (created) and ``index.json`` with the times, the frame count and the
    ``source`` run; returns the frame paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, time in enumerate(times):
        paths.append(output_dir / frame_name(index))
        write_gaussians_ply(gaussians_at(model, time), paths[-1])
    index = {
        "format": "3dgs-ply",
        "source": source,
        "num_frames": len(paths),
        "frames": [{"file": path.name, "time": float(t)} for path, t in zip(paths, times)],
    }
    (output_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return paths
