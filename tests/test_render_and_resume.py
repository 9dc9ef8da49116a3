"""ns-train -> checkpoint -> resume and ns-render for the 4D reconstructions, through the real command lines.

One short splatfacto-4d run on the package's own sample scene serves every test here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def run(args, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # finds the venv's ffmpeg
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, **kwargs)


def train_args(scene: Path, out: Path, iters: int, *extra: str):
    return [
        sys.executable, "-m", "nerfstudio.scripts.train", "splatfacto-4d", "--vis", "tensorboard",
        "--output-dir", str(out), "--experiment-name", "exp", "--timestamp", "run",
        "--max-num-iterations", str(iters), "--steps-per-save", "20",
        "--pipeline.model.num-random", "2000", "--pipeline.model.deformation-warmup", "0",
        # Without the static warm-up, the default deformation learning rate overshoots in a 60-step run.
        "--optimizers.deformation.optimizer.lr", "5e-5", *extra,
        "--data", str(scene),
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("render")
    scene = root / "scene"
    run([sys.executable, "-m", "ns_4d_methods.cli.sample_scene", str(scene), "--resolution", "64",
         "--num-train", "30", "--num-val", "3", "--num-test", "5"], check=True)
    result = run(train_args(scene, root / "out", 60))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = root / "out" / "exp" / "splatfacto-4d" / "run"
    return scene, run_dir


def test_resume_continues_from_the_checkpoint(trained, tmp_path):
    scene, run_dir = trained
    checkpoints = sorted((run_dir / "nerfstudio_models").glob("step-*.ckpt"))
    assert checkpoints, "no checkpoint written"
    last = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)
    assert last["step"] == 59
    result = run(train_args(scene, tmp_path / "out", 80, "--load-dir", str(run_dir / "nerfstudio_models")))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = sorted((tmp_path / "out" / "exp" / "splatfacto-4d" / "run" / "nerfstudio_models").glob("step-*.ckpt"))
    steps = [int(p.stem.split("-")[1]) for p in resumed]
    # --max-num-iterations is the run's total: resumed at 60, it ends at 79, as a fresh 80-step run would (nerfstudio
    # would run 80 more, to 139).
    assert steps == [79], steps


@pytest.mark.parametrize("bad", ["missing", "empty"])
def test_load_dir_without_checkpoint_is_a_one_line_error(trained, tmp_path, bad):
    scene, _ = trained
    load_dir = tmp_path / "ckpts"
    if bad == "empty":
        load_dir.mkdir()
    result = run(train_args(scene, tmp_path / "out", 5, "--load-dir", str(load_dir)))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --load-dir") and str(load_dir) in last


def frames_of(path: Path):
    return [np.asarray(Image.open(p).convert("RGB")).astype(np.float32) for p in sorted(path.glob("*.png"))]


def test_camera_path_with_fixed_camera_renders_time_moving(trained, tmp_path):
    """The camera stands still; only render_time changes, so frames differ only if time reaches the model."""
    scene, run_dir = trained
    meta = json.loads((scene / "transforms_test.json").read_text())
    # The path is in nerfstudio world coordinates: apply the dataparser's transform and scale to a test camera.
    transforms = json.loads((run_dir / "dataparser_transforms.json").read_text())
    c2w = np.array(meta["frames"][0]["transform_matrix"])
    c2w = np.concatenate([np.array(transforms["transform"]) @ c2w, [[0, 0, 0, 1]]])
    c2w[:3, 3] *= transforms["scale"]
    times = [0.0, 0.25, 0.5, 0.75, 1.0]
    path = {
        "render_height": 64, "render_width": 64, "seconds": 1.0, "fps": len(times),
        "camera_path": [{"camera_to_world": c2w.reshape(-1).tolist(), "fov": 39.6, "aspect": 1.0, "render_time": t}
                        for t in times],
    }
    (tmp_path / "path.json").write_text(json.dumps(path))
    out = tmp_path / "frames"
    result = run([sys.executable, "-m", "nerfstudio.scripts.render", "camera-path",
                  "--load-config", str(run_dir / "config.yml"), "--camera-path-filename", str(tmp_path / "path.json"),
                  "--output-format", "images", "--image-format", "png", "--output-path", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    frames = frames_of(out)
    assert len(frames) == len(times)
    diffs = [float(np.abs(a - b).mean()) for a, b in zip(frames, frames[1:])]
    # Rendering is deterministic: with time ignored every difference is exactly 0. (The sample scene's spheres move
    # less than their size and the run is 60 steps: 0.03-0.07 grey levels here.)
    assert min(diffs) > 0.01 and max(diffs) > 0.03, f"frames do not change with time: mean abs differences {diffs}"


def test_interpolate_writes_a_video(trained, tmp_path):
    _, run_dir = trained
    out = tmp_path / "interpolate.mp4"
    result = run([sys.executable, "-m", "nerfstudio.scripts.render", "interpolate", "--load-config",
                  str(run_dir / "config.yml"), "--output-path", str(out), "--interpolation-steps", "3",
                  "--frame-rate", "8"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.stat().st_size > 1000


def test_spiral_renders_time_moving_for_nerfacto_4d(trained, tmp_path):
    """nerfstudio's spiral needs a ray-based datamanager (it asserts one), so it is nerfacto-4d's path."""
    scene, _ = trained
    tiny = ["--pipeline.model.num-levels", "4", "--pipeline.model.max-res", "64", "--pipeline.model.log2-hashmap-size",
            "12", "--pipeline.model.max-res-4d", "64", "--pipeline.model.log2-hashmap-size-4d", "12",
            "--pipeline.model.num-nerf-samples-per-ray", "16", "--pipeline.model.num-proposal-samples-per-ray", "32",
            "16", "--pipeline.datamanager.train-num-rays-per-batch", "512"]
    args = train_args(scene, tmp_path / "out", 20, *tiny)
    args[args.index("splatfacto-4d")] = "nerfacto-4d"
    for flag in ("--pipeline.model.num-random", "--pipeline.model.deformation-warmup",
                 "--optimizers.deformation.optimizer.lr"):
        del args[args.index(flag) : args.index(flag) + 2]
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    config = tmp_path / "out" / "exp" / "nerfacto-4d" / "run" / "config.yml"
    out = tmp_path / "spiral"
    result = run([sys.executable, "-m", "nerfstudio.scripts.render", "spiral", "--load-config", str(config),
                  "--output-path", str(out), "--output-format", "images", "--image-format", "png",
                  "--seconds", "1", "--frame-rate", "6"])
    assert result.returncode == 0, result.stderr[-3000:]
    frames = frames_of(out)
    assert len(frames) == 6 and min(float(np.abs(a - b).mean()) for a, b in zip(frames, frames[1:])) > 0.1


def test_interpolate_gives_the_model_advancing_times(trained, monkeypatch):
    """ns-render interpolate drops times; the pipeline's time-from-pose lookup must restore them in order."""
    from nerfstudio.scripts.render import RenderInterpolated

    from ns_4d_methods.models.splatfacto_4d import Splatfacto4DModel

    _, run_dir = trained
    seen = []
    original = Splatfacto4DModel.get_outputs

    def recording(self, camera):
        seen.append(float(camera.times.reshape(-1)[0]))
        return original(self, camera)

    monkeypatch.setattr(Splatfacto4DModel, "get_outputs", recording)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    RenderInterpolated(load_config=run_dir / "config.yml", output_path=run_dir / "interp.mp4",
                       interpolation_steps=4, frame_rate=8).main()
    # The test split's 5 cameras are in time order 0, .25, .5, .75, 1: the path's times must climb through them.
    assert len(seen) >= 16
    assert seen[0] == pytest.approx(0.0, abs=1e-6) and seen[-1] == pytest.approx(1.0, abs=1e-6)
    assert len(set(round(t, 3) for t in seen)) >= 8
    assert all(b >= a - 1e-6 for a, b in zip(seen, seen[1:])), seen
