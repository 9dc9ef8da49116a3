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
    PNP_NEGATIVE_PROMPT,
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
    """Sets the shared editor's schedule (it reads its config at every call): 3 steps, guidance 7.5 by default,
    injection in the first step, sharing in the last two."""

    def apply(**overrides) -> AttentionInjectionEditor:
        settings = dict(num_inference_steps=3, guidance_scale=7.5, t_resnet=0.5, t_edit=0.5, t_context=0.34,
                        batch_size=2)
        settings.update(overrides)
        settings.setdefault("inversion_steps", settings["num_inference_steps"])
        shared_editor.config = replace(shared_editor.config, **settings)
        return shared_editor

    return apply


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("field_name", ["t_resnet", "t_edit", "t_context"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_schedule_fraction_outside_unit_interval_is_a_one_line_error(field_name, value):
    with pytest.raises(InputError) as error:
        AttentionInjectionConfig(**{field_name: value})
    assert field_name in str(error.value) and "\n" not in str(error.value)


def test_defaults_are_pnps():
    config = AttentionInjectionConfig()
    assert (config.t_resnet, config.t_edit, config.num_inference_steps, config.inversion_steps) == (0.8, 0.5, 50, 1000)
    assert config.negative_prompt == "ugly, blurry, black, low res, unrealistic" and config.inversion_prompt == ""


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


def test_injection_off_reproduces_diffusers_ddim_sampling(tiny_sd, configure):
    """t_resnet = t_edit = 0, no reference: same latents in, same latents and images out as
    StableDiffusionPipeline + DDIM (with PnP's negative prompt, the default)."""
    steps, guidance = 3, 7.5
    editor = configure(num_inference_steps=steps, guidance_scale=guidance, t_resnet=0.0, t_edit=0.0)
    pipeline = load_diffusion_pipeline(
        StableDiffusionPipeline, tiny_sd, "model", "cpu", safety_checker=None, requires_safety_checker=False
    )
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    start = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
    call = dict(negative_prompt=PNP_NEGATIVE_PROMPT, latents=start, num_inference_steps=steps, guidance_scale=guidance)

    ours = editor.sample(start, PROMPT, source=editor.invert(start))  # an inversion, but no step injects it
    theirs = pipeline(PROMPT, output_type="latent", **call)
    assert torch.equal(ours, theirs.images)  # measured: max abs difference 0.0
    decoded = pipeline(PROMPT, output_type="pt", **call)
    assert (editor.decode(ours) - decoded.images).abs().max() < 1e-5


@pytest.mark.parametrize("t_context", [0.5, 0.3])
def test_schedule_of_a_ten_step_run_per_image_role(configure, t_context):
    """Which features each role receives at each of 10 steps: inverted ResNet for i < 8 (t_resnet 0.8), inverted Q/K
    for i < 5 (t_edit 0.5), the reference's K/V for i >= 10 t_context (other images; the reference records them)."""
    editor = configure(num_inference_steps=10, t_resnet=0.8, t_edit=0.5, t_context=t_context)
    layer = next(iter(editor.attentions))
    log, current = [], {}
    hooks = {"resnet": editor._resnet_hook, "projection": editor._projection_hook}

    def classify(key: str, output: torch.Tensor, result) -> str:
        state = editor._state
        if result is None or result is output:
            return "own"
        repeats = [state.branches] + [1] * (result.ndim - 1)
        if key in state.source and torch.equal(result, state.source[key].repeat(*repeats)):
            return "inverted"
        if state.shared is not None and torch.equal(result, state.shared[key].repeat_interleave(len(result) // 2, 0)):
            return "shared"
        return "changed otherwise"

    def resnet_spy(module, args, output):
        result = hooks["resnet"](module, args, output)
        if editor._state.phase == "edit":
            log.append((current["role"], current["step"], "resnet", classify("resnet", output, result)))
        return result

    def projection_spy(name, kind, module, args, output):
        result = hooks["projection"](name, kind, module, args, output)
        if editor._state.phase == "edit" and name == layer:
            log.append((current["role"], current["step"], kind, classify(f"{name}.{kind}", output, result)))
        return result

    editor._resnet_hook, editor._projection_hook = resnet_spy, projection_spy
    try:
        current["role"] = "reference"
        trajectory = editor.invert(editor.encode(images(1)))
        context = ReferenceContext()
        editor.sample(trajectory[-1], PROMPT, trajectory, record=context, callback=lambda i, _: current.update(step=i))
        current["role"] = "other"
        other = editor.invert(editor.encode(images(2, seed=3)))
        editor.sample(other[-1], PROMPT, other, shared=context, callback=lambda i, _: current.update(step=i))
    finally:
        del editor._resnet_hook, editor._projection_hook

    context_start = int(t_context * 10)
    assert sorted(context.steps) == list(range(context_start, 10))  # the reference recorded the shared steps only
    for role in ("reference", "other"):
        for step in range(10):
            received = {feature: how for r, i, feature, how in log if (r, i) == (role, step)}
            shared = role == "other" and step >= context_start
            expected = {
                "resnet": "inverted" if step < 8 else "own",
                "q": "inverted" if step < 5 else "own",
                "k": "shared" if shared else "inverted" if step < 5 else "own",
                "v": "shared" if shared else "own",
            }
            assert received == expected, (role, step)


def test_inversion_round_trip_error_falls_with_inversion_steps(tiny_sd):
    """DDIM inversion in M steps, then 10 DDIM sampling steps without guidance from the inverted latent, returns the
    input, more closely the finer the inversion (PnP inverts with 1000 steps and samples 50).

    Inversion is exact only when the noise prediction barely changes between neighbouring steps' latents; a random
    UNet is far from that, so its output layer is damped by 10 to make it a smooth predictor. Measured relative L2
    error at 10 sampling steps: 0.051 (10 inversion steps), 0.036 (20), 0.026 (100), 0.024 (1000).
    """
    config = AttentionInjectionConfig(
        model=tiny_sd, num_inference_steps=10, guidance_scale=1.0, t_resnet=0.0, t_edit=0.0
    )
    editor = AttentionInjectionEditor(config)  # its own copy: the damping below must not leak into other tests
    with torch.no_grad():
        editor.unet.conv_out.weight.mul_(0.1)
        editor.unet.conv_out.bias.mul_(0.1)
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    errors = {}
    for inversion_steps in (10, 20, 100):
        editor.config.inversion_steps = inversion_steps
        trajectory = editor.invert(start)
        assert len(trajectory) == 11  # the input and the latents at the 10 sampling timesteps
        reconstruction = editor.sample(trajectory[-1], editor.config.inversion_prompt)
        errors[inversion_steps] = ((reconstruction - start).norm() / start.norm()).item()
    assert errors[100] < errors[20] < errors[10], errors
    assert errors[100] < 0.03 < 0.045 < errors[10], errors

    editor.config.inversion_steps = 30  # timesteps 1, 34, 67, ...: not the sampling timesteps 1, 101, 201, ...
    with pytest.raises(InputError, match="inversion_steps 30"):
        editor.invert(start)


def test_sharing_a_reference_that_is_the_image_itself_equals_plain_injection(configure):
    """Editing an image with its own K/V as the reference is its PnP edit, numerically equal."""
    editor = configure()  # 3 steps: injection in the first, sharing in the last two
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

    # with t_context = 1 the reference is never consulted, and recording K/V does not change the PnP edit
    no_sharing = configure(t_context=1.0)
    assert torch.equal(no_sharing.edit_batch(image, PROMPT, other_context), pnp_edit)
    assert torch.equal(no_sharing.edit_batch(image, PROMPT, ReferenceContext()), pnp_edit)


def test_structure_injection_changes_the_edit_and_hooks_are_removed(configure):
    image = images(1)
    injected, _ = configure(t_resnet=1.0, t_edit=1.0, t_context=1.0).edit_reference(image, PROMPT)
    editor = configure(t_resnet=0.0, t_edit=0.0, t_context=1.0)
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
    assert sorted(context.steps) == [2, 3]  # from int(0.5 x 4) to the end
    assert context.device == torch.device("cpu")  # "auto" on a CPU model
    expected_keys = {f"{name}.{kind}" for name in editor.attentions for kind in "kv"}
    for step in context.steps.values():
        assert set(step) == expected_keys
        for tensor in step.values():
            assert tensor.device.type == "cpu" and tensor.shape[0] == 2  # [uncond, cond] rows
    assert context.nbytes == sum(t.numel() * 4 for step in context.steps.values() for t in step.values())


def test_streamed_edit_in_batches_reproduces_the_reference_edit(configure):
    editor = configure(batch_size=2)
    frames = images(3, seed=2)
    reference_edit, _ = editor.edit_reference(frames[1:2], PROMPT)
    edited = list(editor.edit(iter(frames), frames[1], PROMPT))
    assert len(edited) == 3 and all(frame.shape == (3, SIZE, SIZE) for frame in edited)
    # frame 1 is edited in a batch of two here and alone as the reference: equal up to batched float arithmetic
    assert (edited[1] - reference_edit[0]).abs().max() < 1e-4  # measured 1.3e-5
    assert all((frame - original).abs().mean() > 0.01 for frame, original in zip(edited, frames))


def test_a_start_image_gives_the_starting_latent_and_the_image_its_structure(configure):
    """Refresh passes: the render (``start``) is inverted for the starting latent, the original for the structure."""
    editor = configure(t_resnet=1.0, t_edit=1.0)
    image, render = images(1, seed=0), images(1, seed=5)
    _, context = editor.edit_reference(image, PROMPT)
    plain = editor.edit_batch(image, PROMPT, context)
    assert torch.equal(editor.edit_batch(image, PROMPT, context, start=image), plain)
    anchored = editor.edit_batch(image, PROMPT, context, start=render)
    from_render = editor.edit_batch(render, PROMPT, context)  # what an unanchored refresh pass does
    assert (anchored - plain).abs().max() > 1e-3 and (anchored - from_render).abs().max() > 1e-3
