"""Anchor attention on a tiny stock UNet2DConditionModel: where it is installed, what it computes, when it is plain."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention
from tiny_models import TEXT_DIM, tiny_unet

from ns_4d_methods.guidance.anchor_attention import (
    AnchorAttnProcessor,
    anchor_attention,
    install_anchor_attention,
    restore_attention_processors,
)

GROUPS = 3  # InstructPix2Pix guidance: text-cond, image-cond, uncond
VARIANTS = ["anchor", "anchor_self"]


@pytest.fixture(scope="module")
def unet():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tiny_unet(in_channels=8)


def unet_inputs(frames: list[torch.Tensor], seed: int = 1) -> dict:
    """A batch [3 x F] of per-frame latents (the same frames in every group) with per-group text states."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(GROUPS, 1, 6, TEXT_DIM, generator=generator).expand(-1, len(frames), -1, -1)
    sample = torch.stack(frames)[None].expand(GROUPS, -1, -1, -1, -1)
    return {
        "sample": sample.reshape(-1, *frames[0].shape),
        "timestep": 500,
        "encoder_hidden_states": text.reshape(-1, 6, TEXT_DIM),
    }


def run(unet, inputs: dict, variant: str | None = None) -> torch.Tensor:
    with torch.no_grad():
        if variant is None:
            return unet(**inputs).sample
        with anchor_attention(unet, variant, num_groups=GROUPS):
            return unet(**inputs).sample


def frame(seed: int) -> torch.Tensor:
    return torch.randn(8, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_installs_on_self_attention_only_and_restores(unet) -> None:
    before = dict(unet.attn_processors)
    originals = install_anchor_attention(unet, "anchor_self")
    installed = unet.attn_processors
    self_attention = [name for name in installed if name.endswith("attn1.processor")]
    # two down blocks, mid block and two up blocks (two transformer blocks each on the way up): 7 transformer blocks
    assert len(self_attention) == 7
    for name, processor in installed.items():
        if name in self_attention:
            assert isinstance(processor, AnchorAttnProcessor) and processor.variant == "anchor_self"
        else:
            assert processor is before[name]  # cross-attention keeps its processor
    restore_attention_processors(unet, originals)
    assert all(unet.attn_processors[name] is processor for name, processor in before.items())


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_frame_equals_plain_attention(unet, variant: str) -> None:
    inputs = unet_inputs([frame(0)])
    difference = (run(unet, inputs, variant) - run(unet, inputs)).abs().max().item()
    assert difference < 1e-5  # measured: 0 for "anchor", about 1e-6 for "anchor_self"


@pytest.mark.parametrize("variant", VARIANTS)
def test_identical_frames_equal_plain_attention(unet, variant: str) -> None:
    inputs = unet_inputs([frame(0)] * 3)
    difference = (run(unet, inputs, variant) - run(unet, inputs)).abs().max().item()
    assert difference < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_frames_attend_to_their_groups_anchor(unet, variant: str) -> None:
    frames = [frame(0), frame(1), frame(2)]
    plain = run(unet, unet_inputs(frames)).view(GROUPS, 3, 4, 16, 16)
    anchored = run(unet, unet_inputs(frames), variant).view(GROUPS, 3, 4, 16, 16)
    # the anchor itself attends as in plain attention; the other frames change
    assert (anchored[:, 0] - plain[:, 0]).abs().max() < 1e-5
    assert (anchored[:, 1:] - plain[:, 1:]).abs().amax(dim=(2, 3, 4)).min() > 1e-3

    # replacing the anchor changes frame 1's prediction only through anchor attention
    new_anchor = [frame(5), frame(1), frame(2)]
    plain_new = run(unet, unet_inputs(new_anchor)).view(GROUPS, 3, 4, 16, 16)
    anchored_new = run(unet, unet_inputs(new_anchor), variant).view(GROUPS, 3, 4, 16, 16)
    assert (plain_new[:, 1] - plain[:, 1]).abs().max() < 1e-5
    assert (anchored_new[:, 1] - anchored[:, 1]).abs().max() > 1e-3


def explicit_attention(attn: Attention, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, written out, for one frame's tokens against a context of tokens."""
    heads = attn.heads
    q, k, v = attn.to_q(queries), attn.to_k(context), attn.to_v(context)
    d = q.shape[-1] // heads
    q, k, v = (x.view(x.shape[0], heads, d).transpose(0, 1) for x in (q, k, v))
    weights = torch.softmax(q @ k.transpose(1, 2) / d**0.5, dim=-1)
    return attn.to_out[0]((weights @ v).transpose(0, 1).reshape(queries.shape[0], heads * d))


@pytest.mark.parametrize("variant", VARIANTS)
def test_processor_computes_anchor_keys_and_values(variant: str) -> None:
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    groups, frames, tokens = 2, 3, 5
    hidden = torch.randn(groups * frames, tokens, 16)
    with torch.no_grad():
        out = AnchorAttnProcessor(variant, num_groups=groups)(attn, hidden).view(groups, frames, tokens, 16)
        grouped = hidden.view(groups, frames, tokens, 16)
        for g in range(groups):
            for f in range(frames):
                anchor = grouped[g, 0]
                context = anchor if variant == "anchor" else torch.cat([anchor, grouped[g, f]])
                expected = explicit_attention(attn, grouped[g, f], context)
                torch.testing.assert_close(out[g, f], expected, atol=1e-5, rtol=1e-5)


def test_processor_rejects_uneven_batches_and_unknown_variants() -> None:
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    with pytest.raises(ValueError, match="3 equal groups"):
        AnchorAttnProcessor("anchor", num_groups=3)(attn, torch.randn(4, 5, 16))
    with pytest.raises(ValueError, match="variant"):
        AnchorAttnProcessor("cross_frame")  # type: ignore[arg-type]
