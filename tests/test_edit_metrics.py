"""Edit metrics: CLIP scores with a tiny random CLIP loaded through the package's helper, and the flow warp error."""

from __future__ import annotations

import json
import math

import cv2
import imageio_ffmpeg
import numpy as np
import pytest
import torch
from huggingface_hub import constants as hub_constants
from tiny_models import build_tiny_clip

from ns_4d_methods.cli.edit import entrypoint
from ns_4d_methods.editing.edit_metrics import ClipEmbedder, clip_scores, edit_metrics

CLIP_KEYS = ("clip_text_image", "clip_directional", "clip_frame_consistency")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-clip")
    build_tiny_clip(path)
    return str(path)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub round trips: a missing model fails at once instead of after network timeouts."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random colour texture (blurred noise): something optical flow can track."""
    noise = np.random.default_rng(seed).random((height, width, 3)).astype(np.float32)
    return (cv2.GaussianBlur(noise, (0, 0), 2.0) * 255).clip(0, 255).astype(np.uint8)


def moving_frames(count: int, size: int = 64, step=(2, 1)) -> list:
    """Crops of one texture moving by ``step`` = (dx, dy) pixels per frame."""
    canvas = texture(size + count * step[1] + 4, size + count * step[0] + 4)
    return [canvas[i * step[1] : i * step[1] + size, i * step[0] : i * step[0] + size] for i in range(count)]


def test_clip_scores_are_finite_cosines(tiny_clip):
    clip = ClipEmbedder(tiny_clip)
    frames = moving_frames(3, size=40)
    edited = [255 - frame for frame in frames]
    report = edit_metrics(zip(frames, edited), "a red car", "a car", clip, temporal=False)
    assert report["frames"] == 3
    for key in CLIP_KEYS:
        assert math.isfinite(report[key]) and -1.0 <= report[key] <= 1.0, (key, report[key])
    assert report["clip_directional"] != 0.0  # the two prompts embed differently


def test_clip_scores_on_known_embeddings():
    basis = torch.eye(3)
    original = basis[[0, 0]]
    edited = torch.nn.functional.normalize(basis[[0, 0]] + basis[[1, 1]], dim=-1)
    scores = clip_scores(original, edited, prompt=basis[1], source_prompt=basis[0])
    assert scores["clip_text_image"] == pytest.approx(math.sqrt(0.5))
    assert scores["clip_frame_consistency"] == pytest.approx(1.0)
    # edited - original leans towards +prompt and -source: the same direction as prompt - source
    assert scores["clip_directional"] == pytest.approx(
        float(torch.nn.functional.cosine_similarity(edited[0] - original[0], basis[1] - basis[0], dim=0))
    )


def test_warp_error_is_small_for_a_consistent_edit_and_large_for_flicker():
    frames = moving_frames(4)
    consistent = [255 - frame for frame in frames]  # an edit that moves with the content
    report = edit_metrics(zip(frames, consistent), "p", temporal=True)
    assert report["warp_valid_fraction"] > 0.8
    assert report["warp_error_original"] < 0.02
    assert report["warp_error"] < 0.02
    # alternate frames brightened by 0.2: the warp error sees the flicker
    flicker = [np.clip(f.astype(int) + 51 * (i % 2), 0, 255).astype(np.uint8) for i, f in enumerate(consistent)]
    flickering = edit_metrics(zip(frames, flicker), "p", temporal=True)
    assert flickering["warp_error"] > 0.15
    assert "clip_text_image" not in flickering


def write_video(path, frames) -> None:
    writer = imageio_ffmpeg.write_frames(str(path), frames[0].shape[1::-1], fps=10, macro_block_size=1)
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def test_metrics_command_on_two_videos(tmp_path, tiny_clip, capsys):
    frames = moving_frames(4)
    write_video(tmp_path / "original.mp4", frames)
    write_video(tmp_path / "edited.mp4", [255 - frame for frame in frames])
    report_path = tmp_path / "report.json"
    entrypoint([
        "metrics", str(tmp_path / "original.mp4"), str(tmp_path / "edited.mp4"), "--prompt", "a red car",
        "--clip-model", tiny_clip, "--output", str(report_path), "--device", "cpu",
    ])
    report = json.loads(report_path.read_text())
    assert report["frames"] == 4
    for key in CLIP_KEYS + ("warp_error", "warp_error_original"):
        assert math.isfinite(report[key])
    assert "warp_error" in capsys.readouterr().out


def test_metrics_command_without_clip_weights_prints_the_skip_message(tmp_path, capsys):
    frames = moving_frames(2, size=32)
    for name, image in (("a.png", frames[0]), ("b.png", frames[1])):
        cv2.imwrite(str(tmp_path / name), image)
    entrypoint([
        "metrics", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--prompt", "x",
        "--clip-model", str(tmp_path / "no-clip-here"), "--device", "cpu",
    ])
    out = capsys.readouterr().out
    assert "CLIP metrics skipped: --clip-model: cannot load" in out
    assert "frames" in out
