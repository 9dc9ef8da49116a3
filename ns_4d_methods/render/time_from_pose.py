"""Time for cameras that carry none, from the training cameras nearest in position.

``ns-render interpolate`` builds its path with nerfstudio's ``get_interpolated_camera_path``, which drops camera
times. In a monocular capture each training camera was taken at one instant, so a path camera lying between two
training cameras is given the time between theirs, weighted by distance; along the path time then advances as it did
during capture.
"""

from __future__ import annotations

import torch
from nerfstudio.cameras.cameras import Cameras


class TimeFromPose:
    """Looks up a time for a camera position from the training cameras' positions and times."""

    def __init__(self, train_cameras: Cameras) -> None:
        self.centers = train_cameras.camera_to_worlds[..., :3, 3].reshape(-1, 3).detach().cpu().float()
        times = train_cameras.times
        self.times = None if times is None else times.reshape(-1).detach().cpu().float()

    def times_for(self, centers: torch.Tensor) -> torch.Tensor:
        """[N] times for [N, 3] camera centres: distance-weighted between the two nearest training cameras."""
        assert self.times is not None
        dist = torch.cdist(centers.detach().cpu().float(), self.centers)
        if self.centers.shape[0] == 1:
            return self.times.expand(centers.shape[0]).clone()
        d, idx = dist.topk(2, dim=-1, largest=False)
        w = d.flip(-1) / d.sum(-1, keepdim=True).clamp_min(1e-12)
        w = torch.where(d.sum(-1, keepdim=True) > 0, w, torch.tensor([1.0, 0.0]))
        return (self.times[idx] * w).sum(-1)

    def fill(self, cameras: Cameras) -> Cameras:
        """``cameras`` with times filled in where they have none (returned unchanged otherwise)."""
        if cameras.times is not None or self.times is None:
            return cameras
        centers = cameras.camera_to_worlds[..., :3, 3].reshape(-1, 3)
        times = self.times_for(centers).to(cameras.device).reshape(*cameras.shape, 1)
        return Cameras(
            camera_to_worlds=cameras.camera_to_worlds,
            fx=cameras.fx,
            fy=cameras.fy,
            cx=cameras.cx,
            cy=cameras.cy,
            width=cameras.width,
            height=cameras.height,
            distortion_params=cameras.distortion_params,
            camera_type=cameras.camera_type,
            times=times,
            metadata=cameras.metadata,
        )
