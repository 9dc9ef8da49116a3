"""The ``instruct4d`` method: Instruct 4D-to-4D editing of a nerfacto-4d reconstruction (``--load-dir``) by a prompt."""

from __future__ import annotations

import copy

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.plugins.types import MethodSpecification

from method_configs.nerfacto_4d import nerfacto_4d
from ns_4d_methods.data.edited_dataset import EditedFrameDataset
from ns_4d_methods.data.ns4d_dataparser import Ns4dDataParserConfig
from ns_4d_methods.pipelines.instruct4d_pipeline import Instruct4DPipelineConfig
from ns_4d_methods.trainer import Trainer4DConfig

# The edited scene is the reconstruction itself: same model settings (so its checkpoint loads), plus the official
# NeRFPlayer-nerfacto's LPIPS term (weight 1 on 32x32 patches; its AlexNet stays out of checkpoints, so they still fit).
_reconstruction = nerfacto_4d.config
_model = copy.deepcopy(_reconstruction.pipeline.model)
_model.lpips_loss_weight = 1.0
_model.lpips_patch_size = 32

# The official edit trains fields and proposal networks at a constant 1e-2 (Adam, no scheduler). nerfacto-4d's
# schedule (1e-2 -> 1e-4 over 200k steps), continued from the reconstruction's last step, would train the edit at
# 5.0e-3 -> 3.2e-3 after a 30k-step reconstruction. A decay from 1e-2 to 1e-2 is that constant rate with a scheduler
# object, so the reconstruction's scheduler state still loads (the first step runs at the loaded optimizer's rate,
# the scheduler sets 1e-2 after it); the camera optimiser keeps the reconstruction's.
_optimizers = copy.deepcopy(_reconstruction.optimizers)
for _group in ("proposal_networks", "fields"):
    _optimizers[_group] = {
        "optimizer": AdamOptimizerConfig(lr=1e-2, eps=1e-15),
        "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-2, max_steps=200000),
    }

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
                # the official NeRFPlayer-nerfacto's batch, 16,384 rays, here as 16 patches of 32x32 pixels for the
                # LPIPS term. The official model reshapes its batch into 32x32 "patches" but its datamanager keeps
                # nerfstudio's patch_size 1, so its LPIPS sees blocks of scattered pixels; here they are image patches
                # (nerfstudio's PatchPixelSampler, as Instruct-NeRF2NeRF samples them). Frames must be >= 32 px.
                train_num_rays_per_batch=16384,
                patch_size=32,
                eval_num_rays_per_batch=4096,
                # a bounded subset of (edited) images in memory, resampled often enough to see every frame
                train_num_images_to_sample_from=50,
                train_num_times_to_repeat_images=250,
            ),
            model=_model,
        ),
        optimizers=_optimizers,
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
