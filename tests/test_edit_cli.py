"""``ns-4d-edit`` end to end on real data with a tiny random Stable Diffusion, and its bad-input errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from huggingface_hub import constants as hub_constants
from PIL import Image
from tiny_models import build_tiny_sd_pipeline

from ns_4d_methods.cli.edit import entrypoint
from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.panorama_fusion import window_starts

SHARED = Path(__file__).resolve().parents[2] / "shared"
VIDEO = SHARED / "data" / "videos" / "car-turn.mp4"
SINTEL = SHARED / "data" / "sintel_demo_frames"
FAST = [
    "--prompt", "a red car in the snow", "--steps", "2", "--inversion-steps", "2", "--device", "cpu",
    "--batch-size", "4",
]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd_pipeline(path)
    return str(path)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub round trips: the default CLIP model fails at once and its scores are skipped."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def read_video(path: Path) -> list:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))


def assert_one_line_error(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_video_edit_end_to_end(tmp_path, tiny_sd, capsys):
    output = tmp_path / "car_edited.mp4"
    entrypoint([
        "video", str(VIDEO), "--model", tiny_sd, "--height", "64", "--max-frames", "3", "--t-edit", "1",
        "--t-resnet", "1", "--t-context", "0.5", "--batch-size", "2", "--output", str(output), *FAST[:-2],
    ])
    edited = read_video(output)
    assert len(edited) == 3 and edited[0].shape == (64, 64, 3)
    originals = [cv2.resize(frame, (64, 64), interpolation=cv2.INTER_AREA) for frame in read_video(VIDEO)[:3]]
    for original, frame in zip(originals, edited):
        assert np.abs(original.astype(float) - frame).mean() > 10  # changed well beyond video compression
    report = json.loads((tmp_path / "car_edited.metrics.json").read_text())
    assert report["frames"] == 3
    assert math.isfinite(report["warp_error"]) and 0 < report["warp_valid_fraction"] <= 1
    assert "CLIP metrics skipped" in capsys.readouterr().out


def panorama(path: Path, frames: int = 2) -> Path:
    """A wide image: sintel frames side by side (each 1024x436)."""
    tiles = [np.asarray(Image.open(SINTEL / f"frame_{16 + i:04d}.png").convert("RGB")) for i in range(frames)]
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)
    return path


def test_panorama_edit_end_to_end(tmp_path, tiny_sd, capsys):
    source = panorama(tmp_path / "wide.png")
    before = source.read_bytes()
    entrypoint(["panorama", str(source), "--model", tiny_sd, "--height", "48", "--window", "48", *FAST])
    printed = capsys.readouterr().out
    assert "9 windows, no wrap" in printed  # fused in latent space: 224 / 2 = 112 latent columns, windows of 24
    output = tmp_path / "wide_edited.png"
    result = np.asarray(Image.open(output))
    original = np.asarray(Image.open(source).convert("RGB").resize((result.shape[1], 48), Image.BILINEAR))
    assert result.shape == (48, 225, 3)  # 2 x 1024 x 436 scaled to height 48
    assert np.abs(original.astype(float) - result).mean() > 10
    assert source.read_bytes() == before
    report = json.loads((tmp_path / "wide_edited.metrics.json").read_text())
    assert report["frames"] == len(window_starts(225, 48, 0.5))  # scored in pixel windows of the result
    assert "CLIP metrics skipped" in printed
    assert ("lpips" in report and 0 < report["lpips"] < 1) or "LPIPS skipped" in printed


def test_images_edit_end_to_end(tmp_path, tiny_sd):
    views = tmp_path / "views"
    views.mkdir()
    for name in ("frame_0016.png", "frame_0017.png"):
        shutil.copy(SINTEL / name, views / name)
    entrypoint(["images", str(views), "--model", tiny_sd, "--height", "32", *FAST])
    edited = sorted((tmp_path / "views_edited").glob("*.png"))
    assert [path.name for path in edited] == ["frame_0016.png", "frame_0017.png"]
    assert (tmp_path / "views_edited.metrics.json").is_file()


@pytest.mark.parametrize(
    "make_args, fragments",
    [
        (lambda d, m: ["video", str(d / "bad.mp4"), "--model", m], ["bad.mp4", "cannot read a video"]),
        (lambda d, m: ["panorama", str(d / "small.png"), "--model", m, "--window", "64"], ["smaller than one"]),
        (lambda d, m: ["images", str(d / "empty"), "--model", m], ["empty", "no images"]),
        (lambda d, m: ["video", str(VIDEO), "--model", str(d / "no-model")], ["--model", "cannot load"]),
        (lambda d, m: ["video", str(VIDEO), "--model", "nobody/no-such-model"], ["nobody/no-such-model"]),
        (lambda d, m: ["video", str(VIDEO), "--model", m, "--t-edit", "1.5"], ["t_edit 1.5", "[0, 1]"]),
        (lambda d, m: ["panorama", str(d / "small.png"), "--model", m, "--t-context", "-1"], ["t_context"]),
        (lambda d, m: ["video", str(VIDEO), "--model", m, "--t-resnet", "2"], ["t_resnet 2", "[0, 1]"]),
        (lambda d, m: ["video", str(VIDEO), "--model", m, "--steps", "4", "--inversion-steps", "6",
                       "--max-frames", "1", "--height", "32"], ["inversion_steps 6", "sampling timesteps"]),
        (lambda d, m: ["video", str(VIDEO), "--model", m, "--inversion-steps", "2000", "--max-frames", "1",
                       "--height", "32"], ["inversion_steps 2000", "at most", "1000"]),
        (lambda d, m: ["video", str(VIDEO), "--model", m, "--output", str(VIDEO)], ["is the input"]),
    ],
    ids=["unreadable-video", "small-panorama", "empty-folder", "missing-dir", "unknown-id", "t-edit", "t-context",
         "t-resnet", "inversion-steps", "too-many-inversion-steps", "output-is-input"],
)
def test_bad_input_is_a_one_line_error(tmp_path, tiny_sd, make_args, fragments):
    (tmp_path / "bad.mp4").write_text("not a video")
    Image.new("RGB", (48, 32)).save(tmp_path / "small.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as error:
        entrypoint([*make_args(tmp_path, tiny_sd), "--prompt", "x", "--device", "cpu"])
    assert_one_line_error(error, *fragments)


def test_installed_command_exits_non_zero_with_one_line(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ns-4d-edit"), "video", str(tmp_path / "missing.mp4"), "--prompt", "x"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing.mp4'}: cannot read a video " \
        "(not a video file, or no decodable frames)"
