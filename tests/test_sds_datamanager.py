"""The SDS camera datamanager and the orbit cameras: threestudio's camera convention (the same (elevation, azimuth)
means the same camera for the renderer and for the 4DM prior), 4Diffusion's view sampling, times and windows, the
resolution schedule, and the fixed cameras that the viewer, ns-render and evaluation use."""

from __future__ import annotations

import math

import pytest
import torch
from nerfstudio.data.datamanagers.random_cameras_datamanager import RandomCamerasDataManager

from ns_4d_methods.data.sds_datamanager import SDSDataManagerConfig
from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.four_dm_prior import camera_vector_from_c2w
from ns_4d_methods.render.orbit_cameras import orbit_c2w, orbit_cameras
from ns_4d_methods.render.time_from_pose import TimeFromPose

ANGLES = [(0.0, 0.0), (5.0, -135.0), (30.0, 70.0), (-20.0, 200.0), (3.3, 91.0)]


def imagedream_camera(elevation: float, azimuth: float) -> torch.Tensor:
    """ImageDream's ``get_camera`` vector (4DIFFUSION.md section 3), row-major 16 values."""
    e, a = math.radians(elevation), math.radians(azimuth)
    ce, se, ca, sa = math.cos(e), math.sin(e), math.cos(a), math.sin(a)
    return torch.tensor(
        [
            ca,
            -sa * se,
            ce * sa,
            ce * sa,
            sa,
            ca * se,
            -ce * ca,
            -ce * ca,
            0,
            ce,
            se,
            se,
            0,
            0,
            0,
            1,
        ]
    )


def test_orbit_camera_matches_threestudio_and_imagedream():
    # threestudio (e=0, a=0) -> the documented vector
    expected = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1], dtype=torch.float32)
    assert torch.allclose(camera_vector_from_c2w(orbit_c2w(0.0, 0.0, 1.1)), expected, atol=1e-6)
    for elevation, azimuth in ANGLES:
        vector = camera_vector_from_c2w(orbit_c2w(elevation, azimuth, 1.7))
        # threestudio's camera at azimuth a is ImageDream's at a + 90; the distance is normalised away
        assert torch.allclose(vector, imagedream_camera(elevation, azimuth + 90.0), atol=1e-5)


def test_orbit_camera_matches_the_prior_camera_vector():
    four_dm_prior = pytest.importorskip("ns_4d_methods.guidance.four_dm_prior")
    for elevation, azimuth in ANGLES:
        ours = camera_vector_from_c2w(orbit_c2w(elevation, azimuth, 1.1))
        theirs = four_dm_prior.camera_vector(torch.tensor(elevation), torch.tensor(azimuth)).float().reshape(16)
        assert torch.allclose(ours, theirs, atol=1e-5), (elevation, azimuth)


def test_orbit_cameras_look_at_the_origin_with_z_up():
    cameras = orbit_cameras(torch.tensor([0.0, 30.0]), torch.tensor([0.0, 90.0]), 2.0, 45.0, 65)
    c2w = cameras.camera_to_worlds
    assert torch.allclose(c2w[0, :, 3], torch.tensor([2.0, 0.0, 0.0]), atol=1e-6)
    e = math.radians(30.0)
    assert torch.allclose(c2w[1, :, 3], torch.tensor([0.0, 2 * math.cos(e), 2 * math.sin(e)]), atol=1e-6)
    # the central pixel's ray passes through the origin; +z (world up) projects above the image centre
    rays = cameras.generate_rays(camera_indices=1)
    centre = rays[32, 32]
    closest = centre.origins - (centre.origins * centre.directions).sum() * centre.directions
    assert closest.norm() < 1e-4
    up = torch.tensor([0.0, 0.0, 0.3])
    local = c2w[1, :, :3].T @ (up - c2w[1, :, 3])  # camera frame: looks down -z, +y up
    assert local[2] < 0 and local[1] > 0
    # focal length from the vertical field of view
    assert torch.allclose(cameras.fy[0], torch.tensor([0.5 * 65 / math.tan(math.radians(22.5))]))


def test_training_batches_follow_4diffusion():
    datamanager = SDSDataManagerConfig(seed=3).setup(device="cpu")
    assert datamanager.includes_time
    cameras, batch = datamanager.next_train(0)
    views = batch["views"]
    assert len(cameras) == 32 and views.num_views == 4 and views.num_frames == 8
    assert torch.allclose(views.times, torch.linspace(0, 1, 8))
    # frames-major: each instant's 4 views share its time
    assert torch.allclose(cameras.times.view(8, 4), views.times[:, None].expand(8, 4))
    # 4 orthogonal azimuths (u + k) / 4 * 360 - 180, one elevation in [0, 5], distance 1.1, fovy 45
    azimuth = views.azimuth
    assert torch.allclose(torch.diff(azimuth), torch.full((3,), 90.0)) and -180 <= azimuth[0] < -90
    assert (views.elevation == views.elevation[0]).all() and 0 <= views.elevation[0] <= 5
    vectors = camera_vector_from_c2w(cameras.camera_to_worlds).view(8, 4, 16)
    for k in range(4):
        expected = camera_vector_from_c2w(orbit_c2w(views.elevation[k], views.azimuth[k], 1.1))
        assert torch.allclose(vectors[:, k], expected.expand(8, 16), atol=1e-5)
    assert torch.allclose(cameras.camera_to_worlds[:, :, 3].norm(dim=-1), torch.full((32,), 1.1))
    assert torch.allclose(cameras.fy, torch.full((32, 1), 0.5 * 64 / math.tan(math.radians(22.5))))
    # the base azimuth is random
    starts = {round(float(datamanager.next_train(1)[1]["views"].azimuth[0]), 3) for _ in range(5)}
    assert len(starts) == 5


def test_resolution_schedule():
    datamanager = SDSDataManagerConfig().setup(device="cpu")
    sizes = {step: int(datamanager.next_train(step)[0].width[0]) for step in (0, 4999, 5000, 9999, 10000, 34999)}
    assert sizes == {0: 64, 4999: 64, 5000: 192, 9999: 192, 10000: 256, 34999: 256}
    assert datamanager.get_train_rays_per_batch() == 32 * 256 * 256
    with pytest.raises(InputError, match="one more resolution than milestones"):
        SDSDataManagerConfig(resolutions=(64, 128)).setup(device="cpu")


def test_window_slides_over_longer_inputs():
    datamanager = SDSDataManagerConfig(num_frames=24).setup(device="cpu")
    starts = set()
    for step in range(60):
        views = datamanager.next_train(step)[1]["views"]
        frames = views.frame_indices
        assert len(frames) == 8 and torch.equal(frames, torch.arange(int(frames[0]), int(frames[0]) + 8))
        assert torch.allclose(views.times, frames / 23.0)
        starts.add(int(frames[0]))
    assert starts <= set(range(17)) and len(starts) > 8  # random starts over [0, 24 - 8]


def test_fixed_cameras_for_viewer_render_and_eval():
    datamanager = SDSDataManagerConfig(num_eval_cameras=16, eval_resolution=32).setup(device="cpu")
    # ns-render spiral accepts nerfstudio's RandomCamerasDataManager and its eval dataloader
    assert isinstance(datamanager, RandomCamerasDataManager)
    camera, _ = datamanager.eval_dataloader.get_camera(image_idx=0)
    assert camera.times is not None and float(camera.times) == 0.0
    cameras = datamanager.eval_dataset.cameras
    assert datamanager.train_dataset is datamanager.eval_dataset and len(cameras) == 16
    assert torch.allclose(cameras.times.view(-1), torch.linspace(0, 1, 16))  # time rises along the orbit
    positions = cameras.camera_to_worlds[:, :, 3]
    azimuths = torch.rad2deg(torch.atan2(positions[:, 1], positions[:, 0])) % 360
    assert torch.allclose(azimuths, (270 + torch.arange(16) * 22.5) % 360, atol=1e-3)  # from the input view, -90
    assert datamanager.eval_dataset[3]["image"].shape == (32, 32, 3)
    # ns-render interpolate drops the path's times; the pipeline's TimeFromPose finds them again along this orbit
    between = (positions[4] + positions[5]) / 2
    found = TimeFromPose([cameras]).times_for(torch.stack([positions[4], between]))
    assert torch.allclose(found, torch.tensor([4 / 15, 4.5 / 15]), atol=1e-4)
    # cameras at chosen azimuths and instants, frames-major
    views = datamanager.view_cameras([0.0, 90.0], torch.tensor([0.0, 0.5, 1.0]), 16)
    assert len(views) == 6 and torch.allclose(views.times.view(-1), torch.tensor([0, 0, 0.5, 0.5, 1, 1.0]))
    assert torch.allclose(views.camera_to_worlds[1, :, 3], torch.tensor([0.0, 1.1, 0.0]), atol=1e-6)
