"""Disentangled self-attention injection (unified editing, arXiv 2405.16823): one Stable Diffusion edits a set of
images (video frames, views of a scene, panorama windows) consistently.

Every image is DDIM-inverted (diffusers' ``DDIMInverseScheduler``, inversion prompt, no guidance) and then sampled
again with diffusers' ``DDIMScheduler`` under the edit prompt, classifier-free guidance on a batch laid out
``[uncond x B ; cond x B]``. At sampling step ``i`` of ``N`` (noisiest first):

- a **source pass** (no grad) runs the UNet on each image's own inverted latent for that step with the inversion
  prompt and records its ResNet residual features and decoder self-attention queries and keys (PnP's source branch;
  it runs as its own UNet call on the stored inversion trajectory rather than as a third part of the batch);
- **structure injection**, for ``i < int(t_edit N)``: in both guidance branches the residual branch of
  ``up_blocks[1].resnets[1]`` (``conv2``'s output, before the skip add) and the self-attention Q and K of the
  selected decoder layers are replaced by the image's own source features;
- **context sharing**, for ``i < int(t_context N)`` and every image except the reference: the self-attention K and V
  are replaced by those of the edited reference at the same step and branch (the reference path itself is plain PnP).
  Where both apply, Q is the image's own and K/V the reference's.

With ``t_edit = t_context = 0`` this is exactly ``StableDiffusionPipeline.__call__`` with ``DDIMScheduler``.

Everything is done with forward hooks on ``conv2`` and on the ``to_q``/``to_k``/``to_v`` projections of the chosen
``attn1`` layers, installed only while the editor samples: whatever attention processor the UNet has (SDPA,
xformers, sliced) still computes the attention, now on the injected projections. Nothing patches ``forward``.

Memory: images are edited in batches of ``batch_size`` against one reference; a batch's inversion trajectory
(``N + 1`` latents per image) lives only while the batch is edited. The reference is edited once first and its K/V
for the ``int(t_context N)`` shared steps are stored on ``cache_device`` and reused by every batch. The trade-off:
the cache costs ``2 branches x 2 (K, V) x sum over the shared layers of tokens x channels`` values per shared step;
for SD 2.1-base at 512 px that is 26.2 M values, 52 MB in fp16, so 1.3 GB of host memory at the default 25 shared
steps of 50 (the alternative, recomputing the reference inside every batch, needs no cache but costs one extra image
per batch at every step).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import Attention

from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.model_loading import hold_frozen, load_diffusion_pipeline

SD21_BASE = "stabilityai/stable-diffusion-2-1-base"


@dataclass
class AttentionInjectionConfig:
    """Settings of the self-attention injection editor (defaults: PnP-diffusers on SD 2.1-base)."""

    model: str = SD21_BASE
    """Stable Diffusion pipeline to edit with: a hub id or a local directory in ``save_pretrained`` layout."""
    num_inference_steps: int = 50
    """DDIM steps, used both for the inversion and for the edit."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale of the edit (1 or less: no guidance, the prompt branch only)."""
    t_edit: float = 0.8
    """Fraction of the sampling steps, from the noisiest, with structure injection (ResNet features and Q/K)."""
    t_context: float = 0.5
    """Fraction of the sampling steps, from the noisiest, in which non-reference images take K/V from the reference."""
    negative_prompt: str = ""
    """Prompt of the unconditional guidance branch."""
    inversion_prompt: str = ""
    """Prompt for the DDIM inversion and the source passes (PnP: empty)."""
    batch_size: int = 4
    """Images edited together against the reference; bounds the memory of one step."""
    cache_device: str = "cpu"
    """Where the reference's per-step K/V are kept between batches (host memory by default, see the module doc)."""

    def __post_init__(self) -> None:
        for name in ("t_edit", "t_context"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"{name} {value}: expected a fraction of the sampling steps in [0, 1]")
        if self.num_inference_steps < 1:
            raise InputError(f"num_inference_steps {self.num_inference_steps}: expected at least 1")
        if self.batch_size < 1:
            raise InputError(f"batch_size {self.batch_size}: expected at least 1")


def injection_layers(unet: torch.nn.Module) -> Tuple[torch.nn.Module, Dict[str, Attention]]:
    """The ResNet block and the decoder self-attention layers that receive injected features.

    The rule reproduces PnP's choice on Stable Diffusion's layout and picks the analogous layers of smaller UNets:
    the ResNet is ``up_blocks[1].resnets[1]`` (indices clamped to what exists); the attention layers are every
    decoder self-attention (``attn1``) except the first, coarsest one, which on SD is exactly
    ``up_blocks`` {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}. A decoder with a single self-attention keeps it.
    """
    block = unet.up_blocks[min(1, len(unet.up_blocks) - 1)]
    resnet = block.resnets[min(1, len(block.resnets) - 1)]
    attentions = {
        f"up_blocks.{name}": module
        for name, module in unet.up_blocks.named_modules()
        if name.endswith("attn1") and isinstance(module, Attention)
    }
    names = list(attentions)
    keep = names[1:] if len(names) > 1 else names
    return resnet, {name: attentions[name] for name in keep}


@dataclass
class ReferenceContext:
    """The edited reference's self-attention K and V, one ``{"<layer>.k" | "<layer>.v": tensor}`` per shared step.

    Each tensor is ``[branches, tokens, channels]`` (branches: unconditional then conditional) on the config's
    ``cache_device``.
    """

    steps: List[Dict[str, torch.Tensor]] = field(default_factory=list)
    """Per shared step, the reference path's K and V of every injected layer."""

    @property
    def nbytes(self) -> int:
        """Size of the cache in bytes."""
        return sum(t.numel() * t.element_size() for step in self.steps for t in step.values())


@dataclass
class _HookState:
    """What the hooks do during the current UNet call (set by the sampler before each call)."""

    phase: str = "off"
    """One of "off" (pass through), "source" (record features), "edit" (inject, share, record K/V)."""
    branches: int = 1
    """Guidance branches stacked in the edit batch."""
    inject: bool = False
    """Replace the residual features and Q/K by the recorded source ones."""
    shared: Optional[Dict[str, torch.Tensor]] = None
    """Reference K/V of this step to use instead of the batch's own."""
    record: Optional[Dict[str, torch.Tensor]] = None
    """Where to store this call's K/V (the reference path)."""
    source: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Features of the last source pass, keyed by layer and projection."""


class AttentionInjectionEditor(torch.nn.Module):
    """Edits images by a prompt with DDIM inversion, PnP structure injection and K/V sharing from a reference.

    Args:
        config: the editor's settings.
        device: where the models run.
        dtype: model dtype; fp16 on CUDA and fp32 on the CPU when None. Latents and scheduler arithmetic stay fp32.
        field_name: the config field that names the model, quoted when the weights cannot be loaded.
    """

    def __init__(
        self,
        config: AttentionInjectionConfig,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        field_name: str = "model",
    ) -> None:
        super().__init__()
        self.config = config
        pipeline = load_diffusion_pipeline(
            StableDiffusionPipeline, config.model, field_name, device, dtype,
            safety_checker=None, requires_safety_checker=False,
        )
        # frozen and out of checkpoints: see the holder pattern in model_loading
        hold_frozen(self, "pipeline", pipeline)
        self.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        self.inverse_scheduler = DDIMInverseScheduler.from_config(pipeline.scheduler.config)
        resnet, self.attentions = injection_layers(pipeline.unet)
        hold_frozen(self, "resnet", resnet)  # a plain module attribute would put its weights in state_dict()
        self._state = _HookState()
        self._embeddings: Dict[Tuple[str, str, bool], torch.Tensor] = {}

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's downscaling times the UNet's."""
        return self.pipeline.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def do_guidance(self) -> bool:
        return self.config.guidance_scale > 1.0

    # ---------------------------------------------------------------- prompts, VAE
    def prompt_embeddings(self, prompt: str, guided: bool) -> torch.Tensor:
        """``[negative ; prompt]`` embeddings when ``guided``, else ``[prompt]``; the pipeline's own encoding."""
        key = (prompt, self.config.negative_prompt, guided)
        if key not in self._embeddings:
            positive, negative = self.pipeline.encode_prompt(
                prompt, self.device, 1, guided, self.config.negative_prompt if guided else None
            )
            self._embeddings[key] = torch.cat([negative, positive]) if guided else positive
        return self._embeddings[key]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> scaled latents (posterior mean: deterministic), fp32."""
        self._check_size(images)
        vae = self.pipeline.vae
        pixels = images.to(self.device, vae.dtype) * 2.0 - 1.0
        return vae.encode(pixels).latent_dist.mean.float() * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images [B, 3, H, W] in [0, 1], fp32."""
        vae = self.pipeline.vae
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

    def _check_size(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [batch, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"image size {height}x{width} is not a multiple of {self.size_multiple}")

    # ---------------------------------------------------------------- hooks
    def _resnet_hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        state = self._state
        if state.phase == "source":
            state.source["resnet"] = output
        elif state.phase == "edit" and state.inject:
            return state.source["resnet"].repeat(state.branches, 1, 1, 1)
        return None

    def _projection_hook(
        self, name: str, kind: str, module: torch.nn.Module, args: tuple, output: torch.Tensor
    ) -> Optional[torch.Tensor]:
        state, key = self._state, f"{name}.{kind}"
        if state.phase == "source":
            if kind != "v":  # PnP injects queries and keys only
                state.source[key] = output
            return None
        if state.phase != "edit":
            return None
        if state.inject and kind != "v":
            output = state.source[key].repeat(state.branches, 1, 1)
        if state.shared is not None and kind != "q":
            # the reference's [uncond, cond] rows, each repeated for the batch's images
            shared = state.shared[key].to(output.device, output.dtype)
            output = shared.repeat_interleave(output.shape[0] // len(shared), dim=0)
        if state.record is not None and kind != "q":
            state.record[key] = output.to(self.config.cache_device)
        return output

    @contextmanager
    def _hooks(self) -> Iterator[None]:
        handles = [self.resnet.conv2.register_forward_hook(self._resnet_hook)]
        for name, attention in self.attentions.items():
            for kind, projection in (("q", attention.to_q), ("k", attention.to_k), ("v", attention.to_v)):
                handles.append(projection.register_forward_hook(partial(self._projection_hook, name, kind)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._state = _HookState()

    # ---------------------------------------------------------------- inversion and sampling
    @torch.no_grad()
    def invert(self, latents: torch.Tensor) -> List[torch.Tensor]:
        """DDIM inversion of scaled latents [B, 4, h, w] under the inversion prompt, without guidance.

        Returns ``N + 1`` latents: ``[z_0, z_t1, ..., z_tN]``, the input and then the latent after each inversion
        step (noise levels ascending); sampling step ``i`` (timesteps descending) pairs with entry ``N - i``.
        """
        embeddings = self.prompt_embeddings(self.config.inversion_prompt, guided=False)
        embeddings = embeddings.expand(len(latents), -1, -1)
        self.inverse_scheduler.set_timesteps(self.config.num_inference_steps, device=self.device)
        trajectory = [latents]
        for t in self.inverse_scheduler.timesteps:
            eps = self.unet(latents.to(self.unet.dtype), t, encoder_hidden_states=embeddings, return_dict=False)[0]
            latents = self.inverse_scheduler.step(eps.float(), t, latents, return_dict=False)[0]
            trajectory.append(latents)
        return trajectory

    @torch.no_grad()
    def sample(
        self,
        latents: torch.Tensor,
        prompt: str,
        source: Optional[List[torch.Tensor]] = None,
        shared: Optional[ReferenceContext] = None,
        record: Optional[ReferenceContext] = None,
    ) -> torch.Tensor:
        """DDIM sampling from ``latents`` [B, 4, h, w] under ``prompt`` with the injection schedule.

        Args:
            latents: the starting (noisiest) latents, usually ``source[-1]``.
            prompt: the edit prompt.
            source: the images' inversion trajectory (:meth:`invert`); without it there is no structure injection.
            shared: the reference's K/V to use in the first ``int(t_context N)`` steps (non-reference images).
            record: an empty context that receives this path's K/V for those steps (the reference path).

        Returns:
            The final latents, fp32.
        """
        config, state = self.config, self._state
        steps = config.num_inference_steps
        edit_steps = int(config.t_edit * steps) if source is not None else 0
        context_steps = int(config.t_context * steps)
        if shared is not None and len(shared.steps) < context_steps:
            raise ValueError(f"the reference context holds {len(shared.steps)} steps, {context_steps} are shared")
        guided = self.do_guidance
        state.branches = 2 if guided else 1
        embeddings = self.prompt_embeddings(prompt, guided).repeat_interleave(len(latents), dim=0)
        source_embeddings = self.prompt_embeddings(config.inversion_prompt, guided=False).expand(len(latents), -1, -1)
        self.scheduler.set_timesteps(steps, device=self.device)
        with self._hooks():
            for i, t in enumerate(self.scheduler.timesteps):
                state.inject = i < edit_steps
                if state.inject:
                    state.phase = "source"
                    self.unet(
                        source[steps - i].to(self.unet.dtype), t, encoder_hidden_states=source_embeddings,
                        return_dict=False,
                    )
                state.phase = "edit"
                state.shared = shared.steps[i] if shared is not None and i < context_steps else None
                state.record = {} if record is not None and i < context_steps else None
                model_input = self.scheduler.scale_model_input(torch.cat([latents] * state.branches), t)
                eps = self.unet(
                    model_input.to(self.unet.dtype), t, encoder_hidden_states=embeddings, return_dict=False
                )[0].float()
                if state.record is not None:
                    record.steps.append(state.record)
                if guided:
                    eps_uncond, eps_text = eps.chunk(2)
                    eps = eps_uncond + config.guidance_scale * (eps_text - eps_uncond)
                latents = self.scheduler.step(eps, t, latents, return_dict=False)[0]
                state.source = {}
        return latents

    # ---------------------------------------------------------------- editing
    @torch.no_grad()
    def edit_reference(self, image: torch.Tensor, prompt: str) -> Tuple[torch.Tensor, ReferenceContext]:
        """PnP-edit the reference image [1, 3, H, W] in [0, 1]; returns the edit and its K/V for the other images."""
        trajectory = self.invert(self.encode(image))
        context = ReferenceContext()
        latents = self.sample(trajectory[-1], prompt, source=trajectory, record=context)
        return self.decode(latents), context

    @torch.no_grad()
    def edit_batch(self, images: torch.Tensor, prompt: str, reference: ReferenceContext) -> torch.Tensor:
        """Edit images [B, 3, H, W] in [0, 1] with their own structure and the reference's K/V."""
        trajectory = self.invert(self.encode(images))
        return self.decode(self.sample(trajectory[-1], prompt, source=trajectory, shared=reference))

    def edit(self, images: Iterable[torch.Tensor], reference: torch.Tensor, prompt: str) -> Iterator[torch.Tensor]:
        """Edit a stream of images [3, H, W] in [0, 1] (all of the reference's size) against ``reference`` [3, H, W].

        The reference is edited once; the images are edited ``batch_size`` at a time and yielded one by one, in
        order, as fp32 tensors on the CPU. Including the reference among ``images`` reproduces its own edit.
        """
        _, context = self.edit_reference(reference.unsqueeze(0), prompt)
        batch: List[torch.Tensor] = []
        for image in images:
            batch.append(image)
            if len(batch) == self.config.batch_size:
                yield from self.edit_batch(torch.stack(batch), prompt, context).cpu()
                batch = []
        if batch:
            yield from self.edit_batch(torch.stack(batch), prompt, context).cpu()
