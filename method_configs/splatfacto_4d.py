"""``ns-train splatfacto-4d``: deformable 3D Gaussians on a time-aware dataset (D-NeRF by default)."""

from __future__ import annotations

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanagerConfig
from nerfstudio.data.dataparsers.dnerf_dataparser import DNeRFDataParserConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.plugins.types import MethodSpecification

from ns_4d_methods.models.splatfacto_4d import Splatfacto4DModelConfig
from ns_4d_methods.pipelines.dynamic_pipeline import DynamicPipelineConfig
from ns_4d_methods.trainer import Trainer4DConfig

_STEPS = 30000

splatfacto_4d = MethodSpecification(
    config=Trainer4DConfig(
        method_name="splatfacto-4d",
        steps_per_eval_image=100,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=1000,
        max_num_iterations=_STEPS,
        mixed_precision=False,
        pipeline=DynamicPipelineConfig(
            datamanager=FullImageDatamanagerConfig(dataparser=DNeRFDataParserConfig(), cache_images_type="uint8"),
            # D-NeRF has no point cloud and composites its images on white: random Gaussians in the scene box
            # [-1.5, 1.5]^3 (nerfstudio's normalised scale) and a white background. For real captures use
            # --pipeline.model.background-color random.
            model=Splatfacto4DModelConfig(background_color="white", random_scale=3.0),
        ),
        # splatfacto's learning rates; the deformation MLP's is Deformable-3DGS' (8e-4 decaying to 1.6e-6).
        optimizers={
            "means": {
                "optimizer": AdamOptimizerConfig(lr=1.6e-4, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=_STEPS),
            },
            "features_dc": {"optimizer": AdamOptimizerConfig(lr=0.0025, eps=1e-15), "scheduler": None},
            "features_rest": {"optimizer": AdamOptimizerConfig(lr=0.0025 / 20, eps=1e-15), "scheduler": None},
            "opacities": {"optimizer": AdamOptimizerConfig(lr=0.05, eps=1e-15), "scheduler": None},
            "scales": {"optimizer": AdamOptimizerConfig(lr=0.005, eps=1e-15), "scheduler": None},
            "quats": {"optimizer": AdamOptimizerConfig(lr=0.001, eps=1e-15), "scheduler": None},
            "deformation": {
                "optimizer": AdamOptimizerConfig(lr=8e-4, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=_STEPS),
            },
            "camera_opt": {
                "optimizer": AdamOptimizerConfig(lr=1e-4, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(
                    lr_final=5e-7, max_steps=_STEPS, warmup_steps=1000, lr_pre_warmup=0
                ),
            },
            "bilateral_grid": {
                "optimizer": AdamOptimizerConfig(lr=2e-3, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(
                    lr_final=1e-4, max_steps=_STEPS, warmup_steps=1000, lr_pre_warmup=0
                ),
            },
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    ),
    description="Deformable 3D Gaussians: splatfacto's canonical Gaussians moved over time by a deformation MLP "
    "(Deformable-3DGS). gsplat on CUDA, a pure-PyTorch rasterizer elsewhere.",
)
