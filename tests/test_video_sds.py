"""Video SDS (4Real) with a tiny random LTX-Video pipeline loaded through the suite's loader: the condition frame stays
clean and is told timestep 0, the one-step estimate is the scheduler's and matches diffusers' LTX image-to-video
pipeline, no gradient reaches the prior or the VAE, and the loss is the pixel MSE to the detached estimate."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTXImageToVideoPipeline, LTXPipeline
from tiny_video_models import build_tiny_ltx_pipeline

from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.video_models import VideoGenerationConfig, VideoModel
from ns_4d_methods.guidance.video_sds import SDS_PIPELINES, LTXVideoPrior, video_sds_loss

PROMPT = "a corgi playing in the snow in a park"
HEIGHT, WIDTH, RENDERS = 64, 96, 16  # 17 frames: 3 x 2 x 3 latents


class Recorder:
    """Wraps a prior and keeps what video SDS handed it and got back."""

    def __init__(self, prior: LTXVideoPrior) -> None:
        self.prior, self.calls = prior, {}
        self.temporal_compression = prior.temporal_compression

    def encode(self, frames):
        self.calls["frames"] = frames.clone()
        self.calls["latents"] = self.prior.encode(frames)
        return self.calls["latents"]

    def add_noise(self, latents, noise, sigma):
        self.calls["noise"] = noise.clone()
        return self.prior.add_noise(latents, noise, sigma)

    def predict_velocity(self, noisy, sigma, path=None, frame_rate=None):
        self.calls["noisy"] = noisy.clone()
        self.calls["velocity"] = self.prior.predict_velocity(noisy, sigma, path, frame_rate)
        return self.calls["velocity"]

    def decode(self, latents, generator=None):
        self.calls["estimate"] = latents.clone()
        return self.prior.decode(latents, generator)


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("ltx") / "tiny-ltx"
    build_tiny_ltx_pipeline(path)
    return VideoModel.load(str(path), VideoGenerationConfig(), field_name="pipeline.sds_model", supported=SDS_PIPELINES)


@pytest.fixture(scope="module")
def prior(video_model):
    return LTXVideoPrior(video_model, PROMPT, guidance_scale=3.0)


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    renders = torch.rand(RENDERS, 3, HEIGHT, WIDTH, generator=generator).requires_grad_(True)
    return renders, torch.rand(3, HEIGHT, WIDTH, generator=generator)


def test_condition_frame_first_clean_and_at_timestep_zero(prior):
    recorder = Recorder(prior)
    timesteps = []
    hook = prior.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: timesteps.append(kwargs["timestep"].clone()), with_kwargs=True
    )
    renders, condition = _inputs()
    try:
        video_sds_loss(renders, condition, recorder, 0.6, generator=torch.Generator().manual_seed(1))
    finally:
        hook.remove()
    calls = recorder.calls
    assert torch.equal(calls["frames"][0], condition) and torch.equal(calls["frames"][1:], renders.detach())
    latents, noisy, noise = calls["latents"], calls["noisy"], calls["noise"]
    assert latents.shape == (1, 8, 3, 2, 3)  # condition alone in latent frame 0, 8 renders per latent frame after
    assert torch.equal(noisy[:, :, 0], latents[:, :, 0])  # clean
    assert torch.allclose(noisy[:, :, 1:], 0.4 * latents[:, :, 1:] + 0.6 * noise[:, :, 1:], atol=1e-6)
    (timestep,) = timesteps
    assert timestep.shape == (2, 3 * 2 * 3)  # unconditional + conditional, one timestep per token
    tokens_per_frame = 2 * 3
    assert torch.all(timestep[:, :tokens_per_frame] == 0)  # the condition's tokens
    assert torch.allclose(timestep[:, tokens_per_frame:], torch.tensor(600.0))
    # the condition's latents come back unchanged in the estimate
    assert torch.equal(calls["estimate"][:, :, 0], latents[:, :, 0])


def test_one_step_estimate_is_the_schedulers(prior):
    recorder = Recorder(prior)
    renders, condition = _inputs(2)
    sigma = 0.35
    video_sds_loss(renders, condition, recorder, sigma, generator=torch.Generator().manual_seed(3))
    calls = recorder.calls
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(prior.scheduler.config)
    scheduler.set_timesteps(sigmas=[sigma])  # one step from sigma to 0
    timestep = scheduler.timesteps[0]
    noised = scheduler.scale_noise(calls["latents"][:, :, 1:], timestep[None], calls["noise"][:, :, 1:])
    assert torch.allclose(calls["noisy"][:, :, 1:], noised, atol=1e-6)
    stepped = scheduler.step(calls["velocity"][:, :, 1:], timestep, calls["noisy"][:, :, 1:]).prev_sample
    assert torch.allclose(calls["estimate"][:, :, 1:], stepped, atol=1e-6)


def test_estimate_matches_diffusers_ltx_image_to_video(prior, video_model):
    """One denoising step of diffusers' LTX image-to-video pipeline from the same noisy latents (sigma 1, where its
    one-step schedule starts) gives the estimate that video SDS decodes."""
    recorder = Recorder(prior)
    renders, condition = _inputs(4)
    video_sds_loss(renders, condition, recorder, 1.0, generator=torch.Generator().manual_seed(5))
    noisy = recorder.calls["noisy"]
    pipeline = LTXImageToVideoPipeline(**video_model.pipeline.components)
    pipeline.set_progress_bar_config(disable=True)
    packed = LTXPipeline._pack_latents(noisy, 1, 1)
    result = pipeline(
        **video_model.prompt_embeddings(PROMPT), latents=packed, height=HEIGHT, width=WIDTH,
        num_frames=RENDERS + 1, num_inference_steps=1, guidance_scale=3.0, frame_rate=25, output_type="latent",
    ).frames
    expected = LTXPipeline._unpack_latents(result, 3, 2, 3, 1, 1)
    difference = (recorder.calls["estimate"] - expected).abs().max().item()
    print(f"max |video SDS estimate - LTXImageToVideoPipeline one step| = {difference:.2e}")
    assert difference < 1e-5


def test_loss_is_pixel_mse_to_the_detached_estimate_without_gradient_into_the_prior(prior):
    recorder = Recorder(prior)
    renders, condition = _inputs(6)
    output = video_sds_loss(renders, condition, recorder, 0.5, generator=torch.Generator().manual_seed(7))
    assert not output.target.requires_grad
    decoded = prior.decode(recorder.calls["estimate"], torch.Generator().manual_seed(7))
    assert torch.allclose(output.target, decoded[1:], atol=1e-6)
    assert torch.allclose(output.loss, ((renders - output.target) ** 2).mean())
    output.loss.backward()
    expected = 2.0 * (renders.detach() - output.target) / renders.numel()
    assert torch.allclose(renders.grad, expected, atol=1e-9)
    for module in (prior.transformer, prior.vae):
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())


def test_frame_count_must_fit_the_latent_frames(prior):
    renders, condition = _inputs()
    with pytest.raises(ValueError, match="1 \\+ 8k frames"):
        video_sds_loss(renders[:15], condition, prior, 0.5)


def test_a_non_ltx_pipeline_is_refused_in_one_line(tmp_path):
    model = tmp_path / "cogvideox"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    with pytest.raises(InputError) as error:
        VideoModel.load(str(model), VideoGenerationConfig(), field_name="pipeline.sds_model", supported=SDS_PIPELINES)
    assert "CogVideoXPipeline" in str(error.value) and "\n" not in str(error.value)


def test_ltx_is_told_the_frame_rate_of_the_renders(prior):
    """LTX's rotary time coordinates are in seconds (latent frame k at k * 8 / fps): the renders' own frame rate goes
    in, the model's (25) when none is given."""
    scales = []
    hook = prior.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: scales.append(kwargs["rope_interpolation_scale"]), with_kwargs=True
    )
    renders, condition = _inputs(4)
    try:
        for frame_rate in (None, 8.0):
            video_sds_loss(renders, condition, prior, 0.5, generator=torch.Generator().manual_seed(5),
                           frame_rate=frame_rate)  # fmt: skip
    finally:
        hook.remove()
    compression = prior.temporal_compression
    assert [scale[0] for scale in scales] == [compression / 25, compression / 8.0]
