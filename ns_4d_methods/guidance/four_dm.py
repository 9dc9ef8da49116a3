"""4DM, 4Diffusion's multi-view video diffusion model, composed from stock diffusers parts.

4DM is the ImageDream "ipmv" UNet (Stable Diffusion 2.1-base layout, 4 views + 1 image-prompt view) with 21 motion
modules. Here it is:

- **spatial UNet**: diffusers' ``UNet2DConditionModel``; the **camera** (a flattened 4x4 camera-to-world, 16 values)
  is its class embedding (``class_embed_type="projection"``: Linear-SiLU-Linear added to the timestep embedding,
  exactly ImageDream's ``camera_embed``); the image-prompt view gets a zero camera;
- **image prompt** (IP-Adapter-Plus, as ImageDream): CLIP ViT-H image tokens -> diffusers'
  ``IPAdapterPlusImageProjection`` (the Resampler: 16 tokens) -> ``IPAdapterAttnProcessor2_0`` on every
  cross-attention, which adds ``scale * attention(q, to_k_ip(tokens), to_v_ip(tokens))`` to the text attention;
- **multi-view self-attention** on every ``attn1``
  (:class:`~ns_4d_methods.guidance.multiview_attention.MultiViewAttnProcessor`);
- **motion modules** on forward hooks (:mod:`ns_4d_methods.guidance.motion_module`).

The input frame's VAE latent in the image-prompt view's slot is part of ``sample``: the caller writes it (4Diffusion
overwrites that slot inside the UNet call; keeping the UNet a pure function of its inputs makes no difference to the
result). :class:`FourDMUNet` is its own ``ModelMixin``/``ConfigMixin`` so that ``save_pretrained``/``from_pretrained``
rebuild the processors, the image projection and the motion modules (a bare ``UNet2DConditionModel`` would come
back with plain processors and without them).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Dict, Optional

import torch
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from torch import nn

from ns_4d_methods.guidance.motion_module import attached_motion_modules, build_motion_module, motion_module_placements
from ns_4d_methods.guidance.multiview_attention import MultiViewAttnProcessor

CAMERA_DIM = 16
CLIP_IMAGE_DIM = 1280  # ImageDream's Resampler input: OpenCLIP ViT-H-14 tokens (hard-coded in the original)


class FourDMUNet(ModelMixin, ConfigMixin):
    """The 4DM UNet: ``forward`` maps a batch of ``(b f n)`` noisy latents to their noise predictions.

    Args:
        unet_config: ``UNet2DConditionModel`` configuration (SD 2.1-base sizes for the real model, with
            ``class_embed_type="projection"`` and ``projection_class_embeddings_input_dim=16``).
        num_views: views per time step in a batch, the image-prompt view included (ImageDream: 4 + 1).
        num_frames: time steps per batch the motion modules were trained on (4DM: 8).
        image_tokens: image-prompt tokens the Resampler makes (ImageDream's ``ip_dim``: 16).
        image_scale: weight of the image-prompt attention (ImageDream's ``ip_weight``: 1).
        resampler_heads, resampler_depth: the Resampler's attention heads (64 channels each) and layers.
        motion_heads, motion_layers, motion_max_frames, motion_attention_dim_div: the motion modules' attention heads,
            transformer blocks, sinusoidal positions and head-width divisor (4DM: 8, 1, 32, 1).
    """

    @register_to_config
    def __init__(
        self,
        unet_config: Dict[str, Any],
        num_views: int = 5,
        num_frames: int = 8,
        image_tokens: int = 16,
        image_scale: float = 1.0,
        resampler_heads: int = 12,
        resampler_depth: int = 4,
        motion_heads: int = 8,
        motion_layers: int = 1,
        motion_max_frames: int = 32,
        motion_attention_dim_div: int = 1,
    ) -> None:
        super().__init__()
        self.unet = UNet2DConditionModel(**unet_config)
        text_dim = self.unet.config.cross_attention_dim
        self.image_projection = IPAdapterPlusImageProjection(
            embed_dims=CLIP_IMAGE_DIM,
            output_dims=text_dim,
            hidden_dims=text_dim,
            depth=resampler_depth,
            dim_head=64,
            heads=resampler_heads,
            num_queries=image_tokens,
            ffn_ratio=4,
        )
        processors = {}
        for name in self.unet.attn_processors:
            layer = self.unet.get_submodule(name[: -len(".processor")])
            if name.endswith("attn1.processor"):
                processors[name] = MultiViewAttnProcessor(num_views)
            else:
                processors[name] = IPAdapterAttnProcessor2_0(
                    layer.to_q.out_features, text_dim, num_tokens=(image_tokens,), scale=image_scale
                )
        self.unet.set_attn_processor(processors)
        self.placements = motion_module_placements(
            self.unet.config.down_block_types, self.unet.config.block_out_channels, self.unet.config.layers_per_block
        )
        self.motion_modules = nn.ModuleList(
            build_motion_module(
                placement.channels, motion_heads, motion_layers, motion_max_frames, motion_attention_dim_div
            )
            for placement in self.placements
        )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        camera: torch.Tensor,
        image_embeds: torch.Tensor,
        num_frames: Optional[int] = None,
    ) -> torch.Tensor:
        """Noise predictions ``[B, C, h, w]`` for ``B = b x num_frames x num_views`` latents, frames-major.

        Args:
            sample: noisy latents ``[B, C, h, w]``, each time step's image-prompt view (its last view) holding the
                input frame's latent (zeros in the unconditional branch).
            timestep: ``[B]`` or a scalar.
            encoder_hidden_states: text tokens ``[B, 77, D]``.
            camera: ``[B, 16]`` camera vectors (zeros for the image-prompt view).
            image_embeds: CLIP image tokens ``[B, T, 1280]`` of each latent's time step (zeros: unconditional).
            num_frames: time steps in the batch; ``None`` runs the ImageDream UNet alone (motion modules off), on any
                number of groups of ``num_views`` views.
        """
        image_tokens = self.image_projection(image_embeds.to(self.dtype))
        motion = (
            attached_motion_modules(self.unet, self.motion_modules, self.placements, num_frames, self.config.num_views)
            if num_frames
            else nullcontext()
        )
        with motion:
            return self.unet(
                sample.to(self.dtype),
                timestep,
                encoder_hidden_states=(encoder_hidden_states.to(self.dtype), [image_tokens]),
                class_labels=camera.to(self.dtype),
                return_dict=False,
            )[0]
