"""Depth-based projection on an analytic scene: a textured ground square and a textured sphere standing on it, ray-cast
exactly from six cameras around it. Key-view colours projected into another camera must match what that camera truly
sees, and ground the key view sees hidden behind the sphere must be rejected."""

from __future__ import annotations

import math

import pytest
import torch

from ns_4d_methods.editing.depth_projection import (
    KEY_VIEW_THRESHOLD,
    OTHER_VIEW_THRESHOLD,
    backproject,
    blend_with_current,
    combine_references,
    hole_mask,
    project,
    project_key_views,
    project_references,
)

WIDTH, HEIGHT, FOCAL = 96, 72, 90.0
CENTRE, RADIUS, GROUND_HALF = torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64), 0.5, 2.0
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def look_at(eye) -> torch.Tensor:
    """OpenGL camera-to-world looking from ``eye`` at the sphere (world up +z)."""
    eye = torch.tensor(eye, dtype=torch.float64)
    back = eye - torch.tensor([0.0, 0.0, 0.4], dtype=torch.float64)
    back = back / back.norm()
    right = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), back)
    right = right / right.norm()
    up = torch.linalg.cross(back, right)
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, up, back, eye
    return pose


def intrinsics() -> torch.Tensor:
    return torch.tensor([[FOCAL, 0.0, WIDTH / 2], [0.0, FOCAL, HEIGHT / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)


def first_hit(origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Distance along unit rays to the first surface (sphere or ground square), inf where none."""
    oc = origins - CENTRE
    b = (oc * dirs).sum(-1)
    disc = b**2 - ((oc**2).sum(-1) - RADIUS**2)
    t_sphere = -b - torch.sqrt(disc.clamp_min(0))
    t_sphere = torch.where((disc > 0) & (t_sphere > 1e-9), t_sphere, torch.full_like(b, math.inf))
    t_ground = -origins[..., 2] / dirs[..., 2]
    hit = origins + t_ground[..., None] * dirs
    on_square = (hit[..., 0].abs() <= GROUND_HALF) & (hit[..., 1].abs() <= GROUND_HALF) & (t_ground > 1e-9)
    t_ground = torch.where(on_square, t_ground, torch.full_like(b, math.inf))
    return torch.minimum(t_sphere, t_ground)


def texture(points: torch.Tensor) -> torch.Tensor:
    """Colour of surface points: a wavy pattern on the ground, a different one on the sphere."""
    x, y, z = points.unbind(-1)
    on_sphere = ((points - CENTRE).norm(dim=-1) - RADIUS).abs() < 1e-6
    ground = [0.5 + 0.4 * torch.sin(4 * x), 0.5 + 0.4 * torch.sin(4 * y), 0.3 + 0.2 * torch.cos(3 * (x + y))]
    sphere = [0.2 + 0.15 * torch.sin(7 * z), 0.85 + 0.1 * torch.cos(5 * x), 0.2 + 0.15 * torch.sin(5 * y)]
    return torch.where(on_sphere[..., None], torch.stack(sphere, -1), torch.stack(ground, -1))


def render(pose: torch.Tensor):
    """Exact colours [H, W, 3], ray distance [H, W] and z-depth [H, W] at pixel centres (inf where nothing is hit)."""
    v, u = torch.meshgrid(torch.arange(HEIGHT) + 0.5, torch.arange(WIDTH) + 0.5, indexing="ij")
    k = intrinsics()
    dirs_cam = torch.stack([(u - k[0, 2]) / k[0, 0], -(v - k[1, 2]) / k[1, 1], -torch.ones_like(u)], -1).double()
    dirs_cam = dirs_cam / dirs_cam.norm(dim=-1, keepdim=True)
    dirs = dirs_cam @ pose[:3, :3].T
    t = first_hit(pose[:3, 3].expand_as(dirs), dirs)
    points = pose[:3, 3] + torch.where(torch.isfinite(t), t, 0)[..., None] * dirs
    colour = torch.where(torch.isfinite(t)[..., None], texture(points), torch.zeros(3, dtype=torch.float64))
    return colour, t, t * -dirs_cam[..., 2]


@pytest.fixture(scope="module")
def scene():
    """Six cameras on a circle around the sphere, 1.4 units up, 3.2 away."""
    poses = [look_at([3.2 * math.cos(a), 3.2 * math.sin(a), 1.4]) for a in torch.arange(6) * math.pi / 3]
    views = [render(p) for p in poses]
    return {
        "poses": torch.stack(poses).float(),
        "K": intrinsics().float().expand(6, 3, 3).clone(),
        "images": torch.stack([c for c, _, _ in views]).float(),
        "ray": torch.stack([r for _, r, _ in views]).float(),
        "z": torch.stack([z for _, _, z in views]).float(),
    }


def views(scene, idx, kind="ray", device="cpu"):
    idx = torch.as_tensor(idx)
    return [scene[key][idx].to(device) for key in (kind, "K", "poses")]


def test_backproject_then_project_returns_the_pixels(scene):
    depth, k, pose = views(scene, [0, 3])
    points = backproject(depth, k, pose, "ray")
    uv, z = project(points, k, pose)
    v, u = torch.meshgrid(torch.arange(HEIGHT) + 0.5, torch.arange(WIDTH) + 0.5, indexing="ij")
    finite = torch.isfinite(depth)
    assert torch.allclose(uv[..., 0][finite], u.expand_as(depth)[finite], atol=1e-3)
    assert torch.allclose(uv[..., 1][finite], v.expand_as(depth)[finite], atol=1e-3)
    assert torch.allclose(z[finite], scene["z"][[0, 3]][finite], rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["ray", "z"])
def test_projected_key_views_match_the_target(scene, kind, device):
    target, keys = 1, [0, 2, 3, 4, 5]
    projected, valid = project_key_views(
        *views(scene, [target], kind, device),
        scene["images"][keys].to(device),
        *views(scene, keys, kind, device),
        threshold=OTHER_VIEW_THRESHOLD,
        depth_kind=kind,
    )
    projected, valid = projected[0].cpu(), valid[0].cpu()
    assert torch.isfinite(projected).all()  # the background's infinite depth leaves no NaN behind
    error = (projected - scene["images"][target]).abs().amax(-1)[valid]
    match = (error < 0.04).float().mean().item()
    seen = torch.isfinite(scene["ray"][target])
    coverage = valid.sum().item() / seen.sum().item()
    print(f"depth={kind} device={device}: {match:.4f} of valid pixels within 0.04, valid on {coverage:.3f} of the "
          f"pixels that see the scene")
    assert match >= 0.95
    assert coverage > 0.9
    assert not valid[~seen].any()


def test_pixels_the_key_view_sees_occluded_are_rejected(scene):
    target, key = 0, [2]  # 120 degrees apart: the sphere hides ground from the key that the target sees
    depth, k, pose = views(scene, [target])
    colours, valid = project_references(
        depth, k, pose, scene["images"][key], *views(scene, key), threshold=KEY_VIEW_THRESHOLD
    )
    valid = valid[0, 0]

    # Ground truth by ray casting from the key camera towards each target surface point.
    points = backproject(depth.double(), k.double(), pose.double())[0]
    uv, z = project(points[None], scene["K"][key].double(), scene["poses"][key].double())
    uv, z = uv[0], z[0]
    inside = (uv[..., 0] >= 0) & (uv[..., 0] <= WIDTH) & (uv[..., 1] >= 0) & (uv[..., 1] <= HEIGHT) & (z > 0)
    key_centre = scene["poses"][key[0], :3, 3].double()
    to_point = points - key_centre
    distance = to_point.norm(dim=-1)
    hit = first_hit(key_centre.expand_as(points), to_point / distance[..., None])
    finite = torch.isfinite(depth[0])
    occluded = finite & inside & (hit < distance - 0.1)
    visible = finite & inside & ((hit - distance).abs() < 1e-3)

    rejected = 1.0 - valid[occluded].float().mean().item()
    accepted = valid[visible].float().mean().item()
    print(f"{int(occluded.sum())} occluded pixels, {rejected:.4f} rejected; {accepted:.4f} of {int(visible.sum())} "
          "visible pixels accepted")
    assert occluded.sum() > 200
    assert rejected > 0.95
    assert accepted > 0.9
    error = (colours[0, 0] - scene["images"][0]).abs().amax(-1)[valid]
    assert (error < 0.04).float().mean() >= 0.95


def test_references_are_weighted_by_their_valid_fraction():
    colours = torch.stack([torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 2, 3)], dim=1)  # [B=1, K=2, 2, 2, 3]
    valid = torch.tensor([[[[True, True], [True, False]], [[True, False], [False, False]]]])
    image, mask = combine_references(colours, valid)
    # Pixel (0, 0): reference 0 covers 3/4 of the target and reference 1 1/4, so the average is 0.25.
    assert image[0, 0, 0].tolist() == pytest.approx([0.25] * 3)
    assert image[0, 0, 1].tolist() == [0.0] * 3
    assert image[0, 1, 1].tolist() == [0.0] * 3
    assert mask[0].tolist() == [[True, True], [True, False]]


def test_blend_and_holes():
    current, projected = torch.zeros(2, 2, 3), torch.ones(2, 2, 3)
    valid = torch.tensor([[True, False], [False, True]])
    blended = blend_with_current(current, projected, valid)
    assert blended[..., 0].tolist() == [[0.5, 0.0], [0.0, 0.5]]
    assert blend_with_current(current, projected, valid, ratio=1.0)[0, 0, 0] == 1.0
    assert hole_mask(valid).tolist() == [[False, True], [True, False]]
