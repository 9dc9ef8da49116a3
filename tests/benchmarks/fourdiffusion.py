"""Benchmark (not a test): seconds and peak memory of one 4diffusion SDS step at the real sizes, random weights.

One training step is (a) rendering the 32 SDS views (4 views x 8 instants) with gradient through the dynamic NeRF at
the official sizes (3D + 4D hash grids, 16 levels, 2^19 entries, resolution 16 -> 4096; nerfacto's proposal sampling,
256 + 96 proposal and 48 NeRF samples per ray), at 64, 192 or 256 px (the resolution schedule), and backpropagating;
(b) the prior: the renders resized to 256 px, VAE-encoded (SD 2.1's AutoencoderKL) with gradient for ``--grad-views``
of them, one 80-latent UNet call of the real 4DM (:class:`~ns_4d_methods.guidance.four_dm.FourDMUNet` with SD
2.1-base sizes, ImageDream's Resampler and the 21 motion modules; 4Diffusion's ``sd_v2_base_ipmv.yaml``), and the
backward pass through the encoder. The text and image encoders run once per run, not per step, and are left out.

On the CPU a full step takes many minutes, so each part is measured once: the field on ``--field-views`` of the 32
views at the smallest resolution, scaled by the ray count (the chunked, checkpointed renderer's time grows with the
rays, its memory holds one chunk's activations at a time), the prior once per ``--grad-views`` value. On
CUDA (fp16 prior and mixed precision, as the pipeline runs them) whole steps run (the second one is timed), and the
table says which fit 24 GB.
Peak memory: the resident set size (``getrusage``) on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
The official code takes about 1.2 s per step on an A100 (35k steps in 12 h).

    python tests/benchmarks/fourdiffusion.py [--device cpu] [--grad-views 8 32] [--field-views 1] \
        [--resolutions 64 192 256]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler

from ns_4d_methods.data.sds_datamanager import SDSDataManagerConfig
from ns_4d_methods.guidance.four_dm import FourDMUNet
from ns_4d_methods.guidance.four_dm_conversion import four_dm_config
from ns_4d_methods.guidance.four_dm_prior import FourDMPrior, ImageCondition, PromptEmbeddings
from ns_4d_methods.guidance.sds_4d import FourDAwareSDS, FourDAwareSDSConfig
from ns_4d_methods.models.four_diffusion import FourDiffusionModelConfig
from ns_4d_methods.render.orbit_cameras import camera_condition

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fourdm_unet import SD_V2_BASE_IPMV  # noqa: E402  (the real 4DM's constructor arguments)

GIB = 2**30
SD_VAE = dict(  # stabilityai/stable-diffusion-2-1-base vae/config.json
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def real_prior(device: str, dtype: torch.dtype) -> FourDMPrior:
    """A FourDMPrior holding the real-size UNet and VAE with random weights (built in memory, not loaded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = FourDMUNet(**four_dm_config(SD_V2_BASE_IPMV, Path("sd_v2_base_ipmv.yaml")))
        vae = AutoencoderKL(**SD_VAE)
    prior = FourDMPrior.__new__(FourDMPrior)
    prior.device, prior.dtype = torch.device(device), dtype
    prior.unet = unet.to(device, dtype).eval().requires_grad_(False)
    prior.vae = vae.to(device, dtype).eval().requires_grad_(False)
    prior.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    prior.num_frames, prior.num_views = unet.config.num_frames, unet.config.num_views - 1
    prior.alphas_cumprod = prior.scheduler.alphas_cumprod.to(device)
    prior.latent_scale, prior.vae_scale_factor, prior.image_size = 0.18215, 8, 256
    return prior


def real_field(device: str):
    datamanager = SDSDataManagerConfig().setup(device=device)
    implementation = "tcnn" if device == "cuda" else "torch"
    config = FourDiffusionModelConfig(implementation=implementation, render_chunk_rays=1 << 15)
    model = config.setup(
        scene_box=datamanager.train_dataset.scene_box,
        num_train_data=len(datamanager.train_dataset),
        metadata={},
        device=device,
    ).to(device)
    return datamanager, model


def time_field(datamanager, model, resolution: int, views: int, device: str) -> tuple[float, int]:
    """Seconds and peak bytes of rendering ``views`` of a step's views at ``resolution`` and backpropagating."""
    cameras, _ = datamanager.next_train(0)
    cameras = cameras[:views]
    cameras.width[:], cameras.height[:] = resolution, resolution
    cameras.cx[:], cameras.cy[:] = resolution / 2, resolution / 2
    cameras.fx[:] = cameras.fy[:] = 0.5 * resolution / torch.tan(torch.deg2rad(torch.tensor(22.5)))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    outputs = model.render_views(cameras)
    (outputs["rgb"].sum() + outputs["interlevel"]).backward()
    synchronize(device)
    return time.perf_counter() - start, peak_bytes(device)


def time_prior(prior: FourDMPrior, grad_views: int, device: str) -> tuple[float, int]:
    """Seconds and peak bytes of one SDS loss (VAE with gradient for ``grad_views``, UNet, backward) at 256 px."""
    generator = torch.Generator().manual_seed(0)
    renders = torch.rand(32, 3, 256, 256, generator=generator).to(device).requires_grad_(True)
    cameras = camera_condition(SDSDataManagerConfig().setup(device="cpu").next_train(0)[0].camera_to_worlds)
    prompt = PromptEmbeddings(*(torch.randn(1, 77, 1024).to(device, prior.dtype) for _ in range(2)))
    condition = ImageCondition(torch.randn(8, 257, 1280).to(device, prior.dtype), torch.randn(8, 4, 32, 32).to(device))
    sds = FourDAwareSDS(FourDAwareSDSConfig(grad_views=grad_views), prior)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    result = sds(renders, cameras.to(device), prompt, condition, step=6000, generator=generator)
    result.loss.backward()
    synchronize(device)
    return time.perf_counter() - start, peak_bytes(device)


def time_step(
    datamanager, model, prior: FourDMPrior, resolution: int, grad_views: int, device: str
) -> tuple[float, int]:
    """Seconds and peak bytes of a whole SDS step: 32 renders at ``resolution``, the SDS loss, the backward pass."""
    cameras, _ = datamanager.next_train(0)
    cameras.width[:], cameras.height[:] = resolution, resolution
    cameras.cx[:], cameras.cy[:] = resolution / 2, resolution / 2
    cameras.fx[:] = cameras.fy[:] = 0.5 * resolution / torch.tan(torch.deg2rad(torch.tensor(22.5)))
    prompt = PromptEmbeddings(*(torch.randn(1, 77, 1024).to(device, prior.dtype) for _ in range(2)))
    condition = ImageCondition(torch.randn(8, 257, 1280).to(device, prior.dtype), torch.randn(8, 4, 32, 32).to(device))
    sds = FourDAwareSDS(FourDAwareSDSConfig(grad_views=grad_views), prior)
    torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    with torch.autocast("cuda"):  # the trainer's mixed precision
        outputs = model.render_views(cameras)
        result = sds(outputs["rgb"], camera_condition(cameras.camera_to_worlds).to(device), prompt, condition, 6000)
    (result.loss + outputs["interlevel"]).backward()
    synchronize(device)
    return time.perf_counter() - start, peak_bytes(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grad-views", type=int, nargs="+", default=[32], help="renders with VAE gradient")
    parser.add_argument("--field-views", type=int, default=1, help="views the CPU renders (scaled to 32)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 192, 256])
    args = parser.parse_args()
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    rows = []
    datamanager, model = real_field(device)
    if device == "cuda":
        prior = real_prior(device, dtype)
        for resolution in sorted(args.resolutions):
            for grad_views in sorted(args.grad_views):
                for _ in range(2):  # the first step includes warm-up
                    seconds, peak = time_step(datamanager, model, prior, resolution, grad_views, device)
                rows.append((f"step {resolution} px, VAE grad {grad_views}/32", seconds, peak, "fp16 prior"))
                print(rows[-1], flush=True)
    else:
        # one view at the smallest resolution, scaled by the ray count: the chunked, checkpointed renderer's time grows
        # with the rays, its memory does not (one chunk's activations at a time)
        measured = min(args.resolutions)
        seconds, peak = time_field(datamanager, model, measured, args.field_views, device)
        for resolution in sorted(args.resolutions):
            scale = 32 / args.field_views * (resolution / measured) ** 2
            note = f"{args.field_views} view(s) at {measured} px measured, x{scale:g}"
            rows.append((f"field {resolution} px", seconds * scale, peak, note))
            print(rows[-1], flush=True)
        del model
        prior = real_prior(device, dtype)
        for grad_views in sorted(args.grad_views):
            seconds, peak = time_prior(prior, grad_views, device)
            rows.append((f"prior, VAE grad {grad_views}/32", seconds, peak, "fp32, 256 px"))
            print(rows[-1], flush=True)

    print(f"\n4diffusion SDS step on {device} ({torch.get_num_threads()} threads), random weights at the real sizes")
    print(f"{'part':<32} {'seconds':>9} {'peak GiB':>9}  note")
    for name, seconds, peak, note in rows:
        print(f"{name:<32} {seconds:>9.1f} {peak / GIB:>9.2f}  {note}")
    if device == "cuda":
        fits = [name for name, _, peak, _ in rows if peak < 24e9 * 0.95]
        print(f"under 24 GB: {', '.join(fits) or 'none'}")


if __name__ == "__main__":
    main()
