"""Camera paths without times get the times of the dataset cameras they pass between."""

import torch
from nerfstudio.cameras.cameras import Cameras

from ns_4d_methods.render.time_from_pose import TimeFromPose


def cameras_at(positions, times=None):
    c2w = torch.eye(4)[None, :3, :].repeat(len(positions), 1, 1)
    c2w[:, :3, 3] = torch.tensor(positions, dtype=torch.float32)
    t = None if times is None else torch.tensor(times, dtype=torch.float32)[:, None]
    return Cameras(camera_to_worlds=c2w, fx=10.0, fy=10.0, cx=5.0, cy=5.0, width=10, height=10, times=t)


def test_path_between_key_cameras_interpolates_their_times():
    # Eval cameras in time order along x; a second, shuffled training set far away must not interfere.
    evals = cameras_at([[0, 0, 0], [1, 0, 0], [2, 0, 0]], [0.0, 0.5, 1.0])
    train = cameras_at([[0, 5, 0], [3, 5, 0], [1, 6, 0]], [0.9, 0.1, 0.4])
    lookup = TimeFromPose([train, evals])
    path = cameras_at([[0, 0, 0], [0.5, 0, 0], [1.0, 0, 0], [1.75, 0, 0], [2, 0, 0]])
    filled = lookup.fill(path)
    assert filled.times.squeeze(-1).tolist() == [0.0, 0.25, 0.5, 0.875, 1.0]


def test_cameras_with_times_are_left_alone_and_no_times_means_no_lookup():
    cams = cameras_at([[0, 0, 0]], [0.3])
    lookup = TimeFromPose([cameras_at([[0, 0, 0], [1, 0, 0]], [0.0, 1.0])])
    assert lookup.fill(cams) is cams
    untimed = TimeFromPose([cameras_at([[0, 0, 0]])])
    assert not untimed.available and untimed.fill(cameras_at([[1, 0, 0]])).times is None
