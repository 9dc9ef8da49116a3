"""The one loading helper: tiny pipelines saved with save_pretrained load back; missing weights fail in one line."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub import constants as hub_constants
from tiny_models import build_tiny_ip2p_pipeline, build_tiny_sd_pipeline
from transformers import CLIPTextModel, CLIPTokenizer

from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.model_loading import (
    WeightsUnavailableError,
    default_dtype,
    from_pretrained_or_fail,
    hold_frozen,
    load_diffusion_pipeline,
    load_pretrained_model,
    load_torchvision_state_dict,
    torchvision_cache_path,
)


@pytest.fixture(scope="module")
def ip2p_dir(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tiny_ip2p")
    build_tiny_ip2p_pipeline(path)
    return path


def test_default_dtype() -> None:
    assert default_dtype("cpu") == torch.float32
    assert default_dtype("cuda") == torch.float16


def test_tiny_ip2p_pipeline_round_trips(ip2p_dir) -> None:
    pipeline = load_diffusion_pipeline(
        StableDiffusionInstructPix2PixPipeline, ip2p_dir, "pipeline.ip2p_model_id", "cpu", safety_checker=None
    )
    assert isinstance(pipeline, StableDiffusionInstructPix2PixPipeline)
    assert pipeline.unet.config.in_channels == 8 and pipeline.unet.dtype == torch.float32
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert pipeline.tokenizer("a").input_ids[0] == pipeline.tokenizer.bos_token_id


def test_tiny_sd_pipeline_round_trips(tmp_path) -> None:
    built = build_tiny_sd_pipeline(tmp_path)
    loaded = load_diffusion_pipeline(StableDiffusionPipeline, tmp_path, "pipeline.sd_model_id", "cpu")
    assert loaded.unet.config.in_channels == 4 and type(loaded.scheduler) is type(built.scheduler)
    for name, tensor in built.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], tensor)


def test_single_models_and_tokenizer_load_from_subfolders(ip2p_dir) -> None:
    unet = load_pretrained_model(UNet2DConditionModel, ip2p_dir, "f", "cpu", dtype=torch.float64, subfolder="unet")
    text_encoder = load_pretrained_model(CLIPTextModel, ip2p_dir, "f", "cpu", subfolder="text_encoder")
    tokenizer = from_pretrained_or_fail(CLIPTokenizer, ip2p_dir, "f", subfolder="tokenizer")
    assert unet.dtype == torch.float64 and not any(p.requires_grad for p in unet.parameters())
    assert text_encoder.dtype == torch.float32 and not text_encoder.training
    assert tokenizer.model_max_length == 77


def test_missing_local_path_fails_in_one_line_naming_the_field(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(WeightsUnavailableError) as error:
        load_diffusion_pipeline(StableDiffusionInstructPix2PixPipeline, missing, "pipeline.ip2p_model_id", "cpu")
    assert str(error.value) == (
        f"pipeline.ip2p_model_id: cannot load '{missing}' "
        "(not a local directory and not reachable on the Hugging Face hub)"
    )
    assert isinstance(error.value, InputError)  # ns-train prints the line and exits 1, no traceback


def test_unreachable_hub_id_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # only the local hub cache is consulted
    with pytest.raises(WeightsUnavailableError) as error:
        load_pretrained_model(UNet2DConditionModel, "ns-4d-tests/absent", "pipeline.unet_id", "cpu", subfolder="unet")
    assert str(error.value) == (
        "pipeline.unet_id: cannot load 'ns-4d-tests/absent' "
        "(not a local directory and not reachable on the Hugging Face hub)"
    )


def test_broken_local_directory_says_so(tmp_path) -> None:
    with pytest.raises(WeightsUnavailableError) as error:
        load_diffusion_pipeline(StableDiffusionPipeline, tmp_path, "pipeline.sd_model_id", "cpu")
    message = str(error.value)
    assert message.startswith(f"pipeline.sd_model_id: cannot load '{tmp_path}' (a local directory, but not a loadable")
    assert "\n" not in message


def test_hold_frozen_keeps_a_model_out_of_the_owners_checkpoint() -> None:
    owner = torch.nn.Module()
    owner.trained = torch.nn.Linear(2, 2)
    hold_frozen(owner, "frozen", torch.nn.Linear(3, 3))
    assert isinstance(owner.frozen, torch.nn.Linear)
    assert set(owner.state_dict()) == {"trained.weight", "trained.bias"}
    assert len(list(owner.parameters())) == 2


def test_torchvision_weights_load_from_the_torch_hub_cache(torch_home) -> None:
    from torchvision.models import alexnet

    network = alexnet()  # random weights, saved where torchvision's enum looks for its file
    path = torchvision_cache_path("AlexNet_Weights.IMAGENET1K_V1")
    assert path.parent == torch_home / "hub" / "checkpoints"
    path.parent.mkdir(parents=True)
    torch.save(network.state_dict(), path)
    state_dict = load_torchvision_state_dict("AlexNet_Weights.IMAGENET1K_V1", "pipeline.lpips_net")
    assert state_dict.keys() == network.state_dict().keys()
    assert torch.equal(state_dict["features.0.weight"], network.features[0].weight)
    # a local file by path works the same
    assert torch.equal(load_torchvision_state_dict(path, "f")["classifier.6.bias"], network.classifier[6].bias)


def test_torchvision_weights_offline_and_uncached_fail_in_one_line_with_the_hint(torch_home) -> None:
    with pytest.raises(WeightsUnavailableError) as caught:
        load_torchvision_state_dict("VGG16_Weights.IMAGENET1K_V1", "pipeline.anchor_lpips", hint="or --no-lpips")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("pipeline.anchor_lpips: cannot load 'VGG16_Weights.IMAGENET1K_V1'")
    assert "not downloadable" in message and message.endswith("; or --no-lpips")
    with pytest.raises(WeightsUnavailableError, match="not a torchvision weights enum name"):
        load_torchvision_state_dict("no_such_weights.pth", "pipeline.raft")
    broken = torch_home / "broken.pth"
    broken.parent.mkdir(parents=True, exist_ok=True)  # the hub's cache folder may already be there
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="a local file, but not loadable"):
        load_torchvision_state_dict(broken, "pipeline.raft")
