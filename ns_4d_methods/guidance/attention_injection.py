"""Disentangled self-attention injection (unified editing, arXiv 2405.16823): one Stable Diffusion edits a set of
images (video frames, views of a scene, panorama windows) consistently.

Every image is DDIM-inverted (diffusers' ``DDIMInverseScheduler``, inversion prompt, no guidance, ``inversion_steps``
fine steps of which the latents at the ``N`` sampling timesteps are kept, as PnP's preprocessing does) and then
sampled again with diffusers' ``DDIMScheduler`` under the edit prompt, classifier-free guidance on a batch laid out
``[uncond x B ; cond x B]``. At sampling step ``i`` of ``N`` (noisiest first; :func:`step_features`):

- a **source pass** (no grad) runs the UNet on each image's own inverted latent for that step with the inversion
  prompt and records its ResNet residual features and decoder self-attention queries and keys (PnP's source branch;
  it runs as its own UNet call on the stored inversion trajectory rather than as a third part of the batch);
- **structure injection** (disentangled editing, early steps): for ``i < int(t_resnet N)`` the residual branch of
  ``up_blocks[1].resnets[1]`` (``conv2``'s output, before the skip add), and for ``i < int(t_edit N)`` the
  self-attention Q and K of the selected decoder layers, are replaced in both guidance branches by the image's own
  source features (PnP's ``pnp_f_t`` 0.8 and ``pnp_attn_t`` 0.5);
- **context sharing** (late steps): from ``i = int(t_context N)`` to the end, every image except the reference takes
  the self-attention K and V of the reference's editing path at the same step and branch, so the last, texture and
  colour deciding steps see one appearance (section 3.2: "early timesteps focus on disentangled editing using
  inverted features, while later timesteps prioritize context transfer by using shared features"). Where injection
  and sharing overlap, Q is the image's own (injected) one and K/V the reference's.

The reference itself is edited PnP-style first and records its K/V for the shared steps.
With ``t_resnet = t_edit = 0`` and no reference this is exactly ``StableDiffusionPipeline.__call__`` with
``DDIMScheduler``.

Everything is done with forward hooks on ``conv2`` and on the ``to_q``/``to_k``/``to_v`` projections of the chosen
``attn1`` layers, installed only while the editor samples: whatever attention processor the UNet has (SDPA,
xformers, sliced) still computes the attention, now on the injected projections. Nothing patches ``forward``.

Memory: images are edited in batches of ``batch_size`` against one reference; a batch's inversion trajectory
(``N + 1`` latents per image) lives only while the batch is edited. The reference's K/V for the shared steps cost
``2 branches x 2 (K, V) x sum over the shared layers of tokens x channels`` values per step; for SD 2.1-base at
512 px that is 26.2 M values, 52 MB in fp16, 1.3 GB at 25 shared steps of 50. ``cache_device="auto"`` keeps them on
the GPU when they fit in half of its free memory (no host-device copy at every layer and step), else in host memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, Literal, Optional, Tuple

import torch

if TYPE_CHECKING:  # diffusers is imported where it is used: listing the methods (ns-train --help) skips it
    from diffusers.models.attention_processor import Attention

from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.model_loading import hold_frozen, load_diffusion_pipeline

SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
PNP_NEGATIVE_PROMPT = "ugly, blurry, black, low res, unrealistic"
"""pnp-diffusers' ``config_pnp.yaml`` negative prompt."""

Role = Literal["reference", "other"]


@dataclass
class AttentionInjectionConfig:
    """Settings of the self-attention injection editor (defaults: PnP-diffusers on SD 2.1-base, the paper's order of
    injection and sharing). The three thresholds are fractions of the ``num_inference_steps`` sampling steps,
    counted from the noisiest; step ``i`` (0-based) is inside a threshold ``t`` when ``i < int(t N)``."""

    model: str = SD21_BASE
    """Stable Diffusion pipeline to edit with: a hub id or a local directory in ``save_pretrained`` layout."""
    num_inference_steps: int = 50
    """DDIM sampling steps of the edit (PnP: 50)."""
    inversion_steps: int = 1000
    """DDIM inversion steps; the latents at the sampling timesteps are kept from this finer trajectory. PnP's
    preprocessing inverts with one step per training timestep (1000; its ``--steps 999`` gives the same timesteps).
    Its timestep spacing must contain every sampling timestep (e.g. 1000, or equal to ``num_inference_steps``)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale of the edit (1 or less: no guidance, the prompt branch only)."""
    t_resnet: float = 0.8
    """Fraction of the sampling steps, from the noisiest, whose ResNet features are the image's inverted ones (PnP's
    ``pnp_f_t``)."""
    t_edit: float = 0.5
    """Fraction of the sampling steps, from the noisiest, whose self-attention Q/K are the image's inverted ones (the
    paper's t_edit; PnP's ``pnp_attn_t``)."""
    t_context: float = 0.5
    """Fraction of the sampling steps after which, from step ``int(t_context N)`` to the last, images other than the
    reference take the self-attention K/V of the reference's editing path (the paper's t_context)."""
    negative_prompt: str = PNP_NEGATIVE_PROMPT
    """Prompt of the unconditional guidance branch (PnP's default)."""
    inversion_prompt: str = ""
    """Prompt for the DDIM inversion and the source passes (PnP: empty)."""
    batch_size: int = 4
    """Images edited together against the reference; bounds the memory of one step."""
    cache_device: str = "auto"
    """Where the reference's per-step K/V are kept: "auto" (the model's device when the cache fits in half of its
    free memory, else the CPU), or a device name."""

    def __post_init__(self) -> None:
        for name in ("t_resnet", "t_edit", "t_context"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"{name} {value}: expected a fraction of the sampling steps in [0, 1]")
        for name in ("num_inference_steps", "inversion_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} {getattr(self, name)}: expected at least 1")


@dataclass(frozen=True)
class StepFeatures:
    """What one image's edit path receives at one sampling step."""

    resnet: bool
    """The image's inverted ResNet features."""
    qk: bool
    """The image's inverted self-attention Q/K."""
    shared_kv: bool
    """Shared self-attention K/V: taken from the reference (other images), recorded for them (the reference)."""


def step_features(config: AttentionInjectionConfig, step: int, role: Role, has_source: bool = True) -> StepFeatures:
    """The schedule: features of sampling step ``step`` (0 = noisiest) for an image of ``role``."""
    steps = config.num_inference_steps
    return StepFeatures(
        resnet=has_source and step < int(config.t_resnet * steps),
        qk=has_source and step < int(config.t_edit * steps),
        shared_kv=step >= int(config.t_context * steps),
    )


def injection_layers(unet: torch.nn.Module) -> Tuple[torch.nn.Module, Dict[str, Attention]]:
    """The ResNet block and the decoder self-attention layers that receive injected features.

    The rule reproduces PnP's choice on Stable Diffusion's layout and picks the analogous layers of smaller UNets:
    the ResNet is ``up_blocks[1].resnets[1]`` (indices clamped to what exists); the attention layers are every
    decoder self-attention (``attn1``) except the first, coarsest one, which on SD is exactly
    ``up_blocks`` {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}. A decoder with a single self-attention keeps it.
    """
    from diffusers.models.attention_processor import Attention

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
    """The edited reference's self-attention K and V, ``{"<layer>.k" | "<layer>.v": tensor}`` per shared step.

    Each tensor is ``[branches, tokens, channels]`` (branches: unconditional then conditional) on ``device``.
    """

    steps: Dict[int, Dict[str, torch.Tensor]] = field(default_factory=dict)
    """Per shared sampling step index, the reference path's K and V of every injected layer."""
    device: Optional[torch.device] = None
    """Where the tensors are kept; None until the first step is recorded (see the config's ``cache_device``)."""

    @property
    def nbytes(self) -> int:
        """Size of the cache in bytes."""
        return sum(t.numel() * t.element_size() for step in self.steps.values() for t in step.values())

    def move(self, device: torch.device) -> None:
        self.device = device
        self.steps = {i: {k: t.to(device) for k, t in step.items()} for i, step in self.steps.items()}


@dataclass
class _HookState:
    """What the hooks do during the current UNet call (set by the sampler before each call)."""

    phase: str = "off"
    """One of "off" (pass through), "source" (record features), "edit" (inject, share, record K/V)."""
    branches: int = 1
    """Guidance branches stacked in the edit batch."""
    features: StepFeatures = StepFeatures(False, False, False)
    """Which injections apply in this call."""
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
        from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionPipeline

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
    def encode(self, images: torch.Tensor, multiple: Optional[int] = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> scaled latents (posterior mean: deterministic), fp32. The sides must be
        multiples of ``multiple`` (default :attr:`size_multiple`, what the UNet needs)."""
        self._check_size(images, multiple or self.size_multiple)
        vae = self.pipeline.vae
        pixels = images.to(self.device, vae.dtype) * 2.0 - 1.0
        return vae.encode(pixels).latent_dist.mean.float() * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images [B, 3, H, W] in [0, 1], fp32."""
        vae = self.pipeline.vae
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

    @staticmethod
    def _check_size(images: torch.Tensor, multiple: int) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [batch, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % multiple or width % multiple:
            raise ValueError(f"image size {height}x{width} is not a multiple of {multiple}")

    # ---------------------------------------------------------------- hooks
    def _resnet_hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        state = self._state
        if state.phase == "source":
            state.source["resnet"] = output
        elif state.phase == "edit" and state.features.resnet:
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
        if state.features.qk and kind != "v":
            output = state.source[key].repeat(state.branches, 1, 1)
        if state.shared is not None and kind != "q":
            # the reference's [uncond, cond] rows, each repeated for the batch's images
            shared = state.shared[key].to(output.device, output.dtype)
            output = shared.repeat_interleave(output.shape[0] // len(shared), dim=0)
        if state.record is not None and kind != "q":
            state.record[key] = output
        return output

    @contextmanager
    def injection(self) -> Iterator[None]:
        """Installs the hooks and sets the sampling timesteps; :meth:`denoise_step` runs inside it."""
        handles = [self.resnet.conv2.register_forward_hook(self._resnet_hook)]
        for name, attention in self.attentions.items():
            for kind, projection in (("q", attention.to_q), ("k", attention.to_k), ("v", attention.to_v)):
                handles.append(projection.register_forward_hook(partial(self._projection_hook, name, kind)))
        self.scheduler.set_timesteps(self.config.num_inference_steps, device=self.device)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._state = _HookState()

    # ---------------------------------------------------------------- inversion
    def inversion_timesteps(self) -> Tuple[torch.Tensor, List[int]]:
        """The inversion's timesteps up to the noisiest sampling timestep, and the positions (in that list) of the
        sampling timesteps, noise ascending."""
        config = self.config
        for name, scheduler in (("num_inference_steps", self.scheduler), ("inversion_steps", self.inverse_scheduler)):
            if getattr(config, name) > scheduler.config.num_train_timesteps:
                raise InputError(f"{name} {getattr(config, name)}: expected at most the model's "
                                 f"{scheduler.config.num_train_timesteps} training timesteps")
            scheduler.set_timesteps(getattr(config, name), device=self.device)
        wanted = self.scheduler.timesteps.flip(0).tolist()
        timesteps = self.inverse_scheduler.timesteps
        timesteps = timesteps[timesteps <= wanted[-1]]  # the last sampling latent is where inversion stops
        position = {t: i for i, t in enumerate(timesteps.tolist())}
        missing = [t for t in wanted if t not in position]
        if missing:
            raise InputError(
                f"inversion_steps {config.inversion_steps}: its timesteps miss the sampling timesteps {missing[:3]} of "
                f"num_inference_steps {config.num_inference_steps}; expected 1000 or a multiple of it that fits"
            )
        return timesteps, [position[t] for t in wanted]

    def invert_step(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One DDIM inversion step at timestep ``t`` of fp32 latents, inversion prompt, no guidance."""
        embeddings = self.prompt_embeddings(self.config.inversion_prompt, guided=False)
        embeddings = embeddings.expand(len(latents), -1, -1)
        eps = self.unet(latents.to(self.unet.dtype), t, encoder_hidden_states=embeddings, return_dict=False)[0]
        return self.inverse_scheduler.step(eps.float(), t, latents, return_dict=False)[0]

    @torch.no_grad()
    def invert(self, latents: torch.Tensor) -> List[torch.Tensor]:
        """DDIM inversion of scaled latents [B, 4, h, w] in ``inversion_steps`` steps (fp32 latents).

        Returns ``N + 1`` latents: ``[z_0, z_t1, ..., z_tN]``, the input and then the latents at the ``N`` sampling
        timesteps (noise levels ascending); sampling step ``i`` (timesteps descending) pairs with entry ``N - i``.
        """
        timesteps, keep = self.inversion_timesteps()
        trajectory, kept = [latents], set(keep)
        for i, t in enumerate(timesteps):
            latents = self.invert_step(t, latents)
            if i in kept:
                trajectory.append(latents)
        return trajectory

    # ---------------------------------------------------------------- sampling
    def denoise_step(
        self,
        step: int,
        latents: torch.Tensor,
        prompt: str,
        source: Optional[torch.Tensor] = None,
        role: Role = "reference",
        shared: Optional[ReferenceContext] = None,
        record: Optional[ReferenceContext] = None,
    ) -> torch.Tensor:
        """Sampling step ``step`` (inside :meth:`injection`) of fp32 ``latents`` [B, 4, h, w]: the next latents.

        Args:
            source: the images' inverted latents at this step; without them there is no structure injection.
            role: "reference" (records its K/V into ``record``) or "other" (takes them from ``shared``).
        """
        config, state = self.config, self._state
        state.features = features = step_features(config, step, role, source is not None)
        guided = self.do_guidance
        state.branches = 2 if guided else 1
        t = self.scheduler.timesteps[step]
        if features.resnet or features.qk:
            state.phase = "source"
            embeddings = self.prompt_embeddings(config.inversion_prompt, guided=False).expand(len(latents), -1, -1)
            self.unet(source.to(self.unet.dtype), t, encoder_hidden_states=embeddings, return_dict=False)
        state.phase = "edit"
        state.shared = state.record = None
        if features.shared_kv and role == "other" and shared is not None:
            if step not in shared.steps:
                raise ValueError(f"the reference context has no K/V for sampling step {step}")
            state.shared = shared.steps[step]
        if features.shared_kv and role == "reference" and record is not None:
            state.record = {}
        embeddings = self.prompt_embeddings(prompt, guided).repeat_interleave(len(latents), dim=0)
        model_input = self.scheduler.scale_model_input(torch.cat([latents] * state.branches), t)
        eps = self.unet(model_input.to(self.unet.dtype), t, encoder_hidden_states=embeddings, return_dict=False)[0]
        if state.record is not None:
            self._keep(record, step, state.record)
        eps = eps.float()
        if guided:
            eps_uncond, eps_text = eps.chunk(2)
            eps = eps_uncond + config.guidance_scale * (eps_text - eps_uncond)
        state.source = {}
        return self.scheduler.step(eps, t, latents, return_dict=False)[0]

    def _keep(self, record: ReferenceContext, step: int, features: Dict[str, torch.Tensor]) -> None:
        """Stores one step's reference K/V, choosing the cache's device at its first step."""
        if record.device is None:
            device = self.config.cache_device
            if device == "auto":
                device = "cpu"
                if self.device.type == "cuda":
                    step_bytes = sum(t.numel() * t.element_size() for t in features.values())
                    shared_steps = sum(step_features(self.config, i, "reference").shared_kv
                                       for i in range(self.config.num_inference_steps))
                    if step_bytes * shared_steps < torch.cuda.mem_get_info(self.device)[0] / 2:
                        device = self.device
            record.device = torch.device(device)
        record.steps[step] = {key: value.to(record.device) for key, value in features.items()}

    @torch.no_grad()
    def sample(
        self,
        latents: torch.Tensor,
        prompt: str,
        source: Optional[List[torch.Tensor]] = None,
        shared: Optional[ReferenceContext] = None,
        record: Optional[ReferenceContext] = None,
        callback: Optional[Callable[[int, torch.Tensor], None]] = None,
    ) -> torch.Tensor:
        """DDIM sampling from ``latents`` [B, 4, h, w] under ``prompt`` with the injection schedule.

        Args:
            latents: the starting (noisiest) latents, usually ``source[-1]``.
            prompt: the edit prompt.
            source: the images' inversion trajectory (:meth:`invert`); without it there is no structure injection.
            shared: the reference's K/V for the shared steps (the images are "other" images).
            record: an empty context that receives this path's K/V for those steps (the reference path).
            callback: called with each step's index and input latents.

        Returns:
            The final latents, fp32.
        """
        steps = self.config.num_inference_steps
        role: Role = "other" if shared is not None else "reference"
        with self.injection():
            for i in range(steps):
                if callback is not None:
                    callback(i, latents)
                latents = self.denoise_step(
                    i, latents, prompt, source[steps - i] if source is not None else None, role, shared, record
                )
        return latents

    # ---------------------------------------------------------------- editing
    @torch.no_grad()
    def edit_reference(
        self, image: torch.Tensor, prompt: str, start: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, ReferenceContext]:
        """PnP-edit the reference image [1, 3, H, W] in [0, 1]; returns the edit and its K/V for the other images.
        ``start``: as in :meth:`edit_batch`."""
        trajectory = self.invert(self.encode(image))
        latents = trajectory[-1] if start is None else self.invert(self.encode(start))[-1]
        context = ReferenceContext()
        latents = self.sample(latents, prompt, source=trajectory, record=context)
        return self.decode(latents), context

    @torch.no_grad()
    def edit_batch(
        self, images: torch.Tensor, prompt: str, reference: ReferenceContext, start: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Edit images [B, 3, H, W] in [0, 1] with their own structure and the reference's K/V.

        ``start`` (same shape; optional) is inverted for the starting latent instead of ``images``, whose inversion
        still gives the structure features: the structure of ``images``, the appearance of ``start``.
        """
        trajectory = self.invert(self.encode(images))
        latents = trajectory[-1] if start is None else self.invert(self.encode(start))[-1]
        return self.decode(self.sample(latents, prompt, source=trajectory, shared=reference))

    def edit(self, images: Iterable[torch.Tensor], reference: torch.Tensor, prompt: str) -> Iterator[torch.Tensor]:
        """Edit a stream of images [3, H, W] in [0, 1] (all of the reference's size) against ``reference`` [3, H, W].

        The reference is edited once; the images are edited ``batch_size`` at a time and yielded one by one, in
        order, as fp32 tensors on the CPU. Including the reference among ``images`` reproduces its own edit (the
        K/V it is given are its own).
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
