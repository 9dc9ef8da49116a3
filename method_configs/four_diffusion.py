"""The ``4diffusion`` method: a monocular object video to a 4D object (4D-aware SDS from 4DM + the anchor loss).

``ns-train 4diffusion --data bird.mp4 --pipeline.prompt "a blue jay" --pipeline.prior-model 4dm`` with the official
settings: 35k steps, AdamW (lr 1e-2 for the hash grids and the proposal networks, 1e-3 for the MLPs, betas (0.9,
0.99)), the 64 -> 192 -> 256 px resolution schedule, mixed precision.
"""

from __future__ import annotations

from nerfstudio.configs.base_config import LoggingConfig, ViewerConfig
from nerfstudio.plugins.types import MethodSpecification

from ns_4d_methods.pipelines.four_diffusion_pipeline import FourDiffusionPipelineConfig
from ns_4d_methods.trainer import AdamWOptimizerConfig, Trainer4DConfig


def _adamw(lr: float) -> dict:
    return {"optimizer": AdamWOptimizerConfig(lr=lr, eps=1e-15, betas=(0.9, 0.99)), "scheduler": None}


four_diffusion = MethodSpecification(
    config=Trainer4DConfig(
        method_name="4diffusion",
        max_num_iterations=35000,
        steps_per_save=2000,
        steps_per_eval_batch=500,
        steps_per_eval_image=1000,
        steps_per_eval_all_images=1_000_000,  # scored once at the end (metrics.json)
        mixed_precision=True,
        pipeline=FourDiffusionPipelineConfig(),
        optimizers={"grids": _adamw(1e-2), "mlps": _adamw(1e-3), "proposal_networks": _adamw(1e-2)},
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        logging=LoggingConfig(steps_per_log=10),
        vis="viewer",
    ),
    description=(
        "4Diffusion: a monocular object video (RGBA, or RGB with --pipeline.datamanager.video.masks; one image with "
        "--pipeline.datamanager.video.image-to-video) to a dynamic NeRF, by 4D-aware SDS from the 4DM multi-view "
        "video diffusion prior and an anchor loss on a 4DM anchor video. Needs --pipeline.prompt and "
        "--pipeline.prior-model (a directory from ns-4d-convert 4dm)."
    ),
)
