"""The anchor-aware InstructPix2Pix editor on a tiny pipeline, held against diffusers' own pipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline
from diffusers.utils.torch_utils import randn_tensor
from tiny_models import build_tiny_ip2p_pipeline

from ns_4d_methods.guidance.ip2p_editor import InstructPix2PixEditor

PROMPT = "make it snowy"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tiny_ip2p")
    build_tiny_ip2p_pipeline(path)
    return path


@pytest.fixture(scope="module")
def editor(model_dir) -> InstructPix2PixEditor:
    return InstructPix2PixEditor(str(model_dir), field_name="pipeline.ip2p_model_id")


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scheduler", ["euler_ancestral", "ddim"])
def test_matches_diffusers_pipeline_with_anchor_attention_off(editor, model_dir, frames, scheduler: str) -> None:
    reference = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(model_dir), safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    if scheduler == "ddim":
        reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    original_scheduler = editor.scheduler
    editor.scheduler = type(reference.scheduler).from_config(reference.scheduler.config)
    try:
        expected = reference(
            prompt=[PROMPT] * len(frames),
            image=frames,
            num_inference_steps=3,
            guidance_scale=7.5,
            image_guidance_scale=1.5,
            generator=torch.Generator().manual_seed(7),
            output_type="pt",
        ).images
        edited = editor.edit(frames, PROMPT, num_inference_steps=3, anchor="off", seed=7)
    finally:
        editor.scheduler = original_scheduler
    assert edited.shape == frames.shape
    assert (edited - expected).abs().max().item() < 1e-5  # measured: 0 (bit for bit) on the CPU


@pytest.mark.parametrize("variant", ["anchor", "anchor_self"])
def test_anchor_attention_on_one_frame_is_plain_editing(editor, frames, variant: str) -> None:
    plain = editor.edit(frames[:1], PROMPT, num_inference_steps=3, anchor="off", seed=3)
    anchored = editor.edit(frames[:1], PROMPT, num_inference_steps=3, anchor=variant, seed=3)
    # measured: 0 for "anchor"; 3e-6 to 1.4e-5 for "anchor_self" (its doubled key set sums in another order)
    assert (anchored - plain).abs().max().item() < 1e-4


def test_anchor_attention_couples_frames_to_the_anchor(editor, frames) -> None:
    """Anchor attention and cross-frame GroupNorm couple the frames of a window (with one frame they change nothing:
    the test above)."""
    plain = editor.edit(frames, PROMPT, num_inference_steps=3, anchor="off", seed=3)
    anchored = editor.edit(frames, PROMPT, num_inference_steps=3, anchor="anchor", seed=3)
    assert (anchored[1] - plain[1]).abs().max() > 1e-3


def test_edits_are_reproducible_by_seed(editor, frames) -> None:
    first = editor.edit(frames, PROMPT, num_inference_steps=2, seed=11)
    assert torch.equal(first, editor.edit(frames, PROMPT, num_inference_steps=2, seed=11))
    assert not torch.equal(first, editor.edit(frames, PROMPT, num_inference_steps=2, seed=12))


def test_default_sampler_is_deterministic_ddim_with_sd14_settings(editor, model_dir) -> None:
    scheduler = editor.scheduler
    assert isinstance(scheduler, DDIMScheduler)
    assert not scheduler.config.clip_sample and not scheduler.config.set_alpha_to_one
    assert scheduler.config.steps_offset == 1 and scheduler.config.beta_schedule == "scaled_linear"
    own = InstructPix2PixEditor(str(model_dir), sampler="pipeline").scheduler
    assert type(own).__name__ == "EulerAncestralDiscreteScheduler"


def test_partial_strength_starts_from_the_noised_current_image(editor, frames) -> None:
    """strength 0.3 of 10 steps: 3 UNet steps, the first on the current image noised to the 8th DDIM timestep; then
    no noise is drawn (eta 0): the result does not depend on what the generator would draw after the start."""
    current = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = editor.unet.register_forward_pre_hook(lambda module, args: calls.append((args[0].clone(), args[1])))
    try:
        edited = editor.edit(frames, PROMPT, init_images=current, strength=0.3, num_inference_steps=10, seed=5)
    finally:
        hook.remove()
    assert len(calls) == 3

    scheduler = DDIMScheduler.from_config(editor.scheduler.config)
    scheduler.set_timesteps(10)
    assert torch.equal(torch.stack([t for _, t in calls]).flatten(), scheduler.timesteps[7:])
    alpha_bar = scheduler.alphas_cumprod[scheduler.timesteps[7]]
    with torch.no_grad():
        clean = editor.vae.encode(current * 2 - 1).latent_dist.mode() * editor.vae.config.scaling_factor
    noise = randn_tensor(clean.shape, generator=torch.Generator().manual_seed(5))
    expected = alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise  # DDIM: no input scaling
    first_input = calls[0][0]
    torch.testing.assert_close(first_input[:2, :4], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(first_input[:2, :4], first_input[2:4, :4])  # every guidance branch denoises the same latents

    # eta 0: stepping draws nothing, so stepping with another generator changes nothing
    original_step = editor.scheduler.step
    editor.scheduler.step = lambda *args, generator=None, **kwargs: original_step(
        *args, generator=torch.Generator().manual_seed(99), **kwargs)
    try:
        again = editor.edit(frames, PROMPT, init_images=current, strength=0.3, num_inference_steps=10, seed=5)
    finally:
        del editor.scheduler.step
    assert torch.equal(edited, again)


def test_rejects_bad_inputs(editor, frames) -> None:
    with pytest.raises(ValueError, match="strength"):
        editor.edit(frames, PROMPT, strength=0.0)
    with pytest.raises(ValueError, match="none of 4 steps"):
        editor.edit(frames, PROMPT, strength=0.2, num_inference_steps=4)
    with pytest.raises(ValueError, match="multiple of 2"):
        editor.edit(torch.rand(1, 3, 33, 32), PROMPT)


def test_models_are_frozen_and_out_of_the_state_dict(editor) -> None:
    assert editor.state_dict() == {} and list(editor.parameters()) == []
    for module in (editor.unet, editor.vae, editor.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    owner = torch.nn.Module()
    owner.editor = editor  # how a nerfstudio pipeline holds it: registered, yet contributes nothing to checkpoints
    assert owner.state_dict() == {}


@pytest.mark.parametrize("anchor", ["anchor_self", "anchor", "off"])
def test_guidance_branches_one_after_the_other_give_the_batched_edit(editor, frames, anchor: str) -> None:
    """The memory saver is exact: anchor attention and the shared GroupNorm statistics work within a branch."""
    window = torch.cat([frames, frames.flip(-1), frames.flip(-2)])  # 6 frames, coupled through the anchor and norms
    kwargs = dict(prompt=PROMPT, strength=0.75, num_inference_steps=4, anchor=anchor, seed=3)
    batched = editor.edit(window, init_images=window.flip(0), **kwargs)
    editor.sequential_branches = True
    try:
        calls = []
        hook = editor.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
        sequential = editor.edit(window, init_images=window.flip(0), **kwargs)
        hook.remove()
    finally:
        editor.sequential_branches = False
    assert calls == [6] * 3 * 3  # 3 denoising steps x 3 branches of 6 frames
    torch.testing.assert_close(sequential, batched, atol=1e-5, rtol=0)
    assert (sequential - batched).abs().max() < 1e-5
