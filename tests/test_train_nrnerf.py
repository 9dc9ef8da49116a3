"""Both 4D reconstructions on a real handheld dynamic video with real camera poses, read through ``ns4d-data``.

The NR-NeRF example sequence (86 frames, 512x384, a hand moving in front of a bookshelf) is trained at 128x96 for a
few dozen steps; the held-out frames' PSNR must rise.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from method_configs.nerfacto_4d import nerfacto_4d
from method_configs.splatfacto_4d import splatfacto_4d
from ns_4d_methods.data.ns4d_dataparser import Ns4dDataParserConfig

SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nrnerf_example_sequence"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SCENE.is_dir(), reason=f"needs {SCENE}")]


def base_config(spec, tmp_path: Path, steps: int):
    config = copy.deepcopy(spec.config)
    config.output_dir = tmp_path
    config.vis = "tensorboard"
    config.machine.device_type = "cpu"
    config.max_num_iterations = steps
    config.steps_per_save = 1000
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 1000
    config.pipeline.datamanager.dataparser = Ns4dDataParserConfig(
        data=SCENE / "transforms_nerfstudio_derived.json", eval_mode="interval", eval_interval=12
    )
    config.pipeline.datamanager.camera_res_scale_factor = 0.25  # 512x384 -> 128x96
    return config


def train_and_measure(config) -> tuple:
    config.set_timestamp()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup(test_mode="test")
    pipeline = trainer.pipeline
    assert pipeline.datamanager.includes_time
    before = pipeline.get_average_eval_image_metrics()["psnr"]
    trainer.train()
    after = pipeline.get_average_eval_image_metrics()["psnr"]
    return before, after


def test_nerfacto_4d_on_real_video_with_poses(tmp_path):
    torch.manual_seed(0)
    config = base_config(nerfacto_4d, tmp_path, 80)
    config.pipeline.datamanager.train_num_rays_per_batch = config.pipeline.datamanager.eval_num_rays_per_batch = 1024
    model = config.pipeline.model
    # A real, unbounded capture: contraction on, background learned, near plane close to the camera.
    model.disable_scene_contraction = False
    model.background_color = "last_sample"
    model.near_plane, model.far_plane = 0.05, 1000.0
    model.num_levels, model.log2_hashmap_size, model.max_res = 8, 14, 256
    model.log2_hashmap_size_4d, model.max_res_4d = 14, 256
    model.proposal_net_args_list = [
        {"hidden_dim": 16, "log2_hashmap_size": 14, "num_levels": 5, "max_res": 64, "use_linear": False},
        {"hidden_dim": 16, "log2_hashmap_size": 14, "num_levels": 5, "max_res": 128, "use_linear": False},
    ]
    model.num_proposal_samples_per_ray = (64, 32)
    model.num_nerf_samples_per_ray = 24
    before, after = train_and_measure(config)
    print(f"nerfacto-4d on NR-NeRF: held-out PSNR {before:.2f} -> {after:.2f} dB")
    assert after > before + 1.0


def test_splatfacto_4d_on_real_video_with_poses(tmp_path):
    torch.manual_seed(0)
    config = base_config(splatfacto_4d, tmp_path, 80)
    model = config.pipeline.model
    model.num_random = 4000
    model.num_downscales = 0
    model.deformation_num_layers, model.deformation_layer_width = 4, 64
    model.deformation_warmup = 30
    before, after = train_and_measure(config)
    print(f"splatfacto-4d on NR-NeRF: held-out PSNR {before:.2f} -> {after:.2f} dB")
    assert after > before + 1.0
