"""Time for cameras that carry none, from the dataset cameras they lie between.

``ns-render interpolate`` builds its path with nerfstudio's ``get_interpolated_camera_path``, which moves the camera
in straight lines between dataset cameras but drops their times. Each split's cameras, taken in time order, form a
polyline of (position, time) samples; a path camera is placed on the nearest segment of those polylines and given the
time interpolated along it. On the path's own key cameras this returns their exact times, and in between time
advances as it did during capture.
"""

from __future__ import annotations

from typing import Sequence

import torch
from nerfstudio.cameras.cameras import Cameras


class TimeFromPose:
    """Looks up a time for a camera position from dataset cameras' positions and times."""

    def __init__(self, camera_sets: Sequence[Cameras]) -> None:
        starts, ends, t0, t1 = [], [], [], []
        for cameras in camera_sets:
            if cameras.times is None or len(cameras) == 0:
                continue
            times = cameras.times.reshape(-1).detach().cpu().float()
            order = torch.argsort(times)
            centers = cameras.camera_to_worlds[..., :3, 3].reshape(-1, 3).detach().cpu().float()[order]
            times = times[order]
            nxt = torch.clamp(torch.arange(len(times)) + 1, max=len(times) - 1)  # a lone camera is a point segment
            starts.append(centers)
            ends.append(centers[nxt])
            t0.append(times)
            t1.append(times[nxt])
        self.available = bool(starts)
        if self.available:
            self.starts, self.ends = torch.cat(starts), torch.cat(ends)
            self.t0, self.t1 = torch.cat(t0), torch.cat(t1)

    def times_for(self, centers: torch.Tensor) -> torch.Tensor:
        """[N] times for [N, 3] camera centres, interpolated along the nearest time-ordered segment."""
        p = centers.detach().cpu().float()[:, None, :]
        seg = (self.ends - self.starts)[None]
        length2 = (seg**2).sum(-1).clamp_min(1e-12)
        u = (((p - self.starts[None]) * seg).sum(-1) / length2).clamp(0.0, 1.0)
        dist = ((self.starts[None] + u[..., None] * seg - p) ** 2).sum(-1)
        best = dist.argmin(-1)
        u = u.gather(1, best[:, None]).squeeze(1)
        return self.t0[best] + u * (self.t1[best] - self.t0[best])

    def fill(self, cameras: Cameras) -> Cameras:
        """``cameras`` with times filled in where they have none (returned unchanged otherwise)."""
        if cameras.times is not None or not self.available:
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
