"""``ns-train splatfacto-4d``: deformable 3D Gaussians on a time-aware dataset (D-NeRF by default).

Its defaults follow the device, with two presets (``splatfacto_4d_config``); the one in force is what
``ns-train splatfacto-4d --help`` shows, and every value in it is a flag of its own:

- ``full``, on a machine with CUDA: Deformable-3DGS' schedule, unchanged: 40,000 steps, 50,000 random Gaussians
  (or the dataset's points), densification by gsplat's DefaultStrategy (no cap) with 3DGS' thresholds at the
  cameras' extent, the deformation (with its time network) after a 3,000-step static warm-up, the means' and
  scales' rates times ``SPATIAL_LR_SCALE``, images from 1/4 resolution.
- ``compact``, without CUDA (a laptop CPU): the same schedule fitted to 3,000 steps by :func:`compress_schedule`,
  except: images at full size (no resolution steps in the step time); splatfacto's rates for the means and scales
  and a zero-initialised deformation output (see the function); 3DGS-MCMC densification capped at 10,000
  Gaussians when the dataset has points, so the step time stops growing at the cap, and splatfacto's uncapped one
  from 10,000 random Gaussians (the cap's worth) when it has none (strategy "auto": MCMC collapses from a random
  start, see the field's docstring; D-NeRF jumpingjacks at 100 px, 800 steps, one core per run: 5,000 random
  Gaussians 25.12 dB on average over seeds 0-2 (24.82-25.35), 10,000 25.65 over seeds 0-3 (25.51-25.81)); a
  deformation MLP of 6 layers 112 wide instead of 8 x 256 (the MLP is about half of a CPU step: on the sample
  scene, 3,000 steps on one core each, 8 x 128 reached 25.41 dB in 908 CPU-s, 6 x 128 25.41 dB in 796 s, 6 x 112
  25.47 dB in 708 s, 6 x 96 25.03 dB in 645 s). The static warm-up (the first tenth) applies
  to random starts only: from a random start, a deformation trained from step 0 threw the Gaussians out of view
  and training stalled; from points it is not needed (8 x 128: 3,000 points with it 25.91 dB, 10,000 without
  25.41), and skipping it keeps every step at the same cost, so the ETA is right from the first steps.
  ``ns-4d-sample-scene`` writes 10,000 points, the cap: the Gaussian count is flat from step 0.
  Measured on the sample scene (128 px) on 2 CPU cores: see README.md ("Run the main job").

The dataset's sparse points (``dnerf-points-data`` reads the ones ``ns-4d-sample-scene`` writes) place the initial
Gaussians on the surfaces in both presets; without them the Gaussians start uniformly random in the scene box.
"""

from __future__ import annotations

from typing import Literal

import torch
from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanagerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.plugins.types import MethodSpecification

from ns_4d_methods.data.dnerf_points_dataparser import DNeRFPointsDataParserConfig
from ns_4d_methods.models.splatfacto_4d import Splatfacto4DModelConfig
from ns_4d_methods.pipelines.dynamic_pipeline import DynamicPipelineConfig
from ns_4d_methods.trainer import Trainer4DConfig

FULL_STEPS = 40000
"""Length of the full schedule and of the learning-rate decays (Deformable-3DGS: 40k, with splatfacto's phases:
densification 500-15k every 100, opacity reset every 3k; splatfacto: 30k)."""
SPATIAL_LR_SCALE = 5.0
"""Deformable-3DGS' ``spatial_lr_scale`` on D-NeRF coordinates (nerfstudio's D-NeRF parser does not rescale the scene):
the rates of the means, the scales and the deformation are its base rates times 5 (full preset)."""
COMPACT_STEPS = 3000
"""Length of the compact schedule."""
MIN_REFINE_EVERY = 25
"""Fewest steps between densifications: splatfacto averages screen-space gradients over that many views first."""
LR_RULE_EXEMPTIONS = {
    "deformation": "kept as the official Deformable-3DGS does it: the deformation's rate decays from step 0 over the "
    "whole run, so it starts after the static warm-up below its nominal 8e-4 (full: 4.3e-4 at step 3,000 of 30,000)",
}
"""Groups that break the suite's learning-rate rule on purpose (:mod:`ns_4d_methods.phase_start_schedule`)."""
PHASES = ("deformation_warmup", "warmup_length", "stop_split_at", "stop_screen_size_at", "resolution_schedule")
"""Model fields that are steps at which a phase of training starts or stops."""


def compress_schedule(config: Trainer4DConfig, steps: int) -> None:
    """Fits a splatfacto-4d run's schedule to ``steps`` in place, by ``r = steps / max_num_iterations``.

    The phase steps (``PHASES``), ``sh_degree_interval`` and the pause after opacity resets
    (``refine_pause_ratio``) are multiplied by ``r``; ``refine_every`` too, but never
    below ``MIN_REFINE_EVERY`` (with fewer views per densification every Gaussian of a random start splits at each
    one: 50k to 560k Gaussians by step 80 in a 200-step run). The learning rates keep their own schedules: a short
    run sees the start of the full decay, as a run stopped early would (with the deformation lr's 500x decay
    compressed into 200 steps the MLP barely moved the Gaussians: 21.7 dB against 21.9 with no deformation; measured
    at 50 px on D-NeRF jumpingjacks).
    """
    ratio = steps / config.max_num_iterations
    model = config.pipeline.model
    for name in (*PHASES, "sh_degree_interval"):
        setattr(model, name, max(1, round(getattr(model, name) * ratio)) if getattr(model, name) > 0 else 0)
    model.refine_every = max(MIN_REFINE_EVERY, round(model.refine_every * ratio))
    model.refine_pause_ratio *= ratio
    config.max_num_iterations = steps


def splatfacto_4d_config(preset: Literal["full", "compact"]) -> Trainer4DConfig:
    """splatfacto-4d's trainer configuration under ``preset`` (module docstring)."""
    config = Trainer4DConfig(
        method_name="splatfacto-4d",
        steps_per_eval_image=100,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=1000,
        max_num_iterations=FULL_STEPS,
        mixed_precision=False,
        pipeline=DynamicPipelineConfig(
            datamanager=FullImageDatamanagerConfig(dataparser=DNeRFPointsDataParserConfig(), cache_images_type="uint8"),
            # D-NeRF composites its images on white; without points the Gaussians start random in the scene box
            # [-1.5, 1.5]^3 (nerfstudio's normalised scale). For real captures use
            # --pipeline.model.background-color random.
            # Deformable-3DGS' network and densification on synthetic scenes (the model fields' docstrings): the time
            # network, default-initialised output, scale offsets after the exponential, 3DGS' pruning opacity
            # (splatfacto's 0.1; the opacity reset then sets 0.01, as 3DGS) and world sizes of the camera extent.
            # Measured with the 40k schedule against splatfacto's settings (README; jumpingjacks, 100 px, CPU): compact
            # 800 steps 25.59 -> 26.16 dB (seeds 0-1), 3,000 steps 30.25 -> 30.89 (seeds 0-1; after: 29.82-31.95,
            # about 6,900 -> 12,000 Gaussians); full 800 steps 24.37 -> 26.36 (seed 0). One change at a time turned back
            # (compact, 800 steps, seeds 0-1) moves the mean by +0.05 to +0.44 dB, within the seed spread: no single
            # change carries the gain; kept as the official settings.
            model=Splatfacto4DModelConfig(
                background_color="white",
                random_scale=3.0,
                time_network_width=256,
                deformation_zero_init=False,
                scale_offset="linear",
                densify_by_camera_extent=True,
                cull_alpha_thresh=0.005,
                cull_scale_thresh=0.1,
            ),
        ),
        # Deformable-3DGS' learning rates: 3DGS' (splatfacto's) with the means' and scales' times SPATIAL_LR_SCALE; the
        # deformation MLP's 8e-4 decaying to 1.6e-6. Their schedules span the full schedule in both presets (see
        # compress_schedule).
        optimizers={
            "means": {
                "optimizer": AdamOptimizerConfig(lr=1.6e-4 * SPATIAL_LR_SCALE, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6 * SPATIAL_LR_SCALE, max_steps=FULL_STEPS),
            },
            "features_dc": {"optimizer": AdamOptimizerConfig(lr=0.0025, eps=1e-15), "scheduler": None},
            "features_rest": {"optimizer": AdamOptimizerConfig(lr=0.0025 / 20, eps=1e-15), "scheduler": None},
            "opacities": {"optimizer": AdamOptimizerConfig(lr=0.05, eps=1e-15), "scheduler": None},
            "scales": {"optimizer": AdamOptimizerConfig(lr=0.005 * SPATIAL_LR_SCALE, eps=1e-15), "scheduler": None},
            "quats": {"optimizer": AdamOptimizerConfig(lr=0.001, eps=1e-15), "scheduler": None},
            "deformation": {
                "optimizer": AdamOptimizerConfig(lr=8e-4, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=FULL_STEPS),
            },
            "camera_opt": {
                "optimizer": AdamOptimizerConfig(lr=1e-4, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(
                    lr_final=5e-7, max_steps=FULL_STEPS, warmup_steps=1000, lr_pre_warmup=0
                ),
            },
            "bilateral_grid": {
                "optimizer": AdamOptimizerConfig(lr=2e-3, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(
                    lr_final=1e-4, max_steps=FULL_STEPS, warmup_steps=1000, lr_pre_warmup=0
                ),
            },
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )
    if preset == "compact":
        compress_schedule(config, COMPACT_STEPS)
        model = config.pipeline.model
        model.num_downscales = 0
        model.num_random = 10000
        model.strategy = "auto"
        model.max_gs_num = 10000
        model.deformation_num_layers = 6
        model.deformation_layer_width = 112
        model.deformation_warmup_with_points = False
        # without a warm-up from points, a default-initialised output layer would move them from step 0
        model.deformation_zero_init = True
        # splatfacto's rates for the means and scales: x5 was not better on this preset (D-NeRF jumpingjacks, 100 px,
        # 3,000 steps, one seed each: 31.20 dB, means x5 30.86, means and scales x5 30.63)
        optimizers = config.optimizers
        optimizers["means"]["optimizer"].lr = 1.6e-4
        optimizers["means"]["scheduler"].lr_final = 1.6e-6
        optimizers["scales"]["optimizer"].lr = 0.005
    return config


splatfacto_4d = MethodSpecification(
    config=splatfacto_4d_config("full" if torch.cuda.is_available() else "compact"),
    description="Deformable 3D Gaussians: splatfacto's canonical Gaussians moved over time by a deformation MLP "
    "(Deformable-3DGS). gsplat on CUDA, a PyTorch rasterizer with compiled compositing elsewhere; a 3,000-step "
    "compact preset without CUDA.",
)
