"""Motion modules (4Diffusion's 4DM): AnimateDiff-style temporal transformers after every block of the multi-view UNet.

4DM inserts 21 zero-initialised temporal modules into the ImageDream UNet, one after every down, mid and up layer
(the AnimateDiff v2 placement with a mid-block module). Each is GroupNorm -> Linear -> two temporal self-attentions
with sinusoidal position encodings -> GEGLU feed-forward -> Linear -> residual, attending over time only, separately
for every view and pixel. That is diffusers' ``AnimateDiffTransformer3D`` (``double_self_attention=True``,
``positional_embeddings="sinusoidal"``) with two differences from the stock module, both handled here:

1. **GroupNorm scope**: 4Diffusion normalises every frame on its own; diffusers normalises the whole
   ``(B, C, F, H, W)`` clip at once (statistics shared over frames). :class:`PerFrameGroupNorm` replaces the stock
   norm (same parameters, so checkpoints keep their names).
2. **Batch layout**: 4DM's UNet batch is ``(b f n)``: frames-major, views-minor (``n`` = 4 views + the image-prompt
   view). The temporal module needs each view's frames together, ``(b n f)``: :func:`temporal_attention` permutes
   in and out.

Placement: the modules transform the outputs of the UNet's layers through forward hooks (a ``Transformer2DModel``
called by its block with ``return_dict=False`` returns a one-element tuple, a ``ResnetBlock2D`` a tensor), attached
only while :func:`attached_motion_modules` is active, so the same UNet also runs as the plain ImageDream UNet. The
21 places of the SD 2.1 layout, original module -> diffusers layer:

| #     | 4Diffusion (motion-inserted layout) | diffusers                            |
|-------|-------------------------------------|--------------------------------------|
| 1-2   | input_blocks.1.2, 2.2               | down_blocks.0.attentions.0/1         |
| 3-4   | input_blocks.4.2, 5.2               | down_blocks.1.attentions.0/1         |
| 5-6   | input_blocks.7.2, 8.2               | down_blocks.2.attentions.0/1         |
| 7-8   | input_blocks.10.1, 11.1             | down_blocks.3.resnets.0/1            |
| 9     | middle_block.2                      | mid_block.attentions.0               |
| 10-12 | output_blocks.0.1, 1.1, 2.1         | up_blocks.0.resnets.0/1/2            |
| 13-21 | output_blocks.3..11 .2              | up_blocks.1..3 .attentions.0/1/2     |

:func:`motion_module_placements` derives this table from any UNet configuration of the same family.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Sequence

import torch
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn


@dataclass(frozen=True)
class MotionModulePlacement:
    """Where one motion module sits."""

    target: str
    """The diffusers UNet layer whose output the module transforms, e.g. ``down_blocks.0.attentions.1``."""
    original: str
    """The module's name in 4Diffusion's motion-inserted UNet, e.g. ``input_blocks.2.2`` (checkpoint key prefix)."""
    channels: int
    """Feature channels at that layer."""


def motion_module_placements(
    down_block_types: Sequence[str], block_out_channels: Sequence[int], layers_per_block: int
) -> List[MotionModulePlacement]:
    """The motion modules of a 4DM built on a UNet with these blocks, in 4Diffusion's order (down, mid, up).

    4Diffusion appends a module to every input block holding a ResBlock (after its spatial transformer where the
    level has attention), inserts one after the middle block's transformer and appends one to every output block
    before its upsampler.
    """
    placements = []
    has_attention = ["CrossAttn" in block_type for block_type in down_block_types]
    for level, channels in enumerate(block_out_channels):
        for layer in range(layers_per_block):
            kind, slot = ("attentions", 2) if has_attention[level] else ("resnets", 1)
            original = f"input_blocks.{1 + level * (layers_per_block + 1) + layer}.{slot}"
            placements.append(MotionModulePlacement(f"down_blocks.{level}.{kind}.{layer}", original, channels))
    placements.append(MotionModulePlacement("mid_block.attentions.0", "middle_block.2", block_out_channels[-1]))
    levels = len(block_out_channels)
    for up_level in range(levels):
        level = levels - 1 - up_level
        for layer in range(layers_per_block + 1):
            kind, slot = ("attentions", 2) if has_attention[level] else ("resnets", 1)
            original = f"output_blocks.{up_level * (layers_per_block + 1) + layer}.{slot}"
            placements.append(
                MotionModulePlacement(f"up_blocks.{up_level}.{kind}.{layer}", original, block_out_channels[level])
            )
    return placements


class PerFrameGroupNorm(nn.GroupNorm):
    """GroupNorm of a ``(B, C, F, H, W)`` clip with statistics per frame, as 4Diffusion's temporal transformer
    normalises (it folds the frames into the batch first)."""

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = clip.shape
        per_frame = clip.transpose(1, 2).reshape(batch * frames, channels, height, width)
        normalised = super().forward(per_frame)
        return normalised.reshape(batch, frames, channels, height, width).transpose(1, 2)


def build_motion_module(
    channels: int, num_attention_heads: int = 8, num_layers: int = 1, max_frames: int = 32, attention_dim_div: int = 1
) -> AnimateDiffTransformer3D:
    """One 4DM motion module: a stock ``AnimateDiffTransformer3D`` with 4Diffusion's per-frame GroupNorm.

    Zero-initialised output projection, as in 4Diffusion (and AnimateDiff): a fresh module is the identity.
    """
    module = AnimateDiffTransformer3D(
        num_attention_heads=num_attention_heads,
        attention_head_dim=channels // num_attention_heads // attention_dim_div,
        in_channels=channels,
        num_layers=num_layers,
        norm_num_groups=32,
        activation_fn="geglu",
        attention_bias=False,
        double_self_attention=True,
        positional_embeddings="sinusoidal",
        num_positional_embeddings=max_frames,
    )
    module.norm = PerFrameGroupNorm(module.norm.num_groups, channels, eps=module.norm.eps, affine=True)
    nn.init.zeros_(module.proj_out.weight)
    nn.init.zeros_(module.proj_out.bias)
    return module


def temporal_attention(
    module: AnimateDiffTransformer3D, hidden_states: torch.Tensor, num_frames: int, num_views: int
) -> torch.Tensor:
    """Apply a motion module to features ``[(b f n), C, H, W]`` laid out frames-major, views-minor."""
    total, channels, height, width = hidden_states.shape
    if total % (num_frames * num_views):
        raise ValueError(f"a batch of {total} is not made of {num_frames} frames x {num_views} views")
    batch = total // (num_frames * num_views)
    grid = (batch, num_frames, num_views, channels, height, width)
    per_view = hidden_states.reshape(grid).transpose(1, 2).reshape(total, channels, height, width)  # (b n f)
    out = module(per_view, num_frames=num_frames)
    per_view_grid = (batch, num_views, num_frames, channels, height, width)
    return out.reshape(per_view_grid).transpose(1, 2).reshape(total, channels, height, width)


@contextmanager
def attached_motion_modules(
    unet: nn.Module,
    modules: Sequence[AnimateDiffTransformer3D],
    placements: Sequence[MotionModulePlacement],
    num_frames: int,
    num_views: int,
) -> Iterator[None]:
    """While active, every placement's layer output passes through its motion module (forward hooks)."""

    def hook_for(module: AnimateDiffTransformer3D):
        def hook(_layer: nn.Module, _inputs: tuple, output):
            if isinstance(output, tuple):  # Transformer2DModel(..., return_dict=False)
                return (temporal_attention(module, output[0], num_frames, num_views),) + output[1:]
            return temporal_attention(module, output, num_frames, num_views)

        return hook

    handles = [
        unet.get_submodule(placement.target).register_forward_hook(hook_for(module))
        for module, placement in zip(modules, placements)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
