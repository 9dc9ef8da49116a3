"""4D-aware SDS and the 4Diffusion dynamic NeRF: the loss against its formula, the timestep annealing, the VAE
gradient lever, checkpointed chunked rendering, the orientation loss, and the oracle run.

The oracle run: a stand-in for 4DM whose clean-latent estimate is the exact encoding (an invertible pixel-unshuffle
"VAE") of the true render of the sample scene's analytic spheres at the cameras and instants it is handed. The SDS
loss alone, through the SDS datamanager's cameras and times, its resolution schedule and the timestep annealing,
must then fit the 4D field: PSNR on held-out orbit cameras at instants between the 8 fitted ones rises by at least
6 dB and ends above 18 dB. Budget (2 CPU cores, about a minute): 60 steps of 32 renders at 8 -> 10 -> 12 px
(milestones 15 and 30; the prior sees 12 px; timesteps annealed over 30 steps), a 4-level field (3D grid up to 128,
4D grid up to 64 with 7 cells along time: one per gap between the instants), one proposal network, 12 + 12 samples
per ray, learning rates raised to 1e-1 (grids) and 3e-2 (MLPs) so that 60 steps suffice.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation

from ns_4d_methods.cli.sample_object_video import OBJECT_SCALE, render_object, scene_time
from ns_4d_methods.cli.sample_scene import render
from ns_4d_methods.data.sds_datamanager import SDSDataManagerConfig
from ns_4d_methods.guidance.four_dm_prior import camera_vector_from_c2w
from ns_4d_methods.guidance.sds_4d import FourDAwareSDS, FourDAwareSDSConfig
from ns_4d_methods.guidance.sds_schedule import (
    LinearWideningConfig,
    SqrtAnnealingConfig,
    add_noise,
    predict_start_from_noise,
    ramp,
)
from ns_4d_methods.models.four_diffusion import FourDiffusionModelConfig
from ns_4d_methods.render.orbit_cameras import orbit_cameras

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SOURCE_FRAMES = 25  # the object video the oracle's instants come from (8 of 25 sampled, as 4Diffusion does)


def on_white(rgba: np.ndarray) -> torch.Tensor:
    image = torch.from_numpy(rgba).float() / 255.0
    return image[..., :3] * image[..., 3:] + 1.0 - image[..., 3:]


class RecordingPrior:
    """A prior with a linear, invertible "VAE" and fixed noise predictions, recording what it was asked."""

    num_frames, num_views = 8, 4

    def __init__(self, image_size: int, eps_cfg=None, eps_cond=None) -> None:
        self.image_size = image_size
        self.alphas_cumprod = DDIMScheduler(**SD_SCHEDULE).alphas_cumprod
        self.eps = (eps_cfg, eps_cond)
        self.calls = []

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images * 2.0 - 1.0, 2)

    def predict_noise(self, noisy, timestep, cameras, prompt, condition, guidance_scale):
        self.calls.append(dict(noisy=noisy.clone(), timestep=timestep, cameras=cameras, guidance_scale=guidance_scale))
        return self.eps


class OraclePrior(RecordingPrior):
    """Stand-in 4DM whose x0 estimate is the encoding of the true render at the cameras (and instants) it gets."""

    def __init__(self, image_size: int, distance: float = 1.1, fovy: float = 45.0) -> None:
        super().__init__(image_size)
        self.distance, self.fovy = distance, fovy

    def truth(self, cameras: torch.Tensor) -> torch.Tensor:
        """True renders [32, 3, S, S] for 4DM's camera vectors (frames-major: instant k // 4 of 8)."""
        images = []
        for k, vector in enumerate(cameras.cpu()):
            c2w = vector.view(4, 4).double().numpy().copy()
            c2w[:3, 3] *= self.distance / OBJECT_SCALE  # unit translation -> the scaled scene's camera
            time_ = scene_time((k // self.num_views) / (self.num_frames - 1), SOURCE_FRAMES)
            images.append(on_white(render(c2w, time_, self.image_size, math.radians(self.fovy))).permute(2, 0, 1))
        return torch.stack(images)

    def predict_noise(self, noisy, timestep, cameras, prompt, condition, guidance_scale):
        clean = self.encode_images(self.truth(cameras))
        alpha_bar = self.alphas_cumprod[timestep]
        eps = (noisy - alpha_bar.sqrt() * clean) / (1.0 - alpha_bar).sqrt()
        return eps, eps


# ---- the loss ------------------------------------------------------------------------------------------------------
def test_x0_reconstruction_loss_follows_the_formula():
    torch.manual_seed(0)
    renders = torch.rand(32, 3, 8, 8, requires_grad=True)
    eps_cfg, eps_cond = torch.randn(32, 12, 8, 8), 0.5 * torch.randn(32, 12, 8, 8)
    prior = RecordingPrior(16, eps_cfg, eps_cond)
    sds = FourDAwareSDS(FourDAwareSDSConfig(), prior)
    result = sds(
        renders, torch.zeros(32, 16), "prompt", "condition", step=0, generator=torch.Generator().manual_seed(1)
    )
    call = prior.calls[0]
    assert result.timestep == call["timestep"] == 980 and call["guidance_scale"] == 5.0  # step 0: t fixed at 980
    latents = F.pixel_unshuffle(F.interpolate(renders, size=(16, 16), mode="bilinear") * 2 - 1, 2)
    alpha_bar = prior.alphas_cumprod[980]
    x0 = (call["noisy"] - (1 - alpha_bar).sqrt() * eps_cfg) / alpha_bar.sqrt()
    x0_cond = (call["noisy"] - (1 - alpha_bar).sqrt() * eps_cond) / alpha_bar.sqrt()
    x0 = 0.2 * x0 * x0_cond.std() / x0.std() + 0.8 * x0
    expected = 0.5 * ((latents - x0) ** 2).sum() / 32
    assert torch.allclose(result.loss, expected, rtol=1e-5)
    # the noisy latents are the renders' latents noised at t (one t for all 32)
    noise = (call["noisy"] - alpha_bar.sqrt() * latents.detach()) / (1 - alpha_bar).sqrt()
    assert abs(float(noise.std()) - 1.0) < 0.05
    # the gradient on the latents is (z - x0) / 32
    (latent_grad,) = torch.autograd.grad(result.loss, result.latents, retain_graph=True)
    assert torch.allclose(latent_grad, (result.latents - x0) / 32, atol=1e-6)
    result.loss.backward()
    assert renders.grad is not None and renders.grad.abs().sum() > 0


def test_oracle_noise_gives_back_the_truth_at_every_timestep():
    prior = OraclePrior(8)
    cameras = camera_vector_from_c2w(orbit_cameras(2.0, torch.arange(32) * 11.25, 1.1, 45.0, 8).camera_to_worlds)
    truth = prior.truth(cameras)
    clean = prior.encode_images(truth)
    for timestep in (20, 500, 980):
        noisy = add_noise(clean, torch.randn_like(clean), prior.alphas_cumprod[timestep])
        eps, _ = prior.predict_noise(noisy, timestep, cameras, None, None, 5.0)
        assert torch.allclose(predict_start_from_noise(noisy, eps, prior.alphas_cumprod[timestep]), clean, atol=1e-4)
    result = FourDAwareSDS(FourDAwareSDSConfig(), prior)(truth, cameras, None, None, step=0)
    assert float(result.loss) < 1e-6  # the renders are the truth: nothing to learn


def test_gradient_reaches_only_the_chosen_vae_views():
    renders = torch.rand(32, 3, 8, 8, requires_grad=True)
    prior = RecordingPrior(8, torch.randn(32, 12, 4, 4), torch.randn(32, 12, 4, 4))
    sds = FourDAwareSDS(FourDAwareSDSConfig(grad_views=3), prior)
    result = sds(renders, torch.zeros(32, 16), None, None, step=0, generator=torch.Generator().manual_seed(0))
    result.loss.backward()
    with_gradient = (renders.grad.abs().flatten(1).sum(1) > 0).sum()
    assert with_gradient == 3
    # all 32 latents reach the prior
    assert torch.allclose(prior.calls[0]["noisy"].shape[0] * torch.ones(1), torch.tensor([32.0]))


def test_timestep_annealing_and_ramps():
    schedule = LinearWideningConfig()
    assert schedule.bounds(0) == (980, 980)
    assert schedule.bounds(2500) == (500, 615)
    assert schedule.bounds(5000) == schedule.bounds(30000) == (20, 250)
    samples = {schedule.sample(6000, generator=torch.Generator().manual_seed(s)) for s in range(200)}
    assert min(samples) >= 20 and max(samples) <= 250 and len(samples) > 100
    hifa = SqrtAnnealingConfig(t_max=0.98, t_min=0.02, max_steps=10000)
    assert hifa.bounds(0) == (980, 980) and hifa.bounds(10000) == (20, 20)
    assert hifa.bounds(2500) == (int(1000 * (0.98 - 0.96 * 0.5)),) * 2
    assert ramp((0, 10.0, 1000.0, 5000), 2500) == pytest.approx(505.0)  # orientation weight
    assert ramp((10000, 0.0, 100.0, 10001), 9999) == 0.0 and ramp((10000, 0.0, 100.0, 10001), 10001) == 100.0
    assert ramp(7.0, 123) == 7.0


# ---- the model -----------------------------------------------------------------------------------------------------
def tiny_model(**overrides):
    """A small 4Diffusion model (PyTorch hash grids, one proposal network) and an SDS datamanager for its scene box."""
    datamanager = SDSDataManagerConfig(**overrides.pop("datamanager", {})).setup(device="cpu")
    settings = dict(
        num_levels=4,
        log2_hashmap_size=12,
        max_res=64,
        log2_hashmap_size_4d=12,
        max_res_4d=32,
        implementation="torch",
        num_proposal_iterations=1,
        num_proposal_samples_per_ray=(12,),
        num_nerf_samples_per_ray=12,
        proposal_net_args_list=[dict(hidden_dim=16, log2_hashmap_size=12, num_levels=4, max_res=64, use_linear=False)],
        eval_num_rays_per_chunk=1 << 14,
        render_chunk_rays=1 << 14,
    )
    model = FourDiffusionModelConfig(**{**settings, **overrides}).setup(
        scene_box=datamanager.train_dataset.scene_box,
        num_train_data=len(datamanager.train_dataset),
        metadata={},
        device="cpu",
    )
    return datamanager, model


def test_checkpointed_chunks_give_the_same_renders_and_gradients():
    _, model = tiny_model(render_chunk_rays=100)
    cameras = orbit_cameras(3.0, torch.tensor([0.0, 120.0]), 1.1, 45.0, 10, torch.tensor([0.2, 0.7]))
    results = []
    for checkpointed in (True, False):
        model.config.checkpoint_chunks = checkpointed
        torch.manual_seed(0)  # the samplers' jitter
        outputs = model.render_views(cameras)
        loss = (outputs["rgb"] * torch.linspace(0, 1, 10)).sum() + outputs["interlevel"]
        model.zero_grad()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((outputs["rgb"].detach(), grads))
    assert results[0][0].shape == (2, 3, 10, 10)
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5, rtol=1e-4)


def test_field_starts_as_a_ball_and_the_orientation_loss_trains_it():
    _, model = tiny_model()
    cameras = orbit_cameras(0.0, torch.tensor([0.0]), 3.0, 45.0, 16, torch.tensor([0.5]))  # sees [-1.2, 1.2]
    outputs = model.render_views(cameras, with_normals=True)
    accumulation = outputs["accumulation"][0, 0]
    # the blob bias: an opaque ball of radius ~0.5 at the origin, nothing far outside (white background)
    assert accumulation[8, 8] > 0.95 and accumulation[0, 0] < 0.05
    losses = model.regularisers(outputs, outputs, step=0)
    assert set(losses) == {"interlevel", "sparsity", "orientation"}  # opacity entropy starts at step 10000
    assert set(model.regularisers(outputs, outputs, step=10001)) == {"interlevel", "sparsity", "opaque", "orientation"}
    model.zero_grad()
    losses["orientation"].backward()
    grid_grad = sum(float(p.grad.abs().sum()) for p in model.field.grids.parameters() if p.grad is not None)
    assert grid_grad > 0  # normals are in the graph (nerfstudio's own are not)
    groups = model.get_param_groups()
    assert set(groups) == {"proposal_networks", "grids", "mlps"} and groups["mlps"]


# ---- the oracle run ------------------------------------------------------------------------------------------------
STEPS, RESOLUTIONS, PRIOR_SIZE = 60, (8, 10, 12), 12
ORACLE_FIELD = dict(max_res=128, log2_hashmap_size=14, max_res_4d=64, log2_hashmap_size_4d=14, time_resolution=7)


def test_oracle_sds_fits_the_4d_field():
    torch.manual_seed(0)
    datamanager, model = tiny_model(
        datamanager=dict(
            resolutions=RESOLUTIONS,
            resolution_milestones=(STEPS // 4, STEPS // 2),
            num_eval_cameras=4,
            eval_resolution=PRIOR_SIZE,
        ),
        **ORACLE_FIELD,
    )
    prior = OraclePrior(PRIOR_SIZE)
    annealing = LinearWideningConfig(min_percent=(0, 0.98, 0.02, STEPS // 2), max_percent=(0, 0.98, 0.25, STEPS // 2))
    sds = FourDAwareSDS(FourDAwareSDSConfig(timesteps=annealing), prior)
    rates = {"proposal_networks": 1e-2, "grids": 1e-1, "mlps": 3e-2}
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": rates[name]} for name, params in model.get_param_groups().items()],
        betas=(0.9, 0.99),
        eps=1e-15,
    )
    callbacks = model.get_training_callbacks(TrainingCallbackAttributes(None, None, None, None))

    # held out: instants between the 8 fitted ones, seen from azimuths all around at elevation 2.5
    instants = [(j + 0.5) / 7 for j in range(7)]
    azimuths = [25.0 + 51.4 * j for j in range(7)]
    held_out = orbit_cameras(2.5, torch.tensor(azimuths), 1.1, 45.0, PRIOR_SIZE, torch.tensor(instants))
    truths = [
        on_white(render_object(2.5, a, 1.1, 45.0, scene_time(t, SOURCE_FRAMES), PRIOR_SIZE))
        for a, t in zip(azimuths, instants)
    ]

    def psnr() -> float:
        model.eval()
        with torch.no_grad():
            values = [
                -10
                * math.log10(float(((model.get_outputs_for_camera(held_out[i : i + 1])["rgb"] - truth) ** 2).mean()))
                for i, truth in enumerate(truths)
            ]
        model.train()
        return float(np.mean(values))

    start, began = psnr(), time.time()
    generator = torch.Generator().manual_seed(0)
    timesteps, sizes = [], set()
    for step in range(STEPS):
        for callback in callbacks:
            callback.run_callback_at_location(step, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        cameras, batch = datamanager.next_train(step)
        outputs = model.render_views(cameras)
        result = sds(outputs["rgb"], camera_vector_from_c2w(cameras.camera_to_worlds), None, None, step, generator)
        optimizer.zero_grad()
        (result.loss + outputs["interlevel"]).backward()
        optimizer.step()
        for callback in callbacks:
            callback.run_callback_at_location(step, TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
        timesteps.append(result.timestep)
        sizes.add(batch["views"].resolution)
    end = psnr()
    print(
        f"oracle: held-out PSNR {start:.2f} -> {end:.2f} dB in {STEPS} steps ({time.time() - began:.0f} s); "
        f"timesteps {timesteps[0]} -> U[{min(timesteps[-10:])}, {max(timesteps[-10:])}]"
    )
    assert sizes == set(RESOLUTIONS)
    assert timesteps[0] == 980 and max(timesteps[-10:]) <= 250
    assert end - start >= 6.0 and end > 18.0
