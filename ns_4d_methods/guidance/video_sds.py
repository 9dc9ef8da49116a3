"""Video score distillation (4Real): a video diffusion prior pulls renders along a camera path towards its one-step
denoised estimate.

4Real renders a short video along a camera path, puts the real conditioning frame I_c first, noises the video at one
timestep, denoises it in one step and regresses the renders onto that estimate with no gradient through the prior::

    frames = [I_c, render_1 .. render_16]           17 frames = 8k + 1: LTX's latent frame 0 holds exactly I_c
    z = E(frames)                                   (no gradient: the loss is on pixels)
    z_s = (1 - s) z + s eps      for the render latents; I_c's latents stay clean (model timestep 0)
    x0_hat = D(z_s - s v(z_s, s))                   flow matching's one-step estimate, decoded
    L = || render - sg(x0_hat[1:]) ||^2             mean over pixels

This differs from rectified-flow SDS only by a per-timestep weighting ((z - x0_hat) / s = v - (eps - z)), as in
HiFA. The prior is anything that implements :class:`VideoPrior`; :class:`LTXVideoPrior` is LTX-Video's transformer,
VAE and flow-matching scheduler from diffusers (loaded by :mod:`ns_4d_methods.guidance.video_models`). No gradient
reaches the prior or the VAE: both run under ``no_grad`` on detached frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor

from ns_4d_methods.guidance.video_models import VideoModel


class VideoPrior(Protocol):
    """What video SDS needs from a video diffusion model (flow matching, first latent frame = one pixel frame)."""

    temporal_compression: int
    """Pixel frames per latent frame after the first: a video has ``temporal_compression * k + 1`` frames."""

    def encode(self, frames: Tensor) -> Tensor:
        """Frames [F, 3, H, W] in [0, 1] -> latents [1, C, f, h, w]; latent frame 0 is pixel frame 0 alone."""

    def add_noise(self, latents: Tensor, noise: Tensor, sigma: float) -> Tensor:
        """The flow-matching forward process at noise level ``sigma`` in (0, 1)."""

    def predict_velocity(
        self, noisy: Tensor, sigma: float, path: Optional["Cameras"] = None, frame_rate: Optional[float] = None
    ) -> Tensor:
        """The velocity of ``noisy`` latents at ``sigma``, latent frame 0 being a clean condition (timestep 0).

        ``path`` holds the cameras (with times) the frames were rendered from, condition first. Learned priors
        ignore it; a stand-in prior that knows the scene can render the truth along it. ``frame_rate``: frames per
        second of the video (None: the model's own).
        """

    def decode(self, latents: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Latents [1, C, f, h, w] -> frames [F, 3, H, W] in [0, 1] (``generator`` for any decoder noise)."""


@dataclass
class VideoSDSOutput:
    """The loss and what it was computed from."""

    loss: Tensor
    """Mean squared pixel error between the renders and the detached estimate (a scalar with gradient)."""
    target: Tensor
    """The decoded one-step estimate of the renders [F - 1, 3, H, W] in [0, 1] (no gradient)."""
    sigma: float
    """The noise level used."""


def seeded_noise(like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Gaussian noise shaped like ``like``, drawn on the generator's device (a CPU generator works for CUDA tensors)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def video_sds_loss(
    renders: Tensor,
    condition: Tensor,
    prior: VideoPrior,
    sigma: float,
    path: Optional[Cameras] = None,
    generator: Optional[torch.Generator] = None,
    frame_rate: Optional[float] = None,
) -> VideoSDSOutput:
    """4Real's video SDS loss of ``renders`` [F, 3, H, W] (F = temporal_compression * k, with gradient) that follow the
    real conditioning frame ``condition`` [3, H, W], both in [0, 1], at noise level ``sigma``.

    ``path`` (cameras with times, the condition's first) and ``frame_rate`` (frames per second the renders have;
    None: the prior's own) are passed on to the prior.
    """
    count = renders.shape[0] + 1
    if (count - 1) % prior.temporal_compression != 0:
        raise ValueError(
            f"video SDS needs 1 + {prior.temporal_compression}k frames (condition + renders), got {count}"
        )
    if not 0.0 < sigma <= 1.0:
        raise ValueError(f"sigma must be in (0, 1], got {sigma}")
    with torch.no_grad():
        frames = torch.cat([condition[None].to(renders), renders.detach()])
        latents = prior.encode(frames)
        noise = seeded_noise(latents, generator)
        noisy = prior.add_noise(latents, noise, sigma)
        noisy[:, :, :1] = latents[:, :, :1]  # the condition stays clean
        velocity = prior.predict_velocity(noisy, sigma, path, frame_rate)
        estimate = noisy - sigma * velocity.to(noisy.dtype)
        estimate[:, :, :1] = latents[:, :, :1]
        target = prior.decode(estimate, generator)[1:].to(renders)
    loss = F.mse_loss(renders, target)
    return VideoSDSOutput(loss=loss, target=target, sigma=sigma)


def _ltx() -> type:
    """diffusers' LTXPipeline, imported when used: listing the methods (ns-train --help) skips diffusers."""
    from diffusers import LTXPipeline

    return LTXPipeline


SDS_PIPELINES = {name: "LTXPipeline" for name in ("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline")}
"""``model_index.json`` classes whose weights :class:`LTXVideoPrior` distils (any LTX-Video pipeline)."""


class LTXVideoPrior:
    """LTX-Video's transformer (flow velocity), causal video VAE (32x in space, 8x in time) and flow-matching
    scheduler as a :class:`VideoPrior`, with classifier-free guidance.

    It takes the components and the cached prompt embeddings of a loaded
    :class:`~ns_4d_methods.guidance.video_models.VideoModel` (the suite's loader: frozen, bf16 on CUDA, never in a
    checkpoint); the frame rate and the decoder's timestep and noise are that model's generation settings.

    Args:
        video_model: the loaded LTX pipeline.
        prompt: the text prompt.
        guidance_scale: classifier-free guidance scale of the velocity; 1 turns guidance off.
    """

    def __init__(self, video_model: VideoModel, prompt: str, guidance_scale: float) -> None:
        pipeline = video_model.pipeline
        self.transformer, self.vae, self.scheduler = pipeline.transformer, pipeline.vae, pipeline.scheduler
        self.settings = video_model.config
        self.guidance_scale = guidance_scale
        self.device, self.dtype = self.transformer.device, self.transformer.dtype
        embeddings = video_model.prompt_embeddings(prompt)
        if guidance_scale != 1.0:
            self.text = torch.cat([embeddings["negative_prompt_embeds"], embeddings["prompt_embeds"]])
            self.text_mask = torch.cat(
                [embeddings["negative_prompt_attention_mask"], embeddings["prompt_attention_mask"]]
            )
        else:
            self.text, self.text_mask = embeddings["prompt_embeds"], embeddings["prompt_attention_mask"]
        self.temporal_compression = int(self.vae.temporal_compression_ratio)
        self.spatial_compression = int(self.vae.spatial_compression_ratio)
        self.patch_size = int(self.transformer.config.patch_size)
        self.patch_size_t = int(self.transformer.config.patch_size_t)

    def encode(self, frames: Tensor) -> Tensor:
        video = (frames * 2.0 - 1.0).permute(1, 0, 2, 3)[None].to(self.device, self.dtype)  # [1, 3, F, H, W]
        latents = self.vae.encode(video).latent_dist.mode()
        return _ltx()._normalize_latents(
            latents.float(), self.vae.latents_mean, self.vae.latents_std, self.vae.config.scaling_factor
        )

    def add_noise(self, latents: Tensor, noise: Tensor, sigma: float) -> Tensor:
        return (1.0 - sigma) * latents + sigma * noise

    def predict_velocity(
        self, noisy: Tensor, sigma: float, path: Optional[Cameras] = None, frame_rate: Optional[float] = None
    ) -> Tensor:
        _, _, frames, height, width = noisy.shape
        tokens = _ltx()._pack_latents(noisy, self.patch_size, self.patch_size_t)
        condition = torch.zeros(1, 1, frames, height, width, device=noisy.device)
        condition[:, :, 0] = 1.0
        condition = _ltx()._pack_latents(condition, self.patch_size, self.patch_size_t).squeeze(-1)
        # as LTX's image-to-video pipeline: the condition's tokens are told timestep 0
        timestep = sigma * self.scheduler.config.num_train_timesteps * (1.0 - condition)  # [1, tokens]
        batch = self.text.shape[0]
        velocity = self.transformer(
            hidden_states=tokens.to(self.dtype).expand(batch, -1, -1),
            encoder_hidden_states=self.text,
            timestep=timestep.expand(batch, -1),
            encoder_attention_mask=self.text_mask,
            num_frames=frames,
            height=height,
            width=width,
            rope_interpolation_scale=(  # LTX's positions in seconds: the frame rate the frames really have
                self.temporal_compression / (frame_rate or self.settings.frame_rate),
                self.spatial_compression,
                self.spatial_compression,
            ),
            return_dict=False,
        )[0].float()
        if batch == 2:
            unconditional, conditional = velocity.chunk(2)
            velocity = unconditional + self.guidance_scale * (conditional - unconditional)
        return _ltx()._unpack_latents(velocity, frames, height, width, self.patch_size, self.patch_size_t)

    def decode(self, latents: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        latents = _ltx()._denormalize_latents(
            latents, self.vae.latents_mean, self.vae.latents_std, self.vae.config.scaling_factor
        )
        timestep = None
        if self.vae.config.timestep_conditioning:  # LTX >= 0.9.1 decodes as its pipelines do
            noise = seeded_noise(latents, generator)
            scale = self.settings.decode_noise_scale
            latents = (1.0 - scale) * latents + scale * noise
            timestep = torch.tensor([self.settings.decode_timestep], device=self.device, dtype=self.dtype)
        video = self.vae.decode(latents.to(self.dtype), timestep, return_dict=False)[0]  # [1, 3, F, H, W] in [-1, 1]
        return ((video[0].permute(1, 0, 2, 3).float() + 1.0) / 2.0).clamp(0.0, 1.0)
