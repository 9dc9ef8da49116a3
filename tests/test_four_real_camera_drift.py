"""The reference video's camera motion (:mod:`ns_4d_methods.data.camera_drift`): about 0 for the static camera of
the analytic scene over its textured ground, the pan's size for the same video panned, and the warning it gives."""

from __future__ import annotations

import numpy as np
import pytest
from four_real_scene import camera_pose, reference_video
from PIL import Image

from ns_4d_methods.data.camera_drift import camera_drift
from ns_4d_methods.guidance.video_models import VideoGenerationConfig, reference_video_stage


@pytest.fixture(scope="module")
def video() -> np.ndarray:
    return reference_video(camera_pose(20.0, 35.0), 9, 160, ground=True)


def test_static_camera_has_no_drift_and_a_pan_its_size(video) -> None:
    static = camera_drift(video[:, 16:144, 16:144], step=2)
    # the same frames seen by a camera panning 2 px a frame: 16 px over 8 frames, 7.1 % of the 181 px diagonal
    panned = np.stack([frame[16:144, 16 + 2 * k : 144 + 2 * k] for k, frame in enumerate(video)])
    drift = camera_drift(panned, step=2)
    print(f"camera drift: static {static:.4f}, panned 16 px {drift:.4f} (0.0884 expected)")
    assert static < VideoGenerationConfig().max_camera_drift  # 0.014: the moving spheres pull it a little
    assert drift == pytest.approx(16 / np.hypot(128, 128), abs=0.01)


def test_a_moving_reference_video_warns(video, tmp_path) -> None:
    panned = np.stack([frame[16:144, 8 * k : 8 * k + 96] for k, frame in enumerate(video)])
    (tmp_path / "user").mkdir()
    for index, frame in enumerate(panned):
        Image.fromarray(frame).save(tmp_path / "user" / f"{index:03d}.png")
    config = VideoGenerationConfig(reference_video=tmp_path / "user", height=128, width=96)
    with pytest.warns(UserWarning, match="the reference video's camera moves"):
        reference_video_stage(config, tmp_path / "run")
