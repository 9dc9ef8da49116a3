"""Reconstruction benchmark on a D-NeRF scene (default "jumpingjacks"): test-split PSNR/SSIM and training speed.

Trains nerfacto-4d, splatfacto-4d and nerfstudio's static nerfacto (the floor: it cannot model motion) for the same
number of iterations at the same image resolution, then evaluates every test image. Then, at equal wall-clock time:
nerfstudio's ``nerfacto`` and ``dnerf`` (D-NeRF: vanilla NeRF with a deformation MLP, nerfstudio's own method) each
train for as long as splatfacto-4d's training took, however many steps that is.

    python tests/benchmarks/reconstruction.py --steps 800 --scale 0.25 --rays 1024 --small-grids --seeds 4   # CPU
    python tests/benchmarks/reconstruction.py --steps 30000 --scale 1 --methods nerfacto-4d splatfacto-4d \
        --preset full --equal-time                                                                          # GPU

splatfacto-4d runs with a preset (``--preset``; default the one ``ns-train splatfacto-4d`` has on this machine:
compact without CUDA, full with it), its schedule fitted to ``steps`` by the rule ``ns-train`` uses for the compact
preset (``method_configs.splatfacto_4d.compress_schedule``); ``--splatfacto-strategy`` adds rows
with other densification strategies, same schedule. splatfacto-4d's jumpingjacks has no points, so its Gaussians
start random (``--num-random``, default the preset's). A single 800-step splatfacto-4d run moves by about 0.5 dB with
the seed (and with the thread count, which changes float summation order): ``--seeds N`` reports, for every method,
the mean and range over seeds 0..N-1. ``--scene`` takes any folder in D-NeRF's layout (transforms_*.json with
times). The NeRFs run their own schedules unchanged. On CUDA the table adds peak GPU memory. nerfstudio's nerfacto
and dnerf build torchmetrics' LPIPS, which downloads AlexNet weights; they get the package's offline one.

Published full-resolution (800 px, full training) anchors on this scene: D-NeRF 32.80 dB, K-Planes 32.64,
4DGS 35.42, Deformable-3DGS 37.72.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
import unittest.mock
from pathlib import Path
from typing import Optional

import torch
from nerfstudio.configs.method_configs import method_configs
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
from nerfstudio.data.dataparsers.dnerf_dataparser import DNeRFDataParserConfig

from method_configs.nerfacto_4d import nerfacto_4d
from method_configs.splatfacto_4d import compress_schedule, splatfacto_4d_config
from ns_4d_methods.models.image_metrics import LazyLPIPS, image_metrics

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "dnerf_jumpingjacks_400"


class TimeUp(Exception):
    """Raised by the training step that would start after the wall-clock budget."""


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


def run(
    name: str, config, steps: int, scale: float, out: Path, device: str, scene: Path, seconds: Optional[float] = None
):
    """Trains ``steps`` steps on ``scene``, or as many as fit in ``seconds`` of training; (PSNR, SSIM, it/s, test
    images, steps done, training seconds, CPU seconds of training, peak GPU GiB)."""
    config = copy.deepcopy(config)
    config.method_name = name
    config.output_dir = out
    config.vis = "tensorboard"
    config.max_num_iterations = steps if seconds is None else 10**7
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 10**8
    config.steps_per_save = 10**8
    config.machine.device_type = device
    config.pipeline.datamanager.data = scene
    config.pipeline.datamanager.camera_res_scale_factor = scale
    config.set_timestamp()
    # nerfstudio's nerfacto builds a downloading LPIPS in populate_modules; give it the offline one instead.
    with unittest.mock.patch("torchmetrics.image.lpip.LearnedPerceptualImagePatchSimilarity", lambda **_: LazyLPIPS()):
        trainer = config.setup(local_rank=0, world_size=1)
        trainer.setup()
    done = 0
    step_fn = trainer.train_iteration

    def train_iteration(step: int):
        nonlocal done
        if seconds is not None and time.perf_counter() - start >= seconds:
            raise TimeUp
        result = step_fn(step)
        done += 1
        return result

    trainer.train_iteration = train_iteration
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cpu_start, start = time.process_time(), time.perf_counter()
    try:
        trainer.train()
    except TimeUp:
        pass
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    trainer.pipeline.eval()
    pipeline = trainer.pipeline
    psnr, ssim = [], []
    with torch.no_grad():
        for camera, batch in pipeline.datamanager.fixed_indices_eval_dataloader:
            outputs = pipeline.model.get_outputs_for_camera(camera)
            rgb = outputs["rgb"] if "rgb" in outputs else outputs["rgb_fine"]  # nerfstudio's dnerf: coarse + fine
            metrics = image_metrics(ground_truth(batch["image"]).to(rgb.device), rgb, None)
            psnr.append(float(metrics["psnr"]))
            ssim.append(float(metrics["ssim"]))
    return sum(psnr) / len(psnr), sum(ssim) / len(ssim), done / elapsed, len(psnr), done, elapsed, cpu, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--scale", type=float, default=0.25, help="image scale of the 400 px scene")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scene", type=Path, default=DATA, help="a D-NeRF-layout folder (default: jumpingjacks)")
    parser.add_argument(
        "--preset", choices=["full", "compact"], default="full" if torch.cuda.is_available() else "compact",
        help="splatfacto-4d's preset (default: ns-train's on this machine)",
    )
    parser.add_argument("--methods", nargs="+", default=["nerfacto", "nerfacto-4d", "splatfacto-4d"])
    parser.add_argument("--rays", type=int, default=4096, help="rays per training batch for the NeRFs")
    parser.add_argument("--num-random", type=int, help="random initial Gaussians of splatfacto-4d (default: preset's)")
    parser.add_argument("--small-grids", action="store_true", help="12-level 2^15 hash grids for both NeRFs (CPU)")
    parser.add_argument(
        "--splatfacto-strategy", nargs="*", default=[], choices=["default", "mcmc"],
        help="extra splatfacto-4d rows with these densification strategies",
    )
    parser.add_argument(
        "--seeds", type=int, default=1,
        help="every row: mean and range over seeds 0..N-1 (a single 800-step run varies by about 0.5 dB with the seed)",
    )
    parser.add_argument(
        "--equal-time", nargs="*", default=["nerfacto", "dnerf"], choices=["nerfacto", "dnerf", "nerfacto-4d"],
        help="methods trained for splatfacto-4d's training time (needs splatfacto-4d in --methods)",
    )
    args = parser.parse_args()
    if not (args.scene / "transforms_test.json").is_file():
        raise SystemExit(f"error: --scene {args.scene}: expected a D-NeRF-layout folder with transforms_test.json")
    splatfacto = splatfacto_4d_config(args.preset)
    compress_schedule(splatfacto, args.steps)
    model = splatfacto.pipeline.model
    if args.num_random is not None:
        model.num_random = args.num_random
    dnerf = copy.deepcopy(method_configs["dnerf"])
    configs = {"nerfacto": static_nerfacto(), "nerfacto-4d": nerfacto_4d.config, "splatfacto-4d": splatfacto, "dnerf": dnerf}
    for name in ("nerfacto", "nerfacto-4d", "dnerf"):
        configs[name].pipeline.datamanager.train_num_rays_per_batch = args.rays
    if args.small_grids:
        for name in ("nerfacto", "nerfacto-4d"):
            grid = configs[name].pipeline.model
            grid.num_levels, grid.log2_hashmap_size = 12, 15
            if name == "nerfacto-4d":
                grid.log2_hashmap_size_4d = 15
    runs = [(name, configs[name]) for name in args.methods]
    for strategy in args.splatfacto_strategy:
        variant = copy.deepcopy(splatfacto)
        variant.pipeline.model.strategy = strategy
        runs.append((f"splatfacto-4d ({strategy})", variant))
    rows = []
    spread = {}  # name: (lowest PSNR, highest PSNR, runs)
    load = [os.getloadavg()[0]]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in runs:
            results = []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                results.append(
                    run(name.split(" ")[0], config, args.steps, args.scale, Path(tmp), args.device, args.scene)
                )
                print("RUN", name, seed, results[-1], flush=True)
            psnrs = [result[0] for result in results]
            # mean of every figure (test image and step counts are the same in every run)
            mean = tuple(sum(values) / len(values) for values in zip(*results))
            rows.append((name, *mean[:3], results[0][3], results[0][4], *mean[5:]))
            spread[name] = (min(psnrs), max(psnrs), len(psnrs))
            load.append(os.getloadavg()[0])
            print("ROW", rows[-1], flush=True)
        budget = next((row[6] for row in rows if row[0] == "splatfacto-4d"), None)
        if budget is not None:
            for name in args.equal_time:
                torch.manual_seed(0)
                result = run(
                    name, configs[name], args.steps, args.scale, Path(tmp), args.device, args.scene, seconds=budget
                )
                rows.append((f"{name} (equal time)", *result))
                load.append(os.getloadavg()[0])
                print("ROW", rows[-1], flush=True)
    minutes = (time.perf_counter() - start) / 60
    res = int(400 * args.scale)
    grids = ", 12-level 2^15 hash grids" if args.small_grids else ""
    print(
        f"\n{args.scene.name} at scale {args.scale} ({res} px on a 400 px scene), {args.steps} iterations of "
        f"{args.rays} rays (NeRFs){grids}, device {args.device}"
    )
    strategy = f"strategy {model.strategy}" + (f" capped at {model.max_gs_num}" if model.strategy == "mcmc" else "")
    print(
        f"splatfacto-4d: preset {args.preset}, {strategy}, schedule fitted to {args.steps} steps (deformation "
        f"warm-up {model.deformation_warmup}, densification {model.warmup_length}-{model.stop_split_at} every "
        f"{model.refine_every}, SH every {model.sh_degree_interval}), {model.num_random} random initial Gaussians, deformation MLP "
        f"{model.deformation_num_layers}x{model.deformation_layer_width}"
    )
    if budget is not None:
        print(f"equal time: {budget:.0f} s of training each (splatfacto-4d's)")
    print(f"wall time {minutes:.1f} min (training and evaluation); 1-min load average " + ", ".join(f"{x:.1f}" for x in load))
    print(
        "| method | test PSNR (dB) | test SSIM | steps | training (s) | it/s | CPU s/step | peak GPU GiB "
        "| test images | runs (PSNR range) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, psnr, ssim, its, n, done, elapsed, cpu, peak in rows:
        low, high, n_runs = spread.get(name, (psnr, psnr, 1))
        runs_text = f"{n_runs} ({low:.2f}-{high:.2f})" if n_runs > 1 else "1"
        print(
            f"| {name} | {psnr:.2f} | {ssim:.4f} | {done} | {elapsed:.0f} | {its:.2f} | {cpu / max(done, 1):.3f} "
            f"| {peak:.2f} | {n} | {runs_text} |"
        )


if __name__ == "__main__":
    main()
