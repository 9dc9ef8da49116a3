"""``ns-train 4real --pipeline.prompt "..."``: 4Real, text to a 4D scene through video diffusion (five stages in one
run, see :mod:`ns_4d_methods.pipelines.four_real_pipeline`): reference video, freeze-time video, cameras by structure
from motion, then 20k steps of canonical Gaussians (freeze-time frames; multi-view video SDS in the last 5k) and 20k
of temporal deformation (reference and freeze-time frames; temporal video SDS from registered freeze-time cameras
other than the reference, and multi-view video SDS along the freeze-time arc, in the last 5k).

Learning rates follow the suite's rule (:mod:`ns_4d_methods.phase_start_schedule`): a group's schedule starts with the
stage it trains in, so the temporal deformation starts stage 5 at its nominal 8e-4 (one schedule over all 40k steps
from step 0 would have given it 3.6e-5). ``ns-train`` refits those schedules to --pipeline.canonical-steps and
--pipeline.temporal-steps."""

from __future__ import annotations

from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.plugins.types import MethodSpecification

from ns_4d_methods.models.four_real import FourRealModelConfig
from ns_4d_methods.phase_start_schedule import PhaseStartSchedulerConfig
from ns_4d_methods.pipelines.four_real_pipeline import FourRealPipelineConfig, FourRealTrainerConfig

_CANONICAL, _TEMPORAL, _SDS = 20000, 20000, 5000
_STEPS = _CANONICAL + _TEMPORAL


def _decaying(lr: float, lr_final: float, **kwargs) -> dict:
    return {
        "optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15),
        "scheduler": ExponentialDecaySchedulerConfig(lr_final=lr_final, max_steps=_STEPS, **kwargs),
    }


def _stage(lr: float, lr_final: float, start: int, steps: int) -> dict:
    """A decay that starts with its stage (the suite's rule, :mod:`ns_4d_methods.phase_start_schedule`); ns-train
    refits start and length to --pipeline.canonical-steps / --pipeline.temporal-steps
    (``FourRealPipelineConfig.param_group_phases``)."""
    return {
        "optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15),
        "scheduler": PhaseStartSchedulerConfig(lr_final=lr_final, start_step=start, max_steps=steps),
    }


def _constant(lr: float) -> dict:
    return {"optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": None}


four_real = MethodSpecification(
    config=FourRealTrainerConfig(
        method_name="4real",
        steps_per_eval_image=500,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=5000,
        max_num_iterations=_STEPS,
        mixed_precision=False,
        pipeline=FourRealPipelineConfig(
            canonical_steps=_CANONICAL,
            temporal_steps=_TEMPORAL,
            sds_steps=_SDS,
            # 4Real densifies with opacity threshold 5e-3 and (plain, not absolute) gradient threshold 2e-4, during
            # the canonical stage until its video SDS starts; the freeze-time cameras are refined (SO3 x R3)
            model=FourRealModelConfig(
                cull_alpha_thresh=0.005,
                densify_grad_thresh=0.0002,
                use_absgrad=False,
                stop_split_at=_CANONICAL - _SDS,
                time_frequencies=10,
                camera_optimizer=CameraOptimizerConfig(mode="SO3xR3"),
            ),
        ),
        # splatfacto's learning rates; the deformation networks' are Deformable-3DGS' (8e-4 decaying to 1.6e-6),
        # each over its own stage: the per-frame deformation over stage 4 (it keeps its final rate for the
        # freeze-time frames of stage 5), the temporal deformation over stage 5 from its first step. The canonical
        # means decay over the whole run, as Deformable-3DGS' positions over its 40k steps.
        optimizers={
            "means": _stage(1.6e-4, 1.6e-6, 0, _STEPS),
            "features_dc": _constant(0.0025),
            "features_rest": _constant(0.0025 / 20),
            "opacities": _constant(0.05),
            "scales": _constant(0.005),
            "quats": _constant(0.001),
            "deformation": _stage(8e-4, 1.6e-6, _CANONICAL, _TEMPORAL),
            "per_frame_deformation": _stage(8e-4, 1.6e-6, 0, _CANONICAL),
            "camera_opt": _decaying(1e-4, 5e-7, warmup_steps=1000, lr_pre_warmup=0),
            "bilateral_grid": _decaying(2e-3, 1e-4, warmup_steps=1000, lr_pre_warmup=0),
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    ),
    description="4Real: text to a photorealistic 4D scene. A reference video and a freeze-time video from a video "
    "diffusion model (or your own), cameras by structure from motion, canonical deformable Gaussians with per-frame "
    "deformation, then a temporal deformation, each stage ending with video score distillation (temporal paths from "
    "freeze-time cameras other than the reference one).",
)
