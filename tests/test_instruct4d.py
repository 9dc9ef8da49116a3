"""instruct4d: frame editing at a bounded resolution, the in-loop edit schedule, and `ns-train instruct4d` end to end
on the D-NeRF scene (monocular) and on an N3DV-layout capture rendered from the reconstruction (multi-camera), with
resume, `ns-render`, and one-line errors for bad input. All diffusion models are tiny and random (tests/tiny_models)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.dataparsers.dnerf_dataparser import DNeRFDataParserConfig
from nerfstudio.utils.eval_utils import eval_setup
from nerfstudio.viewer.utils import parse_object
from nerfstudio.viewer.viewer_elements import ViewerElement
from PIL import Image

from method_configs.instruct4d import instruct4d
from ns_4d_methods.data.n3dv_dataparser import LLFF_TO_OPENGL, N3DVDataParserConfig
from ns_4d_methods.editing.depth_projection import project_key_views
from ns_4d_methods.guidance.frame_editor import FrameEditor, edit_size
from ns_4d_methods.guidance.ip2p_editor import InstructPix2PixEditor
from ns_4d_methods.pipelines.instruct4d_pipeline import EditPosition, Instruct4DPipeline, key_round_strength
from ns_4d_methods.models.image_metrics import ALEXNET
from tiny_4dm import write_random_backbone
from tiny_models import TINY_NERFACTO_4D, build_tiny_ip2p_pipeline

DNERF_SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "dnerf_jumpingjacks_400"
BIN = Path(sys.executable).parent
needs_scene = pytest.mark.skipif(not DNERF_SCENE.is_dir(), reason=f"needs {DNERF_SCENE}")

SCALE = 0.16  # D-NeRF frames at 64 x 64
TINY_MODEL = [
    "--machine.device-type", "cpu", "--vis", "tensorboard",
    "--steps-per-eval-batch", "1000", "--steps-per-eval-image", "1000", "--steps-per-eval-all-images", "100000",
    "--steps-per-save", "1000", *TINY_NERFACTO_4D,
]
RAFT_SMALL = Path(__file__).resolve().parents[2] / "shared" / "weights" / "raft-small.pth"
TINY_EDITS = [
    "--pipeline.raft-weights", str(RAFT_SMALL),
    "--pipeline.datamanager.train-num-rays-per-batch", "1024",  # one 32x32 patch for the LPIPS loss
    "--pipeline.full-edit-steps", "2", "--pipeline.refine-steps", "2", "--pipeline.refine-strength", "0.5",
    "--pipeline.max-edit-resolution", "32", "--pipeline.datamanager.train-num-images-to-sample-from", "10",
]


@pytest.fixture(scope="module", autouse=True)
def lpips_backbone(tmp_path_factory):
    """An offline torch hub cache (as conftest's torch_home) for the whole module, with random AlexNet weights for
    instruct4d's LPIPS loss; the ns-train runs inherit TORCH_HOME and are offline through HF_HUB_OFFLINE."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        write_random_backbone(ALEXNET, features_only=True)
        yield


def run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env=_env(), **kwargs)


def _env(**changes):
    # the venv's ffmpeg for ns-render; never reach for the hub
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", HF_HUB_OFFLINE="1", **changes)


def train(method: str, out: Path, name: str, iters: int, *extra: str, data: Path = DNERF_SCENE, popen=False,
          env=None):
    args = [
        sys.executable, "-m", "nerfstudio.scripts.train", method, "--output-dir", str(out), "--experiment-name", "exp",
        "--timestamp", name, "--max-num-iterations", str(iters), *TINY_MODEL, "--data", str(data), *extra,
    ]
    if data == DNERF_SCENE:
        args.append("dnerf-data")  # instruct4d's default parser is ns4d-data (monocular videos)
    if popen:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_env(**(env or {})))
    return run(args)


def edit_args(ip2p: Path, load_dir: Path, *extra: str):
    return ["--load-dir", str(load_dir), "--pipeline.prompt", "turn him into a bronze statue",
            "--pipeline.ip2p-model-id", str(ip2p), *TINY_EDITS, *extra]


def dnerf_args():
    return ["--pipeline.datamanager.camera-res-scale-factor", str(SCALE)]


def snapshot(folder: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255.0


def video_frames(path: Path) -> list:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    width, height = meta["size"]
    return [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]


# ---- frame editing at a bounded resolution ---------------------------------------------------------------------------
def test_edit_size_is_bounded_and_a_multiple_of_eight():
    assert edit_size(400, 400, 512) == (400, 400)
    assert edit_size(1080, 1920, 512) == (288, 512)
    assert edit_size(64, 50, 512) == (64, 48)
    assert edit_size(5, 3, 512) == (8, 8)
    assert edit_size(1014, 1352, 0) == (1016, 1352)  # no cap: the training resolution, to multiples of 8
    for height, width in [(437, 1013), (2000, 30), (96, 128)]:
        h, w = edit_size(height, width, 256)
        assert h % 8 == 0 and w % 8 == 0 and max(h, w) <= 256 + 4


def test_frame_editor_resizes_for_the_editor_and_back(tmp_path):
    build_tiny_ip2p_pipeline(tmp_path / "ip2p")
    editor = InstructPix2PixEditor(str(tmp_path / "ip2p"))
    seen = []
    original_edit = editor.edit
    editor.edit = lambda images, prompt, **kw: seen.append(images.shape) or original_edit(images, prompt, **kw)
    frames = torch.rand(3, 37, 50, 3)
    out = FrameEditor(editor, max_resolution=24)(
        frames, frames, prompt="x", strength=0.5, num_inference_steps=2, guidance_scale=7.5,
        image_guidance_scale=1.5, anchor="anchor_self", seed=0,
    )
    assert seen == [torch.Size([3, 3, 16, 24])]
    assert out.shape == frames.shape and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1


def test_key_round_strength_follows_a_cosine_from_one_to_the_final_strength():
    strengths = [key_round_strength(r, 12, 0.8) for r in range(12)]
    assert strengths[0] == pytest.approx(1.0) and strengths[-1] == pytest.approx(0.8)
    assert strengths[6] == pytest.approx(0.8 + 0.1 * (1 + math.cos(math.pi * 6 / 11)))
    assert all(a > b for a, b in zip(strengths, strengths[1:]))
    assert key_round_strength(0, 1, 0.8) == 1.0


# ---- the schedule, in process --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ip2p(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ip2p") / "tiny-ip2p"
    build_tiny_ip2p_pipeline(path)
    return path


class RecordingEditor:
    """Wraps the pipeline's FrameEditor and records what every call was asked to do."""

    def __init__(self, editor):
        self.editor, self.calls, self.inits = editor, [], []

    def __call__(self, conditions, inits, **kwargs):
        self.calls.append({"frames": conditions.shape[0], **kwargs})
        self.inits.append(inits.clone())
        return self.editor(conditions, inits, **kwargs)


def tiny_pipeline_config(tiny_ip2p: Path, **overrides):
    """instruct4d's pipeline config with a tiny model and tiny edits, for in-process runs."""
    config = copy.deepcopy(instruct4d.config.pipeline)
    config.prompt, config.ip2p_model_id, config.raft_weights = "make it red", str(tiny_ip2p), str(RAFT_SMALL)
    config.full_edit_steps, config.refine_steps, config.refine_strength, config.max_edit_resolution = 2, 2, 0.5, 32
    for name, value in overrides.items():
        setattr(config, name, value)
    # one 32x32 patch per batch, for the LPIPS loss
    config.datamanager.train_num_images_to_sample_from, config.datamanager.train_num_rays_per_batch = 10, 1024
    model = config.model
    model.num_levels, model.log2_hashmap_size, model.max_res = 2, 8, 16
    model.log2_hashmap_size_4d, model.max_res_4d, model.implementation = 8, 16, "torch"
    model.num_proposal_samples_per_ray, model.num_nerf_samples_per_ray = (8, 4), 4
    model.proposal_net_args_list = [
        {"hidden_dim": 8, "log2_hashmap_size": 8, "num_levels": 2, "max_res": 16, "use_linear": False}
    ] * 2
    return config


def reconstruction_trainer(run_dir: Path, load_dir: Path) -> SimpleNamespace:
    """What the pipeline reads of nerfstudio's trainer: the run directory and the reconstruction it loaded."""
    return SimpleNamespace(base_dir=run_dir, config=SimpleNamespace(load_dir=load_dir, load_checkpoint=None))


@needs_scene
def test_schedule_edits_key_view_then_windows_then_refreshes_from_renders(tiny_ip2p, tmp_path, monkeypatch):
    config = tiny_pipeline_config(tiny_ip2p, steps_per_edit_unit=2, refresh_every=10)
    config.datamanager.dataparser = DNeRFDataParserConfig()
    config.datamanager.data, config.datamanager.camera_res_scale_factor = DNERF_SCENE, SCALE
    config.datamanager.train_num_images_to_sample_from = -1  # every image in the batch: edited ones are in it
    pipeline: Instruct4DPipeline = config.setup(device="cpu", test_mode="val")
    batch = pipeline.datamanager.train_image_dataloader.cached_collated_batch
    untouched = batch["image"][batch["image_idx"].tolist().index(100)].clone()
    pipeline.open_editing(reconstruction_trainer(tmp_path, tmp_path))
    recorder = RecordingEditor(pipeline.editor)
    pipeline.editor = recorder

    # the viewer finds the controls among the pipeline's attributes
    controls = {element.name: element for _, element in parse_object(pipeline, ViewerElement, "Custom Elements")}
    assert {"Edit instruction", "Text guidance scale", "Image guidance scale"} <= set(controls)

    for step in range(5):  # units at steps 0, 2, 4
        if step == 3:
            controls["Edit instruction"].value = "make it blue"
            controls["Text guidance scale"].value = 3.0
        pipeline.get_train_loss_dict(step)
    key, first, second = recorder.calls
    assert key["frames"] == 1 and key["strength"] == 1.0 and key["num_inference_steps"] == 2
    assert first["frames"] == second["frames"] == 5 and first["strength"] == 0.5  # anchor + 4 frames
    assert first["prompt"] == "make it red" and first["guidance_scale"] == 7.5
    assert second["prompt"] == "make it blue" and second["guidance_scale"] == 3.0
    assert len(pipeline.edit_store) == 9
    assert pipeline.position == EditPosition(
        phase="propagate", key_round=1, camera=0, window=2, passes=0, units=3, first_step=0, last_unit_step=4
    )
    # the training batch now holds edited images: the edited rows were replaced in place, the others left alone
    dataset = pipeline.datamanager.train_dataset
    assert not torch.allclose(dataset.current_image(1), dataset.original_image(1))
    assert pipeline.datamanager.train_image_dataloader.cached_collated_batch is batch
    rows = batch["image_idx"].tolist()
    for index in pipeline.cameras[0].indices[:9]:
        torch.testing.assert_close(batch["image"][rows.index(index)], dataset[index]["image"])
    assert torch.equal(batch["image"][rows.index(100)], untouched)

    # the IP2P weights are not part of the checkpoint; the schedule position and the store are
    state = pipeline.state_dict()
    assert not any(name in key for key in state for name in ("unet", "vae", "text_encoder"))
    assert state["_extra_state"]["position"]["window"] == 2 and len(state["_extra_state"]["edits"]["index"]) == 9

    # a pass ended at step 20: nothing until refresh_every steps later, then a window composited on renders
    pipeline.position = EditPosition(
        phase="wait", key_round=1, passes=1, units=3, first_step=0, last_unit_step=20, pass_end_step=20
    )
    renders = []
    original_render = pipeline.render
    monkeypatch.setattr(pipeline, "render", lambda index: renders.append(index) or original_render(index))
    pipeline.get_train_loss_dict(29)
    assert len(recorder.calls) == 3
    pipeline.get_train_loss_dict(30)
    assert len(recorder.calls) == 4 and pipeline.position.phase == "refresh"
    assert sorted(renders) == sorted(pipeline.cameras[0].indices[1:5])
    assert recorder.calls[3]["seed"] == first["seed"]  # the first pass's noise for the same window
    # the window starts from the renders, not from warped edits
    pipeline.model.eval()  # as the edit unit renders
    renders_now = torch.stack([pipeline.render(i)["rgb"] for i in pipeline.cameras[0].indices[1:5]])
    torch.testing.assert_close(recorder.inits[3][1:], renders_now)


# ---- multi-camera: key views projected through depth -----------------------------------------------------------------
CAPTURE_SIZE, CAPTURE_FRAMES, CAPTURE_AZIMUTHS = 48, 5, (0.0, 20.0, 40.0, 60.0)


def look_at(azimuth_degrees: float, radius: float = 4.0, height: float = 1.0) -> torch.Tensor:
    """OpenGL camera-to-world [3, 4] on a circle around the D-NeRF object (z up), looking at the origin."""
    angle = math.radians(azimuth_degrees)
    eye = torch.tensor([radius * math.cos(angle), radius * math.sin(angle), height])
    back = eye / eye.norm()
    right = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]), back)
    right = right / right.norm()
    up = torch.linalg.cross(back, right)
    return torch.stack([right, up, back, eye], dim=1)


RED, BLUE = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
WALL_X = -3.0  # a wall x = -3 behind the origin, that every camera of the synthetic capture sees


def write_capture(scene: Path, azimuths, frames: int, size: int, focal: float, images) -> None:
    """camXX/ frame folders and an LLFF poses_bounds.npy for cameras at ``look_at(azimuth)``."""
    rows = []
    for number, azimuth in enumerate(azimuths):
        pose = look_at(azimuth)
        (scene / f"cam{number:02d}").mkdir(parents=True)
        for frame in range(frames):
            Image.fromarray(images(number, frame, pose)).save(scene / f"cam{number:02d}" / f"{frame:04d}.png")
        # LLFF row: rotation in [down, right, back] axes, position, (h, w, focal); near and far bounds
        llff = torch.cat([pose[:, :3] @ torch.from_numpy(LLFF_TO_OPENGL).float().T, pose[:, 3:],
                          torch.tensor([[size], [size], [focal]], dtype=torch.float32)], dim=1)
        rows.append(torch.cat([llff.reshape(-1), torch.tensor([2.0, 6.0])]).numpy())
    np.save(scene / "poses_bounds.npy", np.stack(rows).astype(np.float64))


def n3dv_config(scene: Path):
    # poses used as given (no re-centring or scaling): the capture is in the reconstruction's world frame
    return N3DVDataParserConfig(data=scene, orientation_method="none", center_method="none", auto_scale_poses=False,
                                scene_scale=1.5)


def wall_depth(cameras: Cameras, index: int) -> torch.Tensor:
    """Distance along each pixel's (unit) ray to the wall: nerfstudio's ray depth, exactly."""
    rays = cameras.generate_rays(camera_indices=index, keep_shape=True)
    return (WALL_X - rays.origins[..., 0]) / rays.directions[..., 0]


def seen_by(cameras: Cameras, target: int, keys) -> torch.Tensor:
    """Pixels of ``target`` whose wall point lies inside some key camera's image (independent pinhole maths)."""
    rays = cameras.generate_rays(camera_indices=target, keep_shape=True)
    points = rays.origins + wall_depth(cameras, target)[..., None] * rays.directions
    seen = torch.zeros(points.shape[:2], dtype=torch.bool)
    for key in keys:
        pose = cameras.camera_to_worlds[key]
        local = (points - pose[:, 3]) @ pose[:, :3]  # OpenGL camera axes: x right, y up, looking down -z
        u = cameras.fx[key] * local[..., 0] / -local[..., 2] + cameras.cx[key]
        v = cameras.fy[key] * -local[..., 1] / -local[..., 2] + cameras.cy[key]
        seen |= (local[..., 2] < 0) & (u >= 0) & (u <= cameras.width[key]) & (v >= 0) & (v <= cameras.height[key])
    return seen


def test_key_view_rounds_project_key_edits_through_cached_depth(tiny_ip2p, tmp_path, monkeypatch):
    """Key views edited to red, repaints blue, depth of a known wall, the other camera's depth 0.03 too far along its
    rays. Round 1 of 2: each pixel of the other camera must be the 50/50 blend of red and its image exactly where a key
    view sees its wall point (the official thresholds, converted from LLFF units, accept the 0.03 error; taken as scene
    units they would reject nearly every pixel), blue elsewhere. Round 2 (the last) repaints the whole image. Depth is
    rendered once per camera."""
    size, focal = 32, 40.0
    generator = np.random.default_rng(0)
    write_capture(tmp_path / "scene", (0.0, 15.0, 30.0, 45.0), 2, size, focal,
                  lambda *_: generator.integers(0, 256, (size, size, 3), dtype=np.uint8))
    config = tiny_pipeline_config(tiny_ip2p, num_key_views=2, key_view_rounds=2)
    config.datamanager.dataparser = n3dv_config(tmp_path / "scene")
    config.datamanager.data = tmp_path / "scene"
    pipeline: Instruct4DPipeline = config.setup(device="cpu", test_mode="val")
    pipeline.open_editing(reconstruction_trainer(tmp_path / "run", tmp_path))
    cameras = pipeline.datamanager.train_dataset.cameras
    firsts = {group.name: group.indices[0] for group in pipeline.cameras}
    chosen = np.random.default_rng([config.edit_seed, 0]).choice(len(firsts), size=2, replace=False).tolist()
    (other,) = [name for c, name in enumerate(firsts) if c not in chosen]
    renders = []

    def render(index):
        renders.append(index)
        return {"depth": (wall_depth(cameras, index) + (0.03 if index == firsts[other] else 0.0))[..., None]}

    monkeypatch.setattr(pipeline, "render", render)
    # the capture's nearest bound is 2 and its poses are not scaled: one LLFF unit is 1.08 x 2 scene units
    assert pipeline.scene_threshold(0.02) == pytest.approx(0.02 * 1.08 * 2.0)

    def editor(conditions, inits, *, strength, **_):
        if strength == 1.0:  # the joint key-view edit of the first round
            return RED.expand_as(inits).clone()
        return torch.cat([inits[:1], BLUE.expand_as(inits[1:])])  # repaint: the anchor, then the targets

    pipeline.editor = editor
    pipeline.run_edit_unit(0)
    assert sorted(renders) == sorted(firsts.values())  # each camera's depth once

    dataset = pipeline.datamanager.train_dataset
    edited = {name: dataset.current_image(index) for name, index in firsts.items()}
    keys = [name for name, image in edited.items() if torch.allclose(image, RED.expand_as(image), atol=1 / 255)]
    assert sorted(keys) == sorted(set(firsts) - {other}) and len(pipeline.edit_store) == 3
    image, original = edited[other], dataset.original_image(firsts[other])
    blended = (image - (0.5 * RED + 0.5 * original)).abs().amax(-1) < 1.5 / 255
    repainted = (image - BLUE).abs().amax(-1) < 1.5 / 255
    expected = seen_by(cameras, firsts[other], [firsts[k] for k in keys])
    seen, agreement = float(expected.float().mean()), float((blended == expected).float().mean())
    intrinsics, poses = pipeline._camera_matrices([firsts[other]] + [firsts[k] for k in keys])
    depths = torch.stack([render(firsts[name])["depth"][..., 0] for name in [other] + keys])
    _, unconverted = project_key_views(depths[:1], intrinsics[:1], poses[:1], torch.zeros(2, size, size, 3),
                                       depths[1:], intrinsics[1:], poses[1:], threshold=0.02)
    print(f"{other}: {seen:.1%} of pixels seen by a key view, {float(blended.float().mean()):.1%} blended "
          f"(threshold 0.02 LLFF units = {pipeline.scene_threshold(0.02):.4f} scene units; taken as 0.02 scene units: "
          f"{float(unconverted.any(1).float().mean()):.1%} valid), {float(repainted.float().mean()):.1%} repainted; "
          f"masks agree on {agreement:.2%}")
    assert bool((blended | repainted).all())
    assert 0.2 < seen < 1.0 and agreement > 0.98
    assert float(unconverted.any(1).float().mean()) < 0.1 * seen  # measured: 3.1 % against 83 %

    renders.clear()
    pipeline.run_edit_unit(1)  # the last round: whole-image repaint, depth from the cache
    torch.testing.assert_close(dataset.current_image(firsts[other]), BLUE.expand_as(image), atol=1 / 255, rtol=0)
    assert renders == []


# ---- end to end: monocular D-NeRF ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reconstruction(tmp_path_factory):
    """A few nerfacto-4d iterations on the D-NeRF scene: what instruct4d edits."""
    root = tmp_path_factory.mktemp("instruct4d")
    result = train("nerfacto-4d", root / "out", "recon", 6, *dnerf_args())
    assert result.returncode == 0, result.stderr[-3000:]
    return root, root / "out" / "exp" / "nerfacto-4d" / "recon"


@pytest.fixture(scope="module")
def monocular(reconstruction, tiny_ip2p):
    """instruct4d for 6 steps with an edit unit every 2 steps: the key frame, then windows 1 and 2."""
    root, recon = reconstruction
    before = snapshot(DNERF_SCENE)
    result = train("instruct4d", root / "out", "edit1", 6, *dnerf_args(),
                   *edit_args(tiny_ip2p, recon / "nerfstudio_models", "--pipeline.steps-per-edit-unit", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(DNERF_SCENE) == before, "instruct4d wrote into the dataset"
    return root, root / "out" / "exp" / "instruct4d" / "edit1"


def extra_state(run_dir: Path) -> dict:
    (checkpoint,) = sorted((run_dir / "nerfstudio_models").glob("step-*.ckpt"))
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["pipeline"]["_extra_state"]


def dnerf_train_frames():
    """Training image paths of the D-NeRF scene in time order (the order instruct4d propagates in)."""
    frames = json.loads((DNERF_SCENE / "transforms_train.json").read_text())["frames"]
    return [DNERF_SCENE / f"{f['file_path']}.png" for f in sorted(frames, key=lambda f: f["time"])]


def original_frame(path: Path, size: int) -> np.ndarray:
    image = Image.open(path).convert("RGBA").resize((size, size), Image.BILINEAR)
    rgba = np.asarray(image).astype(np.float32) / 255.0
    return rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])  # on white, as the dataparser composites


@pytest.mark.slow
@needs_scene
def test_monocular_edits_are_written_under_the_run_and_change_the_frames(monocular):
    _, run_dir = monocular
    index = json.loads((run_dir / "edits" / "index.json").read_text())
    # key frame + 2 windows of 4 frames, keyed (camera 0, frame = rank in time)
    assert sorted((e["camera"], e["frame"]) for e in index.values()) == [(0, f) for f in range(9)]
    originals = dnerf_train_frames()
    for entry in index.values():
        edited = png(run_dir / "edits" / entry["file"])
        assert edited.shape == (64, 64, 3)
        difference = np.abs(edited - original_frame(originals[entry["frame"]], 64)).mean()
        assert difference > 0.05, f"frame {entry['frame']} barely changed ({difference:.3f})"
    state = extra_state(run_dir)
    assert state["position"]["units"] == 3 and state["position"]["window"] == 2 and state["num_train_images"] == 200
    frames = video_frames(run_dir / "edit_videos" / "cam00.mp4")
    assert len(frames) == 200 and frames[0].shape == (64, 128, 3)
    # left half the original, right half the edit: they differ on edited frames only
    assert np.abs(frames[1][:, :64].astype(float) - frames[1][:, 64:]).mean() > 5
    assert np.abs(frames[100][:, :64].astype(float) - frames[100][:, 64:]).mean() < 3


@pytest.fixture(scope="module")
def resumed(monocular, tiny_ip2p):
    root, first = monocular
    # --max-num-iterations is the edit run's total: 6 steps done, 4 more (the run counts from the reconstruction's end)
    result = train("instruct4d", root / "out", "edit2", 10, *dnerf_args(),
                   *edit_args(tiny_ip2p, first / "nerfstudio_models", "--pipeline.steps-per-edit-unit", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return first, root / "out" / "exp" / "instruct4d" / "edit2"


@pytest.mark.slow
@needs_scene
def test_resume_restores_the_edits_and_continues_the_schedule(resumed):
    first, second = resumed
    before, after = extra_state(first), extra_state(second)
    # two more units: windows 3 and 4; the key frame is not edited again
    assert after["position"]["units"] == before["position"]["units"] + 2 == 5
    assert after["position"]["window"] == 4 and after["position"]["key_round"] == 1
    assert after["position"]["first_step"] == before["position"]["first_step"]
    assert len(after["edits"]["index"]) == len(before["edits"]["index"]) + 8 == 17
    assert after["edits"]["root"] == str(second / "edits")
    for entry in before["edits"]["index"].values():  # the earlier edits were copied over unchanged
        assert (second / "edits" / entry["file"]).read_bytes() == (first / "edits" / entry["file"]).read_bytes()


@pytest.mark.slow
@needs_scene
def test_ns_render_renders_the_edited_scene_through_time(resumed, tmp_path):
    """A fixed camera (the first validation view) with render times 0, 0.5, 1: frames differ only if time is used."""
    _, run_dir = resumed
    meta = json.loads((DNERF_SCENE / "transforms_val.json").read_text())
    transforms = json.loads((run_dir / "dataparser_transforms.json").read_text())
    pose = np.concatenate([np.array(transforms["transform"]) @ np.array(meta["frames"][0]["transform_matrix"]),
                           [[0, 0, 0, 1]]])
    pose[:3, 3] *= transforms["scale"]
    path = {
        "render_height": 64, "render_width": 64, "seconds": 1.0, "fps": 3,
        "camera_path": [{"camera_to_world": pose.reshape(-1).tolist(), "fov": math.degrees(meta["camera_angle_x"]),
                         "aspect": 1.0, "render_time": t} for t in (0.0, 0.5, 1.0)],
    }
    (tmp_path / "path.json").write_text(json.dumps(path))
    result = run([sys.executable, "-m", "nerfstudio.scripts.render", "camera-path", "--load-config",
                  str(run_dir / "config.yml"), "--camera-path-filename", str(tmp_path / "path.json"),
                  "--output-format", "images", "--image-format", "png", "--output-path", str(tmp_path / "frames")])
    assert result.returncode == 0, result.stderr[-3000:]
    frames = [png(p) for p in sorted((tmp_path / "frames").glob("*.png"))]
    assert len(frames) == 3 and frames[0].shape == (64, 64, 3)
    differences = [float(np.abs(a - b).mean()) for a, b in zip(frames, frames[1:])]
    print(f"ns-render camera-path: mean abs difference between render times {differences}")
    assert min(differences) > 1e-3


# ---- end to end: a real monocular video through the default parser --------------------------------------------------
NRNERF = Path(__file__).resolve().parents[2] / "shared" / "data" / "nrnerf_example_sequence"


@pytest.mark.slow
@pytest.mark.skipif(not NRNERF.is_dir(), reason=f"needs {NRNERF}")
def test_monocular_video_edits_through_the_default_parser(tiny_ip2p, tmp_path):
    """The NR-NeRF handheld video (86 frames, 64x48 here): a nerfacto-4d reconstruction read by ns4d-data, then
    instruct4d with its default parser (no parser named): key frame, then two windows of RAFT-warped frames."""
    data = NRNERF / "transforms_nerfstudio_derived.json"
    scale = ["--pipeline.datamanager.camera-res-scale-factor", "0.125"]
    result = train("nerfacto-4d", tmp_path, "recon", 2, *scale, "ns4d-data", "--eval-mode", "all", data=data)
    assert result.returncode == 0, result.stderr[-3000:]
    load_dir = tmp_path / "exp" / "nerfacto-4d" / "recon" / "nerfstudio_models"
    result = train("instruct4d", tmp_path, "edit", 3, *scale,
                   *edit_args(tiny_ip2p, load_dir, "--pipeline.steps-per-edit-unit", "1"), data=data)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "exp" / "instruct4d" / "edit"
    assert "propagate pass 1: cam00 window 2/22" in " ".join(result.stdout.split())
    index = json.loads((run_dir / "edits" / "index.json").read_text())
    assert sorted(e["frame"] for e in index.values()) == list(range(9))
    assert extra_state(run_dir)["num_train_images"] == 86  # every frame, in capture order
    frames = sorted(NRNERF.glob("images/*.png"))
    for entry in index.values():
        original = np.asarray(Image.open(frames[entry["frame"]]).convert("RGB").resize((64, 48), Image.BILINEAR))
        assert np.abs(png(run_dir / "edits" / entry["file"]) - original / 255.0).mean() > 0.05


# ---- end to end: multi-camera capture rendered from the reconstruction ----------------------------------------------
@pytest.fixture(scope="module")
def capture(reconstruction):
    """An N3DV-layout capture (camXX/ frame folders + poses_bounds.npy) rendered from the reconstruction."""
    root, recon = reconstruction
    _, pipeline, _, _ = eval_setup(recon / "config.yml", test_mode="inference")
    focal = 0.5 * CAPTURE_SIZE / math.tan(0.5 * 0.6911)  # D-NeRF's field of view

    def render(camera_number, frame, pose):
        camera = Cameras(camera_to_worlds=pose[None], fx=focal, fy=focal, cx=CAPTURE_SIZE / 2, cy=CAPTURE_SIZE / 2,
                         width=CAPTURE_SIZE, height=CAPTURE_SIZE, times=torch.tensor([[frame / (CAPTURE_FRAMES - 1)]]))
        rgb = pipeline.model.get_outputs_for_camera(camera)["rgb"]
        return (rgb.clamp(0, 1) * 255).round().byte().numpy()

    write_capture(root / "capture", CAPTURE_AZIMUTHS, CAPTURE_FRAMES, CAPTURE_SIZE, focal, render)
    return root / "capture"


def n3dv_args(scene: Path):
    # as n3dv_config: poses used as given
    return ["n3dv-data", "--data", str(scene), "--orientation-method", "none", "--center-method", "none",
            "--auto-scale-poses", "False", "--scene-scale", "1.5"]


@pytest.fixture(scope="module")
def multi_camera(reconstruction, capture, tiny_ip2p):
    """Key-view round with 2 of the 3 training cameras (cam00 is held out), then one window per camera."""
    root, recon = reconstruction
    before = snapshot(capture)
    result = train("instruct4d", root / "out", "multi", 4,
                   *edit_args(tiny_ip2p, recon / "nerfstudio_models", "--pipeline.steps-per-edit-unit", "1",
                              "--pipeline.num-key-views", "2", "--pipeline.key-view-rounds", "1"),
                   *n3dv_args(capture), data=capture)
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(capture) == before, "instruct4d wrote into the dataset"
    return result, root / "out" / "exp" / "instruct4d" / "multi"


@pytest.mark.slow
@needs_scene
def test_multi_camera_key_views_projection_and_windows(multi_camera, capture):
    result, run_dir = multi_camera
    index = json.loads((run_dir / "edits" / "index.json").read_text())
    assert sorted((e["camera"], e["frame"]) for e in index.values()) == [
        (c, f) for c in (1, 2, 3) for f in range(CAPTURE_FRAMES)
    ]
    for entry in index.values():
        original = png(capture / f"cam{entry['camera']:02d}" / f"{entry['frame']:04d}.png")
        assert np.abs(png(run_dir / "edits" / entry["file"]) - original).mean() > 0.05
    log = result.stdout + result.stderr
    assert "key-view round 1/1" in log and log.count("propagate pass 1") == 3
    state = extra_state(run_dir)
    assert state["position"]["phase"] == "wait" and state["position"]["passes"] == 1
    assert sorted(p.name for p in (run_dir / "edit_videos").glob("*.mp4")) == ["cam01.mp4", "cam02.mp4", "cam03.mp4"]


# ---- bad input -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_runs(reconstruction, multi_camera, tiny_ip2p):
    """Every bad input at once (they wait on I/O and imports more than on the CPU)."""
    root, recon = reconstruction
    _, multi_run = multi_camera
    out = root / "bad"
    checkpoints = recon / "nerfstudio_models"
    cases = {
        "no load dir": ["--pipeline.prompt", "x", "--pipeline.ip2p-model-id", str(tiny_ip2p), *TINY_EDITS],
        "empty prompt": edit_args(tiny_ip2p, checkpoints)[:2] + ["--pipeline.ip2p-model-id", str(tiny_ip2p)],
        "weights unreachable": edit_args(root / "no-such-ip2p", checkpoints),
        "other scene": edit_args(tiny_ip2p, multi_run / "nerfstudio_models"),
        "other model": edit_args(tiny_ip2p, checkpoints, "--pipeline.model.num-levels", "5"),
        "no lpips weights": edit_args(tiny_ip2p, checkpoints),
        "patch sizes differ": edit_args(tiny_ip2p, checkpoints, "--pipeline.datamanager.patch-size", "16"),
    }
    envs = {"no lpips weights": {"TORCH_HOME": str(root / "empty_torch_home")}}
    before = snapshot(DNERF_SCENE)
    started = time.time()
    processes = {name: train("instruct4d", out, name.replace(" ", "-"), 2, *dnerf_args(), *args, popen=True,
                             env=envs.get(name)) for name, args in cases.items()}
    results = {name: (p.wait(timeout=900), *p.communicate()) for name, p in processes.items()}
    assert snapshot(DNERF_SCENE) == before
    print(f"bad-input runs: {time.time() - started:.0f} s")
    return results


@pytest.mark.slow
@needs_scene
@pytest.mark.parametrize(
    "case, expected",
    [
        ("no load dir", "error: instruct4d edits a reconstruction: pass --load-dir"),
        ("empty prompt", "error: --pipeline.prompt is empty"),
        ("weights unreachable", "error: --pipeline.ip2p-model-id: cannot load"),
        ("other scene", "error: the checkpoint edits a scene with 15 training images, but this dataset has 200"),
        ("other model", "error: the checkpoint (--load-dir/--load-checkpoint) does not fit this model: size mismatch"),
        ("no lpips weights", f"error: --pipeline.model.lpips-weights: cannot load '{ALEXNET}' (HF_HUB_OFFLINE is set"),
        ("patch sizes differ", "error: --pipeline.datamanager.patch-size 16: the LPIPS loss takes 32x32 patches"),
    ],
)
def test_bad_input_is_a_one_line_error(bad_runs, case, expected):
    returncode, _, stderr = bad_runs[case]
    assert returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    print(f"{case}: exit {returncode}: {last}")
    assert last.startswith(expected), last
    if case in ("no lpips weights", "patch sizes differ"):  # and how to go on without the term
        assert last.endswith("--pipeline.model.lpips-loss-weight 0 trains without the LPIPS term"), last
