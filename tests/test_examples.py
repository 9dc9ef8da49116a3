"""Every script in examples/ runs in its tiny CPU mode: tiny random models (saved and loaded through the package's
loading code), 32 px data, a few steps; each ends with a video and an export."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from four_real_scene import camera_pose, freeze_time_video, reference_video
from PIL import Image
from test_four_diffusion_method import TINY as TINY_4DIFFUSION
from test_four_real_method import write_mp4
from tiny_4dm import build_tiny_4dm, write_random_backbone
from tiny_models import (
    TINY_NERFACTO_4D, build_tiny_clip, build_tiny_ip2p_pipeline, build_tiny_sd_pipeline, build_tiny_xclip,
)
from tiny_video_models import build_tiny_ltx_pipeline

from ns_4d_methods.models.image_metrics import ALEXNET

pytestmark = pytest.mark.slow
# Each example runs three to five ns-* commands (about 40 s of start-up each on 2 cores): together far more than the
# suite's CI budget, so the runs are opt-in; the camera path below is always checked.
run_examples = pytest.mark.skipif(
    os.environ.get("NS4D_RUN_EXAMPLES") != "1", reason="example runs take minutes each: set NS4D_RUN_EXAMPLES=1"
)
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
QUIET = ["--steps-per-eval-batch", "1000", "--steps-per-eval-image", "1000", "--steps-per-eval-all-images", "100000",
         "--steps-per-save", "1000", "--machine.device-type", "cpu"]
SPLATS = ["--pipeline.model.deformation-warmup", "0", *QUIET]


def example(name: str, workdir: Path, *args: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--workdir", str(workdir), *args],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (workdir / "video.mp4").stat().st_size > 1000


def joined(args) -> str:
    return shlex.join(args)


def test_camera_path_has_a_render_time_per_keyframe():
    path = json.loads((EXAMPLES / "camera_path.json").read_text())
    times = [keyframe["render_time"] for keyframe in path["camera_path"]]
    assert times[0] == 0.0 and times[-1] == 1.0 and np.all(np.diff(times) > 0)
    assert all(len(keyframe["camera_to_world"]) == 16 for keyframe in path["camera_path"])


@run_examples
def test_splatfacto_4d(tmp_path):
    # a 5-step run keeps 10,000 faint (opacity 0.1) overlapping Gaussians, where the splatv copies' opacity ripple
    # shows: 32.5 dB at worst against the MLP renders measured, under the default --min-psnr 35
    example("splatfacto_4d", tmp_path, "--resolution", "32", "--steps", "5", "--train-args", joined(SPLATS),
            "--export-args", "--min-psnr 30")
    assert json.loads((tmp_path / "gaussians" / "index.json").read_text())["num_frames"] == 5
    assert (tmp_path / "splatv" / "scene.splatv").stat().st_size > 1000


@run_examples
def test_nerfacto_4d(tmp_path):
    example("nerfacto_4d", tmp_path, "--resolution", "32", "--steps", "5",
            "--train-args", joined([*TINY_NERFACTO_4D, *QUIET]),
            "--export-args", "--resolution 16 --threshold-quantile 0.5")
    assert len(json.loads((tmp_path / "meshes" / "index.json").read_text())["frames"]) == 3


@run_examples
def test_instruct4d(tmp_path, torch_home):
    build_tiny_ip2p_pipeline(tmp_path / "ip2p")
    write_random_backbone(ALEXNET, features_only=True)  # the LPIPS loss's AlexNet, in the offline torch hub cache
    edits = ["--pipeline.full-edit-steps", "2", "--pipeline.refine-steps", "2", "--pipeline.refine-strength", "0.5",
             "--pipeline.max-edit-resolution", "32", "--pipeline.datamanager.train-num-images-to-sample-from", "10",
             "--pipeline.datamanager.train-num-rays-per-batch", "1024"]  # one 32x32 patch
    example("instruct4d", tmp_path / "run", "--resolution", "32", "--recon-steps", "4", "--steps", "3",
            "--ip2p-model", str(tmp_path / "ip2p"), "--recon-args", joined([*TINY_NERFACTO_4D, *QUIET]),
            "--train-args", joined([*TINY_NERFACTO_4D, *QUIET, *edits]),
            "--export-args", "--resolution 16 --threshold-quantile 0.5")
    assert (tmp_path / "run" / "meshes" / "index.json").is_file()


@run_examples
def test_unified_edit(tmp_path):
    build_tiny_sd_pipeline(tmp_path / "sd")
    build_tiny_clip(tmp_path / "clip")
    edit = ["--pipeline.editor.num-inference-steps", "2", "--pipeline.editor.batch-size", "64",
            "--pipeline.max-edit-resolution", "32"]
    example("unified_edit", tmp_path / "run", "--resolution", "32", "--steps", "3", "--sd-model",
            str(tmp_path / "sd"), "--clip-model", str(tmp_path / "clip"), "--train-args", joined([*SPLATS, *edit]))
    assert json.loads((tmp_path / "run" / "gaussians" / "index.json").read_text())["num_frames"] == 5


@run_examples
def test_four_diffusion(tmp_path):
    build_tiny_clip(tmp_path / "clip")
    prior = build_tiny_4dm(tmp_path / "models")
    example("four_diffusion", tmp_path / "run", "--resolution", "32", "--steps", "3", "--prior-model", str(prior),
            "--clip-model", str(tmp_path / "clip"), "--train-args", joined([*TINY_4DIFFUSION, *QUIET]),
            "--export-args", "--resolution 16 --threshold-quantile 0.5")
    assert (tmp_path / "run" / "meshes" / "index.json").is_file()


@run_examples
def test_four_real(tmp_path):
    size, frames, canonical = 96, 17, 8  # structure from motion needs about 96 px (test_four_real_method)
    (tmp_path / "freeze").mkdir()
    write_mp4(reference_video(camera_pose(20.0, 25.0), frames, size, ground=True), tmp_path / "reference.mp4")
    images, _ = freeze_time_video(20.0 + np.linspace(-45.0, 45.0, frames), 25.0, 0.0, size, ground=True)
    for index, frame in enumerate(images):
        Image.fromarray(frame).save(tmp_path / "freeze" / f"{index:05d}.png")
    build_tiny_ltx_pipeline(tmp_path / "ltx")
    build_tiny_xclip(tmp_path / "xclip")
    train = ["--pipeline.height", str(size), "--pipeline.width", str(size), "--pipeline.datamanager.resolutions",
             str(size), "--pipeline.canonical-steps", "2", "--pipeline.temporal-steps", "2", "--pipeline.sds-steps",
             "1", *QUIET]
    example("four_real", tmp_path / "run", "--steps", "4", "--video-model", str(tmp_path / "ltx"), "--xclip-model",
            str(tmp_path / "xclip"), "--reference-video", str(tmp_path / "reference.mp4"), "--freeze-time-video",
            str(tmp_path / "freeze"), "--canonical-index", str(canonical), "--train-args", joined(train),
            "--export-args", "--min-psnr 20")
    assert (tmp_path / "run" / "splatv" / "scene.splatv").is_file()
