"""Camera paths of 4Real's video SDS and of the result videos.

A video SDS path is a :class:`~nerfstudio.cameras.cameras.Cameras` batch of ``1 + num_frames`` cameras with times:
camera 0 saw the real conditioning frame, cameras 1.. are rendered. Both kinds start where a real frame was seen and
step away from it evenly, render k at fraction k / num_frames of the way:

- **temporal**: the camera fixed, time moving from ``start_time`` (the conditioning frame's time) to ``end_time``;
- **multi-view**: time fixed, the camera turning rigidly about a pivot (a point in front of it) from its own pose
  out to a perturbed one (``azimuth`` about its up axis and ``elevation`` up about its right axis), in even steps.

The result videos use the same two motions: :func:`orbit_cameras` sweeps azimuths at a fixed time, :func:`time_cameras`
sweeps time at a fixed camera. Poses are nerfstudio's: OpenGL camera-to-world [3, 4], +y up, looking down -z.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor


def axis_rotation(axis: Tensor, angle: float) -> Tensor:
    """Rotation matrix [3, 3] by ``angle`` radians about the unit vector ``axis`` (Rodrigues)."""
    axis = axis / axis.norm()
    x, y, z = axis.tolist()
    cross = axis.new_tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return torch.eye(3, dtype=axis.dtype, device=axis.device) + math.sin(angle) * cross + (
        1.0 - math.cos(angle)
    ) * (cross @ cross)


def rotation_axis_angle(rotation: Tensor) -> Tuple[Tensor, float]:
    """Unit axis [3] and angle (radians, in [0, pi)) of a rotation matrix [3, 3]."""
    angle = math.acos(max(-1.0, min(1.0, (float(torch.trace(rotation)) - 1.0) / 2.0)))
    skew = rotation.new_tensor(
        [rotation[2, 1] - rotation[1, 2], rotation[0, 2] - rotation[2, 0], rotation[1, 0] - rotation[0, 1]]
    )
    if angle < 1e-8 or float(skew.norm()) < 1e-12:
        return rotation.new_tensor([0.0, 0.0, 1.0]), 0.0
    return skew / skew.norm(), angle


def rotate_about(camera_to_world: Tensor, pivot: Tensor, turn: Tensor) -> Tensor:
    """``camera_to_world`` [3, 4] carried rigidly by the rotation ``turn`` [3, 3] about ``pivot`` [3]."""
    rotation, centre = camera_to_world[:, :3], camera_to_world[:, 3]
    return torch.cat([turn @ rotation, (pivot + turn @ (centre - pivot))[:, None]], dim=1)


def orbit_turn(camera_to_world: Tensor, azimuth: float, elevation: float) -> Tensor:
    """The rotation [3, 3] by ``azimuth`` radians about the camera's up axis (counter-clockwise seen from above),
    then ``elevation`` radians upwards about its right axis."""
    rotation = camera_to_world[:, :3]
    return axis_rotation(rotation[:, 0], -elevation) @ axis_rotation(rotation[:, 1], azimuth)


def orbit_pose(camera_to_world: Tensor, pivot: Tensor, azimuth: float, elevation: float) -> Tensor:
    """``camera_to_world`` [3, 4] orbited about ``pivot`` [3] by ``azimuth`` and ``elevation`` (:func:`orbit_turn`)."""
    return rotate_about(camera_to_world, pivot, orbit_turn(camera_to_world, azimuth, elevation))


def _with_poses_and_times(camera: Cameras, camera_to_worlds: Tensor, times: Tensor) -> Cameras:
    """``camera``'s intrinsics for every pose, each with its time; no camera index (path poses are not refined)."""
    count = camera_to_worlds.shape[0]

    def repeat(value: Tensor) -> Tensor:
        return value.reshape(1, -1)[:1].expand(count, -1).clone()

    return Cameras(
        camera_to_worlds=camera_to_worlds,
        fx=repeat(camera.fx), fy=repeat(camera.fy), cx=repeat(camera.cx), cy=repeat(camera.cy),
        width=repeat(camera.width), height=repeat(camera.height),
        camera_type=repeat(camera.camera_type),
        times=times.reshape(count, 1).to(camera_to_worlds),
    )


def temporal_path(camera: Cameras, start_time: float = 0.0, end_time: float = 1.0, num_frames: int = 16) -> Cameras:
    """Temporal SDS path: ``camera`` (one, the conditioning frame's) fixed; camera 0 at ``start_time``, render k at
    ``start_time + k / num_frames * (end_time - start_time)``."""
    steps = torch.arange(num_frames + 1, dtype=torch.float32) / num_frames
    pose = camera.camera_to_worlds.reshape(-1, 3, 4)[:1]
    times = start_time + steps * (end_time - start_time)
    return _with_poses_and_times(camera, pose.expand(num_frames + 1, 3, 4), times)


def multiview_path(
    camera: Cameras, pivot: Tensor, azimuth: float, elevation: float, time: float, num_frames: int = 16
) -> Cameras:
    """Multi-view SDS path at a fixed ``time``: camera 0 is ``camera`` (the conditioning frame's); the path turns it
    about ``pivot`` along the shortest rotation to its pose orbited by (``azimuth``, ``elevation``) radians, render k
    k / num_frames of the way (even steps)."""
    pose = camera.camera_to_worlds.reshape(-1, 3, 4)[0]
    axis, angle = rotation_axis_angle(orbit_turn(pose, azimuth, elevation))
    poses = torch.stack(
        [rotate_about(pose, pivot.to(pose), axis_rotation(axis, angle * k / num_frames)) for k in range(num_frames + 1)]
    )
    return _with_poses_and_times(camera, poses, torch.full((num_frames + 1,), float(time)))


def orbit_cameras(camera: Cameras, pivot: Tensor, azimuths: Sequence[float], time: float) -> Cameras:
    """Result video at a fixed ``time``: ``camera`` orbited about ``pivot`` by each of ``azimuths`` (radians)."""
    pose = camera.camera_to_worlds.reshape(-1, 3, 4)[0]
    poses = torch.stack([orbit_pose(pose, pivot.to(pose), float(a), 0.0) for a in azimuths])
    return _with_poses_and_times(camera, poses, torch.full((len(azimuths),), float(time)))


def time_cameras(camera: Cameras, num_frames: int) -> Cameras:
    """Result video from a fixed ``camera``: times evenly over [0, 1]."""
    pose = camera.camera_to_worlds.reshape(-1, 3, 4)[:1]
    return _with_poses_and_times(
        camera, pose.expand(num_frames, 3, 4), torch.linspace(0.0, 1.0, num_frames)
    )


def pivot_in_front(camera_to_world: Tensor, points: Tensor) -> Tensor:
    """The point on the camera's optical axis at the median depth of ``points`` [N, 3] in front of it (the centre of
    what it looks at); one unit in front when no point is."""
    rotation, centre = camera_to_world[:, :3], camera_to_world[:, 3]
    forward = -rotation[:, 2]
    depths = (points.to(centre) - centre) @ forward
    depths = depths[depths > 0]
    depth = float(depths.median()) if depths.numel() else 1.0
    return centre + depth * forward
