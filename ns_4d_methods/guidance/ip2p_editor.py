"""Anchor-aware InstructPix2Pix: edits a window of frames jointly by an instruction (Instruct 4D-to-4D).

The editor runs InstructPix2Pix's own sampling on diffusers components (scheduler, VAE, UNet, CLIP text encoder)
loaded through :mod:`ns_4d_methods.guidance.model_loading`:

- the frames to edit are the image condition (VAE posterior mode, unscaled, as in InstructPix2Pix);
- 3-way classifier-free guidance on a batch laid out ``[text-cond x F ; image-cond x F ; uncond x F]``:
  ``eps = eps_u + s_t (eps_text - eps_img) + s_i (eps_img - eps_u)``;
- the edit strength in (0, 1] picks where sampling starts on the scheduler's own timesteps (diffusers' img2img
  convention: ``int(steps x strength)`` of ``steps`` are run): strength 1 starts from pure noise, a lower strength
  from the current images noised to the first remaining timestep;
- optional anchor attention (:mod:`ns_4d_methods.guidance.anchor_attention`) makes frame 0 the anchor of the window,
  and cross-frame GroupNorm (:mod:`ns_4d_methods.guidance.cross_frame_norm`) shares the ResNet blocks' normalisation
  statistics over the window's frames, the two couplings of the official inflated UNet;
- the sampler is deterministic DDIM (eta 0) on Stable Diffusion 1.4's DDIM settings, as the official code edits
  (``sampler="ddim"``); ``"pipeline"`` keeps the model's own scheduler (Euler ancestral for timbrooks' weights, which
  draws fresh noise per frame at every step).

With anchor attention off and strength 1 the result is that of ``StableDiffusionInstructPix2PixPipeline.__call__``
with the same model, scheduler, seed, steps and guidance. The loaded models are frozen and held outside
``state_dict()``.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Literal

import torch

from ns_4d_methods.guidance.anchor_attention import anchor_attention
from ns_4d_methods.guidance.cross_frame_norm import cross_frame_group_norm
from ns_4d_methods.guidance.model_loading import hold_frozen, load_diffusion_pipeline

AnchorAttentionMode = Literal["off", "anchor", "anchor_self"]
Sampler = Literal["ddim", "pipeline"]
# Stable Diffusion 1.4's DDIM settings (CompVis/stable-diffusion-v1-4 scheduler config), which the official code uses;
# the noise schedule (betas) is the loaded model's, the same for SD 1.4 and InstructPix2Pix
SD14_DDIM = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}

IP2P_MODEL_ID = "timbrooks/instruct-pix2pix"


class InstructPix2PixEditor(torch.nn.Module):
    """InstructPix2Pix that edits a batch of frames, optionally with anchor attention to frame 0.

    Args:
        model_id: hub id or local directory of an InstructPix2Pix pipeline (``save_pretrained`` layout).
        field_name: the config field that holds ``model_id``, named in the error when it cannot be loaded.
        device: where the models run.
        dtype: model dtype; fp16 on CUDA and fp32 on the CPU when None.
        sampler: "ddim" (deterministic DDIM, eta 0: the official code's) or "pipeline" (the model's own scheduler).
        sequential_branches: run the UNet on the 3 guidance branches one after the other instead of as one batch of
            3 x frames: the same result (anchor attention and shared GroupNorm work within a branch), with a third
            of the UNet's activations alive at once.
    """

    def __init__(
        self,
        model_id: str = IP2P_MODEL_ID,
        *,
        field_name: str = "pipeline.ip2p_model_id",
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        sampler: Sampler = "ddim",
        sequential_branches: bool = False,
    ) -> None:
        # diffusers is imported where it is used: listing the methods (ns-train --help) skips it
        from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline

        super().__init__()
        pipeline = load_diffusion_pipeline(
            StableDiffusionInstructPix2PixPipeline,
            model_id,
            field_name,
            device,
            dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )
        # frozen and out of checkpoints: see the holder pattern in model_loading
        for name in ("vae", "unet", "text_encoder", "tokenizer"):
            hold_frozen(self, name, getattr(pipeline, name))
        if sampler not in ("ddim", "pipeline"):
            raise ValueError(f"sampler must be 'ddim' or 'pipeline', got '{sampler}'")
        self.scheduler = pipeline.scheduler
        if sampler == "ddim":  # eta defaults to 0 in DDIMScheduler.step: no noise is drawn after the start
            self.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, **SD14_DDIM)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.sequential_branches = sequential_branches
        self._prompt_cache: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def _embed(self, text: str) -> torch.Tensor:
        tokens = self.tokenizer(
            text,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.device))[0].to(self.dtype)

    def prompt_embeddings(self, prompt: str) -> torch.Tensor:
        """CLIP embeddings [2, tokens, dim] of the instruction and of the empty (unconditional) prompt, cached."""
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = torch.cat([self._embed(prompt), self._embed("")])
        return self._prompt_cache[prompt]

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [F, 3, H, W] in [0, 1] -> VAE posterior mode (deterministic, unscaled)."""
        pixels = images.to(self.device, self.dtype) * 2.0 - 1.0
        return self.vae.encode(pixels).latent_dist.mode()

    def _timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The scheduler's timesteps for ``num_inference_steps``, of which the last ``strength`` fraction runs."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"edit strength must be in (0, 1], got {strength}")
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        kept = min(int(num_inference_steps * strength), num_inference_steps)
        if kept < 1:
            raise ValueError(f"strength {strength} leaves none of {num_inference_steps} steps to run")
        start = (num_inference_steps - kept) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)  # so that add_noise and step start at the sliced timestep
        return self.scheduler.timesteps[start:]

    @torch.no_grad()
    def edit(
        self,
        images: torch.Tensor,
        prompt: str,
        *,
        init_images: torch.Tensor | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        anchor: AnchorAttentionMode = "anchor_self",
        seed: int = 0,
    ) -> torch.Tensor:
        """Edit a window of frames by ``prompt``.

        Args:
            images: [F, 3, H, W] in [0, 1], the image condition (the original frames); H and W must be multiples
                of the VAE's downscaling factor (8 for Stable Diffusion). Frame 0 is the anchor.
            prompt: the instruction.
            init_images: [F, 3, H, W] in [0, 1] that sampling starts from when ``strength`` < 1 (e.g. the current
                renders or flow-warped edits); ``images`` when None.
            strength: fraction of the noise schedule to run, in (0, 1]; 1 is a full edit from pure noise.
            num_inference_steps: steps of the full schedule (``int(steps x strength)`` of them run).
            guidance_scale: text guidance ``s_t``.
            image_guidance_scale: image guidance ``s_i``.
            anchor: ``"off"`` (frames edited independently), ``"anchor"`` or ``"anchor_self"`` attention; with either
                of the latter the ResNet blocks' GroupNorm statistics are shared over the frames as well.
            seed: seeds the CPU generator that draws all noise, so an edit is reproducible on any device.

        Returns:
            Edited frames [F, 3, H, W] in [0, 1], float32, on the editor's device.
        """
        from diffusers.utils.torch_utils import randn_tensor  # imported when used: listing the methods skips diffusers

        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [frames, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"image size {height}x{width} is not a multiple of {self.vae_scale_factor}")
        frames = images.shape[0]

        generator = torch.Generator("cpu").manual_seed(seed)
        text, uncond = self.prompt_embeddings(prompt).unsqueeze(1).expand(-1, frames, -1, -1)
        prompt_embeds = torch.cat([text, uncond, uncond])
        image_latents = self._encode(images)
        image_cond = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])

        timesteps = self._timesteps(num_inference_steps, strength)
        noise = randn_tensor(image_latents.shape, generator=generator, device=self.device, dtype=self.dtype)
        if strength == 1.0:
            latents = noise * self.scheduler.init_noise_sigma
        else:
            start = self._encode(images if init_images is None else init_images) * self.vae.config.scaling_factor
            latents = self.scheduler.add_noise(start, noise, timesteps[:1].repeat(frames))

        # stochastic schedulers (DDPM, Euler ancestral, DDIM with eta) draw step noise; others take no generator
        accepts_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if accepts_generator else {}
        coupled = anchor != "off"
        branches = 1 if self.sequential_branches else 3  # guidance branches per UNet batch
        with anchor_attention(self.unet, anchor, branches) if coupled else nullcontext(), cross_frame_group_norm(
            self.unet, branches
        ) if coupled else nullcontext():
            for t in timesteps:
                model_input = self.scheduler.scale_model_input(torch.cat([latents] * 3), t)
                eps_text, eps_image, eps_uncond = self._noise_predictions(
                    torch.cat([model_input, image_cond], dim=1), t, prompt_embeds
                )
                eps = (
                    eps_uncond
                    + guidance_scale * (eps_text - eps_image)
                    + image_guidance_scale * (eps_image - eps_uncond)
                )
                latents = self.scheduler.step(eps, t, latents, return_dict=False, **step_kwargs)[0]

        decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

    def _noise_predictions(
        self, unet_input: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """The UNet's noise predictions (text, image, unconditional) of a ``[3 x frames]`` branch-major batch."""
        if not self.sequential_branches:
            return self.unet(unet_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0].chunk(3)
        return tuple(
            self.unet(branch, t, encoder_hidden_states=embeds, return_dict=False)[0]
            for branch, embeds in zip(unet_input.chunk(3), prompt_embeds.chunk(3))
        )
