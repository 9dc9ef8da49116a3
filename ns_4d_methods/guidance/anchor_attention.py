"""Anchor attention (Instruct 4D-to-4D): the frames of a batch share the anchor frame's self-attention keys/values.

Instruct 4D-to-4D edits a window of frames with InstructPix2Pix and makes the edits agree by changing only the
self-attention layers (``attn1`` of every transformer block) of the stock ``UNet2DConditionModel``; convolutions and
cross-attention stay per frame. Two variants exist in the official code:

- ``"anchor"``: every frame's keys/values come only from the anchor frame (the multi-camera code);
- ``"anchor_self"``: keys/values are ``[anchor tokens ; own tokens]`` concatenated along the token axis (the
  monocular code and the paper's description).

The batch is laid out as ``num_groups`` groups of the same frames (3 with InstructPix2Pix's 3-way classifier-free
guidance: text-conditioned, image-conditioned, unconditional); the anchor is frame 0 of each group, so guidance
branches never mix. When every frame equals the anchor (or there is one frame), both variants reduce to plain
self-attention.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # an annotation only: importing this module does not load diffusers
    from diffusers.models.attention_processor import Attention

AnchorVariant = Literal["anchor", "anchor_self"]
ANCHOR_VARIANTS: tuple[str, ...] = ("anchor", "anchor_self")


class AnchorAttnProcessor:
    """diffusers attention processor for a self-attention layer that takes keys/values from the anchor frame.

    Args:
        variant: ``"anchor"`` (keys/values of the anchor only) or ``"anchor_self"`` (anchor's, then the frame's own).
        num_groups: how many groups of frames the batch holds (3 for InstructPix2Pix guidance, 2 for ordinary
            classifier-free guidance, 1 without guidance); the batch is ``num_groups x frames``, group-major.
    """

    def __init__(self, variant: AnchorVariant = "anchor_self", num_groups: int = 3) -> None:
        if variant not in ANCHOR_VARIANTS:
            raise ValueError(f"anchor attention variant must be one of {ANCHOR_VARIANTS}, got '{variant}'")
        self.variant = variant
        self.num_groups = num_groups

    def _anchor_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Keys or values [B, L, D] of each frame -> those the frame attends to, [B, L or 2L, D]."""
        batch, length, dim = tokens.shape
        grouped = tokens.view(self.num_groups, batch // self.num_groups, length, dim)
        anchor = grouped[:, :1].expand_as(grouped)
        if self.variant == "anchor_self":
            anchor = torch.cat([anchor, grouped], dim=2)
        return anchor.reshape(batch, -1, dim)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("anchor attention applies to unmasked self-attention (attn1) only")
        batch = hidden_states.shape[0]
        if batch % self.num_groups:
            raise ValueError(f"batch of {batch} is not {self.num_groups} equal groups of frames")

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            _, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        # projections are per token, so projecting every frame once and then gathering the anchor's tokens is the
        # same as projecting the gathered hidden states
        key = self._anchor_tokens(attn.to_k(hidden_states))
        value = self._anchor_tokens(attn.to_v(hidden_states))

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, scale=attn.scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear projection, dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def is_self_attention(processor_name: str) -> bool:
    """Whether a key of ``unet.attn_processors`` is a transformer block's self-attention (``attn1``)."""
    return processor_name.endswith("attn1.processor")


def install_anchor_attention(
    unet: torch.nn.Module, variant: AnchorVariant = "anchor_self", num_groups: int = 3
) -> dict[str, Any]:
    """Set :class:`AnchorAttnProcessor` on every ``attn1`` of ``unet``; cross-attention stays as it is.

    Returns the previous processors of all attention layers, for :func:`restore_attention_processors`.
    """
    originals = dict(unet.attn_processors)
    processor = AnchorAttnProcessor(variant, num_groups)
    processors = {name: processor if is_self_attention(name) else old for name, old in originals.items()}
    if not any(is_self_attention(name) for name in processors):
        raise ValueError(f"{type(unet).__name__} has no self-attention (attn1) layers to make anchor-aware")
    unet.set_attn_processor(processors)
    return originals


def restore_attention_processors(unet: torch.nn.Module, originals: dict[str, Any]) -> None:
    """Put back the processors returned by :func:`install_anchor_attention`."""
    unet.set_attn_processor(dict(originals))  # set_attn_processor pops from the dict it is given


@contextmanager
def anchor_attention(
    unet: torch.nn.Module, variant: AnchorVariant = "anchor_self", num_groups: int = 3
) -> Iterator[None]:
    """Anchor attention on ``unet`` for the duration of a ``with`` block."""
    originals = install_anchor_attention(unet, variant, num_groups)
    try:
        yield
    finally:
        restore_attention_processors(unet, originals)
