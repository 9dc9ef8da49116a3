"""Tiny, randomly initialised Stable Diffusion and InstructPix2Pix pipelines for tests (no downloads).

They use the real diffusers/transformers classes with small configs, so the package's loading and sampling code is
what the tests exercise. Each builder saves the pipeline with ``save_pretrained`` into the given directory and
returns it. Weights are seeded inside a forked RNG, so building does not disturb the caller's random state.

Sizes: images are multiples of 2 pixels (the VAE downscales by 2), latents have 4 channels, the UNet has two
resolution levels with cross-attention in both (block_out_channels (32, 64)), the text encoder 32-dim embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    VideoMAEImageProcessor,
    XCLIPConfig,
    XCLIPModel,
    XCLIPProcessor,
)

TEXT_DIM = 32
MAX_TOKENS = 77
# Stable Diffusion's noise schedule (both SD 1.5 and InstructPix2Pix use it)
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

_PROPOSALS = "--pipeline.model.proposal-net-args-list"
TINY_NERFACTO_4D = [
    "--pipeline.datamanager.train-num-rays-per-batch", "256", "--pipeline.datamanager.eval-num-rays-per-batch", "256",
    "--pipeline.model.num-levels", "4", "--pipeline.model.log2-hashmap-size", "10", "--pipeline.model.max-res", "64",
    "--pipeline.model.log2-hashmap-size-4d", "10", "--pipeline.model.max-res-4d", "32",
    f"{_PROPOSALS}.0.log2-hashmap-size", "10", f"{_PROPOSALS}.0.num-levels", "3", f"{_PROPOSALS}.0.max-res", "32",
    f"{_PROPOSALS}.1.log2-hashmap-size", "10", f"{_PROPOSALS}.1.num-levels", "3", f"{_PROPOSALS}.1.max-res", "64",
    "--pipeline.model.num-proposal-samples-per-ray", "16", "8", "--pipeline.model.num-nerf-samples-per-ray", "8",
    "--pipeline.model.implementation", "torch", "--pipeline.model.eval-num-rays-per-chunk", "4096",
]
"""``ns-train`` flags that shrink a nerfacto-4d model (and its ray batches) to test size."""


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over printable ASCII characters with no merges: one token per character."""
    chars = [chr(code) for code in range(33, 127)]  # byte-level BPE maps these bytes to themselves
    vocab = {token: index for index, token in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def tiny_clip_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_DIM,
    )
    return CLIPTextModel(config).eval()


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    ).eval()


def tiny_unet(in_channels: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def _components(unet_in_channels: int, seed: int) -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer()
        return {
            "unet": tiny_unet(unet_in_channels),
            "vae": tiny_vae(),
            "text_encoder": tiny_clip_text_encoder(tokenizer),
            "tokenizer": tokenizer,
        }


def build_tiny_sd_pipeline(path: str | Path, seed: int = 0) -> StableDiffusionPipeline:
    """A tiny text-to-image Stable Diffusion pipeline (DDIM scheduler, SD's betas), saved to ``path``."""
    pipeline = StableDiffusionPipeline(
        **_components(unet_in_channels=4, seed=seed),
        scheduler=DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(path))
    return pipeline


def build_tiny_ip2p_pipeline(path: str | Path, seed: int = 0) -> StableDiffusionInstructPix2PixPipeline:
    """A tiny InstructPix2Pix pipeline (UNet with 4 + 4 input channels; Euler ancestral, whose steps draw noise)."""
    pipeline = StableDiffusionInstructPix2PixPipeline(
        **_components(unet_in_channels=8, seed=seed),
        scheduler=EulerAncestralDiscreteScheduler(**SD_BETAS),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(path))
    return pipeline


def tiny_clip_towers(tokenizer) -> dict:
    """Text and vision tower configs of the tiny CLIP (32 px images, 8 px patches), shared by CLIP and CLIPSeg."""
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # pooled at the EOS
    return dict(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, pad_token_id=tokenizer.eos_token_id, **special,
        ),
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4,
        ),
    )


def build_tiny_clip(path) -> None:
    """A tiny random CLIPModel and its CLIPProcessor (the tiny character tokenizer), saved with save_pretrained."""
    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(**tiny_clip_towers(tokenizer), projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)


def build_tiny_xclip(path) -> None:
    """A tiny random XCLIPModel (8 frames, 32 px) and its XCLIPProcessor (the tiny character tokenizer)."""
    tokenizer = tiny_clip_tokenizer()
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = XCLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, pad_token_id=tokenizer.eos_token_id, **special,
        ),
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_frames=8, mit_hidden_size=32, mit_intermediate_size=64,
            mit_num_hidden_layers=1, mit_num_attention_heads=4,
        ),
        projection_dim=32,  # X-CLIP's video transformer (MIT) runs on the projected frame features
        prompt_layers=1,
        prompt_attention_heads=4,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        XCLIPModel(config).save_pretrained(path)
    image_processor = VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    XCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
