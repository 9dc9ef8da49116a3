"""Orbit cameras around an object at the origin, in threestudio's convention (the one the 4DM prior is conditioned in).

World frame: z up. A camera at elevation ``e`` and azimuth ``a`` (degrees) and distance ``d`` sits at
``d (cos e cos a, cos e sin a, sin e)`` and looks at the origin with +z as its up direction; azimuth 0 is the +x axis
and the azimuth grows towards +y. Its camera-to-world matrix has the columns (right, up, back, position): nerfstudio's
OpenGL convention (the camera looks down its -z axis, +y up in the image), which is also threestudio's.

The 4DM prior takes a camera as the flattened 4x4 camera-to-world matrix with its translation scaled to unit length
(:func:`~ns_4d_methods.guidance.four_dm_prior.camera_vector_from_c2w`, ImageDream's ``normalize_camera``), so the
camera that renders a view and the camera the prior is told about are the same matrix by construction.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from torch import Tensor

Angle = Union[float, Tensor]


def orbit_c2w(elevation_deg: Angle, azimuth_deg: Angle, distance: Angle = 1.0) -> Tensor:
    """Camera-to-world matrices [..., 4, 4] of cameras at (elevation, azimuth, distance) looking at the origin."""
    elevation = torch.deg2rad(torch.as_tensor(elevation_deg, dtype=torch.float32))
    azimuth = torch.deg2rad(torch.as_tensor(azimuth_deg, dtype=torch.float32))
    elevation, azimuth, distance = torch.broadcast_tensors(
        elevation, azimuth, torch.as_tensor(distance, dtype=torch.float32)
    )
    back = torch.stack(
        [torch.cos(elevation) * torch.cos(azimuth), torch.cos(elevation) * torch.sin(azimuth), torch.sin(elevation)], -1
    )
    world_up = torch.tensor([0.0, 0.0, 1.0]).expand_as(back)
    right = torch.nn.functional.normalize(torch.linalg.cross(world_up, back), dim=-1)
    up = torch.linalg.cross(back, right)
    c2w = torch.zeros(*back.shape[:-1], 4, 4)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2] = right, up, back
    c2w[..., :3, 3] = back * distance[..., None]
    c2w[..., 3, 3] = 1.0
    return c2w


def focal_from_fovy(fovy_deg: Angle, height: int) -> Tensor:
    """Focal length in pixels of a vertical field of view over ``height`` pixels."""
    return 0.5 * height / torch.tan(0.5 * torch.deg2rad(torch.as_tensor(fovy_deg, dtype=torch.float32)))


def orbit_cameras(
    elevation_deg: Angle,
    azimuth_deg: Angle,
    distance: Angle,
    fovy_deg: Angle,
    resolution: int,
    times: Optional[Tensor] = None,
) -> Cameras:
    """Square pinhole nerfstudio cameras [N] on the orbit (angles, distances, fields of view broadcast to [N]).

    ``times`` [N] in [0, 1] are the instants the cameras see (None: time-less cameras).
    """
    c2w = orbit_c2w(elevation_deg, azimuth_deg, distance).reshape(-1, 4, 4)
    count = c2w.shape[0]
    focal = focal_from_fovy(fovy_deg, resolution).expand(count).reshape(count, 1)
    return Cameras(
        camera_to_worlds=c2w[:, :3, :],
        fx=focal.clone(),
        fy=focal.clone(),
        cx=torch.full((count, 1), resolution / 2.0),
        cy=torch.full((count, 1), resolution / 2.0),
        width=torch.full((count, 1), resolution, dtype=torch.long),
        height=torch.full((count, 1), resolution, dtype=torch.long),
        camera_type=CameraType.PERSPECTIVE,
        times=None if times is None else times.reshape(count, 1).float(),
    )


def spread_azimuths(count: int, start_deg: float = 0.0) -> Tensor:
    """``count`` azimuths evenly spread over a full turn from ``start_deg``."""
    return start_deg + torch.arange(count, dtype=torch.float32) * (360.0 / count)
