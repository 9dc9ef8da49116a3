"""The ``nerfacto-4d`` method: nerfacto's training setup with the 3D+4D hash-grid model, defaults for D-NeRF scenes."""

from __future__ import annotations

from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
from nerfstudio.data.dataparsers.dnerf_dataparser import DNeRFDataParserConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.plugins.types import MethodSpecification

from ns_4d_methods.models.nerfacto_4d import Nerfacto4DModelConfig
from ns_4d_methods.pipelines.dynamic_pipeline import DynamicPipelineConfig
from ns_4d_methods.trainer import Trainer4DConfig

nerfacto_4d = MethodSpecification(
    config=Trainer4DConfig(
        method_name="nerfacto-4d",
        steps_per_eval_batch=500,
        steps_per_save=2000,
        max_num_iterations=30000,
        mixed_precision=True,
        pipeline=DynamicPipelineConfig(
            datamanager=VanillaDataManagerConfig(
                dataparser=DNeRFDataParserConfig(),
                train_num_rays_per_batch=4096,
                eval_num_rays_per_batch=4096,
            ),
            # D-NeRF scenes are bounded objects inside [-1.5, 1.5]^3 seen from about 4 units away, rendered on white
            # with exact poses and constant lighting: no contraction, near/far around the box, uniform initial
            # samples, white background, no pose refinement and no per-image appearance code (with one image per
            # instant it would soak up motion).
            model=Nerfacto4DModelConfig(
                eval_num_rays_per_chunk=1 << 15,
                average_init_density=0.01,
                background_color="white",
                disable_scene_contraction=True,
                near_plane=2.0,
                far_plane=6.0,
                proposal_initial_sampler="uniform",
                use_appearance_embedding=False,
                camera_optimizer=CameraOptimizerConfig(mode="off"),
            ),
        ),
        optimizers={
            "proposal_networks": {
                "optimizer": AdamOptimizerConfig(lr=1e-2, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=0.0001, max_steps=200000),
            },
            "fields": {
                "optimizer": AdamOptimizerConfig(lr=1e-2, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=0.0001, max_steps=200000),
            },
            # used when --pipeline.model.camera-optimizer.mode turns pose refinement on for real captures
            "camera_opt": {
                "optimizer": AdamOptimizerConfig(lr=1e-3, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=5000),
            },
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    ),
    description=(
        "Dynamic nerfacto: a 3D hash grid on (x, y, z) summed with a 4D hash grid on (x, y, z, t), time-aware "
        "proposal sampling. Defaults suit bounded D-NeRF scenes (dnerf-data); for real captures (dycheck-data, "
        "ns4d-data) set --pipeline.model.disable-scene-contraction False --pipeline.model.background-color "
        "last_sample --pipeline.model.near-plane 0.05 --pipeline.model.far-plane 1000 "
        "--pipeline.model.proposal-initial-sampler piecewise."
    ),
)
