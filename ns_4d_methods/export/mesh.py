"""Meshes of a 4D model: marching cubes on its density at chosen times, vertex colours from its field, and an
animated mesh with one topology for the Gaussian models.

- NeRFs (nerfacto-4d, 4diffusion, instruct4d): the density and colour are the field's at (x, t). The 4D hash grid
  models each time on its own (a 3D grid plus a 4D grid, no deformation), so nothing tells where a surface point goes
  over time: their meshes are one per time, each with its own topology, and no animated mesh can be made.
- Deformable Gaussians (splatfacto-4d, 4real, unified-edit): the density is the sum of the Gaussians' opacity-weighted
  kernels; the canonical Gaussians are meshed once and each vertex follows the Gaussians around it (inverse-distance
  blend of its nearest Gaussians' displacements under the deformation), which gives one topology for every time:
  a glTF 2.0 binary (``.glb``) with one morph target per time and an animation of the morph weights, which Blender,
  Maya and game engines import.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from nerfstudio.cameras.rays import Frustums, RaySamples
from nerfstudio.field_components.field_heads import FieldHeadNames
from plyfile import PlyData, PlyElement
from skimage.measure import marching_cubes
from torch import Tensor

from ns_4d_methods.export.deformed_gaussians import Gaussians, active_sh_degree, gaussians_at
from ns_4d_methods.models.splatfacto_4d import Splatfacto4DModel

DensityFn = Callable[[Tensor], Tensor]
"""Points [M, 3] -> density [M] at a fixed time."""
ColourFn = Callable[[Tensor, Tensor], Tensor]
"""Points [M, 3] and outward normals [M, 3] -> RGB in [0, 1] [M, 3] at a fixed time."""


@dataclass
class Mesh:
    vertices: np.ndarray
    """[V, 3] float32 positions."""
    faces: np.ndarray
    """[F, 3] int32 vertex indices, counter-clockwise seen from outside."""
    normals: np.ndarray
    """[V, 3] outward unit normals."""
    colours: np.ndarray
    """[V, 3] uint8 vertex colours."""


def _evaluate(fn: Callable[..., Tensor], *inputs: Tensor, chunk: int = 1 << 16) -> Tensor:
    return torch.cat([fn(*(x[i : i + chunk] for x in inputs)) for i in range(0, len(inputs[0]), chunk)])


@torch.no_grad()
def extract_mesh(
    density_fn: DensityFn, colour_fn: ColourFn, box: Tensor, resolution: int, threshold: float,
    quantile: Optional[float] = None,
) -> Mesh:
    """Marching cubes on ``density_fn`` sampled on a ``resolution``^3 grid over ``box`` [2, 3] (min, max corners):
    the surface where the density crosses ``threshold`` (or, given ``quantile``, that quantile of the sampled
    densities), coloured by ``colour_fn`` looking at it from outside."""
    box = box.float().cpu()
    axes = [torch.linspace(float(box[0, k]), float(box[1, k]), resolution) for k in range(3)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    density = _evaluate(density_fn, grid).reshape(resolution, resolution, resolution).float().numpy()
    if quantile is not None:
        threshold = float(np.quantile(density, quantile))
    if not density.min() < threshold < density.max():
        raise ValueError(f"the density ({density.min():.3g} to {density.max():.3g}) never crosses {threshold:g}")
    spacing = tuple(float(box[1, k] - box[0, k]) / (resolution - 1) for k in range(3))
    # "descent": normals point where the density falls, out of the object; faces are then counter-clockwise outside
    vertices, faces, normals, _ = marching_cubes(density, threshold, spacing=spacing, gradient_direction="descent")
    vertices = vertices + box[0].numpy()
    v, n = torch.from_numpy(vertices).float(), torch.from_numpy(normals.copy()).float()
    colours = _evaluate(colour_fn, v, n).clamp(0, 1).numpy()
    return Mesh(vertices.astype(np.float32), faces[:, ::-1].astype(np.int32).copy(), normals.astype(np.float32),
                (colours * 255 + 0.5).astype(np.uint8))


# ---- NeRFs ----------------------------------------------------------------------------------------------------------
def nerf_density_fn(model, time: float) -> DensityFn:
    """The density of a nerfacto-4d field (nerfacto-4d, 4diffusion, instruct4d) at ``time``."""
    field = model.field
    return lambda points: field.density_fn(points.to(model.device), times=torch.full_like(points[:, :1], time).to(
        model.device))[..., 0].cpu()


def nerf_colour_fn(model, time: float) -> ColourFn:
    """The field's colour at ``time`` seen along -normal (from outside), average appearance embedding."""
    field = model.field

    def colour(points: Tensor, normals: Tensor) -> Tensor:
        points, normals = points.to(model.device), normals.to(model.device)
        ones = torch.ones_like(points[:, :1])
        samples = RaySamples(
            frustums=Frustums(origins=points, directions=-normals, starts=0 * ones, ends=0 * ones, pixel_area=ones),
            camera_indices=torch.zeros_like(ones, dtype=torch.long),
            times=ones * time,
        )
        return field(samples)[FieldHeadNames.RGB].cpu()

    return colour


# ---- deformable Gaussians -------------------------------------------------------------------------------------------
def gaussian_density_fn(gaussians: Gaussians, voxel: float, max_radius: int = 4) -> DensityFn:
    """sum_i opacity_i exp(-d^T Sigma_i^-1 d / 2) at points (opacity-weighted kernels). Each Gaussian reaches the
    points within 3 sigma; to keep it to one pass over the Gaussians, points are binned on a ``voxel`` grid and a
    Gaussian visits at most ``max_radius`` bins each way."""
    rotation = _quat_to_matrix(gaussians.quats)
    precision = rotation @ torch.diag_embed(gaussians.scales.clamp_min(1e-8) ** -2) @ rotation.transpose(1, 2)
    reach = (3 * gaussians.scales.max(1).values / voxel).ceil().clamp(1, max_radius).long()

    def density(points: Tensor) -> Tensor:
        origin = points.min(0).values
        cells = ((points - origin) / voxel).round().long()
        size = cells.max(0).values + 1
        cell_index = torch.full((int(size.prod()),), -1, dtype=torch.long)
        flat = (cells[:, 0] * size[1] + cells[:, 1]) * size[2] + cells[:, 2]
        cell_index[flat] = torch.arange(len(points))
        out = torch.zeros(len(points))
        centre_cells = ((gaussians.means - origin) / voxel).round().long()
        r = int(reach.max())
        offsets = torch.stack(torch.meshgrid(*[torch.arange(-r, r + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
        for start in range(0, len(gaussians), 2048):
            ids = torch.arange(start, min(start + 2048, len(gaussians)))
            target = centre_cells[ids, None] + offsets[None]  # [B, O, 3]
            valid = ((target >= 0) & (target < size)).all(-1) & (offsets.abs().max(-1).values[None] <= reach[ids, None])
            flat_target = (target[..., 0] * size[1] + target[..., 1]) * size[2] + target[..., 2]
            point = torch.where(valid, cell_index[flat_target.clamp(0, len(cell_index) - 1)], -1)
            valid &= point >= 0
            b, o = valid.nonzero(as_tuple=True)
            d = points[point[b, o]] - gaussians.means[ids[b]]
            mahalanobis = (d[:, None] @ precision[ids[b]] @ d[:, :, None]).reshape(-1)
            out.index_add_(0, point[b, o], gaussians.opacities[ids[b]] * torch.exp(-0.5 * mahalanobis))
        return out

    return density


def _quat_to_matrix(quats: Tensor) -> Tensor:
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(-1, 3, 3)


def _nearest(points: Tensor, centres: Tensor, k: int) -> tuple:
    """Distances and indices [M, k] of each point's ``k`` nearest centres."""
    found = [torch.cdist(points[i : i + 4096], centres).topk(k, largest=False) for i in range(0, len(points), 4096)]
    return torch.cat([f.values for f in found]), torch.cat([f.indices for f in found])


def gaussian_colour_fn(model: Splatfacto4DModel, gaussians: Gaussians, k: int = 8) -> ColourFn:
    """The view-independent colour of the nearest Gaussians, weighted by opacity and inverse distance."""
    dc = gaussians.sh[:, 0]
    rgb = torch.sigmoid(dc) if active_sh_degree(model) is None else (dc * 0.28209479177387814 + 0.5).clamp(0, 1)

    def colour(points: Tensor, normals: Tensor) -> Tensor:
        distance, index = _nearest(points, gaussians.means, k)
        weight = gaussians.opacities[index] / (distance + 1e-6)
        return (weight[..., None] * rgb[index]).sum(1) / weight.sum(1, keepdim=True)

    return colour


@torch.no_grad()
def follow_gaussians(model: Splatfacto4DModel, vertices: np.ndarray, reference_time: float, times: Sequence[float],
                     k: int = 4) -> List[np.ndarray]:
    """Vertex positions [V, 3] at each of ``times`` for a mesh of the Gaussians at ``reference_time``: each vertex
    moves with the inverse-distance blend of its ``k`` nearest Gaussians' displacements (so the topology is kept)."""
    reference = gaussians_at(model, reference_time).means
    v = torch.from_numpy(vertices).float()
    distance, index = _nearest(v, reference, k)
    weight = 1.0 / (distance + 1e-6)
    weight = weight / weight.sum(1, keepdim=True)
    frames = []
    for time in times:
        displacement = gaussians_at(model, time).means - reference
        frames.append((v + (weight[..., None] * displacement[index]).sum(1)).numpy())
    return frames


# ---- files ----------------------------------------------------------------------------------------------------------
def write_mesh_ply(mesh: Mesh, path: Path) -> None:
    """A binary PLY with vertex positions, normals and colours (red, green, blue) and triangle faces."""
    vertex = np.empty(len(mesh.vertices), dtype=[(n, "f4") for n in ("x", "y", "z", "nx", "ny", "nz")]
                      + [(n, "u1") for n in ("red", "green", "blue")])
    for k, name in enumerate("xyz"):
        vertex[name] = mesh.vertices[:, k]
        vertex[f"n{name}"] = mesh.normals[:, k]
    for k, name in enumerate(("red", "green", "blue")):
        vertex[name] = mesh.colours[:, k]
    face = np.empty(len(mesh.faces), dtype=[("vertex_indices", "i4", (3,))])
    face["vertex_indices"] = mesh.faces
    PlyData([PlyElement.describe(vertex, "vertex"), PlyElement.describe(face, "face")]).write(str(path))


def write_animated_glb(mesh: Mesh, frames: Sequence[np.ndarray], times: Sequence[float], path: Path,
                       seconds: float) -> None:
    """glTF 2.0 binary: ``mesh`` (positions, normals, colours, triangles) with one morph target per frame
    (displacements from ``mesh.vertices``) and an animation that plays the frames over ``seconds`` (frame k at
    ``times[k] * seconds``, linear in between)."""
    blobs: List[bytes] = []
    views, accessors = [], []

    def add(array: np.ndarray, component: int, kind: str, target: int = None, bounds: bool = False) -> int:
        data = np.ascontiguousarray(array).tobytes()
        offset = sum(len(b) for b in blobs)
        blobs.append(data + b"\0" * (-len(data) % 4))
        views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(data), **({"target": target} if target
                                                                                    else {})})
        accessor = {"bufferView": len(views) - 1, "componentType": component, "count": len(array), "type": kind}
        if bounds:
            accessor.update(min=array.min(0).tolist(), max=array.max(0).tolist())
        accessors.append(accessor)
        return len(accessors) - 1

    float_, uint, ubyte = 5126, 5125, 5121
    attributes = {
        "POSITION": add(mesh.vertices.astype("<f4"), float_, "VEC3", 34962, bounds=True),
        "NORMAL": add(mesh.normals.astype("<f4"), float_, "VEC3", 34962),
        "COLOR_0": add(np.concatenate([mesh.colours, np.full((len(mesh.colours), 1), 255, np.uint8)], 1), ubyte,
                       "VEC4", 34962),
    }
    indices = add(mesh.faces.astype("<u4").reshape(-1), uint, "SCALAR", 34963)
    targets = [{"POSITION": add((frame - mesh.vertices).astype("<f4"), float_, "VEC3", 34962, bounds=True)}
               for frame in frames]
    n = len(frames)
    key_times = add(np.asarray(times, "<f4") * seconds, float_, "SCALAR", bounds=True)
    key_weights = add(np.eye(n, dtype="<f4").reshape(-1), float_, "SCALAR")
    accessors[attributes["COLOR_0"]]["normalized"] = True
    gltf = {
        "asset": {"version": "2.0", "generator": "ns-4d-export"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "mesh"}],
        "meshes": [{"primitives": [{"attributes": attributes, "indices": indices, "targets": targets}],
                    "weights": [1.0] + [0.0] * (n - 1),
                    "extras": {"targetNames": [f"t={t:g}" for t in times]}}],
        "animations": [{"channels": [{"sampler": 0, "target": {"node": 0, "path": "weights"}}],
                        "samplers": [{"input": key_times, "output": key_weights, "interpolation": "LINEAR"}]}],
        "buffers": [{"byteLength": sum(len(b) for b in blobs)}],
        "bufferViews": views,
        "accessors": accessors,
    }
    text = json.dumps(gltf).encode()
    text += b" " * (-len(text) % 4)
    binary = b"".join(blobs)
    with open(path, "wb") as file:
        file.write(struct.pack("<III", 0x46546C67, 2, 12 + 8 + len(text) + 8 + len(binary)))
        file.write(struct.pack("<II", len(text), 0x4E4F534A) + text)
        file.write(struct.pack("<II", len(binary), 0x004E4942) + binary)
