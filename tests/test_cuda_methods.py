"""``ns-train`` of the diffusion-guided methods for a few steps on CUDA, each with its prior in the precision CUDA
selects ("auto": float16 for InstructPix2Pix, Stable Diffusion and the 4DM; LTX-Video's own), built from the tiny
models and arguments of the method's own tests (splatfacto-4d and nerfacto-4d train on CUDA in their test files)."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_four_diffusion_method as four_diffusion
import test_four_real_method as four_real
import test_instruct4d as instruct4d
import test_unified_edit_method as unified_edit
# fixtures (pytest finds them by name): the tiny 4DM and CLIP, the object video, 4Real's videos and tiny models
from test_four_diffusion_method import models, scene  # noqa: F401
from test_four_real_method import inputs  # noqa: F401
from tiny_4dm import write_random_backbone
from tiny_models import build_tiny_clip, build_tiny_ip2p_pipeline, build_tiny_sd_pipeline

from ns_4d_methods.models.image_metrics import ALEXNET

CUDA = ("--machine.device-type", "cuda")
pytestmark = pytest.mark.cuda


def _checkpoint_written(run: Path) -> bool:
    return bool(list((run / "nerfstudio_models").glob("step-*.ckpt")))


@instruct4d.needs_scene
def test_instruct4d_on_cuda(tmp_path, torch_home):
    build_tiny_ip2p_pipeline(tmp_path / "ip2p")
    write_random_backbone(ALEXNET, features_only=True)  # the LPIPS loss's AlexNet, in the offline torch hub cache
    out = tmp_path / "out"
    recon = instruct4d.train("nerfacto-4d", out, "recon", 4, *instruct4d.dnerf_args(), *CUDA)
    assert recon.returncode == 0, recon.stderr[-3000:]
    load_dir = out / "exp" / "nerfacto-4d" / "recon" / "nerfstudio_models"
    edit_args = instruct4d.edit_args(tmp_path / "ip2p", load_dir, "--pipeline.steps-per-edit-unit", "2")
    result = instruct4d.train("instruct4d", out, "edit", 4, *instruct4d.dnerf_args(), *edit_args, *CUDA)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _checkpoint_written(out / "exp" / "instruct4d" / "edit")


@unified_edit.needs_data
def test_unified_edit_on_cuda(tmp_path):
    build_tiny_sd_pipeline(tmp_path / "sd")
    build_tiny_clip(tmp_path / "clip")
    sd_models = {"sd": str(tmp_path / "sd"), "clip": str(tmp_path / "clip")}
    args = unified_edit.train_args("unified-edit", tmp_path, "cuda", 4, sd_models, *CUDA, *unified_edit.DNERF)
    result = unified_edit.run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _checkpoint_written(unified_edit.run_dir(tmp_path, "cuda"))


def test_4diffusion_on_cuda(tmp_path, scene, models):  # noqa: F811
    result = four_diffusion.train(tmp_path / "out", "cuda", 3, models, *CUDA, "--data", str(scene / "frames"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert _checkpoint_written(tmp_path / "out" / "exp" / "4diffusion" / "cuda")


def test_4real_on_cuda(inputs):  # noqa: F811
    result = four_real.run(four_real.train_args(inputs, "cuda", 4, *four_real.user_video_args(inputs), *CUDA))
    assert result.returncode == 0, result.stderr[-3000:]
    assert _checkpoint_written(four_real.run_dir(inputs, "cuda"))
