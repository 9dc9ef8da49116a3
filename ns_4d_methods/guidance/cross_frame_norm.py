"""Cross-frame GroupNorm (Instruct 4D-to-4D): the frames of a window share the GroupNorm statistics of the UNet.

The official inflated InstructPix2Pix UNet (``finetune_ip2p/models/ip2p_resnet.py``, ``ResnetBlock3D``) runs its
ResNet blocks on ``[b, c, f, h, w]`` clips, so ``norm1`` and ``norm2`` of every ResNet block, and the UNet's
``conv_norm_out``, compute their mean and variance over all frames of the window at once (the transformers' own
GroupNorm stays per frame). Besides anchor attention, this pulls the frames of a window toward one colour and
contrast. Here the stock ``UNet2DConditionModel`` runs the frames as a batch; :func:`cross_frame_group_norm` swaps
those GroupNorm modules, for the duration of a ``with`` block, for :class:`CrossFrameGroupNorm` modules that share
their weights and normalise each group of frames together.

The batch is laid out as in :mod:`ns_4d_methods.guidance.anchor_attention`: ``num_groups`` groups of the same frames
(3 with InstructPix2Pix's 3-way guidance), group-major; statistics never mix guidance branches. With one frame the
result is that of the stock GroupNorm.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


class CrossFrameGroupNorm(torch.nn.GroupNorm):
    """GroupNorm whose statistics span all frames of a group of a ``[groups x frames, C, H, W]`` batch.

    Args:
        norm: the stock GroupNorm whose settings and (shared, not copied) affine parameters it takes.
        num_groups_of_frames: how many groups of frames the batch holds (the guidance branches).
    """

    def __init__(self, norm: torch.nn.GroupNorm, num_groups_of_frames: int) -> None:
        super().__init__(norm.num_groups, norm.num_channels, eps=norm.eps, affine=False)
        self.weight, self.bias = norm.weight, norm.bias
        self.num_groups_of_frames = num_groups_of_frames

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = hidden_states.shape
        if batch % self.num_groups_of_frames:
            raise ValueError(f"batch of {batch} is not {self.num_groups_of_frames} equal groups of frames")
        # [G, F, C, ...] -> [G, C, F, ...]: group_norm then reduces over the frames with the pixels
        clips = hidden_states.view(self.num_groups_of_frames, -1, channels, *spatial).transpose(1, 2)
        normed = F.group_norm(clips, self.num_groups, self.weight, self.bias, self.eps)
        return normed.transpose(1, 2).reshape(hidden_states.shape)


def _norm_slots(unet: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute) of every GroupNorm the official code shares across frames."""
    from diffusers.models.resnet import ResnetBlock2D  # imported when used: method listing skips diffusers

    slots = [(module, name) for module in unet.modules() if isinstance(module, ResnetBlock2D)
             for name in ("norm1", "norm2")]
    if isinstance(getattr(unet, "conv_norm_out", None), torch.nn.GroupNorm):
        slots.append((unet, "conv_norm_out"))
    return slots


@contextmanager
def cross_frame_group_norm(unet: torch.nn.Module, num_groups_of_frames: int = 3) -> Iterator[None]:
    """Cross-frame statistics in the ResNet blocks' ``norm1``/``norm2`` and ``conv_norm_out`` of ``unet`` for the
    duration of a ``with`` block; the stock modules are put back afterwards."""
    slots = _norm_slots(unet)
    if not slots:
        raise ValueError(f"{type(unet).__name__} has no ResNet-block GroupNorm to share across frames")
    stock = [getattr(parent, name) for parent, name in slots]
    try:
        for (parent, name), norm in zip(slots, stock):
            setattr(parent, name, CrossFrameGroupNorm(norm, num_groups_of_frames))
        yield
    finally:
        for (parent, name), norm in zip(slots, stock):
            setattr(parent, name, norm)
