"""nerfacto-4d: time reaches the fields, cameras without times are placed in time, K-Planes' time resolution and
time-smoothness loss are in place, and training on D-NeRF helps (on CUDA too, under the cuda marker)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.cameras.rays import Frustums, RaySamples
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.field_components.field_heads import FieldHeadNames

from method_configs.nerfacto_4d import nerfacto_4d
from ns_4d_methods.fields.nerfacto_4d_field import (
    Nerfacto4DField,
    SpaceTimeHashEncoding,
    TimeHashMLPDensityField,
    kplanes_time_resolution,
)
from ns_4d_methods.models.image_metrics import LazyLPIPS
from ns_4d_methods.models.nerfacto_4d import Nerfacto4DModel, Nerfacto4DModelConfig
from ns_4d_methods.render.time_from_pose import TimeFromPose

DNERF_SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "dnerf_jumpingjacks_400"

TINY_GRID = dict(num_levels=4, base_res=4, max_res=32, log2_hashmap_size=10, features_per_level=2)
TINY_PROPOSALS = [
    {"hidden_dim": 16, "log2_hashmap_size": 10, "num_levels": 3, "max_res": 32, "use_linear": False},
    {"hidden_dim": 16, "log2_hashmap_size": 10, "num_levels": 3, "max_res": 64, "use_linear": False},
]


def _ray_samples(times: float | None, num_rays: int = 6, num_samples: int = 5) -> RaySamples:
    generator = torch.Generator().manual_seed(0)
    origins = torch.rand(num_rays, num_samples, 3, generator=generator) * 1.6 - 0.8
    return RaySamples(
        frustums=Frustums(
            origins=origins,
            directions=F.normalize(torch.randn(num_rays, num_samples, 3, generator=generator), dim=-1),
            starts=torch.zeros(num_rays, num_samples, 1),
            ends=torch.full((num_rays, num_samples, 1), 0.01),
            pixel_area=torch.ones(num_rays, num_samples, 1),
        ),
        camera_indices=torch.zeros(num_rays, num_samples, 1, dtype=torch.long),
        times=None if times is None else torch.full((num_rays, num_samples, 1), times),
    )


def _randomize_time_grid(module: torch.nn.Module) -> None:
    """Large 4D-grid features, so that time visibly matters (a fresh grid starts near zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "grid_4d" in name:
                parameter.normal_(0.0, 1.0)


def test_field_output_changes_with_time_and_only_through_the_4d_grid():
    aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    field = Nerfacto4DField(
        aabb, num_images=3, **TINY_GRID, max_res_4d=32, log2_hashmap_size_4d=10, implementation="torch"
    )
    field.eval()
    _randomize_time_grid(field)
    early = field(_ray_samples(0.2))
    late = field(_ray_samples(0.8))
    for head in (FieldHeadNames.DENSITY, FieldHeadNames.RGB):
        assert not torch.allclose(early[head], late[head], atol=1e-4)
        torch.testing.assert_close(early[head], field(_ray_samples(0.2))[head])
    # rays without times are at time 0
    rgb = FieldHeadNames.RGB
    torch.testing.assert_close(field(_ray_samples(None))[rgb], field(_ray_samples(0.0))[rgb])
    with torch.no_grad():
        field.mlp_base[0].grid_4d.hash_table.zero_()
    torch.testing.assert_close(field(_ray_samples(0.2))[rgb], field(_ray_samples(0.8))[rgb])


def test_proposal_density_fn_takes_time():
    aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    proposal = TimeHashMLPDensityField(aabb, hidden_dim=16, implementation="torch", **TINY_GRID)
    _randomize_time_grid(proposal)
    positions = _ray_samples(None).frustums.origins
    early = proposal.density_fn(positions, times=torch.full((6, 1, 1), 0.1))
    late = proposal.density_fn(positions, times=torch.full((6, 1, 1), 0.9))
    assert early.shape == (6, 5, 1)
    assert not torch.allclose(early, late, rtol=1e-3)
    torch.testing.assert_close(proposal.density_fn(positions), proposal.density_fn(positions, torch.zeros(6, 5, 1)))


def test_time_resolution_follows_kplanes_rule_and_time_smoothness_is_a_loss(tiny_model):
    assert kplanes_time_resolution(200) == 100 and kplanes_time_resolution(50) == 25  # K-Planes on D-NeRF
    grids = tiny_model.field.mlp_base[0]
    assert grids.time_resolution == 1 and grids.time_scale == pytest.approx(1 / 32)  # 2 training images, 32 cells
    proposal_grids = tiny_model.proposal_networks[0].encoding
    assert proposal_grids.time_resolution == 1
    # the finest level has time_resolution cells along time: two times in one cell interpolate the same corners
    encoding = SpaceTimeHashEncoding(2, 4, 16, 10, 2, max_res_4d=16, log2_hashmap_size_4d=10, implementation="torch",
                                     time_resolution=4)
    _randomize_time_grid(encoding)
    x = torch.rand(50, 3, generator=torch.Generator().manual_seed(2))
    at = lambda t: encoding.grid_4d(torch.cat([x, torch.full((50, 1), t * 4 / 16)], -1))  # noqa: E731
    torch.testing.assert_close(encoding._space_time(x, torch.full((50, 1), 0.3)), at(0.3))
    # a 4D grid that is linear in time has no second difference; a random one has
    with torch.no_grad():
        smooth_random = encoding.time_smoothness(512)
    assert smooth_random > 0
    with torch.no_grad():
        encoding.grid_4d.hash_table.zero_()
    assert encoding.time_smoothness(512) == 0
    # the model's loss while training, weighted by time_smoothness_mult, with gradients into the 4D grid
    tiny_model.train()
    rays = _camera_at(torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.5]])).generate_rays(0).reshape((-1,))
    outputs = tiny_model(rays)
    batch = {"image": torch.ones(36, 3)}
    losses = tiny_model.get_loss_dict(outputs, batch, tiny_model.get_metrics_dict(outputs, batch))
    assert losses["time_smoothness"] > 0
    losses["time_smoothness"].backward()
    assert tiny_model.field.mlp_base[0].grid_4d.hash_table.grad.abs().sum() > 0
    tiny_model.config.time_smoothness_mult = 0.0
    metrics = tiny_model.get_metrics_dict(outputs, batch)
    assert "time_smoothness" not in tiny_model.get_loss_dict(outputs, batch, metrics)


def _camera_at(center: torch.Tensor, times: torch.Tensor | None = None, size: int = 6) -> Cameras:
    """Cameras (one per row of ``center``) looking at the origin along -z of their frame (OpenGL convention)."""
    forward = F.normalize(-center, dim=-1)
    right = F.normalize(torch.cross(forward, torch.tensor([[0.0, 0.0, 1.0]]).expand_as(forward), dim=-1), dim=-1)
    up = torch.cross(right, forward, dim=-1)
    c2w = torch.stack([right, up, -forward, center], dim=-1)
    return Cameras(camera_to_worlds=c2w, fx=8.0, fy=8.0, cx=size / 2, cy=size / 2, width=size, height=size, times=times)


@pytest.fixture
def tiny_model() -> Nerfacto4DModel:
    config = Nerfacto4DModelConfig(
        **TINY_GRID,
        max_res_4d=32,
        log2_hashmap_size_4d=10,
        proposal_net_args_list=TINY_PROPOSALS,
        num_proposal_samples_per_ray=(16, 8),
        num_nerf_samples_per_ray=8,
        near_plane=2.0,
        far_plane=6.0,
        disable_scene_contraction=True,
        background_color="white",
        implementation="torch",
    )
    scene_box = SceneBox(aabb=torch.tensor([[-1.5, -1.5, -1.5], [1.5, 1.5, 1.5]]))
    model = config.setup(scene_box=scene_box, num_train_data=2, metadata={})
    _randomize_time_grid(model)
    return model.eval()


def test_model_builds_offline_and_renders_time(tiny_model):
    assert isinstance(tiny_model.lpips, LazyLPIPS)
    center = torch.tensor([[4.0, 0.0, 0.0]])
    early = tiny_model.get_outputs_for_camera(_camera_at(center, torch.tensor([[0.1]])))
    late = tiny_model.get_outputs_for_camera(_camera_at(center, torch.tensor([[0.9]])))
    assert early["rgb"].shape == (6, 6, 3)
    assert not torch.allclose(early["rgb"], late["rgb"], atol=1e-4)
    metrics, images = tiny_model.get_image_metrics_and_images(early, {"image": late["rgb"]})
    assert {"psnr", "ssim"} <= set(metrics) and {"img", "accumulation", "depth", "prop_depth_0"} <= set(images)


def test_camera_without_time_takes_it_from_the_nearest_training_cameras(tiny_model):
    train_centers = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    tiny_model.time_from_pose = TimeFromPose([_camera_at(train_centers, torch.tensor([[0.2], [0.6]]))])
    between = torch.tensor([[3.0, 1.0, 0.0]])  # a quarter of the way from the first camera to the second
    untimed = tiny_model.get_outputs_for_camera(_camera_at(between))
    expected_time = float(tiny_model.time_from_pose.times_for(between))
    assert 0.2 < expected_time < 0.6
    timed = tiny_model.get_outputs_for_camera(_camera_at(between, torch.tensor([[expected_time]])))
    at_zero = tiny_model.get_outputs_for_camera(_camera_at(between, torch.tensor([[0.0]])))
    torch.testing.assert_close(untimed["rgb"], timed["rgb"])
    assert not torch.allclose(untimed["rgb"], at_zero["rgb"], atol=1e-4)


def _test_psnr(pipeline, indices=(0, 7, 14)) -> float:
    """Mean PSNR of the model's renders of some test-split images."""
    pipeline.eval()
    dataset = pipeline.datamanager.eval_dataset
    psnrs = []
    for i in indices:
        outputs = pipeline.model.get_outputs_for_camera(dataset.cameras[i : i + 1].to(pipeline.device))
        metrics, _ = pipeline.model.get_image_metrics_and_images(outputs, dataset[i])
        psnrs.append(metrics["psnr"])
    pipeline.train()
    return sum(psnrs) / len(psnrs)


@pytest.mark.slow
@pytest.mark.skipif(not DNERF_SCENE.is_dir(), reason=f"needs {DNERF_SCENE}")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_training_on_dnerf_raises_test_psnr(tmp_path, device):
    config = copy.deepcopy(nerfacto_4d.config)
    config.output_dir = tmp_path
    config.vis = "tensorboard"
    config.viewer.quit_on_train_completion = True
    config.machine.device_type = device
    config.max_num_iterations = 60
    config.steps_per_save = 1000
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 1000
    datamanager = config.pipeline.datamanager
    datamanager.data = DNERF_SCENE
    datamanager.camera_res_scale_factor = 0.25  # 100 x 100 images
    datamanager.train_num_rays_per_batch = datamanager.eval_num_rays_per_batch = 1024
    model = config.pipeline.model
    model.num_levels, model.log2_hashmap_size, model.max_res = 8, 14, 256
    model.log2_hashmap_size_4d, model.max_res_4d = 14, 256
    model.proposal_net_args_list = [
        {"hidden_dim": 16, "log2_hashmap_size": 14, "num_levels": 5, "max_res": 64, "use_linear": False},
        {"hidden_dim": 16, "log2_hashmap_size": 14, "num_levels": 5, "max_res": 128, "use_linear": False},
    ]
    model.num_proposal_samples_per_ray = (64, 32)
    model.num_nerf_samples_per_ray = 24
    model.eval_num_rays_per_chunk = 4096
    # tiny-cuda-nn's grids run on CUDA only (used there when installed; the PyTorch grids otherwise)
    model.implementation = "tcnn" if device == "cuda" else "torch"
    config.set_timestamp()

    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup(test_mode="test")
    psnr_before = _test_psnr(trainer.pipeline)
    trainer.train()
    psnr_after = _test_psnr(trainer.pipeline)
    print(f"nerfacto-4d test-split PSNR: {psnr_before:.2f} dB at step 0 -> {psnr_after:.2f} dB after 60 steps")
    assert psnr_after > psnr_before + 1.0
    assert list((tmp_path).rglob("step-*.ckpt"))
