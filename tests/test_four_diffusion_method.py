"""4diffusion: its input (object videos with alpha or masks, 4Diffusion's frame sampling, white compositing, image to
video with a tiny random Stable Video Diffusion), bad input, and `ns-train 4diffusion` end to end with the converted
tiny 4DM (`tiny_4dm`) on the sample scene's object video and on real RGBA frames (D-NeRF jumpingjacks): anchor video
written, checkpoint, a resumed run that reuses the anchor, `ns-render` frames that change with time, `metrics.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from PIL import Image
from tiny_4dm import build_tiny_4dm, build_tiny_clipseg, write_random_backbone
from tiny_models import build_tiny_clip
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
from tree_digest import tree_digest

from ns_4d_methods.cli.sample_object_video import write_object_video
from ns_4d_methods.cli.sample_scene import SampleScene
from ns_4d_methods.data.object_video import (
    ObjectVideoConfig,
    ObjectVideoDataManagerConfig,
    auto_num_frames,
    image_to_video,
    on_white,
    read_object_image,
    read_object_video,
    sample_generated_video,
    sample_indices,
)
from ns_4d_methods.errors import InputError
from ns_4d_methods.models.four_diffusion import FourDiffusionModelConfig
from ns_4d_methods.models.image_metrics import VGG16
from ns_4d_methods.pipelines.four_diffusion_pipeline import FourDiffusionPipeline, FourDiffusionPipelineConfig
from ns_4d_methods.render.orbit_cameras import orbit_c2w

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
JUMPINGJACKS = DATA / "dnerf_jumpingjacks_400" / "train"
RGB_VIDEO = DATA / "videos" / "car-turn.mp4"
needs_data = pytest.mark.skipif(not (JUMPINGJACKS.is_dir() and RGB_VIDEO.is_file()), reason=f"needs {DATA}")
PROMPT = "three striped spheres"


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """The sample scene's object video (25 RGBA frames of 32 px, a webm) and its ground-truth views."""
    return write_object_video(tmp_path_factory.mktemp("scene") / "object", resolution=32, gt_instants=5)


# ---- input -------------------------------------------------------------------------------------------------------
def test_frames_are_sampled_as_4diffusion_does(scene):
    assert sample_indices(25, 8) == [0, 3, 6, 9, 12, 15, 18, 21]
    assert auto_num_frames(25) == auto_num_frames(32) == 8 and auto_num_frames(100) == 24 and auto_num_frames(200) == 48
    video = read_object_video(scene / "frames", ObjectVideoConfig(resolution=32))
    assert video.source_indices == [0, 3, 6, 9, 12, 15, 18, 21] and video.num_source_frames == 25
    assert video.frames.shape == (8, 3, 32, 32)
    rgba = np.asarray(Image.open(scene / "frames" / "00009.png")).astype(np.float32) / 255.0
    expected = rgba[..., :3] * rgba[..., 3:] + 1.0 - rgba[..., 3:]  # composited on white
    assert np.abs(video.frames[3].permute(1, 2, 0).numpy() - expected).max() < 1e-6
    # the webm (VP9 with alpha, decoded by libvpx) gives the same frames up to its chroma subsampling
    webm = read_object_video(scene / "video.webm", ObjectVideoConfig(resolution=32))
    assert (webm.frames - video.frames).abs().mean() < 0.02


def test_sample_scene_writes_the_object_video(tmp_path):
    SampleScene(
        tmp_path / "s", resolution=16, num_train=2, num_val=1, num_test=1, num_points=0, object_video=True
    ).main()
    frames = sorted((tmp_path / "s/object/frames").glob("*.png"))
    assert len(frames) == 25 and Image.open(frames[0]).mode == "RGBA"
    views = json.loads((tmp_path / "s/object/gt_views/views.json").read_text())["views"]
    assert [v["azimuth"] for v in views] == [0.0, 90.0, 180.0] and len(views[0]["times"]) == 15
    assert all((tmp_path / "s/object/gt_views" / name).is_file() for v in views for name in v["frames"])


def test_white_compositing_pads_to_a_square():
    rgba = np.zeros((4, 8, 4), np.uint8)
    rgba[..., 0], rgba[:, 2:6, 3] = 255, 255  # a red opaque square in a transparent frame
    image = on_white(rgba, 8)
    assert image.shape == (3, 8, 8)
    assert torch.all(image[:, :2] == 1) and torch.all(image[:, 6:] == 1)  # white padding above and below
    assert torch.allclose(image[:, 2:6, 2:6], torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 4, 4))
    assert torch.all(image[:, 2:6, :2] == 1)  # transparent pixels become white


def test_masks_cut_out_rgb_frames(scene, tmp_path):
    frames, masks = tmp_path / "rgb", tmp_path / "masks"
    frames.mkdir(), masks.mkdir()
    for path in sorted((scene / "frames").glob("*.png")):
        rgba = np.asarray(Image.open(path))
        Image.fromarray(np.zeros_like(rgba[..., :3])).save(frames / path.name)  # black background, no alpha
        Image.fromarray(rgba[..., 3]).save(masks / path.name)
    video = read_object_video(frames, ObjectVideoConfig(masks=masks, resolution=32))
    reference = read_object_video(scene / "frames", ObjectVideoConfig(resolution=32))
    background = reference.frames.min(dim=1).values > 0.999
    assert torch.all(video.frames.permute(1, 0, 2, 3)[:, background] == 1.0)  # masked out -> white
    with pytest.raises(InputError, match="no alpha channel"):
        read_object_video(frames, ObjectVideoConfig(resolution=32))
    (masks / "00000.png").unlink()
    with pytest.raises(InputError, match="24 masks for 25 frames"):
        read_object_video(frames, ObjectVideoConfig(masks=masks, resolution=32))


def tiny_model_config() -> FourDiffusionModelConfig:
    return FourDiffusionModelConfig(
        num_levels=4,
        log2_hashmap_size=10,
        max_res=64,
        log2_hashmap_size_4d=10,
        max_res_4d=32,
        implementation="torch",
        num_proposal_iterations=1,
        num_proposal_samples_per_ray=(12,),
        num_nerf_samples_per_ray=12,
        proposal_net_args_list=[dict(hidden_dim=16, log2_hashmap_size=10, num_levels=3, max_res=32, use_linear=False)],
        anchor_lpips_weight=0.0,  # no VGG weights in-process; test_four_diffusion_fidelity loads a random one
    )


@needs_data
def test_bad_input_is_one_line(scene, models, tmp_path):
    def datamanager(data, **video):
        return ObjectVideoDataManagerConfig(data=Path(data), video=ObjectVideoConfig(**video)).setup(device="cpu")

    short = tmp_path / "short"
    short.mkdir()
    for path in sorted((scene / "frames").glob("*.png"))[:5]:
        shutil.copy(path, short / path.name)
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for index in range(8):
        (corrupt / f"{index:03d}.png").write_bytes(b"not a png")
    no_image_encoder = tmp_path / "4dm"
    shutil.copytree(models["4dm"], no_image_encoder)
    shutil.rmtree(no_image_encoder / "image_encoder")

    def prior_from(path):
        pipeline = FourDiffusionPipelineConfig(
            prompt=PROMPT,
            prior_model=str(path),
            model=tiny_model_config(),
            datamanager=ObjectVideoDataManagerConfig(data=scene / "frames"),
        ).setup(device="cpu")
        pipeline.setup_generation(tmp_path / "run")

    cases = {
        "no alpha channel": lambda: datamanager(RGB_VIDEO),
        "5 frames; expected at least 8": lambda: datamanager(short),
        "cannot read a video": lambda: datamanager(broken),
        "000.png: cannot read an image": lambda: datamanager(corrupt),
        "001.png: cannot read an image": lambda: datamanager(corrupt / "001.png", image_to_video=True),
        "no such file or directory": lambda: datamanager(tmp_path / "missing.mp4"),
        "unknown video type": lambda: datamanager(scene / "gt_views" / "views.json"),
        "--data: missing": lambda: ObjectVideoDataManagerConfig().setup(device="cpu"),
        "--pipeline.prompt is empty": lambda: FourDiffusionPipelineConfig(
            datamanager=ObjectVideoDataManagerConfig(data=scene / "frames")
        ).setup(device="cpu"),
        "no views.json": lambda: FourDiffusionPipelineConfig(prompt=PROMPT, gt_views=tmp_path).setup(device="cpu"),
        "--pipeline.prior-model: cannot load": lambda: prior_from(tmp_path / "nowhere"),
        "not a loadable CLIPVisionModel": lambda: prior_from(no_image_encoder),
    }
    before = tree_digest(scene)
    for expected, make in cases.items():
        with pytest.raises(InputError) as error:
            make()
        assert expected in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert tree_digest(scene) == before


# ---- image to video ----------------------------------------------------------------------------------------------
def build_tiny_svd(path: Path) -> Path:
    """A tiny random Stable Video Diffusion pipeline of the real classes (sizes as diffusers' own tests)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNetSpatioTemporalConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=16,
            in_channels=8,
            out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            cross_attention_dim=32,
            num_attention_heads=8,
            projection_class_embeddings_input_dim=96,
            addition_time_embed_dim=32,
        )
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            latent_channels=4,
        )
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                intermediate_size=37,
                patch_size=4,
            )
        )
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        interpolation_type="linear",
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    ).save_pretrained(path)
    return path


def test_image_to_video_with_stable_video_diffusion(scene, tmp_path):
    svd = build_tiny_svd(tmp_path / "svd")
    config = ObjectVideoConfig(
        image_to_video=True,
        svd_model=str(svd),
        svd_num_frames=10,
        svd_resolution=32,
        svd_steps=2,
        resolution=16,
    )
    image = read_object_image(scene / "frames" / "00000.png", config)
    assert image.shape == (3, 32, 32)
    frames = image_to_video(image, config, "cpu")
    assert frames.shape == (10, 3, 32, 32) and 0 <= float(frames.min()) and float(frames.max()) <= 1
    video = sample_generated_video(frames, config, scene)
    assert video.source_indices == sample_indices(10, 8) and video.frames.shape == (8, 3, 16, 16)
    # through the datamanager: the video is made later (by the pipeline), the instants are known now
    datamanager = ObjectVideoDataManagerConfig(data=scene / "frames" / "00000.png", video=config).setup(device="cpu")
    assert datamanager.needs_video and datamanager.config.num_frames == 8
    datamanager.set_generated_video(frames)
    assert not datamanager.needs_video and datamanager.video.frames.shape == (8, 3, 16, 16)
    with pytest.raises(InputError, match="cannot load"):
        image_to_video(image, ObjectVideoConfig(svd_model=str(tmp_path / "nowhere")), "cpu")


def test_image_to_video_run_keeps_its_video_and_anchor(scene, models, tmp_path, monkeypatch):
    """The pipeline animates the image once, samples 12 instants (anchors for instants 0-7 and 4-11), and a resumed
    run takes video and anchor back from the checkpoint state."""
    svd = build_tiny_svd(tmp_path / "svd")
    video = ObjectVideoConfig(
        image_to_video=True,
        svd_model=str(svd),
        svd_num_frames=14,
        svd_resolution=32,
        svd_steps=2,
        num_frames=12,
    )

    def pipeline():
        return FourDiffusionPipelineConfig(
            prompt=PROMPT,
            prior_model=models["4dm"],
            anchor_steps=2,
            matting_model=models["clipseg"],
            model=tiny_model_config(),
            datamanager=ObjectVideoDataManagerConfig(data=scene / "frames" / "00000.png", video=video),
        ).setup(device="cpu")

    first = pipeline()
    assert first.datamanager.needs_video and first.datamanager.config.num_frames == 12
    first.setup_generation(tmp_path / "first")
    assert first.anchor_windows() == [0, 4] and first.anchor.shape == (12, 4, 3, 64, 64)
    assert first.generated_video.shape == (14, 3, 32, 32) and (tmp_path / "first/input/generated.mp4").is_file()
    assert len(list((tmp_path / "first/anchor").glob("view*/*.png"))) == 48
    state = first.get_extra_state()

    def fail(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr("ns_4d_methods.data.object_video.image_to_video", fail)
    monkeypatch.setattr(FourDiffusionPipeline, "generate_anchor", fail)
    resumed = pipeline()
    resumed.set_extra_state(state)
    resumed.setup_generation(tmp_path / "resumed")
    assert torch.equal(resumed.anchor, first.anchor) and torch.equal(resumed.generated_video, first.generated_video)
    assert torch.equal(resumed.datamanager.video.frames, first.datamanager.video.frames)
    # a checkpoint from another prompt does not pass its anchor off as this one's
    other = FourDiffusionPipelineConfig(
        prompt="something else",
        prior_model=models["4dm"],
        model=tiny_model_config(),
        datamanager=ObjectVideoDataManagerConfig(data=scene / "frames" / "00000.png", video=video),
    ).setup(device="cpu")
    other.set_extra_state(state)
    with pytest.raises(InputError, match="anchor video was generated for another prompt"):
        other.setup_generation(tmp_path / "other")


# ---- ns-train end to end -----------------------------------------------------------------------------------------
TINY = [
    "--pipeline.model.num-levels",
    "4",
    "--pipeline.model.log2-hashmap-size",
    "10",
    "--pipeline.model.max-res",
    "64",
    "--pipeline.model.log2-hashmap-size-4d",
    "10",
    "--pipeline.model.max-res-4d",
    "32",
    "--pipeline.model.num-proposal-iterations",
    "1",
    "--pipeline.model.num-proposal-samples-per-ray",
    "12",
    "--pipeline.model.num-nerf-samples-per-ray",
    "12",
    "--pipeline.model.proposal-net-args-list.0.num-levels",
    "3",
    "--pipeline.model.proposal-net-args-list.0.log2-hashmap-size",
    "10",
    "--pipeline.model.proposal-net-args-list.0.max-res",
    "32",
    "--pipeline.model.implementation",
    "torch",
    "--pipeline.model.eval-num-rays-per-chunk",
    "4096",
    "--pipeline.model.time-resolution",
    "7",
    "--pipeline.datamanager.resolutions",
    "8",
    "12",
    "--pipeline.datamanager.resolution-milestones",
    "2",
    "--pipeline.datamanager.eval-resolution",
    "16",
    "--pipeline.datamanager.num-eval-cameras",
    "8",
    "--pipeline.anchor-steps",
    "2",
    "--pipeline.anchor-resolution",
    "16",
    "--pipeline.video-frames",
    "4",
    "--pipeline.sds.grad-views",
    "8",
    "--optimizers.grids.optimizer.lr",
    "0.1",  # so that a few steps already make time visible in renders
]


def _env():
    # the environment's bin (its ffmpeg, which ns-render needs) first, also when pytest runs without activating it
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PATH=path)


def ns(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=900, env={**_env(), **env}
    )


def train(out: Path, name: str, steps: int, models: dict, *extra: str) -> subprocess.CompletedProcess:
    return ns(
        "nerfstudio.scripts.train",
        "4diffusion",
        "--output-dir",
        str(out),
        "--experiment-name",
        "exp",
        "--timestamp",
        name,
        "--max-num-iterations",
        str(steps),
        "--machine.device-type",
        "cpu",
        "--vis",
        "tensorboard",
        "--steps-per-eval-batch",
        "2",
        "--steps-per-eval-image",
        "3",
        "--steps-per-save",
        "1000",
        "--pipeline.prompt",
        PROMPT,
        "--pipeline.prior-model",
        models["4dm"],
        "--pipeline.clip-model",
        models["clip"],
        "--pipeline.matting-model",
        models["clipseg"],
        *TINY,
        *extra,
        TORCH_HOME=models["torch_home"],  # random VGG16 features for the anchor loss's LPIPS
    )


def video_frames(path: Path) -> list:
    reader = imageio_ffmpeg.read_frames(str(path))
    width, height = next(reader)["size"]
    return [np.frombuffer(frame, np.uint8).reshape(height, width, 3).astype(float) for frame in reader]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    build_tiny_clip(root / "clip")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(root / "torch_home"))
        write_random_backbone(VGG16, features_only=True)
    return {
        "4dm": str(build_tiny_4dm(root)),
        "clip": str(root / "clip"),
        "clipseg": str(build_tiny_clipseg(root / "clipseg")),
        "torch_home": str(root / "torch_home"),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, models, scene) -> dict:
    out = tmp_path_factory.mktemp("runs")
    inputs = tree_digest(scene)
    first = train(
        out, "first", 4, models, "--pipeline.gt-views", str(scene / "gt_views"), "--data", str(scene / "frames")
    )
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = train(
        out,
        "resumed",
        6,  # the run's total: 2 steps more than the first run's 4
        models,
        "--load-dir",
        str(out / "exp/4diffusion/first/nerfstudio_models"),
        "--data",
        str(scene / "frames"),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert tree_digest(scene) == inputs, "the input was modified"
    return {"out": out, "first": first, "resumed": resumed}


@pytest.mark.slow
def test_anchor_checkpoint_outputs(runs):
    run = runs["out"] / "exp/4diffusion/first"
    log = runs["first"].stdout
    assert "generating the anchor video, instants 0-7 of 8 (2 DDIM steps)" in log
    anchor = sorted((run / "anchor").glob("view*/*.png"))
    assert len(anchor) == 32 and Image.open(anchor[0]).size == (64, 64)  # 4 views x 8 instants at the prior's size
    assert len(video_frames(run / "anchor" / "anchor.mp4")) == 8
    assert len(list((run / "input").glob("frame_*.png"))) == 8
    assert (run / "nerfstudio_models" / "step-000000003.ckpt").is_file()
    state = torch.load(run / "nerfstudio_models" / "step-000000003.ckpt", map_location="cpu", weights_only=False)
    extra = state["pipeline"]["_extra_state"]
    assert extra["anchor"].shape == (8, 4, 3, 64, 64) and extra["anchor"].dtype == torch.uint8
    assert not any(key.startswith("_model.prior") or "unet" in key for key in state["pipeline"])  # no 4DM weights
    for name in ("view0_az000", "view1_az090", "view2_az180", "view3_az270", "orbit"):
        assert len(video_frames(run / "videos" / f"{name}.mp4")) == 4
    metrics = json.loads((run / "metrics.json").read_text())
    print("4diffusion metrics (tiny models, 4 steps):", metrics)
    assert set(metrics) >= {"clip_i", "clip_c", "gt_psnr", "gt_ssim", "instants"}
    assert -1 <= metrics["clip_i"] <= 1 and -1 <= metrics["clip_c"] <= 1 and 0 < metrics["gt_psnr"] < 60


@pytest.mark.slow
def test_resume_reuses_the_anchor(runs):
    first, resumed = (runs["out"] / "exp/4diffusion" / name for name in ("first", "resumed"))
    assert "anchor video restored from the checkpoint (not generated again)" in runs["resumed"].stdout
    assert "generating the anchor video" not in runs["resumed"].stdout
    for path in sorted((first / "anchor").glob("view*/*.png")):
        assert path.read_bytes() == (resumed / path.relative_to(first)).read_bytes()
    assert (resumed / "nerfstudio_models" / "step-000000005.ckpt").is_file()  # steps 4 and 5 after 0-3


@pytest.mark.slow
def test_ns_render_moves_through_time(runs, tmp_path):
    config = runs["out"] / "exp/4diffusion/resumed/config.yml"
    c2w = orbit_c2w(0.0, -90.0, 1.1).flatten().tolist()  # the input view
    path = tmp_path / "path.json"
    path.write_text(
        json.dumps(
            {
                "camera_type": "perspective",
                "render_height": 16,
                "render_width": 16,
                "seconds": 1.0,
                "fps": 6,
                "camera_path": [
                    {"camera_to_world": c2w, "fov": 45.0, "aspect": 1.0, "render_time": t}
                    for t in np.linspace(0, 1, 6).tolist()
                ],
            }
        )
    )
    result = ns(
        "nerfstudio.scripts.render",
        "camera-path",
        "--load-config",
        str(config),
        "--camera-path-filename",
        str(path),
        "--output-path",
        str(tmp_path / "time"),
        "--output-format",
        "images",
        "--image-format",
        "png",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # lossless frames: a few steps of training change the renders by about a grey level per step of time
    frames = [np.asarray(Image.open(p)).astype(float) for p in sorted((tmp_path / "time").glob("*.png"))]
    change = [np.abs(b - a).mean() for a, b in zip(frames, frames[1:])]
    print(f"fixed camera, time 0 -> 1: mean |frame change| {np.round(change, 2).tolist()} (of 255)")
    assert len(frames) == 6 and min(change) > 0.1


@pytest.mark.slow
@needs_data
def test_real_rgba_frames_with_a_sliding_window(models, tmp_path):
    before = tree_digest(JUMPINGJACKS)
    result = train(
        tmp_path,
        "jacks",
        3,
        models,
        "--pipeline.datamanager.video.num-frames",
        "16",
        "--pipeline.datamanager.video.resolution",
        "64",
        "--data",
        str(JUMPINGJACKS),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "exp/4diffusion/jacks"
    # 16 of 200 frames: anchor blocks 0-7, 7-14 (sharing instant 7) and 8-15; SDS windows slide over the 16 instants
    for block in ("0-7", "7-14", "8-15"):
        assert f"instants {block} of 16" in result.stdout
    assert len(list((run / "anchor").glob("view*/*.png"))) == 64
    assert (run / "metrics.json").is_file()
    assert tree_digest(JUMPINGJACKS) == before


@pytest.mark.slow
@needs_data
def test_bad_input_from_ns_train(models, tmp_path):
    before = tree_digest(RGB_VIDEO.parent)
    result = train(tmp_path, "bad", 2, models, "--data", str(RGB_VIDEO))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --data") and "no alpha channel" in last
    assert tree_digest(RGB_VIDEO.parent) == before
