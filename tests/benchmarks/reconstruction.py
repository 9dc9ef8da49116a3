"""Reconstruction benchmark on the D-NeRF "jumpingjacks" scene: test-split PSNR/SSIM and training speed.

Trains nerfacto-4d, splatfacto-4d and nerfstudio's static nerfacto (the floor: it cannot model motion) for the same
number of iterations at the same image resolution, then evaluates every test image.

    python tests/benchmarks/reconstruction.py --steps 800 --scale 0.25 --rays 1024 --small-grids   # CPU-sized
    python tests/benchmarks/reconstruction.py --steps 3000 --scale 0.5          # on a GPU

splatfacto-4d's schedule is written in steps of its full training (``max_num_iterations``, 30k). Under a shorter
budget of ``steps`` it would never leave its warmups (deformation from 3000, densification from 500, full resolution
from 6000), so the benchmark compresses it by ``r = steps / max_num_iterations``: the step at which each phase starts
or stops (deformation warmup, densification start/stop and post-reset pause, screen-size culling stop, resolution and
SH schedules) is multiplied by ``r``. Three things are not compressed, each because compressing it broke training
(measured at 50 px):

- the learning rates follow their own schedules, so a short budget sees the start of the full decay, as any run
  stopped early would. With the deformation lr's 500x decay compressed into the budget the MLP barely moves the
  Gaussians: 21.7 dB at 200 steps against 21.9 with no deformation at all; uncompressed, 800 steps reach 25.8 dB
  against 22.0 with no deformation;
- the densification interval ``refine_every`` is ``max(r * refine_every, MIN_REFINE_EVERY)`` views: screen-space
  gradients are averaged over that many views before Gaussians are split, and with fewer every Gaussian of the
  random start splits at each refinement (50k to 560k Gaussians by step 80);
- the random start has ``--num-random`` Gaussians (5,000; splatfacto's 50,000 are meant for 800 px images), which
  keeps the deformation MLP, run on every Gaussian each step, affordable on a CPU.

The NeRFs run their own schedules unchanged. The compressed schedule is printed.

Published full-resolution (800 px, full training) anchors on this scene: D-NeRF 32.80 dB, K-Planes 32.64,
4DGS 35.42, Deformable-3DGS 37.72.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import unittest.mock
from pathlib import Path

import torch
from nerfstudio.configs.method_configs import method_configs
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
from nerfstudio.data.dataparsers.dnerf_dataparser import DNeRFDataParserConfig

from method_configs.nerfacto_4d import nerfacto_4d
from method_configs.splatfacto_4d import splatfacto_4d
from ns_4d_methods.models.image_metrics import LazyLPIPS, image_metrics

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "dnerf_jumpingjacks_400"
MIN_REFINE_EVERY = 25
"""Fewest training views whose gradients splatfacto's densification averages (module docstring)."""


def static_nerfacto():
    """nerfstudio's nerfacto on D-NeRF data with the same background and data loading as nerfacto-4d."""
    config = copy.deepcopy(method_configs["nerfacto"])
    config.pipeline.datamanager = VanillaDataManagerConfig(
        dataparser=DNeRFDataParserConfig(), train_num_rays_per_batch=4096, eval_num_rays_per_batch=4096
    )
    config.pipeline.model.background_color = "white"
    config.pipeline.model.disable_scene_contraction = True
    return config


def ground_truth(image: torch.Tensor) -> torch.Tensor:
    """A test image as [H, W, 3] floats composited on white, as every model here renders D-NeRF."""
    image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    if image.shape[-1] == 4:
        image = image[..., :3] * image[..., 3:] + (1.0 - image[..., 3:])
    return image


def compress_schedule(config, steps: int) -> str:
    """splatfacto-4d's schedule fitted to ``steps`` in place (module docstring); returns it as a line of text."""
    ratio = steps / config.max_num_iterations
    model = config.pipeline.model
    fields = ("deformation_warmup", "warmup_length", "stop_split_at", "stop_screen_size_at", "resolution_schedule")
    for name in (*fields, "sh_degree_interval"):
        setattr(model, name, max(1, round(getattr(model, name) * ratio)))
    model.refine_every = max(MIN_REFINE_EVERY, round(model.refine_every * ratio))
    return ", ".join(f"{name} {getattr(model, name)}" for name in (*fields, "sh_degree_interval", "refine_every"))


def run(name: str, config, steps: int, scale: float, out: Path, device: str, compressed: bool = False):
    config = copy.deepcopy(config)
    full_steps = config.max_num_iterations
    config.method_name = name
    config.output_dir = out
    config.vis = "tensorboard"
    config.max_num_iterations = steps
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = steps + 1
    config.steps_per_save = steps + 1
    config.machine.device_type = device
    config.pipeline.datamanager.data = DATA
    config.pipeline.datamanager.camera_res_scale_factor = scale
    config.set_timestamp()
    # nerfstudio's nerfacto builds a downloading LPIPS in populate_modules; give it the offline one instead.
    with unittest.mock.patch("torchmetrics.image.lpip.LearnedPerceptualImagePatchSimilarity", lambda **_: LazyLPIPS()):
        trainer = config.setup(local_rank=0, world_size=1)
        trainer.setup()
    if compressed:
        # splatfacto sets the pause after an opacity reset to an epoch plus a refine interval, in its populate_modules
        strategy = trainer.pipeline.model.strategy
        strategy.pause_refine_after_reset = round(strategy.pause_refine_after_reset * steps / full_steps)
    start = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    trainer.pipeline.eval()
    pipeline = trainer.pipeline
    psnr, ssim = [], []
    with torch.no_grad():
        for camera, batch in pipeline.datamanager.fixed_indices_eval_dataloader:
            outputs = pipeline.model.get_outputs_for_camera(camera)
            metrics = image_metrics(ground_truth(batch["image"]).to(outputs["rgb"].device), outputs["rgb"], None)
            psnr.append(float(metrics["psnr"]))
            ssim.append(float(metrics["ssim"]))
    return sum(psnr) / len(psnr), sum(ssim) / len(ssim), steps / elapsed, len(psnr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--scale", type=float, default=0.25, help="image scale of the 400 px scene")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=["nerfacto", "nerfacto-4d", "splatfacto-4d"])
    parser.add_argument("--rays", type=int, default=4096, help="rays per training batch for both NeRFs")
    parser.add_argument("--num-random", type=int, default=5000, help="random initial Gaussians of splatfacto-4d")
    parser.add_argument("--small-grids", action="store_true", help="12-level 2^15 hash grids for both NeRFs (CPU)")
    args = parser.parse_args()
    configs = {
        "nerfacto": static_nerfacto(),
        "nerfacto-4d": nerfacto_4d.config,
        "splatfacto-4d": copy.deepcopy(splatfacto_4d.config),
    }
    for name in ("nerfacto", "nerfacto-4d"):
        configs[name].pipeline.datamanager.train_num_rays_per_batch = args.rays
    if args.small_grids:
        for name in ("nerfacto", "nerfacto-4d"):
            model = configs[name].pipeline.model
            model.num_levels, model.log2_hashmap_size = 12, 15
            if name == "nerfacto-4d":
                model.log2_hashmap_size_4d = 15
    schedule = compress_schedule(configs["splatfacto-4d"], args.steps)
    configs["splatfacto-4d"].pipeline.model.num_random = args.num_random
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            torch.manual_seed(0)
            compressed = name == "splatfacto-4d"
            rows.append((name, *run(name, configs[name], args.steps, args.scale, Path(tmp), args.device, compressed)))
    minutes = (time.perf_counter() - start) / 60
    res = int(400 * args.scale)
    grids = ", 12-level 2^15 hash grids" if args.small_grids else ""
    print(f"\nD-NeRF jumpingjacks, {res}x{res} px, {args.steps} iterations of {args.rays} rays (NeRFs){grids}, device {args.device}")
    ratio = args.steps / configs["splatfacto-4d"].max_num_iterations
    print(f"splatfacto-4d schedule compressed x{ratio:.4g}: {schedule}, {args.num_random} random initial Gaussians")
    print(f"wall time {minutes:.1f} min (training and evaluation)")
    print("| method | test PSNR (dB) | test SSIM | it/s | test images |\n|---|---|---|---|---|")
    for name, psnr, ssim, its, n in rows:
        print(f"| {name} | {psnr:.2f} | {ssim:.4f} | {its:.2f} | {n} |")


if __name__ == "__main__":
    main()
