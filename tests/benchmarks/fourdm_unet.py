"""Benchmark (not a test): time and peak memory of one 4DM UNet forward at the real size, random weights.

The UNet is :class:`~ns_4d_methods.guidance.four_dm.FourDMUNet` built from 4Diffusion's ``sd_v2_base_ipmv.yaml``
arguments (SD 2.1-base: 320/640/1280/1280 channels, 1024-dim text, ImageDream's Resampler, 21 motion modules),
randomly initialised. One forward without gradients on the 4D-aware SDS batch: ``2 x 8 x 5 = 80`` latents (guidance
branches x time steps x (4 views + the image-prompt view)) of 32x32 (256 px images), 77 text tokens and 257 CLIP
tokens each. fp32 on the CPU, fp16 on CUDA (the prior's dtypes). "forward CPU s" is the process's CPU time (all
threads): on a shared machine it is steadier than the wall clock. Peak memory: resident set size (``getrusage``) on
the CPU, ``torch.cuda.max_memory_allocated`` on CUDA; "model" is the value right after building.

    python tests/benchmarks/fourdm_unet.py [--device cpu] [--frames 8] [--latent 32] [--repeats 1]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from ns_4d_methods.guidance.four_dm import FourDMUNet
from ns_4d_methods.guidance.four_dm_conversion import four_dm_config

MIB = 2**20
SD_V2_BASE_IPMV = dict(  # the MultiViewUNetModel arguments of 4Diffusion's sd_v2_base_ipmv.yaml
    image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
    num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64, use_spatial_transformer=True,
    use_linear_in_transformer=True, transformer_depth=1, context_dim=1024, use_checkpoint=False, legacy=False,
    camera_dim=16, with_ip=True, ip_dim=16, ip_mode="local_resample", use_motion_module=True,
    motion_module_type="Vanilla",
    motion_module_kwargs=dict(
        num_attention_heads=8, num_transformer_block=1, attention_block_types=["Temporal_Self", "Temporal_Self"],
        temporal_position_encoding=True, temporal_position_encoding_max_len=32, temporal_attention_dim_div=1,
    ),
)


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=8, help="time steps (the batch is 2 x frames x 5 views)")
    parser.add_argument("--latent", type=int, default=32, help="latent side (256 px images: 32)")
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards (the first includes warm-up)")
    args = parser.parse_args()
    dtype = torch.float16 if args.device == "cuda" else torch.float32

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = FourDMUNet(**four_dm_config(SD_V2_BASE_IPMV, Path("sd_v2_base_ipmv.yaml")))
    unet = unet.to(args.device).eval().requires_grad_(False)
    if dtype != torch.float32:
        unet = unet.to(dtype=dtype)
    build_seconds = time.perf_counter() - start
    parameters = sum(p.numel() for p in unet.parameters())
    motion = sum(p.numel() for p in unet.motion_modules.parameters())
    model_bytes = peak_bytes(args.device)

    generator = torch.Generator().manual_seed(0)
    batch = 2 * args.frames * unet.config.num_views
    inputs = [
        torch.randn(batch, 4, args.latent, args.latent, generator=generator),
        torch.full((batch,), 601),
        torch.randn(batch, 77, 1024, generator=generator),
        torch.randn(batch, 16, generator=generator),
        torch.randn(batch, 257, 1280, generator=generator),
    ]
    inputs = [tensor.to(args.device) for tensor in inputs]
    seconds, cpu_seconds = [], []
    with torch.inference_mode():
        for _ in range(args.repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            unet(*inputs, num_frames=args.frames)
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)

    print("| device | dtype | params (motion) | batch | latent | build s | forward s | forward CPU s | model MiB "
          "| peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.device} | {str(dtype).removeprefix('torch.')} | {parameters / 1e6:.0f} M ({motion / 1e6:.0f} M) | "
        f"{batch} ({args.frames} x 2 x 5) | {args.latent} | {build_seconds:.1f} | "
        f"{' / '.join(f'{s:.1f}' for s in seconds)} | {' / '.join(f'{s:.1f}' for s in cpu_seconds)} | "
        f"{model_bytes / MIB:.0f} | {peak_bytes(args.device) / MIB:.0f} |"
    )


if __name__ == "__main__":
    main()
