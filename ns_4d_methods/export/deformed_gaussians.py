"""The Gaussians of a deformable-Gaussian model (splatfacto-4d, 4real, unified-edit) at one time, activated, and their
render with the suite's rasterizer: what every Gaussian export writes and what its tests render back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor

from ns_4d_methods.models.gaussian_rasterizer_torch import rasterization_torch
from ns_4d_methods.models.splatfacto_4d import Splatfacto4DModel, _world_to_camera


@dataclass
class Gaussians:
    """N Gaussians, activated: what a splat viewer draws."""

    means: Tensor
    """Centres [N, 3]."""
    quats: Tensor
    """Unit rotation quaternions [N, 4], (w, x, y, z)."""
    scales: Tensor
    """Standard deviations along the rotated axes [N, 3] (exp of the log-scales)."""
    opacities: Tensor
    """Opacities in (0, 1) [N] (sigmoid of the logits)."""
    sh: Tensor
    """Spherical-harmonic colour coefficients [N, K, 3]; K = 1 (the DC term) for view-independent colour."""

    def __len__(self) -> int:
        return len(self.means)


@torch.no_grad()
def gaussians_at(model: Splatfacto4DModel, time: float) -> Gaussians:
    """The model's Gaussians deformed to ``time`` (positions, rotations, scales and opacities as it renders them)."""
    means, quats, log_scales = model.deform(float(time))
    return Gaussians(
        means=means.float().cpu(),
        quats=F.normalize(quats, dim=-1).float().cpu(),  # gsplat normalises too: the same rotation
        scales=torch.exp(log_scales).float().cpu(),
        opacities=torch.sigmoid(model.opacities_at(float(time))).reshape(-1).float().cpu(),
        sh=torch.cat([model.features_dc[:, None, :], model.features_rest], dim=1).float().cpu(),
    )


def active_sh_degree(model: Splatfacto4DModel) -> Optional[int]:
    """The SH degree the model renders with at its step (None: colours are sigmoid(features_dc), no SH)."""
    if model.config.sh_degree == 0:
        return None
    return min(model.step // model.config.sh_degree_interval, model.config.sh_degree)


@torch.no_grad()
def render_gaussians(gaussians: Gaussians, camera: Cameras, background: Tensor, sh_degree: Optional[int]) -> Tensor:
    """RGB [H, W, 3] of ``gaussians`` seen from one ``camera``, composited over ``background`` [3], with the suite's
    PyTorch rasterizer and the same projection as :class:`Splatfacto4DModel` (``sh_degree`` None: the first SH
    coefficient holds logits of the colour, as splatfacto with ``sh_degree`` 0 stores them)."""
    colors = gaussians.sh[:, : (sh_degree + 1) ** 2] if sh_degree is not None else torch.sigmoid(gaussians.sh[:, 0])
    render, alpha, _ = rasterization_torch(
        means=gaussians.means,
        quats=gaussians.quats,
        scales=gaussians.scales,
        opacities=gaussians.opacities,
        colors=colors,
        viewmats=_world_to_camera(camera.camera_to_worlds.float().cpu()),
        Ks=camera.get_intrinsics_matrices().float().cpu(),
        width=int(camera.width.item()),
        height=int(camera.height.item()),
        near_plane=0.01,
        far_plane=1e10,
        sh_degree=sh_degree,
    )
    return torch.clamp(render[0, ..., :3] + (1 - alpha[0]) * background.cpu(), 0.0, 1.0)
