"""``ns-train 4real`` end to end through the real command lines, on CPU, with tiny random LTX-Video and X-CLIP models.

- User videos rendered from ``ns-4d-sample-scene``'s analytic spheres over a textured ground plane (structure from
  motion finds no features on the spheres over a plain background at this size): a fixed camera over time (the
  reference video, an mp4) and an orbit at time 0 (the freeze-time video, a folder of frames). A run stopped in the
  middle of stage 4 and resumed with ``--load-dir`` goes through all five stages without redoing stages 1-3, writes
  the result videos and metrics, and ``ns-render`` of it shows time moving. The user's files are never written.
- From the prompt alone, the tiny video model makes videos of the requested lengths in stages 1-2; its frames are
  noise, so structure from motion fails, with one line and a non-zero exit.
- Bad input (empty prompt, too short or unreadable videos, an unreachable video model, a video pipeline video SDS
  cannot distil) stops with one line naming the field.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from four_real_scene import camera_pose, freeze_time_video, reference_video
from PIL import Image
from tiny_models import build_tiny_xclip
from tiny_video_models import build_tiny_ltx_pipeline
from tree_digest import tree_digest

from ns_4d_methods.data.four_real_datamanager import load_inputs
from ns_4d_methods.errors import InputError
from ns_4d_methods.pipelines.four_real_pipeline import FourRealPipelineConfig

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
PROMPT = "three striped spheres on a tiled floor"
SIZE, FRAMES, CANONICAL = 96, 17, 8  # structure from motion needs about 96 px here; the reference camera's frame
STAGE_STEPS, SDS_STEPS, CUT = 6, 2, 4  # steps of stages 4 and 5, video SDS steps at the end of each, first run's


def run(args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)


def console_text(log: str) -> str:
    """nerfstudio's console output as one line of text: its 120-column log lines (time column, message, source
    column) unwrapped, so that messages can be searched whatever their length."""
    lines = []
    for line in log.splitlines():
        line = re.sub(r"^(\[\d\d:\d\d:\d\d\]| {11})", "", line)
        lines.append(re.sub(r"\s+[\w.]+\.py:\d+\s*$", "", line).strip())
    return " ".join(lines)


def write_mp4(frames: np.ndarray, path: Path) -> None:
    writer = imageio_ffmpeg.write_frames(
        str(path), frames.shape[2:0:-1], fps=8, macro_block_size=1, quality=10, ffmpeg_log_level="error"
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def video_frames(path: Path) -> list:
    reader = imageio_ffmpeg.read_frames(str(path))
    width, height = next(reader)["size"]
    return [np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("four_real")
    user = root / "user"
    (user / "freeze").mkdir(parents=True)
    write_mp4(reference_video(camera_pose(20.0, 25.0), FRAMES, SIZE, ground=True), user / "reference.mp4")
    azimuths = 20.0 + np.linspace(-45.0, 45.0, FRAMES)  # frame CANONICAL stands where the reference camera does
    frames, _ = freeze_time_video(azimuths, 25.0, 0.0, SIZE, ground=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(user / "freeze" / f"{index:05d}.png")
    build_tiny_ltx_pipeline(root / "ltx")
    build_tiny_xclip(root / "xclip")
    return {"root": root, "user": user, "ltx": str(root / "ltx"), "xclip": str(root / "xclip")}


def train_args(inputs: dict, name: str, iters: int, *extra: str) -> list:
    return [
        sys.executable, "-m", "nerfstudio.scripts.train", "4real", "--vis", "tensorboard",
        "--output-dir", str(inputs["root"] / "out"), "--experiment-name", "exp", "--timestamp", name,
        "--max-num-iterations", str(iters), "--steps-per-save", "1000", "--machine.device-type", "cpu",
        "--pipeline.prompt", PROMPT, "--pipeline.video-model", inputs["ltx"], "--pipeline.xclip-model", inputs["xclip"],
        "--pipeline.height", str(SIZE), "--pipeline.width", str(SIZE), "--pipeline.datamanager.resolutions", str(SIZE),
        "--pipeline.canonical-steps", str(STAGE_STEPS), "--pipeline.temporal-steps", str(STAGE_STEPS),
        "--pipeline.sds-steps", str(SDS_STEPS), "--pipeline.log-every", "1", *extra,
    ]  # fmt: skip


def user_video_args(inputs: dict) -> list:
    return [
        "--pipeline.reference-video", str(inputs["user"] / "reference.mp4"),
        "--pipeline.freeze-time-video", str(inputs["user"] / "freeze"),
        "--pipeline.freeze-time-canonical-index", str(CANONICAL),
    ]


def run_dir(inputs: dict, name: str) -> Path:
    return inputs["root"] / "out" / "exp" / "4real" / name


def extra_state(run: Path) -> dict:
    checkpoint = sorted((run / "nerfstudio_models").glob("step-*.ckpt"))[-1]
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["pipeline"]["_extra_state"]


def artefact_times(run: Path) -> dict:
    names = ("reference_video/meta.json", "freeze_time/meta.json", "cameras/transforms.json", "cameras/sparse_pc.ply")
    return {name: (run / name).stat().st_mtime_ns for name in names}


@pytest.fixture(scope="module")
def runs(inputs) -> dict:
    """"cut": stopped after CUT steps of stage 4; "resumed": --load-dir of it, to the end of stage 5."""
    before = tree_digest(inputs["user"])
    cut = run(train_args(inputs, "cut", CUT, *user_video_args(inputs)))
    assert cut.returncode == 0, cut.stderr[-3000:]
    times = artefact_times(run_dir(inputs, "cut"))
    resumed = run(train_args(
        inputs, "resumed", 2 * STAGE_STEPS, "--load-dir", str(run_dir(inputs, "cut") / "nerfstudio_models"),
        *user_video_args(inputs),
    ))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert tree_digest(inputs["user"]) == before, "the user's videos were modified"
    return {"cut": cut, "resumed": resumed, "artefact_times": times}


def test_stages_one_to_three_write_their_artefacts(inputs, runs):
    log, cut = console_text(runs["cut"].stdout), run_dir(inputs, "cut")
    for stage in ("1/5 reference video", "2/5 freeze-time video", "3/5 cameras by structure from motion"):
        assert f"4real: stage {stage}" in log
    assert f"reference {FRAMES} frames" in log and f"cameras {FRAMES}/{FRAMES} registered" in log
    reference = json.loads((cut / "reference_video" / "meta.json").read_text())
    freeze = json.loads((cut / "freeze_time" / "meta.json").read_text())
    assert reference["num_frames"] == FRAMES and freeze["num_frames"] == FRAMES
    assert freeze["canonical_index"] == CANONICAL
    assert len(list((cut / "reference_video" / "frames").glob("*.png"))) == FRAMES
    assert (cut / "reference_video" / "video.mp4").is_file() and (cut / "freeze_time" / "video.mp4").is_file()
    transforms = json.loads((cut / "cameras" / "transforms.json").read_text())
    assert len(transforms["frames"]) == FRAMES and transforms["ply_file_path"] == "sparse_pc.ply"
    assert list((cut / "prompt_embeddings").glob("*.pt"))  # computed once, reused by the resumed run
    # the reference camera is the canonical frame's: it sees what the reference video's first frame shows
    inputs_read = load_inputs(cut)
    assert inputs_read.freeze_indices[inputs_read.cameras.camera_to_worlds.shape[0] // 2] == CANONICAL
    state = extra_state(cut)
    assert state["stage"] == "canonical" and state["stage_step"] == CUT and "4/5 canonical Gaussians" in log


def test_resume_in_the_middle_of_stage_four_finishes_all_stages(inputs, runs):
    log = console_text(runs["resumed"].stdout)
    cut, resumed = run_dir(inputs, "cut"), run_dir(inputs, "resumed")
    assert log.count(f"(found in {cut}, kept)") == 3  # stages 1-3 come from the first run, nothing is redone
    assert artefact_times(cut) == runs["artefact_times"]
    assert not (resumed / "reference_video").exists() and not (resumed / "cameras").exists()
    assert f"checkpoint in stage 4/5 canonical Gaussians after {CUT} steps" in log
    assert f"4/5 canonical Gaussians: step {CUT + 1}/{STAGE_STEPS}" in log
    assert f"5/5 temporal deformation: step {STAGE_STEPS}/{STAGE_STEPS} · video SDS" in log
    state = extra_state(resumed)
    assert state["stage"] == "temporal" and state["stage_step"] == STAGE_STEPS
    assert sum(state["sds_counts"].values()) == 2 * SDS_STEPS and state["sds_counts"]["multiview"] >= SDS_STEPS

    orbit, time_video = video_frames(resumed / "videos" / "orbit.mp4"), video_frames(resumed / "videos" / "time.mp4")
    space_time = video_frames(resumed / "videos" / "space_time.mp4")
    assert len(orbit) == len(time_video) == len(space_time) == FRAMES and orbit[0].shape == (SIZE, SIZE, 3)
    metrics = json.loads((resumed / "metrics.json").read_text())
    print("4real metrics:", json.dumps(metrics))
    assert metrics["prompt"] == PROMPT and math.isfinite(metrics["reference_psnr"])
    assert all(Path(path).is_file() and Path(path).is_relative_to(cut) for path in metrics["inputs"].values())
    assert set(metrics["xclip"]) == {"orbit", "time", "space_time"}
    assert all(-100.0 <= score <= 100.0 for score in metrics["xclip"].values())


def test_ns_render_shows_time_moving(inputs, runs, tmp_path):
    """A camera path holding the reference camera still while render_time moves: frames change only through time."""
    resumed = run_dir(inputs, "resumed")
    scene = load_inputs(run_dir(inputs, "cut"))
    index = scene.freeze_indices.index(CANONICAL)
    c2w = torch.cat([scene.cameras.camera_to_worlds[index], torch.tensor([[0.0, 0.0, 0.0, 1.0]])])
    fov = math.degrees(2 * math.atan(0.5 * SIZE / float(scene.cameras.fy[index])))
    times = [0.0, 0.25, 0.5, 0.75, 1.0]
    path = {
        "render_height": SIZE, "render_width": SIZE, "seconds": 1.0, "fps": len(times), "camera_type": "perspective",
        "camera_path": [{"camera_to_world": c2w.reshape(-1).tolist(), "fov": fov, "aspect": 1.0, "render_time": t}
                        for t in times],
    }  # fmt: skip
    (tmp_path / "path.json").write_text(json.dumps(path))
    result = run([
        sys.executable, "-m", "nerfstudio.scripts.render", "camera-path", "--load-config", str(resumed / "config.yml"),
        "--camera-path-filename", str(tmp_path / "path.json"), "--output-format", "images", "--image-format", "png",
        "--output-path", str(tmp_path / "frames"),
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    frames = [np.asarray(Image.open(p)).astype(np.float32) for p in sorted((tmp_path / "frames").glob("*.png"))]
    assert len(frames) == len(times)
    differences = [float(np.abs(a - b).mean()) for a, b in zip(frames, frames[1:])]
    print("mean |frame t+1 - frame t| of the ns-render camera path:", differences)
    assert min(differences) > 0.01  # rendering is deterministic: without time every difference would be 0


def test_from_the_prompt_the_videos_are_generated_and_a_failed_sfm_is_one_line(inputs):
    result = run(train_args(
        inputs, "prompt", 2, "--pipeline.reference-frames", "9", "--pipeline.freeze-time-frames", "17",
        "--pipeline.freeze-time-clip-frames", "9", "--pipeline.num-inference-steps", "2", "--pipeline.height", "64",
        "--pipeline.width", "96",
    ))  # fmt: skip
    folder = run_dir(inputs, "prompt")
    assert json.loads((folder / "reference_video" / "meta.json").read_text())["num_frames"] == 9
    freeze = json.loads((folder / "freeze_time" / "meta.json").read_text())
    assert freeze["num_frames"] == 17 and freeze["prompt"].startswith("Camera circulating around")
    assert Image.open(folder / "freeze_time" / "frames" / "00000.png").size == (96, 64)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "structure from motion registered" in last and "longer camera arc" in last


def _setup(tmp_path: Path, **fields) -> None:
    config = FourRealPipelineConfig(run_dir=tmp_path / "run", height=SIZE, width=SIZE, **fields)
    config.setup(device="cpu", test_mode="val")


def _one_line(error: pytest.ExceptionInfo, *parts: str) -> None:
    text = str(error.value)
    assert "\n" not in text and all(part in text for part in parts), text


def test_bad_input_is_one_line(inputs, tmp_path):
    videos = dict(
        reference_video=inputs["user"] / "reference.mp4", freeze_time_video=inputs["user"] / "freeze",
        freeze_time_canonical_index=CANONICAL, video_model=inputs["ltx"],
    )
    with pytest.raises(InputError) as error:
        _setup(tmp_path / "a", prompt="  ", **videos)
    _one_line(error, "pipeline.prompt", "empty")

    short = tmp_path / "short"
    short.mkdir()
    for index in range(5):
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(short / f"{index:05d}.png")
    with pytest.raises(InputError) as error:
        _setup(tmp_path / "b", prompt=PROMPT, **{**videos, "reference_video": short})
    _one_line(error, "pipeline.reference_video", "5 frames", "at least 9")

    unreadable = tmp_path / "unreadable.mp4"
    unreadable.write_text("not a video")
    with pytest.raises(InputError) as error:
        _setup(tmp_path / "c", prompt=PROMPT, **{**videos, "freeze_time_video": unreadable})
    _one_line(error, str(unreadable), "cannot read a video")

    with pytest.raises(InputError) as error:
        _setup(tmp_path / "d", prompt=PROMPT, **{**videos, "video_model": str(tmp_path / "missing-model")})
    _one_line(error, "pipeline.video_model", "missing-model", "cannot load")

    other = tmp_path / "cogvideox"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    with pytest.raises(InputError) as error:
        _setup(tmp_path / "e", prompt=PROMPT, **{**videos, "video_model": str(other)})
    _one_line(error, "CogVideoXPipeline", "not a supported video pipeline")
    assert not any((tmp_path / name / "run" / "cameras").exists() for name in "abcde")  # nothing ran past the check
