"""Motion regularisers of deformable Gaussians, as 4Real uses them (after Dynamic 3D Gaussians).

With the deformed centres mu, unit rotations q and the deformation offsets (dx, dq, ds) at time t and at the
previous time t-1, and each canonical Gaussian i's k nearest canonical neighbours j with weights
``w_ij = exp(-lambda d_ij^2)`` (distances in metres; Dynamic 3D Gaussians' lambda = 2000, k = 20):

- L_norm = mean(|dx|) + mean(|dq|) + mean(|ds|): offsets stay small. The same L1 is the *small-motion loss* of the
  per-frame deformations of the freeze-time video.
- L_diff = mean |dx_t - dx_{t-1}|: offsets change little between neighbouring times.
- L_rigid = 1/(k|G|) sum_ij w_ij ||(mu_j,t-1 - mu_i,t-1) - R_i,t-1 R_i,t^-1 (mu_j,t - mu_i,t)||: neighbours move
  with i as one rigid body (i's own rotation carries the offset back to t-1).
- L_rot = 1/(k|G|) sum_ij w_ij ||q_j,t q_j,t-1^-1 - q_i,t q_i,t-1^-1||: neighbours turn alike.

4Real weights each by 0.01. Norms are ``sqrt(x^2 + 1e-20)`` so that their gradient stays finite at zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from nerfstudio.models.splatfacto import quat_to_rotmat
from torch import Tensor

_EPS = 1e-20


@dataclass
class Neighbours:
    """Each canonical Gaussian's k nearest others and their weights."""

    indices: Tensor
    """[N, k] indices of the neighbours (the Gaussian itself excluded)."""
    weights: Tensor
    """[N, k] ``exp(-lambda d^2)``, d in metres."""


def nearest_neighbours(points: Tensor, k: int = 20, weight_lambda: float = 2000.0,
                       metres_per_unit: float = 1.0) -> Neighbours:
    """The k nearest neighbours of every point [N, 3] (itself excluded) and their weights; ``metres_per_unit``
    converts scene units to the metres that ``weight_lambda`` is stated in."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, points.shape[0] - 1)
    array = points.detach().cpu().numpy().astype(np.float64)
    distances, indices = NearestNeighbors(n_neighbors=k + 1).fit(array).kneighbors(array)
    distances = torch.from_numpy(distances[:, 1:]).float().to(points.device)
    indices = torch.from_numpy(indices[:, 1:]).long().to(points.device)
    return Neighbours(indices, torch.exp(-weight_lambda * (distances * metres_per_unit) ** 2))


def quaternion_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product of quaternions [..., 4] (w, x, y, z)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def quaternion_conjugate(q: Tensor) -> Tensor:
    return q * q.new_tensor([1.0, -1.0, -1.0, -1.0])


def _norm(x: Tensor) -> Tensor:
    return torch.sqrt((x**2).sum(-1) + _EPS)


def small_motion_loss(d_means: Tensor, d_quats: Tensor, d_log_scales: Tensor) -> Tensor:
    """L1 of deformation offsets: 4Real's L_norm, and the small-motion loss of the per-frame deformations."""
    return d_means.abs().mean() + d_quats.abs().mean() + d_log_scales.abs().mean()


def difference_loss(d_means: Tensor, previous_d_means: Tensor) -> Tensor:
    """L_diff: L1 between the centre offsets at t and at t-1."""
    return (d_means - previous_d_means).abs().mean()


def relative_rotations(quats: Tensor, previous_quats: Tensor) -> Tensor:
    """Unit quaternions q_t q_{t-1}^-1 [N, 4] taking each Gaussian's orientation at t-1 to the one at t."""
    return quaternion_multiply(F.normalize(quats, dim=-1), quaternion_conjugate(F.normalize(previous_quats, dim=-1)))


def rigidity_loss(means: Tensor, quats: Tensor, previous_means: Tensor, previous_quats: Tensor,
                  neighbours: Neighbours) -> Tensor:
    """L_rigid of centres [N, 3] and rotations [N, 4] at t and t-1."""
    rotation = quat_to_rotmat(relative_rotations(quats, previous_quats))  # R_t R_{t-1}^T per Gaussian
    offsets = means[neighbours.indices] - means[:, None]  # [N, k, 3]
    previous_offsets = previous_means[neighbours.indices] - previous_means[:, None]
    carried_back = torch.einsum("nji,nkj->nki", rotation, offsets)  # R_{t-1} R_t^T (mu_j - mu_i)
    return (neighbours.weights * _norm(previous_offsets - carried_back)).mean()


def rotation_loss(quats: Tensor, previous_quats: Tensor, neighbours: Neighbours) -> Tensor:
    """L_rot of rotations [N, 4] at t and t-1."""
    relative = relative_rotations(quats, previous_quats)
    return (neighbours.weights * _norm(relative[neighbours.indices] - relative[:, None])).mean()

