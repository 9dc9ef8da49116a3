"""Self-attention injection editor on a tiny random Stable Diffusion saved and loaded through the package's helper."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tiny_models import build_tiny_sd_pipeline

from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.attention_injection import (
    AttentionInjectionConfig,
    AttentionInjectionEditor,
    ReferenceContext,
    injection_layers,
)
from ns_4d_methods.guidance.model_loading import load_diffusion_pipeline

PROMPT = "a red car in the snow"
SIZE = 16  # pixels; the tiny VAE halves it, the tiny UNet halves it once more


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd_pipeline(path)
    return str(path)


@pytest.fixture(scope="module")
def shared_editor(tiny_sd) -> AttentionInjectionEditor:
    return AttentionInjectionEditor(AttentionInjectionConfig(model=tiny_sd))


@pytest.fixture
def configure(shared_editor):
    """Sets the shared editor's schedule (it reads its config at every call): 3 steps, guidance 7.5 by default."""

    def apply(**overrides) -> AttentionInjectionEditor:
        settings = dict(num_inference_steps=3, guidance_scale=7.5, t_edit=0.5, t_context=1.0, batch_size=2)
        shared_editor.config = replace(shared_editor.config, **{**settings, **overrides})
        return shared_editor

    return apply


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("field_name", ["t_edit", "t_context"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_schedule_fraction_outside_unit_interval_is_a_one_line_error(field_name, value):
    with pytest.raises(InputError) as error:
        AttentionInjectionConfig(**{field_name: value})
    assert field_name in str(error.value) and "\n" not in str(error.value)


def test_layer_rule_gives_pnp_layers_on_stable_diffusion_layout():
    # SD 2.1's block layout with the smallest channels GroupNorm allows; weights do not matter here
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 32, 32), layers_per_block=2, cross_attention_dim=32, attention_head_dim=8,
        sample_size=8,
    )
    resnet, attentions = injection_layers(unet)
    assert resnet is unet.up_blocks[1].resnets[1]
    pnp = {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}
    expected = [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1" for b, ids in pnp.items() for a in ids]
    assert list(attentions) == expected


def test_frozen_models_stay_out_of_the_state_dict(shared_editor):
    assert not shared_editor.state_dict() and not list(shared_editor.parameters())


def test_layer_rule_on_tiny_unet(shared_editor):
    editor = shared_editor
    assert editor.resnet is editor.unet.up_blocks[1].resnets[1]
    # the tiny decoder has four self-attentions; all but the coarsest first one are used
    assert list(editor.attentions) == [
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
    ]


def test_schedules_off_reproduce_diffusers_ddim_sampling(tiny_sd, configure):
    """(a) t_edit = t_context = 0: same latents in, same latents and images out as StableDiffusionPipeline + DDIM."""
    steps, guidance = 3, 7.5
    editor = configure(num_inference_steps=steps, guidance_scale=guidance, t_edit=0.0, t_context=0.0)
    pipeline = load_diffusion_pipeline(
        StableDiffusionPipeline, tiny_sd, "model", "cpu", safety_checker=None, requires_safety_checker=False
    )
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    start = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))

    ours = editor.sample(start, PROMPT)
    theirs = pipeline(PROMPT, latents=start, num_inference_steps=steps, guidance_scale=guidance, output_type="latent")
    assert torch.equal(ours, theirs.images)  # measured: max abs difference 0.0
    decoded = pipeline(PROMPT, latents=start, num_inference_steps=steps, guidance_scale=guidance, output_type="pt")
    assert (editor.decode(ours) - decoded.images).abs().max() < 1e-5


def test_inversion_then_reconstruction_returns_the_input_latents(tiny_sd):
    """(b) DDIM inversion, then DDIM sampling without guidance from the inverted latent, returns the input.

    Inversion is exact only when the noise prediction barely changes between neighbouring steps' latents; a random
    UNet is far from that (relative L2 error 1.18 at 8 steps, 0.93 at 32), so its output layer is damped by 10 to
    make it a smooth predictor. Measured relative L2 error: 0.055 at 8 steps, 0.026 at 32 steps.
    """
    config = AttentionInjectionConfig(model=tiny_sd, guidance_scale=1.0, t_edit=0.0, t_context=0.0)
    editor = AttentionInjectionEditor(config)  # its own copy: the damping below must not leak into other tests
    with torch.no_grad():
        editor.unet.conv_out.weight.mul_(0.1)
        editor.unet.conv_out.bias.mul_(0.1)
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    errors = {}
    for steps in (8, 32):
        editor.config.num_inference_steps = steps
        trajectory = editor.invert(start)
        assert len(trajectory) == steps + 1
        # sampling step i (descending timesteps) pairs with inversion entry N - i: the schedules mirror each other
        editor.scheduler.set_timesteps(steps)
        assert torch.equal(editor.inverse_scheduler.timesteps.flip(0).cpu(), editor.scheduler.timesteps.cpu())
        reconstruction = editor.sample(trajectory[-1], editor.config.inversion_prompt)
        errors[steps] = ((reconstruction - start).norm() / start.norm()).item()
    assert errors[32] < errors[8]
    assert errors[32] < 0.05, errors


def test_sharing_a_reference_that_is_the_image_itself_equals_plain_injection(configure):
    """(c) Editing an image with its own K/V as the reference is its PnP edit, numerically equal."""
    editor = configure()  # t_edit 0.5, t_context 1 of 3 steps: one step with both, two with sharing only
    image = images(1)
    pnp_edit, context = editor.edit_reference(image, PROMPT)
    shared_edit = editor.edit_batch(image, PROMPT, context)
    assert torch.equal(shared_edit, pnp_edit)


def test_reference_context_changes_other_images_only_while_shared(configure):
    image, other = images(1, seed=0), images(1, seed=1)
    editor = configure()
    pnp_edit, _ = editor.edit_reference(image, PROMPT)
    _, other_context = editor.edit_reference(other, PROMPT)
    assert not torch.allclose(editor.edit_batch(image, PROMPT, other_context), pnp_edit, atol=1e-3)

    # with t_context = 0 the reference is never consulted, and recording K/V does not change the PnP edit
    no_sharing = configure(t_context=0.0)
    assert torch.equal(no_sharing.edit_batch(image, PROMPT, other_context), pnp_edit)
    assert torch.equal(no_sharing.edit_batch(image, PROMPT, ReferenceContext()), pnp_edit)


def test_structure_injection_changes_the_edit_and_hooks_are_removed(configure):
    image = images(1)
    injected, _ = configure(t_edit=1.0, t_context=0.0).edit_reference(image, PROMPT)
    editor = configure(t_edit=0.0, t_context=0.0)
    plain, _ = editor.edit_reference(image, PROMPT)
    assert (injected - plain).abs().max() > 1e-3
    hooked = [editor.resnet.conv2] + [
        projection for attention in editor.attentions.values()
        for projection in (attention.to_q, attention.to_k, attention.to_v)
    ]
    assert all(not module._forward_hooks for module in hooked)


def test_reference_context_holds_shared_steps_on_the_cache_device(configure):
    editor = configure(num_inference_steps=4, t_context=0.5)
    _, context = editor.edit_reference(images(1), PROMPT)
    assert len(context.steps) == 2  # int(0.5 x 4)
    expected_keys = {f"{name}.{kind}" for name in editor.attentions for kind in "kv"}
    for step in context.steps:
        assert set(step) == expected_keys
        for tensor in step.values():
            assert tensor.device.type == "cpu" and tensor.shape[0] == 2  # [uncond, cond] rows
    assert context.nbytes == sum(t.numel() * 4 for step in context.steps for t in step.values())


def test_streamed_edit_in_batches_reproduces_the_reference_edit(configure):
    editor = configure(batch_size=2)
    frames = images(3, seed=2)
    reference_edit, _ = editor.edit_reference(frames[1:2], PROMPT)
    edited = list(editor.edit(iter(frames), frames[1], PROMPT))
    assert len(edited) == 3 and all(frame.shape == (3, SIZE, SIZE) for frame in edited)
    # frame 1 is edited in a batch of two here and alone as the reference: equal up to batched float arithmetic
    assert (edited[1] - reference_edit[0]).abs().max() < 1e-4  # measured 1.3e-5
    assert all((frame - original).abs().mean() > 0.01 for frame, original in zip(edited, frames))
