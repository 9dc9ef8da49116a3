"""4Real's motion regularisers on known motions (rigid motions cost nothing, bending and twisting do; values by hand),
the kNN weights, and the per-frame deformation that is exactly zero at the canonical frame."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ns_4d_methods.fields.per_frame_deformation import PerFrameDeformation
from ns_4d_methods.models.gaussian_regularisers import (
    Neighbours,
    difference_loss,
    nearest_neighbours,
    quaternion_multiply,
    rigidity_loss,
    rotation_loss,
    small_motion_loss,
)


def _axis_angle_quaternion(axis, angle):
    axis = torch.as_tensor(axis, dtype=torch.float32)
    axis = axis / axis.norm()
    return torch.cat([torch.tensor([math.cos(angle / 2)]), math.sin(angle / 2) * axis])


def _rotation_matrix(q):
    w, x, y, z = q.tolist()
    return torch.tensor([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


@pytest.fixture
def cloud():
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(300, 3, generator=generator)
    quats = F.normalize(torch.randn(300, 4, generator=generator), dim=-1)
    return points, quats, nearest_neighbours(points, k=20, weight_lambda=2000.0, metres_per_unit=0.1)


def test_nearest_neighbours_exclude_the_point_and_weigh_by_metric_distance(cloud):
    points, _, neighbours = cloud
    assert neighbours.indices.shape == (300, 20) and neighbours.weights.shape == (300, 20)
    distances = torch.cdist(points, points)
    distances.fill_diagonal_(float("inf"))
    expected = distances.topk(20, largest=False)
    assert torch.equal(neighbours.indices.sort(-1).values, expected.indices.sort(-1).values)
    assert not torch.any(neighbours.indices == torch.arange(300)[:, None])
    chosen = distances.gather(1, neighbours.indices)
    assert torch.allclose(neighbours.weights, torch.exp(-2000.0 * (0.1 * chosen) ** 2), atol=1e-6)


def test_a_rigid_motion_costs_nothing(cloud):
    points, quats, neighbours = cloud
    turn = _axis_angle_quaternion([0.3, -1.0, 0.5], 0.7)
    moved = points @ _rotation_matrix(turn).T + torch.tensor([0.2, -0.1, 0.4])
    turned = quaternion_multiply(turn.expand_as(quats), quats)
    assert rigidity_loss(moved, turned, points, quats, neighbours).item() < 1e-6
    assert rotation_loss(turned, quats, neighbours).item() < 1e-6
    # the loss compares the motion, not the pose: a rigidly moved pair of frames costs nothing either
    assert rigidity_loss(moved, turned, moved, turned, neighbours).item() < 1e-6


def test_bending_and_twisting_cost(cloud):
    points, quats, neighbours = cloud
    bent = points + 0.05 * torch.sin(6 * points[:, :1]) * torch.tensor([0.0, 0.0, 1.0])
    assert rigidity_loss(bent, quats, points, quats, neighbours).item() > 1e-4
    # half the Gaussians turn in place: their neighbours disagree about the rotation, and the offsets to the turned
    # ones are carried back by the wrong rotation
    half = points[:, 0] > 0.5
    turn = _axis_angle_quaternion([0.0, 0.0, 1.0], 0.5)
    twisted = torch.where(half[:, None], quaternion_multiply(turn.expand_as(quats), quats), quats)
    assert rotation_loss(twisted, quats, neighbours).item() > 1e-3
    assert rigidity_loss(points, twisted, points, quats, neighbours).item() > 1e-4


def test_values_by_hand():
    # two Gaussians, each the other's neighbour with weight 0.5; the second moves 0.3 along x, nothing turns
    means_prev = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    means = torch.tensor([[0.0, 0.0, 0.0], [1.3, 0.0, 0.0]])
    identity = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2)
    neighbours = Neighbours(torch.tensor([[1], [0]]), torch.tensor([[0.5], [0.5]]))
    # each offset differs by 0.3 from before: (0.5 * 0.3 + 0.5 * 0.3) / (k |G| = 2)
    assert rigidity_loss(means, identity, means_prev, identity, neighbours).item() == pytest.approx(0.15, abs=1e-6)
    # the second turns by 90 deg about z: relative quaternions differ by (1 - cos 45, 0, 0, sin 45)
    turned = torch.stack([identity[0], _axis_angle_quaternion([0, 0, 1], math.pi / 2)])
    gap = math.sqrt((1 - math.cos(math.pi / 4)) ** 2 + math.sin(math.pi / 4) ** 2)
    assert rotation_loss(turned, identity, neighbours).item() == pytest.approx(0.5 * gap, abs=1e-6)
    offsets = (torch.tensor([[0.1, -0.2, 0.0]]), torch.tensor([[0.0, 0.4, 0.0, 0.0]]), torch.tensor([[0.3, 0.0, 0.0]]))
    assert small_motion_loss(*offsets).item() == pytest.approx(0.1 + 0.1 + 0.1, abs=1e-6)
    assert difference_loss(offsets[0], torch.zeros(1, 3)).item() == pytest.approx(0.1, abs=1e-6)


def test_per_frame_deformation_is_exactly_zero_at_the_canonical_frame():
    deformation = PerFrameDeformation(num_frames=5, canonical_frame=2, code_dim=8, num_layers=2, layer_width=16)
    with torch.no_grad():  # a trained state: every output non-zero elsewhere
        deformation.head.weight.normal_()
        deformation.head.bias.normal_()
    means = torch.rand(50, 3, requires_grad=True)
    for offsets in deformation(means, 2):
        assert torch.count_nonzero(offsets) == 0
    others = [deformation(means, frame) for frame in (0, 1, 3, 4)]
    assert all(torch.count_nonzero(offsets[0]) > 0 for offsets in others)
    assert not torch.allclose(others[0][0], others[1][0])  # each frame its own code
    sum(o.sum() for offsets in others for o in offsets).backward()
    assert deformation.codes.weight.grad[2].abs().sum() == 0 and deformation.codes.weight.grad[0].abs().sum() > 0


def test_per_frame_deformation_starts_as_the_identity():
    deformation = PerFrameDeformation(num_frames=3, canonical_frame=0)
    for offsets in deformation(torch.rand(10, 3), 1):
        assert torch.count_nonzero(offsets) == 0
