"""splatfacto-4d: the deformation starts as the identity and learns time-dependent motion, time reaches the renderer,
nothing downloads, splatfacto's densification runs on the torch rasterizer's info, 3DGS-MCMC's capped relocation
runs on the CPU (eq. 9 against a direct evaluation), seed points with colours place the Gaussians on the CPU, the
presets keep the full schedule on CUDA, the gsplat call binds to gsplat's signature, a gsplat without compiled kernels
is a one-line error before training, Deformable-3DGS' network and densification sizes are in place, and a short
training run on D-NeRF raises test PSNR (on CUDA too, with gsplat and its MCMC kernels, under the cuda marker)."""

from __future__ import annotations

import copy
import inspect
import math
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.engine.optimizers import Optimizers

from method_configs.splatfacto_4d import (
    COMPACT_STEPS,
    FULL_STEPS,
    compress_schedule,
    splatfacto_4d,
    splatfacto_4d_config,
)
from ns_4d_methods.errors import InputError
from ns_4d_methods.models.gaussian_rasterizer_torch import rasterization_torch
from ns_4d_methods.models.image_metrics import LazyLPIPS
from ns_4d_methods.models.mcmc_densification import MCMCStrategyAnyDevice, compute_relocation_torch
from ns_4d_methods.models.splatfacto_4d import Splatfacto4DModel, Splatfacto4DModelConfig, camera_extent

DNERF_SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "dnerf_jumpingjacks_400"


def _camera(x: float = 0.0, time=None) -> Cameras:
    c2w = torch.tensor([[[1.0, 0.0, 0.0, x], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 3.0]]])
    times = None if time is None else torch.tensor([[time]])
    return Cameras(camera_to_worlds=c2w, fx=40.0, fy=40.0, cx=24.0, cy=24.0, width=48, height=48, times=times)


@pytest.fixture
def model() -> Splatfacto4DModel:
    torch.manual_seed(0)
    config = Splatfacto4DModelConfig(
        num_random=300,
        random_scale=1.5,
        num_downscales=0,
        deformation_num_layers=3,
        deformation_layer_width=32,
        deformation_warmup=0,
        background_color="black",
        rasterizer="torch",
    )
    return config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)


def _train_step(model: Splatfacto4DModel, optimizers: Optimizers, camera: Cameras, step: int) -> None:
    model.train()
    model.step_cb(optimizers, step)
    outputs = model(camera)
    target = torch.zeros(48, 48, 3)
    target[:, :24] = 1.0  # half white: forces the Gaussians to change
    loss = sum(model.get_loss_dict(outputs, {"image": target}).values())
    optimizers.zero_grad_all()
    loss.backward()
    optimizers.optimizer_step_all()
    model.step_post_backward(step)


def test_constructs_without_download_and_deformation_is_identity_at_init(model):
    assert isinstance(model.lpips, LazyLPIPS)
    means, quats, log_scales = model.deform(0.7)
    assert torch.equal(means, model.means)
    assert torch.allclose(quats, torch.nn.functional.normalize(model.quats, dim=-1))
    assert torch.equal(log_scales, model.scales)


def test_deformation_moves_gaussians_with_time_after_a_step(model):
    optimizers = Optimizers(copy.deepcopy(splatfacto_4d.config.optimizers), model.get_param_groups())
    assert "deformation" in optimizers.optimizers
    _train_step(model, optimizers, _camera(time=0.5), step=0)
    with torch.no_grad():
        at_0, at_1 = model.deform(0.0)[0], model.deform(1.0)[0]
    assert not torch.allclose(at_0, model.means) and not torch.allclose(at_0, at_1)

    # the camera's time reaches the render; a camera without time renders at time 0
    model.eval()
    render = lambda cam: model.get_outputs_for_camera(cam)["rgb"]  # noqa: E731
    at_time_0 = render(_camera(time=0.0))
    assert not torch.equal(at_time_0, render(_camera(time=1.0)))
    assert torch.equal(render(_camera()), at_time_0)

    # with the pipeline's lookup (DynamicPipeline sets ``time_from_pose``), a time-less camera is placed in time first
    class _AtTimeOne:
        def fill(self, camera: Cameras) -> Cameras:
            return _camera(float(camera.camera_to_worlds[0, 0, 3]), time=1.0)

    model.time_from_pose = _AtTimeOne()
    assert torch.equal(render(_camera()), render(_camera(time=1.0)))
    assert torch.equal(render(_camera(time=0.0)), at_time_0)  # a camera's own time is kept


def test_warmup_keeps_gaussians_static(model):
    model.config.deformation_warmup = 10
    optimizers = Optimizers(copy.deepcopy(splatfacto_4d.config.optimizers), model.get_param_groups())
    _train_step(model, optimizers, _camera(time=0.5), step=0)
    assert torch.equal(model.deformation_field.head.weight, torch.zeros_like(model.deformation_field.head.weight))
    assert torch.equal(model.deform(0.0)[0], model.deform(1.0)[0])


def test_deformable_3dgs_network_time_network_default_init_and_scale_offsets_after_exp():
    box = SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3]))
    config = Splatfacto4DModelConfig(num_random=50, deformation_num_layers=3, deformation_layer_width=32,
                                     rasterizer="torch", deformation_warmup=0, time_network_width=256,
                                     deformation_zero_init=False, scale_offset="linear")
    torch.manual_seed(0)
    model = config.setup(scene_box=box, num_train_data=1)
    field = model.deformation_field
    # time encoding 1 + 2 x 6 = 13 -> 256 -> 30, concatenated with the position encoding 3 + 2 x 3 x 10 = 63
    assert [tuple(m.weight.shape) for m in field.time_network if hasattr(m, "weight")] == [(256, 13), (30, 256)]
    assert field.mlp.in_dim == 63 + 30
    assert field.head.weight.abs().sum() > 0  # PyTorch's default initialisation: deformed from the start
    with torch.no_grad():
        d_scales = field(model.means, torch.full((50, 1), 0.4))[2]
        expected = torch.abs(torch.exp(model.scales) + d_scales)  # Deformable-3DGS: get_scaling + d_scaling
        torch.testing.assert_close(torch.exp(model.deform(0.4)[2]), expected, rtol=1e-5, atol=1e-7)
        model.config.scale_offset = "log"
        torch.testing.assert_close(model.deform(0.4)[2], model.scales + d_scales)


def test_densification_sizes_follow_the_camera_extent():
    # D-NeRF-like cameras 4 units from the origin: 3DGS' extent is 1.1 x 4
    angles = torch.linspace(0, 2 * math.pi, 9)[:-1]
    centres = torch.stack([4 * torch.cos(angles), 4 * torch.sin(angles), torch.zeros(8)], dim=-1)
    camera_to_worlds = torch.cat([torch.eye(3).expand(8, 3, 3), centres[..., None]], dim=-1)
    assert camera_extent(camera_to_worlds) == pytest.approx(4.4)
    attributes = mock.MagicMock()
    attributes.pipeline.datamanager.train_dataset.cameras.camera_to_worlds = camera_to_worlds
    box = SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3]))
    for by_extent, scale in ((True, 4.4), (False, 1.0)):
        config = Splatfacto4DModelConfig(num_random=50, deformation_num_layers=2, deformation_layer_width=16,
                                         rasterizer="torch", densify_by_camera_extent=by_extent)
        model = config.setup(scene_box=box, num_train_data=1)
        model.get_training_callbacks(attributes)
        assert model.strategy_state["scene_scale"] == pytest.approx(scale)


def test_densification_and_pruning_run_on_the_torch_rasterizer_info(model):
    # refine at step 4 (after splatfacto's pause of num_train_data + refine_every steps following the reset at 0)
    model.config.warmup_length, model.config.refine_every = 1, 2
    model.populate_modules()
    model.strategy.grow_grad2d = 0.0  # every Gaussian that received a gradient grows
    optimizers = Optimizers(copy.deepcopy(splatfacto_4d.config.optimizers), model.get_param_groups())
    grown, grow = [], model.strategy._grow_gs
    record = lambda *args: grown.append(grow(*args)) or grown[-1]  # noqa: E731
    with mock.patch.object(model.strategy, "_grow_gs", side_effect=record):
        for step in range(5):
            _train_step(model, optimizers, _camera(time=step / 4), step)
    assert len(grown) == 1 and sum(grown[0]) > 0  # (duplicated, split) at step 4
    assert all(len(p) == model.num_points for p in model.gauss_params.values())
    _train_step(model, optimizers, _camera(time=0.5), step=5)  # optimizer state follows the new Gaussians


def _relocation_reference(opacity: float, scale: float, n: int):
    """3DGS-MCMC eq. 9 term by term, as gsplat's CUDA kernel sums it, in float64."""
    new_opacity = 1.0 - (1.0 - opacity) ** (1.0 / n)
    denominator = sum(
        math.comb(i - 1, k) * (-1) ** k / math.sqrt(k + 1) * new_opacity ** (k + 1)
        for i in range(1, n + 1)
        for k in range(i)
    )
    return new_opacity, scale * opacity / denominator


def test_relocation_matches_equation_9():
    binoms = MCMCStrategyAnyDevice().initialize_state()["binoms"]
    opacities = torch.tensor([0.9, 0.5, 0.05, 0.99, 0.3, 0.7])
    ratios = torch.tensor([1, 2, 3, 7, 20, 60])  # 60 is clamped to the table's 51, as gsplat clamps it
    scales = torch.rand(6, 3) + 0.1
    new_opacities, new_scales = compute_relocation_torch(opacities[:, None], scales, ratios, binoms)
    assert new_opacities.shape == (6, 1) and new_scales.shape == (6, 3)
    for i, (o, n) in enumerate(zip(opacities.tolist(), ratios.clamp(max=51).tolist())):
        expected_opacity, expected_scale = _relocation_reference(o, 1.0, n)
        assert new_opacities[i, 0].item() == pytest.approx(expected_opacity, rel=1e-5)
        assert torch.allclose(new_scales[i], scales[i] * expected_scale, rtol=1e-5)
    # a Gaussian rendered once is unchanged
    assert new_opacities[0, 0] == pytest.approx(0.9) and torch.allclose(new_scales[0], scales[0])


@pytest.mark.cuda
def test_gsplat_relocation_kernel_matches_the_torch_one_with_splatfactos_opacities():
    from gsplat.relocation import compute_relocation

    binoms = MCMCStrategyAnyDevice().initialize_state()["binoms"]
    # gsplat's relocate passes sigmoid(params["opacities"])[idx]: [N, 1] with splatfacto's parameters
    opacities = torch.tensor([0.9, 0.5, 0.05, 0.99, 0.3, 0.7])[:, None]
    ratios = torch.tensor([1, 2, 3, 7, 20, 60])
    scales = torch.rand(6, 3) + 0.1
    expected = compute_relocation_torch(opacities, scales, ratios, binoms)
    cuda = compute_relocation(opacities.cuda(), scales.cuda(), ratios.clone().cuda(), binoms.cuda())
    assert cuda[0].numel() == 6
    assert torch.allclose(cuda[0].cpu().reshape(6), expected[0][:, 0], rtol=1e-4)
    assert torch.allclose(cuda[1].cpu(), expected[1], rtol=1e-3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_mcmc_relocates_dead_gaussians_and_holds_the_cap(model, device):
    # on CUDA: gsplat's rasterizer and its relocation and noise kernels, with the opacities splatfacto holds
    model.config.strategy, model.config.max_gs_num = "mcmc", 330
    model.config.warmup_length, model.config.refine_every, model.config.stop_split_at = 0, 2, 100
    model.config.rasterizer = "gsplat" if device == "cuda" else "torch"
    model.populate_modules()
    model.to(device)
    assert isinstance(model.strategy, MCMCStrategyAnyDevice) and not model.strategy.absgrad
    with torch.no_grad():
        model.opacities[:20] = -10.0  # dead: opacity 4.5e-5
    optimizers = Optimizers(copy.deepcopy(splatfacto_4d.config.optimizers), model.get_param_groups())
    means_before = model.means.detach().clone()
    counts = []
    for step in range(7):
        _train_step(model, optimizers, _camera(time=step / 6).to(device), step)
        counts.append(model.num_points)
    # refinements at steps 2, 4, 6: +5 % each (300 -> 315 -> 330), then the cap
    assert counts == [300, 300, 315, 315, 330, 330, 330], counts
    assert (torch.sigmoid(model.opacities[:300]) > 0.005).all()  # the dead ones were moved onto live ones
    assert not torch.allclose(model.means[:300], means_before, atol=1e-3)
    losses = model.get_loss_dict(model(_camera(time=0.5).to(device)), {"image": torch.zeros(48, 48, 3)})
    assert losses["mcmc_opacity_reg"] > 0 and losses["mcmc_scale_reg"] > 0
    _train_step(model, optimizers, _camera(time=0.5).to(device), step=7)  # optimizer state follows the new Gaussians


def test_auto_strategy_is_mcmc_only_from_seed_points():
    config = Splatfacto4DModelConfig(deformation_num_layers=2, deformation_layer_width=16, rasterizer="torch",
                                     strategy="auto", num_random=50)
    box = SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3]))
    seeded = config.setup(scene_box=box, num_train_data=1, seed_points=(torch.rand(40, 3), torch.zeros(40, 3)))
    random = config.setup(scene_box=box, num_train_data=1, seed_points=None)
    assert isinstance(seeded.strategy, MCMCStrategyAnyDevice) and seeded.uses_mcmc
    assert not isinstance(random.strategy, MCMCStrategyAnyDevice) and not random.uses_mcmc


def test_static_warmup_applies_to_random_starts_and_optionally_to_seed_points():
    box = SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3]))
    points = (torch.rand(40, 3) - 0.5, torch.zeros(40, 3, dtype=torch.uint8))
    moved = {}
    for with_points in (True, False):
        config = Splatfacto4DModelConfig(deformation_num_layers=2, deformation_layer_width=16, rasterizer="torch",
                                         num_random=50, deformation_warmup=100,
                                         deformation_warmup_with_points=with_points)
        for name, seeds in (("points", points), ("random", None)):
            model = config.setup(scene_box=box, num_train_data=1, seed_points=seeds)
            with torch.no_grad():  # a deformation that moves every Gaussian
                model.deformation_field.head.bias.copy_(torch.tensor([0.1, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
            model.step = 0
            means, _, _ = model.deform(0.5)
            moved[with_points, name] = not torch.equal(means, model.means)
            assert model.deformation_warmup == (0 if (name, with_points) == ("points", False) else 100)
            model.step = 100
            assert not torch.equal(model.deform(0.5)[0], model.means)  # after the warm-up it always moves
    assert moved == {(True, "points"): False, (True, "random"): False, (False, "points"): True, (False, "random"): False}


def test_mcmc_with_every_gaussian_dead_stops_with_a_clear_error(model):
    model.config.strategy, model.config.warmup_length, model.config.refine_every = "mcmc", 0, 2
    model.populate_modules()
    with torch.no_grad():
        model.opacities.fill_(-10.0)
    optimizers = Optimizers(copy.deepcopy(splatfacto_4d.config.optimizers), model.get_param_groups())
    with pytest.raises(RuntimeError, match="all 300 Gaussians fell below opacity 0.005 by step 2"):
        for step in range(3):
            _train_step(model, optimizers, _camera(time=0.5), step)


def test_seed_points_with_colours_on_the_cpu():
    points = torch.rand(200, 3) - 0.5
    colours = torch.randint(0, 256, (200, 3), dtype=torch.uint8)
    config = Splatfacto4DModelConfig(deformation_num_layers=2, deformation_layer_width=16, rasterizer="torch")
    model = config.setup(
        scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1, seed_points=(points, colours)
    )
    assert torch.equal(model.means, points)
    assert torch.allclose(model.colors, colours.float() / 255.0, atol=1e-6)  # splatfacto's SH DC from the colours
    assert model.seed_points[1] is colours


def test_presets_keep_the_full_schedule_and_compact_it_without_cuda():
    full, compact = splatfacto_4d_config("full"), splatfacto_4d_config("compact")
    assert splatfacto_4d.config.max_num_iterations == (FULL_STEPS if torch.cuda.is_available() else COMPACT_STEPS)
    # full: Deformable-3DGS' values (splatfacto's phases)
    model = full.pipeline.model
    assert full.max_num_iterations == 40000 and model.strategy == "default" and model.num_random == 50000
    assert (model.deformation_warmup, model.warmup_length, model.refine_every, model.stop_split_at) == (3000, 500, 100, 15000)
    assert (model.num_downscales, model.resolution_schedule, model.sh_degree_interval) == (2, 3000, 1000)
    assert (model.deformation_num_layers, model.deformation_layer_width) == (8, 256)
    assert (model.cull_alpha_thresh, model.cull_scale_thresh, model.densify_size_thresh) == (0.005, 0.1, 0.01)
    assert model.densify_by_camera_extent and model.scale_offset == "linear" and not model.deformation_zero_init
    assert (model.time_network_width, model.time_network_outputs) == (256, 30)
    assert model.deformation_warmup_with_points
    rates = {name: (group["optimizer"].lr, group["scheduler"]) for name, group in full.optimizers.items()}
    assert rates["means"][0] == pytest.approx(8e-4) and rates["means"][1].lr_final == pytest.approx(8e-6)
    assert rates["scales"][0] == pytest.approx(0.025) and rates["deformation"][0] == pytest.approx(8e-4)
    # compact: the same phases at 3,000 / 40,000, bounded Gaussians, splatfacto's rates for the means and scales
    model = compact.pipeline.model
    assert compact.max_num_iterations == 3000 and model.strategy == "auto" and model.max_gs_num == 10000
    assert model.num_random == 10000  # a random start begins with the cap's worth of Gaussians
    phases = (model.warmup_length, model.stop_split_at, model.sh_degree_interval, model.refine_every)
    assert phases == (38, 1125, 75, 25)
    assert model.deformation_warmup == 225 and model.num_downscales == 0 and model.refine_pause_ratio == 0.075
    assert (model.deformation_num_layers, model.deformation_layer_width) == (6, 112)
    assert not model.deformation_warmup_with_points and model.deformation_zero_init
    assert model.densify_by_camera_extent and model.time_network_width == 256
    assert compact.optimizers["means"]["optimizer"].lr == 1.6e-4
    assert compact.optimizers["scales"]["optimizer"].lr == 0.005
    for name, group in compact.optimizers.items():  # learning rates keep their full-length schedules
        scheduler = group["scheduler"]
        assert scheduler is None or scheduler.max_steps == 40000, name


def _model_with(rasterizer: str, backend) -> Splatfacto4DModel:
    """A tiny model built with ``rasterizer`` while gsplat's kernel module is ``backend``."""
    config = Splatfacto4DModelConfig(num_random=50, deformation_num_layers=2, deformation_layer_width=16,
                                     rasterizer=rasterizer, background_color="black")
    with mock.patch.dict(sys.modules, {"gsplat.cuda._backend": backend}):
        return config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)


def test_gsplat_without_compiled_kernels_is_a_one_line_error_before_training():
    # the registry's gsplat with neither a prebuilt gsplat.csrc nor nvcc: its backend module leaves _C None
    no_kernels = types.SimpleNamespace(_C=None)
    with pytest.raises(InputError) as error:
        _model_with("gsplat", no_kernels)
    message = error.value.code
    assert isinstance(message, str) and message.startswith("error: gsplat") and "\n" not in message  # exit status 1
    assert "docs.gsplat.studio/whl/pt" in message and "nvcc" in message
    assert "--pipeline.model.rasterizer torch" in message
    # the way out the message names: the PyTorch rasterizer never consults gsplat's kernels, and renders
    model = _model_with("torch", no_kernels)
    model.eval()
    assert model.get_outputs_for_camera(_camera(time=0.2))["rgb"].shape == (48, 48, 3)
    # kernels present (prebuilt or compiled): no error
    assert _model_with("gsplat", types.SimpleNamespace(_C=object())).config.rasterizer == "gsplat"


def test_gsplat_call_uses_gsplat_signature(model):
    # The CUDA branch cannot run here: check that its arguments bind to gsplat.rasterization and that the outputs
    # it would get (same convention, produced here by the torch rasterizer) flow through the model.
    from gsplat.rendering import rasterization

    def bind_then_render(**kwargs):
        inspect.signature(rasterization).bind(**kwargs)
        return rasterization_torch(**kwargs)

    model.config.rasterizer = "gsplat"
    with mock.patch("gsplat.rendering.rasterization", side_effect=bind_then_render) as gsplat_call:
        model.eval()
        outputs = model.get_outputs_for_camera(_camera(time=0.3))
    assert gsplat_call.called and outputs["rgb"].shape == (48, 48, 3) and outputs["depth"].shape == (48, 48, 1)


@pytest.mark.slow
@pytest.mark.skipif(not DNERF_SCENE.is_dir(), reason=f"needs {DNERF_SCENE}")
@pytest.mark.parametrize("preset, device", [("compact", "cpu"), pytest.param("full", "cuda", marks=pytest.mark.cuda)])
def test_training_on_dnerf_raises_test_psnr(tmp_path, preset, device):
    # each preset on the device it is the default of (CUDA: gsplat, the full network and schedule fitted to 60 steps)
    torch.manual_seed(0)
    config = splatfacto_4d_config(preset)
    config.max_num_iterations = 60
    if preset == "full":
        compress_schedule(config, 60)  # the full schedule's phases within 60 steps
    config.output_dir = tmp_path
    config.vis = "tensorboard"
    config.viewer.quit_on_train_completion = True
    config.machine.device_type = device
    config.pipeline.datamanager.dataparser.data = DNERF_SCENE
    config.pipeline.datamanager.camera_res_scale_factor = 0.25  # 400 px -> 100 px
    model = config.pipeline.model
    model.num_random = 3000
    model.num_downscales = 0
    if device == "cpu":
        model.deformation_num_layers = 4
        model.deformation_layer_width = 64
        model.deformation_warmup = 20
    config.set_timestamp()

    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup(test_mode="test")  # the eval dataset is the D-NeRF test split
    pipeline = trainer.pipeline
    assert pipeline.datamanager.includes_time and pipeline.model.time_from_pose is not None
    before = pipeline.get_average_eval_image_metrics()["psnr"]
    trainer.train()
    after = pipeline.get_average_eval_image_metrics()["psnr"]
    print(f"D-NeRF jumpingjacks test PSNR: {before:.2f} dB at step 0 -> {after:.2f} dB after 60 steps")
    assert after > before + 1.0
    assert list((config.get_base_dir() / "nerfstudio_models").glob("step-*.ckpt"))
