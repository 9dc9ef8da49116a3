"""Depth-based projection of edited key views into other cameras (Instruct 4D-to-4D, multi-camera setting).

Every target pixel is lifted to 3D with the target's depth, projected into each key view, and the key view's colour
and depth are sampled there bilinearly. A reference is valid for that pixel when the projection lands inside the key
image in front of its camera and the key view sees the same surface: the 3D point back-projected from the key view's
depth lies within ``threshold`` (scene units) of the target's 3D point. This rejects pixels the key view sees
occluded. Several references are averaged, each weighted by the fraction of the target it covers; the result is
blended with the target's current image, and the remaining holes are repainted by the editor elsewhere.

Conventions: cameras are nerfstudio/OpenGL camera-to-world [..., 4, 4] (camera looks down -z, +y up, +x right);
intrinsics are pinhole [..., 3, 3] matrices in pixels whose pixel (row i, column j) has its centre at
(u, v) = (j + 0.5, i + 0.5), as nerfstudio's ray generator uses. Depth is either the distance along the pixel's ray
(``depth_kind="ray"``, what nerfstudio's NeRF depth renderer returns: distance along unit-norm ray directions) or the
z-depth in front of the camera (``depth_kind="z"``, what Gaussian rasterizers return). Images are [..., H, W, C]
floats. Everything runs on the tensors' device; nothing needs gradients.
"""

from __future__ import annotations

from typing import Literal, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

DepthKind = Literal["ray", "z"]

KEY_VIEW_THRESHOLD = 0.05
"""Re-projection distance under which a pixel is valid when projecting among key views (official code; in its LLFF
units: positions divided by 1.08 x the nearest depth bound)."""
OTHER_VIEW_THRESHOLD = 0.02
"""Re-projection distance for projecting key views into the remaining cameras (official code; LLFF units)."""

# OpenGL camera axes (x right, y up, z back) to the pinhole/OpenCV axes the intrinsics expect (y down, z front).
_GL_TO_CV = torch.tensor([1.0, -1.0, -1.0])


def backproject(depth: Tensor, intrinsics: Tensor, camera_to_world: Tensor, depth_kind: DepthKind = "ray") -> Tensor:
    """World points [B, H, W, 3] of every pixel of depth maps [B, H, W]."""
    _, height, width = depth.shape
    rows, cols = torch.meshgrid(
        torch.arange(height, device=depth.device, dtype=depth.dtype) + 0.5,
        torch.arange(width, device=depth.device, dtype=depth.dtype) + 0.5,
        indexing="ij",
    )
    pixels = torch.stack([cols, rows, torch.ones_like(cols)], dim=-1)  # [H, W, 3] homogeneous pixel centres
    return _pixels_to_world(pixels[None], depth, intrinsics, camera_to_world, depth_kind)


def project(points: Tensor, intrinsics: Tensor, camera_to_world: Tensor) -> Tuple[Tensor, Tensor]:
    """Pixel coordinates [B, ..., 2] and z-depth in front of the camera [B, ...] of world points [B, ..., 3]."""
    extra = points.dim() - 2  # the point dimensions between the batch and xyz
    rotation = camera_to_world[:, :3, :3].reshape(-1, *([1] * extra), 3, 3)
    origin = camera_to_world[:, :3, 3].reshape(-1, *([1] * extra), 3)
    camera = ((points - origin)[..., None, :] @ rotation).squeeze(-2)  # R^T (p - t), row-vector form
    camera = camera * _GL_TO_CV.to(camera)
    z = camera[..., 2]
    pixels = (camera[..., None, :] @ intrinsics.reshape(-1, *([1] * extra), 3, 3).transpose(-1, -2)).squeeze(-2)
    uv = pixels[..., :2] / z.clamp_min(1e-8)[..., None]
    return uv, z


def sample_bilinear(images: Tensor, uv: Tensor) -> Tensor:
    """Bilinear samples [B, ..., C] of images [B, H, W, C] at pixel coordinates uv [B, ..., 2] (edges clamped)."""
    batch, height, width, channels = images.shape
    size = torch.tensor([width, height], device=uv.device, dtype=uv.dtype)
    grid = (2.0 * uv / size - 1.0).reshape(batch, 1, -1, 2)  # align_corners=False maps pixel edges to -1 and 1
    samples = F.grid_sample(
        images.permute(0, 3, 1, 2), grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )
    return samples.reshape(batch, channels, -1).transpose(1, 2).reshape(*uv.shape[:-1], channels)


def project_references(
    target_depth: Tensor,
    target_intrinsics: Tensor,
    target_camera_to_world: Tensor,
    key_images: Tensor,
    key_depths: Tensor,
    key_intrinsics: Tensor,
    key_camera_to_world: Tensor,
    threshold: float = OTHER_VIEW_THRESHOLD,
    depth_kind: DepthKind = "ray",
) -> Tuple[Tensor, Tensor]:
    """Each key view's colours seen from each target pixel, and where that is valid.

    Targets: depth [B, H, W], intrinsics [B, 3, 3], camera-to-world [B, 4, 4]. Key views: images [K, Hk, Wk, C],
    depths [K, Hk, Wk], intrinsics [K, 3, 3], camera-to-world [K, 4, 4]. Returns colours [B, K, H, W, C] and the
    validity [B, K, H, W] (in bounds, in front of the key camera, re-projection distance under ``threshold``).
    """
    num_keys, key_height, key_width, _ = key_images.shape
    points = backproject(target_depth, target_intrinsics, target_camera_to_world, depth_kind)
    # Key-major so each key view samples its own image: [K, B, H, W, 3].
    points = points[None].expand(num_keys, -1, -1, -1, -1)
    uv, z = project(points, key_intrinsics, key_camera_to_world)

    colours = sample_bilinear(key_images, uv)
    sampled_depth = sample_bilinear(key_depths[..., None], uv)[..., 0]
    homogeneous = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1)
    key_points = _pixels_to_world(homogeneous, sampled_depth, key_intrinsics, key_camera_to_world, depth_kind)

    in_bounds = (uv[..., 0] >= 0) & (uv[..., 0] <= key_width) & (uv[..., 1] >= 0) & (uv[..., 1] <= key_height)
    close = (key_points - points).norm(dim=-1) < threshold
    valid = in_bounds & (z > 0) & close & torch.isfinite(target_depth)[None]
    # No sample taken at NaN coordinates (infinite depth) may reach the average.
    colours = torch.where(valid[..., None], colours, 0.0)
    return colours.transpose(0, 1), valid.transpose(0, 1)


def combine_references(colours: Tensor, valid: Tensor) -> Tuple[Tensor, Tensor]:
    """Average of references [B, K, H, W, C] over their valid pixels [B, K, H, W], each reference weighted by the
    fraction of the target it covers. Returns the image [B, H, W, C] (zero where nothing is valid) and its mask."""
    weights = valid.float() * valid.float().mean(dim=(2, 3), keepdim=True)  # [B, K, H, W]
    total = weights.sum(dim=1)
    image = (colours * weights[..., None]).sum(dim=1) / total.clamp_min(1e-12)[..., None]
    return image, valid.any(dim=1)


def project_key_views(
    target_depth: Tensor,
    target_intrinsics: Tensor,
    target_camera_to_world: Tensor,
    key_images: Tensor,
    key_depths: Tensor,
    key_intrinsics: Tensor,
    key_camera_to_world: Tensor,
    threshold: float = OTHER_VIEW_THRESHOLD,
    depth_kind: DepthKind = "ray",
) -> Tuple[Tensor, Tensor]:
    """Projected image [B, H, W, C] and valid mask [B, H, W]: :func:`project_references` then
    :func:`combine_references` (arguments as in :func:`project_references`)."""
    colours, valid = project_references(
        target_depth,
        target_intrinsics,
        target_camera_to_world,
        key_images,
        key_depths,
        key_intrinsics,
        key_camera_to_world,
        threshold=threshold,
        depth_kind=depth_kind,
    )
    return combine_references(colours, valid)


def blend_with_current(current: Tensor, projected: Tensor, valid: Tensor, ratio: float = 0.5) -> Tensor:
    """``ratio`` of the projected image plus ``1 - ratio`` of the current one where valid; the current image
    elsewhere. Images [..., H, W, C], mask [..., H, W]."""
    mixed = ratio * projected + (1.0 - ratio) * current
    return torch.where(valid[..., None], mixed, current)


def hole_mask(valid: Tensor) -> Tensor:
    """Pixels [..., H, W] that no reference covered: what the editor has to repaint."""
    return ~valid


def _pixels_to_world(
    pixels: Tensor, depth: Tensor, intrinsics: Tensor, camera_to_world: Tensor, depth_kind: DepthKind
) -> Tensor:
    """World points [B, ..., 3] of homogeneous pixels [B or 1, ..., 3] at depths [B, ...]."""
    extra = depth.dim() - 1
    inverse = torch.linalg.inv(intrinsics).reshape(-1, *([1] * extra), 3, 3)
    rays = (pixels[..., None, :] @ inverse.transpose(-1, -2)).squeeze(-2)  # OpenCV ray with z = 1
    if depth_kind == "ray":
        rays = rays / rays.norm(dim=-1, keepdim=True)
    camera = rays * depth[..., None] * _GL_TO_CV.to(rays)
    rotation = camera_to_world[:, :3, :3].reshape(-1, *([1] * extra), 3, 3)
    origin = camera_to_world[:, :3, 3].reshape(-1, *([1] * extra), 3)
    return (camera[..., None, :] @ rotation.transpose(-1, -2)).squeeze(-2) + origin
