"""The 4DM prior of 4Diffusion: encoders, the multi-view video UNet with classifier-free guidance, DDIM sampling.

:class:`FourDMPrior` loads a directory written by ``ns-4d-convert 4dm`` (or a hub id holding one) part by part
through :mod:`ns_4d_methods.guidance.model_loading`: frozen, fp16 on CUDA and fp32 on the CPU, never part of a
checkpoint (hold it with ``hold_frozen``). The 4diffusion pipeline calls it for

- the 4D-aware SDS: :meth:`FourDMPrior.predict_noise` on the 8 times x 4 views of a step's renders, one batch of
  ``2 x 8 x 5 = 80`` latents (conditional and unconditional branch, each time step with its image-prompt view);
- the anchor video, made once: :meth:`FourDMPrior.generate` (DDIM, eta 0, CFG).

Cameras (:func:`camera_vector`): 4Diffusion's guidance feeds 4DM the camera-to-world matrix of threestudio's z-up
cameras with its translation normalised to unit length, flattened row-major. That equals ImageDream's ``get_camera``
vector at azimuth ``a + 90``: ImageDream's azimuth 0 (the input image's view) is azimuth -90 here. The anchor views
(ImageDream azimuths 90, 180, 270, 360 at elevation 0) are :data:`ANCHOR_AZIMUTHS_DEG` = 0, 90, 180, 270 here; the
last one is the input view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.model_loading import default_dtype, from_pretrained_or_fail, load_pretrained_model
from ns_4d_methods.render.orbit_cameras import Angle, orbit_c2w

ANCHOR_AZIMUTHS_DEG = (0.0, 90.0, 180.0, 270.0)
"""Azimuths (this module's convention) of the anchor video's views: ImageDream's 90, 180, 270, 360; the last is the
input view."""
DECODE_BATCH = 8  # VAE decodes at 256 px are memory-heavy: a few images at a time



def camera_vector_from_c2w(c2w: torch.Tensor) -> torch.Tensor:
    """4DM's camera input ``[..., 16]`` from camera-to-world matrices ``[..., 3 or 4, 4]`` (OpenGL camera axes: x
    right, y up, z backwards, in a z-up world): the 4x4 matrix with its translation scaled to unit length (4Diffusion's
    ``normalize_camera``), flattened row-major."""
    rotation, translation = c2w[..., :3, :3], c2w[..., :3, 3]
    translation = translation / (translation.norm(dim=-1, keepdim=True) + 1e-8)
    top = torch.cat([rotation, translation[..., None]], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2).flatten(-2)


def camera_vector(elevation_deg: Angle, azimuth_deg: Angle) -> torch.Tensor:
    """4DM's camera vector ``[..., 16]`` for a camera at (elevation, azimuth) in degrees looking at the origin.

    threestudio's convention (:func:`~ns_4d_methods.render.orbit_cameras.orbit_c2w`, the cameras the scene is
    rendered from): position ``d (cos e cos a, cos e sin a, sin e)`` in a z-up world, up +z; the distance drops out.
    The result equals ImageDream's ``get_camera(elevation=e, azimuth_start=a + 90)`` vector, e.g.
    ``camera_vector(0, 0) = [0,0,1,1, 1,0,0,0, 0,1,0,0, 0,0,0,1]``.
    """
    return camera_vector_from_c2w(orbit_c2w(elevation_deg, azimuth_deg))


def anchor_cameras(num_frames: int = 8) -> torch.Tensor:
    """The anchor video's cameras ``[num_frames x 4, 16]``, frames-major: the 4 anchor views at elevation 0."""
    views = camera_vector(0.0, torch.tensor(ANCHOR_AZIMUTHS_DEG))
    return views.repeat(num_frames, 1)


@dataclass
class PromptEmbeddings:
    """Text tokens of the prompt and of the negative prompt (the unconditional branch)."""

    cond: torch.Tensor
    """``[1, 77, D]``."""
    uncond: torch.Tensor
    """``[1, 77, D]``."""


@dataclass
class ImageCondition:
    """The input video's frames as 4DM sees them, one entry per time step."""

    clip_tokens: torch.Tensor
    """``[F, T, 1280]`` CLIP ViT-H image tokens (``hidden_states[-2]``, before ``post_layernorm``); T = 257."""
    latents: torch.Tensor
    """``[F, C, h, w]`` scaled VAE latents, written into each time step's image-prompt slot."""


class FourDMPrior:
    """Loads the converted 4DM directory (hub id or local dir) through model_loading; frozen, fp16 on CUDA, fp32 on
    CPU.

    Args:
        model: a directory written by ``ns-4d-convert 4dm`` with every part (unet, scheduler, vae, text_encoder,
            tokenizer, image_encoder, feature_extractor), or a hub id holding one.
        device: where the models run.
        field_name: the config field naming ``model``, for error messages.
        dtype: model dtype (default: fp16 on CUDA, fp32 elsewhere).
    """

    num_frames = 8
    num_views = 4  # real views per time step (+1 image-prompt view added internally)

    def __init__(
        self, model: str, device: Union[str, torch.device], field_name: str = "pipeline.prior-model", dtype=None
    ) -> None:
        # diffusers, transformers and the UNet are imported here: listing the methods (ns-train --help) skips them
        from diffusers import AutoencoderKL, DDIMScheduler
        from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModel

        from ns_4d_methods.guidance.four_dm import FourDMUNet

        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        load = dict(name_or_path=model, field_name=field_name, device=self.device, dtype=self.dtype)
        self.unet = load_pretrained_model(FourDMUNet, subfolder="unet", **load)
        self.vae = load_pretrained_model(AutoencoderKL, subfolder="vae", **load)
        self.text_encoder = load_pretrained_model(CLIPTextModel, subfolder="text_encoder", **load)
        self.image_encoder = load_pretrained_model(CLIPVisionModel, subfolder="image_encoder", **load)
        self.tokenizer = from_pretrained_or_fail(CLIPTokenizer, model, field_name, subfolder="tokenizer")
        self.feature_extractor = from_pretrained_or_fail(
            CLIPImageProcessor, model, field_name, subfolder="feature_extractor"
        )
        self.scheduler = from_pretrained_or_fail(DDIMScheduler, model, field_name, subfolder="scheduler")
        text_dim, image_dim = self.unet.unet.config.cross_attention_dim, self.unet.image_projection.proj_in.in_features
        if self.text_encoder.config.hidden_size != text_dim or self.image_encoder.config.hidden_size != image_dim:
            raise InputError(
                f"{field_name}: '{model}' does not fit together: the UNet takes {text_dim}-dim text and "
                f"{image_dim}-dim image tokens, the encoders give {self.text_encoder.config.hidden_size} and "
                f"{self.image_encoder.config.hidden_size}"
            )
        self.num_frames = self.unet.config.num_frames
        self.num_views = self.unet.config.num_views - 1
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        self.latent_scale = float(self.vae.config.scaling_factor)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_size = self.unet.unet.config.sample_size * self.vae_scale_factor

    # ------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str) -> PromptEmbeddings:
        """SD 2.1 text tokens of both prompts (computed once; the caller caches them)."""
        tokens = self.tokenizer(
            [prompt, negative_prompt],
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        embeddings = self.text_encoder(tokens.input_ids.to(self.device))[0]
        return PromptEmbeddings(cond=embeddings[:1], uncond=embeddings[1:])

    @torch.no_grad()
    def encode_condition(self, frames: torch.Tensor, generator: Optional[torch.Generator] = None) -> ImageCondition:
        """Frames ``[F, 3, H, W]`` in [0, 1] (already on white) -> CLIP image tokens and VAE latents per frame."""
        if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] != self.num_frames:
            raise ValueError(f"expected {self.num_frames} RGB frames [F, 3, H, W], got {tuple(frames.shape)}")
        pixels = (frames.clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
        clip_input = self.feature_extractor(images=list(pixels), return_tensors="pt").pixel_values
        hidden = self.image_encoder(clip_input.to(self.device, self.dtype), output_hidden_states=True).hidden_states
        return ImageCondition(clip_tokens=hidden[-2], latents=self.encode_images(frames, generator))

    def encode_images(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in [0, 1] -> scaled latents ``[N, C, h, w]`` (fp32), differentiable.

        Images of another size are first resized (bilinear) to :attr:`image_size`; the latent is a sample of the
        VAE posterior, as 4Diffusion's ``get_first_stage_encoding``.
        """
        size = (self.image_size, self.image_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size, mode="bilinear", align_corners=False)
        posterior = self.vae.encode((images * 2.0 - 1.0).to(self.device, self.vae.dtype)).latent_dist
        return posterior.sample(generator).float() * self.latent_scale

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[N, C, h, w]`` -> images ``[N, 3, S, S]`` in [0, 1] (fp32)."""
        images = [
            self.vae.decode((chunk / self.latent_scale).to(self.device, self.vae.dtype)).sample
            for chunk in latents.split(DECODE_BATCH)
        ]
        return (torch.cat(images).float() / 2.0 + 0.5).clamp(0.0, 1.0)

    # ------------------------------------------------------------ the multi-view video UNet
    @torch.no_grad()
    def predict_noise(
        self,
        noisy_latents: torch.Tensor,
        timestep: torch.Tensor,
        cameras: torch.Tensor,
        prompt: PromptEmbeddings,
        condition: ImageCondition,
        guidance_scale: float,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Guided and conditional noise predictions ``(eps_cfg, eps_cond)``, each like ``noisy_latents``.

        Args:
            noisy_latents: ``[F x V, C, h, w]`` (F = 8 time steps, V = 4 views), frames-major.
            timestep: one shared t (a scalar or one-element tensor), or one per latent ``[F x V]``.
            cameras: ``[F x V, 16]`` from :func:`camera_vector`.
            prompt, condition: from :meth:`encode_prompt` and :meth:`encode_condition`.
            guidance_scale: ``eps_cfg = eps_uncond + s (eps_cond - eps_uncond)``.

        Each time step gets its image-prompt view (zero camera; its latent slot: that frame's latent, zeros in the
        unconditional branch); the unconditional branch takes the negative prompt and zero CLIP tokens. Both branches
        run as one UNet batch of ``2 x F x (V + 1)``.
        """
        from ns_4d_methods.guidance.four_dm import CAMERA_DIM

        frames, views = self.num_frames, self.num_views
        slots = views + 1
        latent_shape = tuple(noisy_latents.shape[1:])
        if noisy_latents.shape[0] != frames * views or tuple(cameras.shape) != (frames * views, CAMERA_DIM):
            raise ValueError(
                f"expected {frames * views} latents and cameras [{frames * views}, {CAMERA_DIM}] (frames-major), got "
                f"{tuple(noisy_latents.shape)} and {tuple(cameras.shape)}"
            )
        if tuple(condition.latents.shape) != (frames,) + latent_shape:
            raise ValueError(f"image latents {tuple(condition.latents.shape)} do not fit latents of {latent_shape}")
        latents = noisy_latents.to(self.device, self.dtype).reshape(frames, views, *latent_shape)
        image_slot = condition.latents.to(self.device, self.dtype)[:, None]
        sample = torch.cat(
            [torch.cat([latents, image_slot], dim=1), torch.cat([latents, torch.zeros_like(image_slot)], dim=1)]
        ).reshape(2 * frames * slots, *latent_shape)
        camera = cameras.to(self.device, self.dtype).reshape(frames, views, CAMERA_DIM)
        camera = torch.cat([camera, torch.zeros_like(camera[:, :1])], dim=1).reshape(frames * slots, CAMERA_DIM)
        text = torch.cat(
            [prompt.cond.expand(frames * slots, -1, -1), prompt.uncond.expand(frames * slots, -1, -1)]
        ).to(self.device, self.dtype)
        clip = condition.clip_tokens.to(self.device, self.dtype).repeat_interleave(slots, dim=0)
        eps = self.unet(
            sample,
            self._timesteps(timestep, frames, views),
            text,
            camera.repeat(2, 1),
            torch.cat([clip, torch.zeros_like(clip)]),
            num_frames=frames,
        )
        eps = eps.reshape(2, frames, slots, *latent_shape)[:, :, :views].reshape(2, frames * views, *latent_shape)
        eps_cond, eps_uncond = eps.to(noisy_latents.dtype).unbind(0)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond), eps_cond

    def _timesteps(self, timestep: torch.Tensor, frames: int, views: int) -> torch.Tensor:
        """Per-latent timesteps of the UNet batch; the image-prompt view takes its time step's last view's t."""
        t = torch.as_tensor(timestep, device=self.device).reshape(-1)
        if t.numel() == 1:
            return t.expand(2 * frames * (views + 1))
        if t.numel() != frames * views:
            raise ValueError(f"expected one timestep or {frames * views}, got {t.numel()}")
        per_frame = t.reshape(frames, views)
        return torch.cat([per_frame, per_frame[:, -1:]], dim=1).reshape(-1).repeat(2)

    @torch.no_grad()
    def sample_latents(
        self,
        prompt: PromptEmbeddings,
        condition: ImageCondition,
        cameras: torch.Tensor,
        num_steps: int = 100,
        guidance_scale: float = 5.0,
        generator: Optional[torch.Generator] = None,
        known: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Clean latents ``[F x V, C, h, w]`` (frames-major) of a multi-view video: diffusers' DDIM (eta 0) from
        Gaussian noise with classifier-free guidance; the image latents sit in the image-prompt slots at every step
        (:meth:`predict_noise` writes them).

        ``known`` ``[K x V, C, h, w]``: clean latents of the first K frames (e.g. the previous block's last frame).
        Before every step they replace those frames' latents, noised to the step's t with one fixed noise draw, and
        they are the result's first K frames: the other frames are generated consistent with them through the
        temporal attention.
        """
        from diffusers import DDIMScheduler
        from diffusers.utils.torch_utils import randn_tensor

        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_steps, device=self.device)
        shape = (self.num_frames * self.num_views,) + tuple(condition.latents.shape[1:])
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        latents = latents * scheduler.init_noise_sigma
        count = 0 if known is None else len(known)
        if known is not None:
            known = known.to(self.device, torch.float32)
            known_noise = randn_tensor(known.shape, generator=generator, device=self.device, dtype=torch.float32)
        for t in scheduler.timesteps:
            if known is not None:
                latents[:count] = scheduler.add_noise(known, known_noise, t.reshape(1))
            eps, _ = self.predict_noise(latents, t, cameras, prompt, condition, guidance_scale)
            latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
        if known is not None:
            latents[:count] = known
        return latents

    @torch.no_grad()
    def generate(
        self,
        prompt: PromptEmbeddings,
        condition: ImageCondition,
        cameras: torch.Tensor,
        num_steps: int = 100,
        guidance_scale: float = 5.0,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """The anchor multi-view video ``[F, V, 3, S, S]`` in [0, 1]: :meth:`sample_latents`, decoded."""
        images = self.decode_latents(
            self.sample_latents(prompt, condition, cameras, num_steps, guidance_scale, generator)
        )
        return images.reshape(self.num_frames, self.num_views, *images.shape[1:])
