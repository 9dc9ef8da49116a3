"""A tiny 4DM prior directory for tests, built by ``ns-4d-convert 4dm`` itself (no downloads).

The UNet is the original implementation's tiny 4DM in ``shared/fixtures/4dm_tiny`` (random weights, 32 base
channels, context dim 32), converted from its original checkpoints. Beside it, tiny random encoders of the real
classes: an ``AutoencoderKL`` that downscales 8x as SD's does, the character-level CLIP tokenizer and a 32-dim
``CLIPTextModel`` (``tiny_models``), and a ``CLIPVisionModel`` with ImageDream's 1280-dim tokens (2 layers, 32 px
images, 16 px patches: 5 tokens instead of ViT-H's 257; the Resampler takes any number).

Sizes: the converted UNet is declared for 8x8 latents, so the prior's ``image_size`` is 64 px (the fixture was made
on 16x16 latents; any side divisible by 8 works).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from tiny_models import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_clip_towers
from transformers import (
    CLIPImageProcessor,
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    ViTImageProcessor,
)

from ns_4d_methods.cli.convert import entrypoint as convert

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "4dm_tiny"
LATENT_SIZE = 8
IMAGE_SIZE = 64


def tiny_vae_8x() -> AutoencoderKL:
    """A 4-channel VAE with SD's 8x downscale (four levels)."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    ).eval()


def tiny_image_encoder() -> CLIPVisionModel:
    config = CLIPVisionConfig(
        hidden_size=1280, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=16, projection_dim=16,
    )
    return CLIPVisionModel(config).eval()


def build_tiny_parts(path: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny SD 2.1-layout directory (vae/, text_encoder/, tokenizer/) and a tiny CLIP vision directory."""
    sd, clip = path / "sd", path / "clip"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer()
        tiny_vae_8x().save_pretrained(sd / "vae")
        tiny_clip_text_encoder(tokenizer).save_pretrained(sd / "text_encoder")
        tokenizer.save_pretrained(sd / "tokenizer")
        tiny_image_encoder().save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    return sd, clip


def build_tiny_4dm(path: str | Path, seed: int = 0) -> Path:
    """Convert the fixture's tiny 4DM with tiny encoders into ``path/4dm`` (``ns-4d-convert``'s layout); returns it."""
    path = Path(path)
    sd, clip = build_tiny_parts(path / "parts", seed)
    config = json.loads((FIXTURE / "config.json").read_text())
    config["unet_config"]["image_size"] = LATENT_SIZE  # the declared latent size ("unused" by the original)
    config_path = path / "parts" / "unet_config.json"
    config_path.write_text(json.dumps(config))
    output = path / "4dm"
    convert([
        "4dm", "--unet-config", str(config_path), "--imagedream", str(FIXTURE / "imagedream_ipmv.pt"),
        "--motion", str(FIXTURE / "4dm.ckpt"), "--vae", str(sd), "--text-encoder", str(sd),
        "--image-encoder", str(clip), "--output", str(output),
    ])
    return output


def build_tiny_clipseg(path: str | Path, seed: int = 0) -> Path:
    """A tiny random CLIPSeg (the anchor video's matting model): 32 px images, 8 px patches, the character tokenizer;
    saved with save_pretrained with its CLIPSegProcessor."""
    tokenizer = tiny_clip_tokenizer()
    config = CLIPSegConfig(
        **tiny_clip_towers(tokenizer),
        projection_dim=16,
        extract_layers=[0, 1],
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPSegForImageSegmentation(config).save_pretrained(path)
    image_processor = ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    )
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return Path(path)


def assert_lpips_weights_missing(load, field: str, weights: str, off_flag: str) -> None:
    """``load()`` of an LPIPS term without its backbone weights stops with one line naming ``field``, ``weights``
    and ``off_flag 0``, the flag that turns the term off."""
    from ns_4d_methods.errors import InputError
    from ns_4d_methods.guidance.model_loading import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError) as caught:
        load()
    message = str(caught.value)
    assert isinstance(caught.value, InputError) and "\n" not in message
    assert message.startswith(f"{field}: cannot load '{weights}'")
    assert message.endswith(f"; {off_flag} 0 trains without the LPIPS term")


def write_random_backbone(weights: str, features_only: bool = False) -> dict:
    """Random weights of the torchvision network that the weights enum name ``weights`` names (AlexNet or VGG16),
    saved where the enum looks for its file in the torch hub cache ($TORCH_HOME). ``features_only``: only the
    ``features.*`` tensors LPIPS uses (VGG16: 59 MB instead of 553 MB; AlexNet: 10 MB instead of 244 MB)."""
    from torchvision.models import alexnet, vgg16
    from torchvision.models.vgg import cfgs, make_layers

    from ns_4d_methods.guidance.model_loading import torchvision_cache_path

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if weights.startswith("VGG16") and features_only:  # VGG16's `features` without its 120M-weight classifier
            state = {f"features.{name}": tensor for name, tensor in make_layers(cfgs["D"]).state_dict().items()}
        elif features_only:  # AlexNet's `features` (10 MB) without its 57M-weight classifier
            state = {f"features.{name}": tensor for name, tensor in alexnet().features.state_dict().items()}
        else:
            state = (vgg16() if weights.startswith("VGG16") else alexnet()).state_dict()
    path = torchvision_cache_path(weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state
