"""The ``instruct4d`` method: Instruct 4D-to-4D editing of a nerfacto-4d reconstruction (``--load-dir``) by a prompt."""

from __future__ import annotations

import copy

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.plugins.types import MethodSpecification

from method_configs.nerfacto_4d import nerfacto_4d
from ns_4d_methods.data.edited_dataset import EditedFrameDataset
from ns_4d_methods.data.ns4d_dataparser import Ns4dDataParserConfig
from ns_4d_methods.pipelines.instruct4d_pipeline import Instruct4DPipelineConfig
from ns_4d_methods.trainer import Trainer4DConfig

# The edited scene is the reconstruction itself: same model settings (so its checkpoint loads) and optimizers (so
# their state resumes).
_reconstruction = nerfacto_4d.config

instruct4d = MethodSpecification(
    config=Trainer4DConfig(
        method_name="instruct4d",
        steps_per_eval_batch=500,
        steps_per_save=1000,
        # counted from the reconstruction's last step; the official code trains 20k (monocular) / 15k (multi-camera)
        max_num_iterations=20000,
        mixed_precision=True,
        pipeline=Instruct4DPipelineConfig(
            datamanager=VanillaDataManagerConfig(
                _target=VanillaDataManager[EditedFrameDataset],
                # a monocular video: one moving camera, frames in capture order, so that flow between consecutive
                # frames follows the scene (D-NeRF's camera jumps between frames: dnerf-data stays available).
                # Every frame is edited and trained on, as in the official code.
                dataparser=Ns4dDataParserConfig(eval_mode="all"),
                # the official NeRFPlayer-nerfacto's batch; its LPIPS term (weight 1) needs patch sampling, which
                # nerfacto-4d's ray sampler does not do, and its constant lr 1e-2 is the optimizers' business (kept
                # as the reconstruction's, so that their state resumes)
                train_num_rays_per_batch=16384,
                eval_num_rays_per_batch=4096,
                # a bounded subset of (edited) images in memory, resampled often enough to see every frame
                train_num_images_to_sample_from=50,
                train_num_times_to_repeat_images=250,
            ),
            model=copy.deepcopy(_reconstruction.pipeline.model),
        ),
        optimizers=copy.deepcopy(_reconstruction.optimizers),
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    ),
    description=(
        "Instruct 4D-to-4D: edit a nerfacto-4d reconstruction (--load-dir RUN/nerfstudio_models) by an instruction "
        "(--pipeline.prompt). Key views edited by anchor-aware InstructPix2Pix, projected to other cameras through "
        "depth (n3dv-data), propagated in time by flow-guided sliding windows, refreshed from renders while training. "
        "Use the reconstruction's data and model flags."
    ),
)
