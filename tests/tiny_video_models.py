"""Tiny, randomly initialised LTX-Video (and CogVideoX) pipelines for tests (no downloads).

They use the real diffusers/transformers classes with small configs, so the package's loading and generation code is
what the tests exercise. The VAE has LTX's real compression, 32x in space and 8x in time (three spatio-temporal
down-sampling stages and a 4x4 patchify), so the 8k+1 frame arithmetic and the 32-pixel size rule run as they do with
the released model: 17 frames at 64x96 px are 3 x 2 x 3 latents. The text encoder is a one-layer T5 behind a real
``T5Tokenizer`` (Unigram over single characters) built offline, so prompts go through the tokenizer path.

Sizes: latents have 8 channels; the transformer one layer of 4 heads x 8 dims; text embeddings 32 dims.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLLTXVideo,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    LTXConditionPipeline,
    LTXPipeline,
    LTXVideoTransformer3DModel,
)
from transformers import T5Config, T5EncoderModel, T5Tokenizer

TEXT_DIM = 32
LATENT_CHANNELS = 8


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5 (Unigram) tokenizer whose pieces are printable ASCII characters and word-initial lowercase letters."""
    pieces = ["\u2581"] + [chr(code) for code in range(33, 127)] + ["\u2581" + chr(code) for code in range(97, 123)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(piece, -1.0) for piece in pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=128)


def tiny_t5_encoder(vocab_size: int) -> T5EncoderModel:
    config = T5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=1, num_heads=4)
    return T5EncoderModel(config).eval()


def tiny_ltx_vae() -> AutoencoderKLLTXVideo:
    """diffusers' test VAE with LTX's real ratios: 3 x 2 spatio-temporal scaling and patch 4 give 32x / 8x."""
    return AutoencoderKLLTXVideo(
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=4,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ).eval()


def tiny_ltx_transformer() -> LTXVideoTransformer3DModel:
    return LTXVideoTransformer3DModel(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=TEXT_DIM,
        num_layers=1,
        caption_channels=TEXT_DIM,
    ).eval()


def tiny_ltx_components(seed: int = 0) -> dict:
    """The five components both LTX pipelines take; weights seeded in a forked RNG (the caller's state is kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_t5_tokenizer()
        return {
            "scheduler": FlowMatchEulerDiscreteScheduler(),
            "vae": tiny_ltx_vae(),
            "text_encoder": tiny_t5_encoder(len(tokenizer)),
            "tokenizer": tokenizer,
            "transformer": tiny_ltx_transformer(),
        }


def build_tiny_ltx_pipeline(path: str | Path, seed: int = 0) -> LTXPipeline:
    """A tiny text-to-video LTXPipeline saved to ``path`` (``model_index.json`` names ``LTXPipeline``)."""
    pipeline = LTXPipeline(**tiny_ltx_components(seed))
    pipeline.save_pretrained(str(path))
    return pipeline


def build_tiny_ltx_condition_pipeline(path: str | Path, seed: int = 0) -> LTXConditionPipeline:
    """The same tiny components as an LTXConditionPipeline (``model_index.json`` names ``LTXConditionPipeline``)."""
    pipeline = LTXConditionPipeline(**tiny_ltx_components(seed))
    pipeline.save_pretrained(str(path))
    return pipeline



def build_tiny_cogvideox_pipeline(path: str | Path, seed: int = 0) -> CogVideoXPipeline:
    """A tiny text-to-video CogVideoXPipeline (diffusers' test sizes; 8x / 4x VAE), saved to ``path``.

    Its transformer's text positions are sized for 16 tokens: call it with ``max_sequence_length=16``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_t5_tokenizer()
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
            text_embed_dim=TEXT_DIM, num_layers=1, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=16,
        ).eval()  # fmt: skip
        vae = AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
            temporal_compression_ratio=4,
        ).eval()  # fmt: skip
        text_encoder = tiny_t5_encoder(len(tokenizer))
    pipeline = CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )  # fmt: skip
    pipeline.save_pretrained(str(path))
    return pipeline
