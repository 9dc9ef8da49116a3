"""unified-edit: `ns-train unified-edit` end to end on the D-NeRF scene with a tiny random Stable Diffusion (and a tiny
CLIP for the metric report): every training view edited against the reference, training reads the edits, a run
resumed in the middle of the edit pass ends with the same edits as an uninterrupted one, refresh passes re-edit the
model's renders, the static variant on the real fox scene (lens distortion), `ns-4d-edit run`, one-line errors."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import TINY_NERFACTO_4D, build_tiny_clip, build_tiny_sd_pipeline
from tree_digest import tree_digest

from method_configs.unified_edit import unified_edit
from ns_4d_methods.cli.edit import entrypoint

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DNERF_SCENE, FOX_SCENE = DATA / "dnerf_jumpingjacks_400", DATA / "ingp_fox"
needs_data = pytest.mark.skipif(not (DNERF_SCENE.is_dir() and FOX_SCENE.is_dir()), reason=f"needs {DATA}")
pytestmark = [pytest.mark.slow, needs_data]

PROMPT = "a bronze statue of a man"
BATCH = 64  # 200 D-NeRF training views: the reference, then 4 batches (64, 64, 64, 7)
SPLATS = ["--pipeline.model.num-random", "2000"]
DNERF = [
    *SPLATS, "--pipeline.model.deformation-warmup", "0", "--optimizers.deformation.optimizer.lr", "5e-5",
    "--pipeline.datamanager.camera-res-scale-factor", "0.16", "--data", str(DNERF_SCENE),  # 64 x 64 views
]
FOX = [
    *SPLATS, "--pipeline.datamanager.camera-res-scale-factor", "0.05",  # 54 x 96 views
    "--data", str(FOX_SCENE), "nerfstudio-data", "--downscale-factor", "1",
]


def run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env=_env(), **kwargs)


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def train_args(method: str, out: Path, name: str, iters: int, models: dict, *extra: str):
    """``ns-train`` arguments for a tiny edit run; the dataset arguments come last in ``extra``."""
    return [
        sys.executable, "-m", "nerfstudio.scripts.train", method, "--output-dir", str(out),
        "--experiment-name", "exp", "--timestamp", name, "--max-num-iterations", str(iters),
        "--machine.device-type", "cpu", "--vis", "tensorboard", "--steps-per-eval-batch", "1000",
        "--steps-per-eval-image", "1000", "--steps-per-eval-all-images", "100000", "--steps-per-save", "1000",
        "--pipeline.prompt", PROMPT, "--pipeline.editor.model", models["sd"], "--pipeline.clip-model", models["clip"],
        "--pipeline.editor.num-inference-steps", "4", "--pipeline.editor.inversion-steps", "4",
        "--pipeline.editor.batch-size", str(BATCH),
        "--pipeline.max-edit-resolution", "32", *extra,
    ]


def run_dir(out: Path, name: str, method: str = "unified-edit") -> Path:
    return out / "exp" / method / name


def extra_state(run: Path) -> dict:
    checkpoint = sorted((run / "nerfstudio_models").glob("step-*.ckpt"))[-1]
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["pipeline"]["_extra_state"]


def edit_files(run: Path) -> dict:
    """Stored edits of a run: (camera, frame) -> PNG bytes."""
    index = json.loads((run / "edits" / "index.json").read_text())
    return {(e["camera"], e["frame"]): (run / "edits" / e["file"]).read_bytes() for e in index.values()}


def video_frames(path: Path) -> list:
    reader = imageio_ffmpeg.read_frames(str(path))
    width, height = reader.__next__()["size"]
    return [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    build_tiny_sd_pipeline(root / "sd")
    build_tiny_clip(root / "clip")
    return {"sd": str(root / "sd"), "clip": str(root / "clip")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, models) -> dict:
    """The D-NeRF runs: "full" (8 steps, one edit pass), "cut" (3 steps: the reference and 2 batches) and "resumed"
    (cut, resumed to 8 steps), "refreshed" (full, resumed to 15 steps with a refresh pass)."""
    out = tmp_path_factory.mktemp("unified")
    before = tree_digest(DNERF_SCENE)
    results = {}
    results["full"] = run(train_args("unified-edit", out, "full", 8, models, *DNERF))
    results["cut"] = run(train_args("unified-edit", out, "cut", 3, models, *DNERF))
    cut_edits = edit_files(run_dir(out, "cut")) if results["cut"].returncode == 0 else {}
    results["resumed"] = run(train_args(
        "unified-edit", out, "resumed", 8, models, "--load-dir", str(run_dir(out, "cut") / "nerfstudio_models"), *DNERF
    ))
    results["refreshed"] = run(train_args(
        "unified-edit", out, "refreshed", 15, models, "--pipeline.refresh-every", "1",
        "--load-dir", str(run_dir(out, "full") / "nerfstudio_models"), *DNERF,
    ))
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
    assert tree_digest(DNERF_SCENE) == before, "the dataset was modified"
    return {"out": out, "results": results, "cut_edits": cut_edits}


def test_every_view_is_edited_against_the_reference(runs):
    full = run_dir(runs["out"], "full")
    log = runs["results"]["full"].stdout
    assert "edit pass: reference view 100 edited" in log  # the middle of 200 views in time
    assert "edit pass: batch 4/4" in log
    edits = edit_files(full)
    assert sorted(edits) == [(0, frame) for frame in range(200)]  # keyed by rank in time
    state = extra_state(full)
    assert state["position"]["passes"] == 1 and state["position"]["units"] == 1 + math.ceil(199 / BATCH)
    assert state["position"]["phase"] == "wait" and state["num_train_images"] == 200

    frames = video_frames(full / "edit_videos" / "cam00.mp4")
    assert len(frames) == 200 and frames[0].shape == (64, 128, 3)
    # the edits keep the dataset's alpha: the object changes, the white background stays (up to video compression)
    changes = {"object": [], "background": []}
    for frame, (key, png) in zip(frames, sorted(edits.items())):
        alpha = np.asarray(Image.open(io.BytesIO(png)))[..., 3]
        difference = np.abs(frame[:, :64].astype(float) - frame[:, 64:]).mean(-1)  # original | edited
        changes["object"].append(difference[alpha == 255].mean())
        changes["background"].append(difference[alpha == 0].mean())
    print("mean |edited - original| per view (of 255): "
          + ", ".join(f"{part} {min(values):.1f} to {max(values):.1f}" for part, values in changes.items()))
    assert min(changes["object"]) > 10 and max(changes["background"]) < 3

    report = json.loads((full / "edit_metrics.json").read_text())
    print("unified-edit report:", json.dumps(report["all"]), "scene:", json.dumps(report["scene"]))
    assert report["prompt"] == PROMPT and report["all"]["frames"] == 200
    assert report["scene"]["frames"] == 20  # renders of the fitted scene from D-NeRF's 20 eval cameras
    for section in ("all", "scene"):
        for key in ("clip_text_image", "clip_directional", "clip_frame_consistency"):
            assert -1.0 <= report[section][key] <= 1.0
        assert 0.0 < report[section]["warp_error_original"]
        assert 0.5 < report[section]["warp_valid_fraction"] <= 1.0
    assert report["all"]["warp_error_original"] < report["all"]["warp_error"]
    assert "scene metrics (renders of the fitted scene, eval cameras)" in log


def test_resume_in_the_middle_of_the_pass_gives_the_uninterrupted_edits(runs):
    cut = runs["cut_edits"]
    assert len(cut) == 1 + 2 * BATCH
    log = runs["results"]["resumed"].stdout
    assert f"restored {1 + 2 * BATCH} edited images" in log
    assert "reference view 100 edited" in log and "batch 3/4" in log and "batch 1/4" not in log
    resumed, full = edit_files(run_dir(runs["out"], "resumed")), edit_files(run_dir(runs["out"], "full"))
    assert resumed.keys() == full.keys()
    assert all(resumed[key] == full[key] for key in full), "edits differ from the uninterrupted run"
    assert all(resumed[key] == cut[key] for key in cut)


def test_a_refresh_pass_re_edits_the_renders(runs):
    log = runs["results"]["refreshed"].stdout
    assert "refresh pass 1: reference view 100 edited" in log and "refresh pass 1: batch 4/4" in log
    state = extra_state(run_dir(runs["out"], "refreshed"))
    assert state["position"]["passes"] == 2
    refreshed, full = edit_files(run_dir(runs["out"], "refreshed")), edit_files(run_dir(runs["out"], "full"))
    changed = sum(refreshed[key] != full[key] for key in full)
    assert changed == len(full), f"only {changed} of {len(full)} views were re-edited"


def test_ns_render_of_the_edited_scene(runs, tmp_path):
    video = tmp_path / "edited.mp4"
    bin_dir = Path(sys.executable).parent  # the venv's ffmpeg
    result = subprocess.run(
        [sys.executable, "-m", "nerfstudio.scripts.render", "interpolate", "--load-config",
         str(run_dir(runs["out"], "full") / "config.yml"), "--output-path", str(video), "--interpolation-steps", "1"],
        capture_output=True, text=True, timeout=900,
        env=dict(_env(), PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    frames = video_frames(video)
    assert len(frames) >= 2 and frames[0].shape[:2] == (64, 64)


def test_run_metrics_command(runs, models, tmp_path, capsys):
    output = tmp_path / "report.json"
    entrypoint(["run", str(run_dir(runs["out"], "full") / "config.yml"), "--clip-model", models["clip"],
                "--device", "cpu", "--output", str(output)])
    printed = capsys.readouterr().out
    assert f"prompt: {PROMPT}" in printed and "[cam00]" in printed and "clip_text_image" in printed
    stored = json.loads((run_dir(runs["out"], "full") / "edit_metrics.json").read_text())
    written = json.loads(output.read_text())
    assert written["prompt"] == stored["prompt"] and written["cameras"].keys() == stored["cameras"].keys()
    for name in ("all", *stored["cameras"]):  # the same videos, the same numbers (up to float32 summation order)
        section = stored["all"] if name == "all" else stored["cameras"][name]
        mine = written["all"] if name == "all" else written["cameras"][name]
        assert mine == pytest.approx(section, rel=1e-5, abs=1e-7)
    with pytest.raises(SystemExit) as error:
        entrypoint(["run", str(tmp_path), "--device", "cpu"])
    assert str(error.value).startswith(f"{tmp_path / 'edit_videos' / 'index.json'}: not found")


def test_training_reads_the_edited_views(tmp_path, models):
    """In process: after the edit pass the images that training samples are the stored edits, byte for byte, with the
    dataset's alpha: composited on the white background exactly where the original is transparent."""
    scene = tmp_path / "scene"
    run([sys.executable, "-m", "ns_4d_methods.cli.sample_scene", str(scene), "--resolution", "64",
         "--num-train", "10", "--num-val", "2", "--num-test", "2"], check=True)
    config = copy.deepcopy(unified_edit.config)
    config.output_dir, config.vis, config.max_num_iterations = tmp_path / "out", "tensorboard", 6
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 1000
    config.machine.device_type = "cpu"
    pipeline = config.pipeline
    pipeline.datamanager.data, pipeline.prompt, pipeline.clip_model = scene, PROMPT, models["clip"]
    pipeline.model.num_random, pipeline.model.deformation_warmup = 500, 0
    pipeline.editor.model, pipeline.editor.num_inference_steps, pipeline.editor.batch_size = models["sd"], 4, 4
    pipeline.editor.inversion_steps = 4
    pipeline.max_edit_resolution = 32
    config.set_timestamp()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    edited = trainer.pipeline
    assert edited.position.passes == 1 and len(edited.edit_store) == 10
    transparent = opaque = 0
    for index in range(10):
        cached = edited.datamanager.cached_train[index]["image"]
        stored = torch.from_numpy(edited.edit_store.get(index))
        alpha = torch.from_numpy(edited.train_dataset.original_alpha(index))[..., 0]
        assert stored.shape[-1] == 4 and torch.equal(stored[..., 3], alpha), f"view {index}: alpha not kept"
        assert torch.equal(cached[alpha == 255], stored[..., :3][alpha == 255]), f"view {index}"
        assert torch.all(cached[alpha == 0] == 255), f"view {index}: the edit tints the background"
        transparent, opaque = transparent + int((alpha == 0).sum()), opaque + int((alpha == 255).sum())
    assert transparent > 1000 and opaque > 1000


def test_static_scene_with_lens_distortion(tmp_path, models):
    before = tree_digest(FOX_SCENE)
    result = run(train_args("unified-edit-static", tmp_path, "fox", 4, models, *FOX))
    assert result.returncode == 0, result.stderr[-3000:]
    assert tree_digest(FOX_SCENE) == before
    fox = run_dir(tmp_path, "fox", "unified-edit-static")
    edits = edit_files(fox)
    assert len(edits) == 45  # nerfstudio-data's 90 % training split of the 50 images
    frames = video_frames(fox / "edit_videos" / "cam00.mp4")
    assert len(frames) == 45 and frames[0].shape == (96, 108, 3)
    report = json.loads((fox / "edit_metrics.json").read_text())
    assert report["all"]["frames"] == 45 and "warp_error" not in report["all"]  # views, not a sequence in time
    assert "clip_text_image" in report["all"]


def test_nerfacto_variant(tmp_path, models):
    dnerf = ["--pipeline.datamanager.camera-res-scale-factor", "0.16", *TINY_NERFACTO_4D, "--data", str(DNERF_SCENE)]
    result = run(train_args("unified-edit-nerfacto", tmp_path, "nerf", 3, models, *dnerf))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "edit pass: batch 2/4" in result.stdout
    assert len(edit_files(run_dir(tmp_path, "nerf", "unified-edit-nerfacto"))) == 1 + 2 * BATCH


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, models) -> dict:
    out = tmp_path_factory.mktemp("bad")
    cases = {
        "empty prompt": ("unified-edit", ["--pipeline.prompt", " ", *DNERF]),
        "t_edit outside [0, 1]": ("unified-edit", ["--pipeline.editor.t-edit", "1.5", *DNERF]),
        "t_context outside [0, 1]": ("unified-edit", ["--pipeline.editor.t-context", "-0.1", *DNERF]),
        "weights unreachable": ("unified-edit", ["--pipeline.editor.model", str(out / "no-such-model"), *DNERF]),
        "reference out of range": ("unified-edit", ["--pipeline.reference-view", "200", *DNERF]),
        "refresh with distortion": ("unified-edit-static", ["--pipeline.refresh-every", "5", *FOX]),
    }
    before = tree_digest(DNERF_SCENE), tree_digest(FOX_SCENE)
    processes = {
        name: subprocess.Popen(
            train_args(method, out, name.replace(" ", "-"), 2, models, *extra),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        )
        for name, (method, extra) in cases.items()
    }
    results = {name: (p.wait(timeout=900), p.communicate()[1]) for name, p in processes.items()}
    assert (tree_digest(DNERF_SCENE), tree_digest(FOX_SCENE)) == before
    return results


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty prompt", "error: --pipeline.prompt is empty"),
        ("t_edit outside [0, 1]", "error: t_edit 1.5: expected a fraction of the sampling steps in [0, 1]"),
        ("t_context outside [0, 1]", "error: t_context -0.1: expected a fraction of the sampling steps in [0, 1]"),
        ("weights unreachable", "error: --pipeline.editor.model: cannot load"),
        ("reference out of range", "error: --pipeline.reference-view 200: expected a training image index in [0, 199]"),
        ("refresh with distortion", "error: --pipeline.refresh-every: refresh passes re-edit pinhole renders"),
    ],
)
def test_bad_input_is_a_one_line_error(bad_runs, case, expected):
    returncode, stderr = bad_runs[case]
    assert returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    print(f"{case}: exit {returncode}: {last}")
    assert last.startswith(expected), last
