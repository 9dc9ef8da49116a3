"""4D-aware score distillation (4Diffusion, section 3.2): a multi-view video prior pulls 4 views x 8 instants of the
dynamic NeRF towards its one-step estimate of the clean multi-view video.

Per training step, for renders ``x`` [32, 3, H, W] ordered frames-major (f n) and their cameras::

    z   = E(resize(x, S))                       the prior's VAE, with gradient (for K of the 32 renders, see below)
    t   ~ U[t_min(step), t_max(step)]           one timestep shared by all 32 latents (annealed, sds_schedule)
    z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps
    eps_cfg, eps_c = prior(z_t, t, cameras)     classifier-free guidance 5 against the negative prompt (no gradient)
    x0  = (z_t - sqrt(1 - abar_t) eps_cfg) / sqrt(abar_t),   x0_c likewise from eps_c
    x0 <- r x0 std(x0_c) / std(x0) + (1 - r) x0 with r = 0.2 (one std over all 32 latents: tames CFG's saturation)
    L   = 0.5 sum((z - sg(x0))^2) / 32          no w(t)

This is an x0-reconstruction loss, not epsilon-SDS: its gradient on ``z`` is ``z - x0`` (official code:
``recon_loss: true``, ``recon_std_rescale: 0.2``).

Memory lever (threestudio's ``low_ram_vae``): the VAE encoder keeps its activations for backpropagation only for
``grad_views`` of the renders, drawn at random each step; the others are encoded without gradient, so their latents
still enter the prior (which needs all 32) but pass no gradient back to the field. ``grad_views = 32`` is the
paper's setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ns_4d_methods.guidance.sds_schedule import LinearWideningConfig, add_noise, predict_start_from_noise


class MultiViewVideoPrior(Protocol):
    """What 4D-aware SDS needs from a multi-view video diffusion model (4DM: :class:`FourDMPrior`)."""

    num_frames: int
    """Instants per call (8 for 4DM)."""
    num_views: int
    """Views per instant (4 for 4DM)."""
    alphas_cumprod: Tensor
    """[T] cumulative products of the noise schedule's alphas."""
    image_size: int
    """Side of the square images the VAE encodes (256 for 4DM)."""

    def encode_images(self, images: Tensor) -> Tensor:
        """Images [N, 3, S, S] in [0, 1] -> latents [N, C, h, w], differentiable."""

    def predict_noise(
        self,
        noisy_latents: Tensor,
        timestep: int,
        cameras: Tensor,
        prompt: Any,
        condition: Any,
        guidance_scale: float,
    ) -> Tuple[Tensor, Tensor]:
        """(classifier-free guided, conditional) noise predictions for ``noisy_latents`` [F * V, C, h, w] (frames-major)
        seen by ``cameras`` [F * V, 16], without gradient. ``prompt`` and ``condition`` are whatever the prior's own
        encoders made of the prompts and the input frames."""


@dataclass
class FourDAwareSDSConfig:
    """4D-aware SDS as the official 4Diffusion config sets it."""

    guidance_scale: float = 5.0
    """Classifier-free guidance scale (against the negative prompt)."""
    std_rescale: float = 0.2
    """Weight r of the x0 estimate rescaled to the unguided estimate's standard deviation (0: no rescale)."""
    timesteps: LinearWideningConfig = field(default_factory=LinearWideningConfig)
    """Timestep annealing: fixed t = 980 at first, widening linearly to U[20, 250] by step 5000."""
    grad_views: int = 32
    """Renders whose VAE encoding keeps its gradient (memory lever; the other renders pass none). 32: all."""


@dataclass
class SDSResult:
    """The loss of one step and what it was computed from (for logs and tests)."""

    loss: Tensor
    """The scalar x0-reconstruction loss."""
    timestep: int
    """The shared timestep."""
    latents: Tensor
    """[N, C, h, w] latents of the renders (the K with gradient)."""
    target: Tensor
    """[N, C, h, w] the rescaled x0 estimate (detached)."""


class FourDAwareSDS:
    """Computes 4D-aware SDS with a :class:`MultiViewVideoPrior`."""

    def __init__(self, config: FourDAwareSDSConfig, prior: MultiViewVideoPrior) -> None:
        self.config = config
        self.prior = prior

    def encode(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Latents of ``images`` [N, 3, S, S]; only ``grad_views`` of them (random) keep the encoder's gradient."""
        count = len(images)
        keep = min(max(self.config.grad_views, 0), count)
        if keep == count:
            return self.prior.encode_images(images)
        chosen = torch.randperm(count, generator=generator)[:keep].to(images.device)
        with torch.no_grad():
            latents = self.prior.encode_images(images)
        if keep == 0:
            return latents
        # index_copy keeps the encoded subset's graph in the combined tensor
        return latents.index_copy(0, chosen, self.prior.encode_images(images[chosen]))

    def __call__(
        self,
        renders: Tensor,
        cameras: Tensor,
        prompt: Any,
        condition: Any,
        step: int,
        generator: Optional[torch.Generator] = None,
    ) -> SDSResult:
        """The loss for ``renders`` [F * V, 3, H, W] in [0, 1] (frames-major) seen by ``cameras`` [F * V, 16]."""
        prior, config = self.prior, self.config
        size = prior.image_size
        images = (
            renders
            if renders.shape[-1] == size
            else F.interpolate(renders, size=(size, size), mode="bilinear", align_corners=False)
        )
        latents = self.encode(images, generator)
        alphas = prior.alphas_cumprod
        timestep = config.timesteps.sample(step, len(alphas), generator)
        alpha_bar = alphas[timestep].to(latents.device, torch.float32)
        with torch.no_grad():
            clean = latents.detach().float()
            # on the generator's device (the latents' without one): a CPU generator keeps runs reproducible across
            # devices at the cost of one copy; a generator on the GPU draws there
            noise_device = generator.device if generator is not None else clean.device
            noise = torch.randn(clean.shape, generator=generator, device=noise_device).to(clean.device)
            noisy = add_noise(clean, noise, alpha_bar)
            eps_cfg, eps_cond = prior.predict_noise(
                noisy.to(latents.dtype), timestep, cameras, prompt, condition, config.guidance_scale
            )
            target = predict_start_from_noise(noisy, eps_cfg.float(), alpha_bar)
            if config.std_rescale > 0:
                unguided = predict_start_from_noise(noisy, eps_cond.float(), alpha_bar)
                factor = (unguided.std() + 1e-8) / (target.std() + 1e-8)
                target = config.std_rescale * target * factor + (1.0 - config.std_rescale) * target
        loss = 0.5 * F.mse_loss(latents.float(), target, reduction="sum") / len(latents)
        return SDSResult(loss, timestep, latents, target)
