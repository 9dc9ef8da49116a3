"""Cross-frame GroupNorm on a tiny stock UNet2DConditionModel: statistics over a window's frames computed by hand,
where the shared norms are installed, and plain GroupNorm with one frame."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from tiny_models import TEXT_DIM, tiny_unet

from ns_4d_methods.guidance.cross_frame_norm import CrossFrameGroupNorm, cross_frame_group_norm

GROUPS = 3  # InstructPix2Pix guidance: text-cond, image-cond, uncond


def reference_group_norm(x: torch.Tensor, norm: torch.nn.GroupNorm, groups_of_frames: int) -> torch.Tensor:
    """By hand: for each guidance branch and channel group, one mean and (biased) variance over all its frames."""
    batch, channels, height, width = x.shape
    frames, per_group = batch // groups_of_frames, channels // norm.num_groups
    out = torch.empty_like(x)
    for branch in range(groups_of_frames):
        rows = slice(branch * frames, (branch + 1) * frames)
        for g in range(norm.num_groups):
            cols = slice(g * per_group, (g + 1) * per_group)
            values = x[rows, cols].double()
            mean, variance = values.mean(), ((values - values.mean()) ** 2).mean()
            out[rows, cols] = ((values - mean) / torch.sqrt(variance + norm.eps)).float()
    return out * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]


def test_statistics_span_the_frames_of_each_guidance_branch():
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(GROUPS * 5, 16, 6, 7) * torch.linspace(0.5, 3, GROUPS * 5)[:, None, None, None]
    shared = CrossFrameGroupNorm(norm, GROUPS)
    assert shared.weight is norm.weight and shared.bias is norm.bias  # shared, not copied
    with torch.no_grad():
        torch.testing.assert_close(shared(x), reference_group_norm(x, norm, GROUPS), atol=1e-5, rtol=1e-5)
        # per frame (the stock module) differs: the frames have different scales
        assert (shared(x) - norm(x)).abs().max() > 0.1
        # one frame per group: exactly the stock GroupNorm
        torch.testing.assert_close(CrossFrameGroupNorm(norm, GROUPS)(x[:GROUPS]), norm(x[:GROUPS]))
    with pytest.raises(ValueError, match="equal groups"):
        shared(x[:4])


def test_installed_on_every_resnet_norm_and_conv_norm_out_then_restored():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = tiny_unet(in_channels=8)
    blocks = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    stock = [(b.norm1, b.norm2) for b in blocks] + [unet.conv_norm_out]
    generator = torch.Generator().manual_seed(1)
    frames = torch.randn(4, 8, 16, 16, generator=generator) * torch.tensor([0.5, 1.0, 2.0, 4.0])[:, None, None, None]
    inputs = {
        "sample": frames[None].expand(GROUPS, -1, -1, -1, -1).reshape(-1, 8, 16, 16),
        "timestep": 500,
        "encoder_hidden_states": torch.randn(GROUPS * 4, 6, TEXT_DIM, generator=generator),
    }
    with torch.no_grad():
        plain = unet(**inputs).sample
        with cross_frame_group_norm(unet, GROUPS):
            assert all(isinstance(b.norm1, CrossFrameGroupNorm) and isinstance(b.norm2, CrossFrameGroupNorm)
                       for b in blocks)
            assert isinstance(unet.conv_norm_out, CrossFrameGroupNorm)
            # the transformers' own GroupNorm stays per frame, as in the official UNet
            assert not any(isinstance(m.norm, CrossFrameGroupNorm) for m in unet.modules() if hasattr(m, "proj_in"))
            shared = unet(**inputs).sample
            single = unet(**{k: v[::4] if torch.is_tensor(v) else v for k, v in inputs.items()}).sample
        restored = unet(**inputs).sample
    assert [(b.norm1, b.norm2) for b in blocks] + [unet.conv_norm_out] == stock
    torch.testing.assert_close(restored, plain, atol=0, rtol=0)
    assert (shared - plain).abs().max() > 1e-3
    # one frame per branch: the stock UNet's result
    torch.testing.assert_close(single, plain[::4], atol=1e-5, rtol=1e-5)
