"""4Diffusion's 4DM prior: parity of the diffusers composition with the original code, the converter, cameras and
the prior's API, on the original implementation's tiny 4DM (``shared/fixtures/4dm_tiny``) and tiny encoders."""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from huggingface_hub import constants as hub_constants
from tiny_4dm import FIXTURE, IMAGE_SIZE, LATENT_SIZE, build_tiny_4dm

from ns_4d_methods.cli.convert import entrypoint as convert
from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.four_dm import FourDMUNet
from ns_4d_methods.guidance.four_dm_conversion import read_reference
from ns_4d_methods.guidance.four_dm_prior import (
    ANCHOR_AZIMUTHS_DEG,
    FourDMPrior,
    anchor_cameras,
    camera_vector,
    camera_vector_from_c2w,
)
from ns_4d_methods.guidance.model_loading import load_pretrained_model

ORIGINALS = ["--unet-config", str(FIXTURE / "config.json"), "--imagedream", str(FIXTURE / "imagedream_ipmv.pt"),
             "--motion", str(FIXTURE / "4dm.ckpt")]
REFERENCE = FIXTURE / "reference_io.pt"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_4dm(tmp_path_factory) -> Path:
    return build_tiny_4dm(tmp_path_factory.mktemp("tiny-4dm"))


@pytest.fixture(scope="module")
def prior(tiny_4dm) -> FourDMPrior:
    return FourDMPrior(str(tiny_4dm), "cpu")


def assert_one_line_error(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- parity with the original 4DM
def test_converted_4dm_matches_the_original_outputs(tmp_path, capsys):
    convert(["4dm", *ORIGINALS, "--verify", str(REFERENCE), "--output", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    differences = {name: float(value) for name, value in re.findall(r"(eps_\w+)\s+max abs difference (\S+)", printed)}
    print(differences)  # measured: eps_4dm 3.8e-06, eps_4dm_uncond 1.1e-05, eps_imagedream 3.9e-06
    assert set(differences) == {"eps_4dm", "eps_4dm_uncond", "eps_imagedream"}
    assert all(value < 1e-4 for value in differences.values()), differences
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scheduler", "unet"]


def conditional_outputs(unet: FourDMUNet, reference: dict, num_frames) -> torch.Tensor:
    """The conditional 4DM output on the reference (``num_frames=None``: ImageDream's, on the first 5 views)."""
    sample = reference["x"].clone()
    sample[4::5] = reference["ip_img"]
    inputs = [sample, reference["t"], reference["context"], reference["camera"],
              reference["ip_per_frame"].repeat_interleave(5, dim=0)]
    count = 40 if num_frames else 5
    with torch.no_grad():
        return unet(*[tensor[:count] for tensor in inputs], num_frames=num_frames)


def test_parity_depends_on_per_frame_groupnorm_and_multiview_attention(tiny_4dm):
    """The two departures from stock diffusers parts are what parity rests on: undo either and it breaks."""
    reference = torch.load(REFERENCE, weights_only=True)
    unet = load_pretrained_model(FourDMUNet, tiny_4dm, "unet", "cpu", subfolder="unet")
    for module in unet.motion_modules:  # diffusers' GroupNorm over the whole clip, same parameters
        stock = torch.nn.GroupNorm(module.norm.num_groups, module.norm.num_channels, eps=module.norm.eps)
        stock.load_state_dict(module.norm.state_dict())
        module.norm = stock
    assert (conditional_outputs(unet, reference, 8) - reference["eps_4dm"]).abs().max() > 1e-2

    for name in unet.unet.attn_processors:  # per-view self-attention
        if name.endswith("attn1.processor"):
            unet.unet.get_submodule(name[: -len(".processor")]).set_processor(AttnProcessor2_0())
    assert (conditional_outputs(unet, reference, None) - reference["eps_imagedream"]).abs().max() > 1e-3


def test_save_pretrained_round_trip(tiny_4dm, tmp_path):
    unet = load_pretrained_model(FourDMUNet, tiny_4dm, "unet", "cpu", subfolder="unet")
    unet.save_pretrained(tmp_path / "copy")
    copy = load_pretrained_model(FourDMUNet, tmp_path / "copy", "unet", "cpu")
    assert {**copy.config, "_name_or_path": ""} == {**unet.config, "_name_or_path": ""}
    original, reloaded = unet.state_dict(), copy.state_dict()
    assert original.keys() == reloaded.keys() and len(original) > 1000
    assert all(torch.equal(original[key], reloaded[key]) for key in original)
    assert {type(p).__name__ for p in copy.unet.attn_processors.values()} == {
        "MultiViewAttnProcessor", "IPAdapterAttnProcessor2_0"
    }
    reference = read_reference(REFERENCE, copy)
    inputs = [reference[key][:5] for key in ("x", "t", "context", "camera")]
    inputs.append(reference["ip_per_frame"][:1].expand(5, -1, -1))
    with torch.no_grad():
        assert torch.equal(copy(*inputs), unet(*inputs))


# ---------------------------------------------------------------- cameras
def imagedream_get_camera(elevation: float, azimuth: float) -> np.ndarray:
    """ImageDream's camera_utils: create_camera_to_world_matrix, then convert_opengl_to_blender, flattened."""
    e, a = np.radians(elevation), np.radians(azimuth)
    position = np.array([np.cos(e) * np.sin(a), np.sin(e), np.cos(e) * np.cos(a)])
    forward = -position / np.linalg.norm(position)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([right, up / np.linalg.norm(up), -forward], axis=1)
    c2w[:3, 3] = position
    flip_yz = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
    return (flip_yz @ c2w).reshape(16)


def imagedream_formula(elevation: float, azimuth: float) -> np.ndarray:
    """4DIFFUSION.md section 3."""
    e, a = np.radians(elevation), np.radians(azimuth)
    ca, sa, ce, se = np.cos(a), np.sin(a), np.cos(e), np.sin(e)
    return np.array([ca, -sa * se, ce * sa, ce * sa, sa, ca * se, -ce * ca, -ce * ca, 0, ce, se, se, 0, 0, 0, 1])


@pytest.mark.parametrize("elevation,azimuth", [(0, 0), (0, 90), (5, -135), (15, 30), (-10, 200), (3.5, 359)])
def test_camera_vector_is_imagedream_at_azimuth_plus_90(elevation, azimuth):
    vector = camera_vector(elevation, azimuth).double().numpy()
    imagedream = imagedream_get_camera(elevation, azimuth + 90)
    np.testing.assert_allclose(imagedream_formula(elevation, azimuth + 90), imagedream, atol=1e-12)
    np.testing.assert_allclose(vector, imagedream, atol=1e-6)


def test_camera_vector_examples_and_c2w_form():
    example = [0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1]
    np.testing.assert_allclose(camera_vector(0.0, 0.0).numpy(), example, atol=1e-6)
    batch = camera_vector(torch.tensor([0.0, 5.0]), torch.tensor([[0.0], [90.0]]))
    assert batch.shape == (2, 2, 16)
    # a camera at distance 1.1 (the SDS cameras): the translation is normalised away
    c2w = camera_vector(5.0, 30.0).reshape(4, 4)
    c2w[:3, 3] *= 1.1
    np.testing.assert_allclose(camera_vector_from_c2w(c2w[:3]).numpy(), camera_vector(5.0, 30.0).numpy(), atol=1e-6)
    # anchor views: ImageDream azimuths 90/180/270/360 at elevation 0, the same 4 for each of the 8 times
    anchors = anchor_cameras()
    assert anchors.shape == (32, 16) and torch.equal(anchors[:4], anchors[28:])
    for k, azimuth in enumerate(ANCHOR_AZIMUTHS_DEG):
        np.testing.assert_allclose(anchors[k].numpy(), imagedream_get_camera(0.0, 90.0 * (k + 1)), atol=1e-6)


# ---------------------------------------------------------------- the converter's bad input
def test_missing_keys_wrong_shapes_and_unexpected_keys(tmp_path, capsys):
    original = torch.load(FIXTURE / "imagedream_ipmv.pt", weights_only=True)
    missing = dict(original)
    del missing["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    before = digest(tmp_path / "missing.pt")
    with pytest.raises(InputError) as error:
        convert(["4dm", *ORIGINALS[:2], "--imagedream", str(tmp_path / "missing.pt"), *ORIGINALS[4:],
                 "--output", str(tmp_path / "out")])
    assert_one_line_error(error, "lack 1 of the model's", "unet.down_blocks.0.resnets.0.conv1.weight")
    assert digest(tmp_path / "missing.pt") == before and not (tmp_path / "out").exists()

    wrong = dict(original)
    wrong["model.diffusion_model.output_blocks.5.1.proj_in.weight"] = torch.zeros(64, 32)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(InputError) as error:
        convert(["4dm", *ORIGINALS[:2], "--imagedream", str(tmp_path / "wrong.pt"), *ORIGINALS[4:],
                 "--output", str(tmp_path / "out")])
    assert_one_line_error(error, "shape mismatch at 'output_blocks.5.1.proj_in.weight'", "(64, 32)", "(64, 64)")

    motion = torch.load(FIXTURE / "4dm.ckpt", weights_only=True)
    motion["state_dict"]["module.output_blocks.99.1.temporal_transformer.norm.weight"] = torch.ones(4)
    torch.save(motion, tmp_path / "extra.ckpt")
    convert(["4dm", *ORIGINALS[:4], "--motion", str(tmp_path / "extra.ckpt"), "--output", str(tmp_path / "out")])
    assert "ignored 1 unexpected checkpoint keys: output_blocks.99.1.temporal_transformer.norm.weight" in \
        capsys.readouterr().out


def test_whole_unet_4dm_checkpoint_in_the_motion_inserted_layout(tmp_path, tiny_4dm):
    """A 4dm.ckpt holding the whole motion-inserted UNet (spatial keys shifted) converts to the same model."""
    imagedream = torch.load(FIXTURE / "imagedream_ipmv.pt", weights_only=True)
    shifts = {"middle_block.2": "middle_block.3", "output_blocks.2.1": "output_blocks.2.2",
              "output_blocks.5.2": "output_blocks.5.3", "output_blocks.8.2": "output_blocks.8.3"}
    whole = torch.load(FIXTURE / "4dm.ckpt", weights_only=True)["state_dict"]
    for key, value in imagedream.items():
        key = key.replace("model.diffusion_model.", "")
        for old, new in shifts.items():  # 4Diffusion's build_model
            key = key.replace(old, new) if old in key else key
        whole["module." + key] = value
    torch.save({"state_dict": whole}, tmp_path / "whole.ckpt")
    convert(["4dm", *ORIGINALS[:4], "--motion", str(tmp_path / "whole.ckpt"), "--output", str(tmp_path / "out")])
    converted = load_pretrained_model(FourDMUNet, tmp_path / "out", "unet", "cpu", subfolder="unet").state_dict()
    expected = load_pretrained_model(FourDMUNet, tiny_4dm, "unet", "cpu", subfolder="unet").state_dict()
    assert converted.keys() == expected.keys() and all(torch.equal(converted[k], expected[k]) for k in expected)


def test_reference_of_other_shapes_and_failed_verification(tmp_path, tiny_4dm):
    unet = load_pretrained_model(FourDMUNet, tiny_4dm, "unet", "cpu", subfolder="unet")
    for key, shape, message in [
        ("x", (40, 4, 12, 16), "'x' has shape (40, 4, 12, 16): expected latents [N, C, h, w], h and w divisible by 8"),
        ("camera", (40, 12), "'camera' has shape (40, 12); expected (40, 16)"),
        ("eps_imagedream", (4, 4, 16, 16), "'eps_imagedream' has shape (4, 4, 16, 16); expected (5, 4, 16, 16)"),
        ("ip_per_frame", (8, 257, 1024), "expected (frames, tokens, 1280)"),
        ("context", (40, 77, 64), "expected (40, 77, 32)"),
    ]:
        reference = torch.load(REFERENCE, weights_only=True)
        reference[key] = torch.zeros(shape)
        torch.save(reference, tmp_path / "other.pt")
        with pytest.raises(InputError) as error:
            read_reference(tmp_path / "other.pt", unet)
        assert_one_line_error(error, message)

    with pytest.raises(InputError) as error:
        convert(["4dm", *ORIGINALS, "--verify", str(REFERENCE), "--tolerance", "1e-9", "--output",
                 str(tmp_path / "out")])
    assert_one_line_error(error, "--verify", "more than --tolerance 1e-09")
    assert not (tmp_path / "out").exists()


def test_unreachable_encoder_and_existing_output(tmp_path, tiny_4dm):
    with pytest.raises(InputError) as error:
        convert(["4dm", *ORIGINALS, "--image-encoder", "nobody/no-such-clip", "--output", str(tmp_path / "out")])
    assert_one_line_error(error, "--image-encoder: cannot load 'nobody/no-such-clip'")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))
    with pytest.raises(InputError) as error:
        convert(["4dm", *ORIGINALS, "--output", str(tiny_4dm)])
    assert_one_line_error(error, "exists and is not an empty directory")


def test_command_line_error_is_one_line(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ns-4d-convert"), "4dm", *ORIGINALS[:4], "--motion",
         str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: --motion {tmp_path / 'missing.ckpt'}: no such file"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the prior
def test_prior_loads_every_part_through_the_loader(tmp_path, tiny_4dm):
    shutil.copytree(tiny_4dm, tmp_path / "partial", ignore=shutil.ignore_patterns("image_encoder"))
    with pytest.raises(InputError) as error:
        FourDMPrior(str(tmp_path / "partial"), "cpu", field_name="pipeline.prior-model")
    assert_one_line_error(error, "pipeline.prior-model: cannot load", "CLIPVisionModel")


def test_prior_encoders(prior):
    assert (prior.image_size, prior.num_frames, prior.num_views) == (IMAGE_SIZE, 8, 4)
    assert math.isclose(prior.latent_scale, 0.18215) and prior.alphas_cumprod.shape == (1000,)
    prompt = prior.encode_prompt("a walking robot", "blurry")
    assert prompt.cond.shape == prompt.uncond.shape == (1, 77, 32) and not torch.equal(prompt.cond, prompt.uncond)
    frames = torch.rand(8, 3, IMAGE_SIZE, IMAGE_SIZE)
    condition = prior.encode_condition(frames, torch.Generator().manual_seed(0))
    assert condition.clip_tokens.shape == (8, 5, 1280) and condition.latents.shape == (8, 4, LATENT_SIZE, LATENT_SIZE)
    assert not torch.allclose(condition.clip_tokens[0], condition.clip_tokens[1])  # one per frame

    renders = torch.rand(32, 3, 16, 16, requires_grad=True)  # resized to image_size, gradient flows back
    latents = prior.encode_images(renders, torch.Generator().manual_seed(0))
    assert latents.shape == (32, 4, LATENT_SIZE, LATENT_SIZE) and latents.dtype == torch.float32
    latents.square().sum().backward()
    assert renders.grad is not None and renders.grad.abs().sum() > 0
    images = prior.decode_latents(latents.detach())
    assert images.shape == (32, 3, IMAGE_SIZE, IMAGE_SIZE) and 0 <= images.min() and images.max() <= 1


def test_predict_noise_batch_and_guidance(prior):
    torch.manual_seed(0)
    prompt = prior.encode_prompt("a walking robot", "blurry")
    condition = prior.encode_condition(torch.rand(8, 3, IMAGE_SIZE, IMAGE_SIZE), torch.Generator().manual_seed(0))
    noisy = torch.randn(32, 4, LATENT_SIZE, LATENT_SIZE)
    cameras = camera_vector(torch.rand(32) * 5, torch.arange(32) % 4 * 90.0 - 180.0)
    seen = {}
    handle = prior.unet.register_forward_pre_hook(lambda _module, args: seen.update(args=args))
    eps, eps_cond = prior.predict_noise(noisy, torch.tensor(601), cameras, prompt, condition, 5.0)
    handle.remove()
    assert eps.shape == eps_cond.shape == noisy.shape
    sample, timestep, text, camera, clip = seen["args"]
    assert sample.shape[0] == 80 and torch.equal(timestep, torch.full((80,), 601))
    assert torch.equal(sample[4:40:5], condition.latents) and not sample[44::5].any()  # image-prompt slots
    assert torch.equal(sample[:40].reshape(8, 5, -1)[:, :4].reshape(noisy.shape), noisy)
    assert not camera[4::5].any() and torch.equal(camera[:40].reshape(8, 5, 16)[:, :4].reshape(32, 16), cameras)
    assert torch.equal(clip[:40], condition.clip_tokens.repeat_interleave(5, 0)) and not clip[40:].any()
    assert torch.equal(text[0], prompt.cond[0]) and torch.equal(text[79], prompt.uncond[0])

    eps_uncond, eps_cond_again = prior.predict_noise(noisy, 601, cameras, prompt, condition, 0.0)
    torch.testing.assert_close(eps_cond_again, eps_cond)
    torch.testing.assert_close(eps, eps_uncond + 5.0 * (eps_cond - eps_uncond), rtol=1e-5, atol=1e-5)
    assert (eps_cond - eps_uncond).abs().max() > 1e-3
    eps_one, _ = prior.predict_noise(noisy, 601, cameras, prompt, condition, 1.0)
    torch.testing.assert_close(eps_one, eps_cond)
    # the unconditional half alone: the 80-batch does not mix the branches
    alone = prior.unet(sample[40:], timestep[40:], text[40:], camera[40:], clip[40:], num_frames=8)
    alone = alone.reshape(8, 5, 4, LATENT_SIZE, LATENT_SIZE)[:, :4].reshape(noisy.shape)
    torch.testing.assert_close(alone, eps_uncond, rtol=1e-4, atol=1e-5)


def test_anchor_generation_is_deterministic_given_a_seed(prior):
    prompt = prior.encode_prompt("a walking robot", "blurry")
    condition = prior.encode_condition(torch.rand(8, 3, IMAGE_SIZE, IMAGE_SIZE), torch.Generator().manual_seed(0))
    cameras = anchor_cameras()
    first = prior.generate(prompt, condition, cameras, num_steps=2, generator=torch.Generator().manual_seed(7))
    again = prior.generate(prompt, condition, cameras, num_steps=2, generator=torch.Generator().manual_seed(7))
    other = prior.generate(prompt, condition, cameras, num_steps=2, generator=torch.Generator().manual_seed(8))
    assert first.shape == (8, 4, 3, IMAGE_SIZE, IMAGE_SIZE) and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_known_frames_are_pinned_through_the_whole_sampling(prior, monkeypatch):
    """A longer anchor's blocks share their boundary frame: the frames given as ``known`` are the result's, and at
    every DDIM step the UNet sees them noised from the known latents with one fixed noise draw."""
    prompt = prior.encode_prompt("a walking robot", "blurry")
    condition = prior.encode_condition(torch.rand(8, 3, IMAGE_SIZE, IMAGE_SIZE), torch.Generator().manual_seed(0))
    known = torch.randn(4, 4, LATENT_SIZE, LATENT_SIZE)  # the previous block's last frame, 4 views
    seen = []
    predict = prior.predict_noise

    def recording(noisy, timestep, *args):
        seen.append((noisy[:4].clone(), int(timestep)))
        return predict(noisy, timestep, *args)

    monkeypatch.setattr(prior, "predict_noise", recording)
    latents = prior.sample_latents(prompt, condition, anchor_cameras(), 2, 5.0, torch.Generator().manual_seed(7), known)
    assert latents.shape == (32, 4, LATENT_SIZE, LATENT_SIZE) and torch.equal(latents[:4], known)
    abar = prior.alphas_cumprod
    noises = [(noisy - abar[t].sqrt() * known) / (1 - abar[t]).sqrt() for noisy, t in seen]
    assert len(noises) == 2 and all(torch.allclose(n, noises[0], atol=1e-4) for n in noises)
    assert abs(float(noises[0].std()) - 1.0) < 0.2  # a noise draw, not the known latents leaking through
    free = prior.sample_latents(prompt, condition, anchor_cameras(), 2, 5.0, torch.Generator().manual_seed(7))
    assert not torch.allclose(free[4:], latents[4:])  # the other frames follow the pinned one
