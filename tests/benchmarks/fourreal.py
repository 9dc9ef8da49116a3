"""4real benchmark (a script that prints tables, not a test).

1. **Video SDS step at LTX-Video's real size** (random weights: ``LTXVideoTransformer3DModel()`` and
   ``AutoencoderKLLTXVideo()`` with diffusers' default configs, which are LTX-Video's 2B transformer and its VAE):
   seconds and peak memory of one :func:`~ns_4d_methods.guidance.video_sds.video_sds_loss` (encode, one guided
   velocity, decode, pixel loss and its backward into the renders) against the frame count and the resolution, each
   configuration in its own process (peak resident memory is per process). Text embeddings are random tensors of
   T5-XXL's shape (the text encoder runs once per run and is released).
2. **Deformation memory of one SDS path**: the activations the deformation network keeps for the backward pass over
   16 renders, plain and as ``FourRealModel.render_path`` evaluates it (shared per time, checkpointed).
3. **Per stage of a tiny run**: the 4real pipeline on 96 px sample-scene videos (17 + 17 frames, the end-to-end
   test's inputs) with the tiny random LTX: seconds of stages 1-3 and of one training step of stages 4 and 5 with and
   without video SDS, and the paper's schedule (2 x 20k steps, video SDS in the last 5k of each) extrapolated from them.

    python tests/benchmarks/fourreal.py                     # all parts, CPU (part 1 takes several minutes)
    python tests/benchmarks/fourreal.py --part sds --frames 17 --sizes 256x384 512x768
    python tests/benchmarks/fourreal.py --part stages --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

PAPER_STEPS, PAPER_SDS_STEPS = 20000, 5000  # per stage


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class _RealSizePrior:
    """LTXVideoPrior's arithmetic over real-size random components (what ``video_models`` would load)."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel

        from ns_4d_methods.guidance.video_models import VideoGenerationConfig
        from ns_4d_methods.guidance.video_sds import LTXVideoPrior

        torch.manual_seed(0)
        with torch.device(device):
            transformer = LTXVideoTransformer3DModel().to(dtype).eval().requires_grad_(False)
            vae = AutoencoderKLLTXVideo().to(dtype).eval().requires_grad_(False)
        text = torch.randn(1, 128, transformer.config.caption_channels, device=device, dtype=dtype)
        mask = torch.ones(1, 128, dtype=torch.bool, device=device)
        embeddings = {"prompt_embeds": text, "prompt_attention_mask": mask,
                      "negative_prompt_embeds": text.clone(), "negative_prompt_attention_mask": mask}  # fmt: skip

        class Loaded:  # the parts of a loaded VideoModel that LTXVideoPrior reads
            pipeline = type("Pipeline", (), {"transformer": transformer, "vae": vae,
                                             "scheduler": FlowMatchEulerDiscreteScheduler()})  # fmt: skip
            config = VideoGenerationConfig()

            @staticmethod
            def prompt_embeddings(prompt: str) -> dict:
                return embeddings

        self.prior = LTXVideoPrior(Loaded(), "benchmark", guidance_scale=3.0)
        self.parameters = sum(p.numel() for p in transformer.parameters()), sum(p.numel() for p in vae.parameters())


def sds_step(frames: int, height: int, width: int, device: str, repeats: int) -> dict:
    """One configuration, in this process: seconds per video SDS step (median of ``repeats``) and peak memory."""
    from ns_4d_methods.guidance.video_sds import video_sds_loss

    torch.set_grad_enabled(True)
    dev = torch.device(device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16  # no fast bf16 on most CPUs
    start = time.perf_counter()
    real = _RealSizePrior(dev, dtype)
    load_seconds = time.perf_counter() - start
    weights_gb = _peak_rss_gb() if dev.type == "cpu" else torch.cuda.memory_allocated() / 2**30
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prior = real.prior
    renders = torch.rand(frames - 1, 3, height, width, device=dev, requires_grad=True)
    condition = torch.rand(3, height, width, device=dev)
    timings = {"encode": [], "velocity": [], "decode": [], "step": []}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            begin = time.perf_counter()
            result = function(*args, **kwargs)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            timings[name].append(time.perf_counter() - begin)
            return result
        return wrapper

    prior.encode, prior.predict_velocity, prior.decode = (
        timed("encode", prior.encode), timed("velocity", prior.predict_velocity), timed("decode", prior.decode)
    )
    for _ in range(repeats):
        begin = time.perf_counter()
        output = video_sds_loss(renders, condition, prior, 0.5, generator=torch.Generator(dev).manual_seed(0))
        output.loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        timings["step"].append(time.perf_counter() - begin)
    peak_gb = _peak_rss_gb() if dev.type == "cpu" else torch.cuda.max_memory_allocated() / 2**30
    latent_frames = (frames - 1) // prior.temporal_compression + 1
    tokens = latent_frames * (height // prior.spatial_compression) * (width // prior.spatial_compression)
    return {
        "frames": frames, "size": f"{height}x{width}", "tokens": tokens,
        "transformer_params_b": real.parameters[0] / 1e9, "vae_params_b": real.parameters[1] / 1e9,
        "load_s": load_seconds, **{f"{name}_s": float(np.median(values)) for name, values in timings.items()},
        "weights_gb": weights_gb, "peak_gb": peak_gb,
    }  # fmt: skip


def run_sds_part(frames_list, sizes, device: str, repeats: int) -> None:
    print(f"\nVideo SDS step at LTX-Video's real size ({device}; guidance: conditional + unconditional batch of 2)")
    header = (f"{'frames':>6} {'size':>9} {'tokens':>6} {'encode s':>9} {'velocity s':>10} {'decode s':>9} "
              f"{'step s':>8} {'weights GB':>10} {'peak GB':>8}")  # fmt: skip
    print(header)
    print("-" * len(header))
    rows = []
    for frames in frames_list:
        for size in sizes:
            height, width = (int(v) for v in size.split("x"))
            result = subprocess.run(
                [sys.executable, __file__, "--one", str(frames), str(height), str(width), "--device", device,
                 "--repeats", str(repeats)],
                capture_output=True, text=True,
            )  # fmt: skip
            if result.returncode != 0:
                print(f"{frames:>6} {size:>9}  failed: {result.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{frames:>6} {row['size']:>9} {row['tokens']:>6} {row['encode_s']:>9.2f} {row['velocity_s']:>10.2f} "
                  f"{row['decode_s']:>9.2f} {row['step_s']:>8.2f} {row['weights_gb']:>10.2f} {row['peak_gb']:>8.2f}",
                  flush=True)  # fmt: skip
    if rows:
        print(f"transformer {rows[0]['transformer_params_b']:.2f} B parameters, VAE {rows[0]['vae_params_b']:.2f} B "
              f"({'float32' if device == 'cpu' else 'bfloat16'}); weights: resident after building both; peak: the "
              "process's high-water mark (CPU) or torch's peak allocation (CUDA); step: encode + guided velocity + "
              "decode + the pixel loss's backward into the renders")


def run_stages_part(device: str, steps: int) -> None:
    from four_real_scene import camera_pose, freeze_time_video, reference_video
    from PIL import Image
    from tiny_video_models import build_tiny_ltx_pipeline

    from method_configs.four_real import four_real
    from ns_4d_methods.pipelines.four_real_pipeline import FourRealPipelineConfig
    from nerfstudio.engine.optimizers import Optimizers

    root = Path(tempfile.mkdtemp(prefix="fourreal-bench-"))
    (root / "freeze").mkdir()
    reference = reference_video(camera_pose(20.0, 25.0), 17, 96, ground=True)
    for index, frame in enumerate(reference):
        (root / "reference").mkdir(exist_ok=True)
        Image.fromarray(frame).save(root / "reference" / f"{index:05d}.png")
    frames, _ = freeze_time_video(20.0 + np.linspace(-45.0, 45.0, 17), 25.0, 0.0, 96, ground=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(root / "freeze" / f"{index:05d}.png")
    build_tiny_ltx_pipeline(root / "ltx")

    config = FourRealPipelineConfig(
        prompt="three striped spheres on a tiled floor", run_dir=root / "run", video_model=str(root / "ltx"),
        reference_video=root / "reference", freeze_time_video=root / "freeze", freeze_time_canonical_index=8,
        height=96, width=96, canonical_steps=steps, temporal_steps=steps, sds_steps=steps // 2,
    )  # fmt: skip
    config.datamanager.resolutions = (96,)
    config.model = four_real.config.pipeline.model
    begin = time.perf_counter()
    pipeline = config.setup(device=device, test_mode="val")
    stages_seconds = time.perf_counter() - begin
    model = pipeline.model
    groups = {name: params for name, params in model.get_param_groups().items() if params}
    optimizers = Optimizers({name: four_real.config.optimizers[name] for name in groups}, groups)
    pipeline.train()
    seconds = {}
    for step in range(2 * steps):
        stage, stage_step, length = pipeline.stage_at(step)
        sds = pipeline.sds_due(stage_step, length)
        model.step_cb(optimizers, step)
        optimizers.zero_grad_all()
        begin = time.perf_counter()
        _, losses, _ = pipeline.get_train_loss_dict(step)
        sum(losses.values()).backward()
        optimizers.optimizer_step_all()
        model.step_post_backward(step)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.setdefault((stage, sds), []).append(time.perf_counter() - begin)
    print(f"\nPer stage of a tiny run ({device}; 96 px videos of 17 frames, tiny random LTX, "
          f"{model.num_points} Gaussians at the end)")
    print(f"stages 1-3 (read both videos, structure from motion, build the pipeline): {stages_seconds:.2f} s")
    for (stage, sds), values in seconds.items():
        print(f"stage {'4 canonical' if stage == 'canonical' else '5 temporal '} {'with' if sds else 'without'} "
              f"video SDS: {np.median(values[1:] or values):.3f} s per step ({len(values)} steps)")
    per_stage = [
        (PAPER_STEPS - PAPER_SDS_STEPS) * np.median(seconds[(stage, False)][1:])
        + PAPER_SDS_STEPS * np.median(seconds[(stage, True)][1:])
        for stage in ("canonical", "temporal")
    ]  # fmt: skip
    print(f"the paper's schedule at these per-step times: {sum(per_stage) / 3600:.2f} h "
          f"(stage 4 {per_stage[0] / 3600:.2f} h, stage 5 {per_stage[1] / 3600:.2f} h)")


def run_memory_part(gaussians: int) -> None:
    """Activation memory that one video SDS path's renders keep for the backward pass in the deformation network:
    bytes of the tensors autograd saves, counted with ``saved_tensors_hooks`` (device independent), for 16 renders
    evaluated plainly (as a training step renders one frame) and as :meth:`FourRealModel.render_path` does (one
    evaluation per distinct time, checkpointed)."""
    from ns_4d_methods.fields.deformation_field import DeformationField

    field = DeformationField(time_frequencies=10)
    means = torch.rand(gaussians, 3)

    def saved_bytes(times, checkpointed: bool) -> int:
        total = [0]

        def pack(tensor):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        cache = {}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs = []
            for time in times:
                t = torch.full((gaussians, 1), time)
                if not checkpointed:
                    outputs.append(field(means, t)[0])
                    continue
                if time not in cache:
                    cache[time] = torch.utils.checkpoint.checkpoint(field, means, t, use_reentrant=False)[0]
                outputs.append(cache[time])
            loss = torch.stack(outputs).sum()
        loss.backward()
        return total[0]

    temporal, multiview = [k / 16 for k in range(1, 17)], [0.5] * 16
    print(f"\nDeformation activations kept for the backward pass of one 16-render path ({gaussians} Gaussians, "
          "8 x 256 MLP, float32)")
    for name, times in (("temporal", temporal), ("multi-view", multiview)):
        plain, shared = saved_bytes(times, False), saved_bytes(times, True)
        print(f"{name:>10}: plain {plain / 2**30:.3f} GB ({plain / gaussians / 1024:.1f} KB per Gaussian), "
              f"render_path {shared / 2**30:.3f} GB ({shared / gaussians / 1024:.2f} KB per Gaussian)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "sds", "stages", "memory"), default="all")
    parser.add_argument("--gaussians", type=int, default=20000, help="Gaussians of the memory part")
    parser.add_argument("--frames", type=int, nargs="+", default=[9, 17, 25])
    parser.add_argument("--sizes", nargs="+", default=["256x384", "512x768"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="training steps of each stage in the tiny run")
    parser.add_argument("--one", type=int, nargs=3, metavar=("FRAMES", "HEIGHT", "WIDTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(sds_step(*args.one, args.device, args.repeats)))
        return
    if args.part in ("all", "stages"):
        run_stages_part(args.device, args.steps)
    if args.part in ("all", "memory"):
        run_memory_part(args.gaussians)
    if args.part in ("all", "sds"):
        run_sds_part(args.frames, args.sizes, args.device, args.repeats)


if __name__ == "__main__":
    main()
