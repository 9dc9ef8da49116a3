"""Multi-view self-attention (MVDream / ImageDream, used by 4Diffusion's 4DM): the views of one time step attend to
each other's tokens.

ImageDream's transformer blocks run their self-attention (``attn1``) over all views of a time step at once by
folding the views into the token axis, ``(b n) l c -> b (n l) c``; cross-attention (``attn2``) and the feed-forward
stay per view. Everything else about the layer is that of the stock ``UNet2DConditionModel`` (the ``norm1`` before
it acts per token, so folding after it is the same as folding before it). This module is the diffusers attention
processor that does the fold around diffusers' own ``AttnProcessor2_0``.

The batch must hold whole groups of ``num_views`` consecutive views. Note: ``UNet2DConditionModel.set_attn_processor``,
``set_default_attn_processor``, xformers switches and ``load_ip_adapter`` replace processors and would silently turn
this back into per-view attention; :class:`~ns_4d_methods.guidance.four_dm.FourDMUNet` installs it once when it is
built.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


class MultiViewAttnProcessor:
    """``attn1`` over the tokens of ``num_views`` consecutive views together (views folded into the token axis)."""

    def __init__(self, num_views: int) -> None:
        self.num_views = num_views
        self.attention = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("multi-view attention is a self-attention: it takes no encoder_hidden_states")
        batch, length, channels = hidden_states.shape
        if batch % self.num_views:
            raise ValueError(f"a batch of {batch} is not made of groups of {self.num_views} views")
        folded = hidden_states.reshape(batch // self.num_views, self.num_views * length, channels)
        out = self.attention(attn, folded, attention_mask=attention_mask, temb=temb)
        return out.reshape(batch, length, channels)
