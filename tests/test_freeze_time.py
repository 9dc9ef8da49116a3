"""4Real's video stages on tiny random video models: the freeze-time generator held against diffusers'
LTXConditionPipeline, the 8k+1 frame arithmetic in both directions, prompt engineering, the resumable stages and
their one-line errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LTXConditionPipeline, LTXPipeline
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition
from huggingface_hub import constants as hub_constants
from PIL import Image
from tiny_video_models import (
    build_tiny_cogvideox_pipeline,
    build_tiny_ltx_condition_pipeline,
    build_tiny_ltx_pipeline,
)

from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.freeze_time import (
    FreezeTimeConfig,
    freeze_time_prompt,
    freeze_time_stage,
    generate_freeze_time_video,
)
from ns_4d_methods.guidance.model_loading import WeightsUnavailableError
from ns_4d_methods.guidance.video_models import (
    FRAME_CONDITIONED_PIPELINES,
    TEXT_TO_VIDEO_PIPELINES,
    VideoGenerationConfig,
    VideoModel,
    VideoModels,
    load_frames,
    reference_video_stage,
)

HEIGHT, WIDTH, STEPS, SEED = 64, 96, 2, 3
PROMPT = "A corgi is running on the beach"
SETTINGS = {"negative_prompt": "blurry", "guidance_scale": 3.0, "max_sequence_length": 32, "frame_rate": 25}


@pytest.fixture(scope="module")
def ltx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_ltx")
    build_tiny_ltx_pipeline(path)
    return path


@pytest.fixture(scope="module")
def model(ltx_dir: Path) -> VideoModel:
    """The frame-conditioned model, loaded from an LTXPipeline directory (model_index says LTXPipeline)."""
    config = VideoGenerationConfig(video_model=str(ltx_dir), **SETTINGS)
    return VideoModel.load(
        str(ltx_dir), config, field_name="pipeline.video_model", supported=FRAME_CONDITIONED_PIPELINES
    )


@pytest.fixture(scope="module")
def reference(ltx_dir: Path) -> LTXConditionPipeline:
    pipeline = LTXConditionPipeline.from_pretrained(str(ltx_dir))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def canonical() -> np.ndarray:
    return (np.random.default_rng(0).random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8)


def diffusers_call(pipeline, condition: LTXVideoCondition, prompt: str, seed: int) -> np.ndarray:
    """diffusers' own LTXConditionPipeline call, PIL output as uint8 [17, H, W, 3]."""
    video = pipeline(
        conditions=[condition], prompt=prompt, negative_prompt=SETTINGS["negative_prompt"], height=HEIGHT,
        width=WIDTH, num_frames=17, num_inference_steps=STEPS, guidance_scale=SETTINGS["guidance_scale"],
        max_sequence_length=SETTINGS["max_sequence_length"], frame_rate=25, decode_timestep=0.05,
        decode_noise_scale=0.025, image_cond_noise_scale=0.15, generator=torch.Generator().manual_seed(seed),
    ).frames[0]  # fmt: skip
    return np.stack([np.asarray(frame) for frame in video])


def to_pil(frames: np.ndarray) -> list:
    return [Image.fromarray(frame) for frame in frames]


def test_prompt_engineering() -> None:
    assert freeze_time_prompt("A corgi is running and jumping on the beach.") == (
        "Camera circulating around a corgi on the beach, time elapse"
    )
    assert freeze_time_prompt("a panda dancing, in a forest") == (
        "Camera circulating around a panda, in a forest, time elapse"
    )
    # nothing to drop: only the prefix and the suffix
    assert freeze_time_prompt("Two cats sleep on a sofa") == (
        "Camera circulating around Two cats sleep on a sofa, time elapse"
    )
    # the verb list is configurable
    assert freeze_time_prompt("Two cats sleep on a sofa", ["sleep"]) == (
        "Camera circulating around Two cats on a sofa, time elapse"
    )


def test_one_extension_each_way_equals_diffusers_calls(model, reference, canonical) -> None:
    """33 frames = the first 17-frame clip (call 0), one forward (call 1) and one backward (call 2) extension."""
    prompt = freeze_time_prompt(PROMPT)
    video, canonical_index = generate_freeze_time_video(
        model, canonical, prompt, 33, clip_frames=17, steps=STEPS, seed=SEED
    )
    # the same calls made with diffusers directly: same conditions, seeds (seed + call number) and steps
    clip = diffusers_call(reference, LTXVideoCondition(image=Image.fromarray(canonical), frame_index=0), prompt, SEED)
    clip[0] = canonical  # the condition frame is kept as given
    forward = diffusers_call(reference, LTXVideoCondition(video=to_pil(clip[-9:]), frame_index=0), prompt, SEED + 1)
    after_forward = np.concatenate([clip, forward[9:]])
    backward = diffusers_call(
        reference, LTXVideoCondition(video=to_pil(after_forward[::-1][-9:]), frame_index=0), prompt, SEED + 2
    )
    expected = np.concatenate([backward[9:][::-1], after_forward])

    assert video.shape == (33, HEIGHT, WIDTH, 3) and video.dtype == np.uint8
    assert canonical_index == 8
    # tolerance 0: the generator's uint8 frames equal diffusers' PIL frames exactly (CPU, fp32)
    assert np.array_equal(video, expected)
    # conditioning frames come back unchanged, bit for bit: the canonical frame, and the 9 context frames of each
    # extension (the 25 frames that existed before the backward call); the VAE's re-decoded copies are discarded
    assert np.array_equal(video[canonical_index], canonical)
    assert np.array_equal(video[8:], after_forward)
    # ... which is a real choice: the tiny random VAE's re-decoding of the context is far from the input
    assert np.abs(forward[:9].astype(int) - clip[-9:].astype(int)).max() > 50


@pytest.mark.parametrize("num_frames, canonical_index", [(17, 0), (49, 16)])
def test_frame_counts_follow_8k_plus_1_forward_and_backward(model, canonical, num_frames, canonical_index) -> None:
    video, index = generate_freeze_time_video(model, canonical, "a cat", num_frames, clip_frames=17, steps=1, seed=0)
    assert len(video) == num_frames
    # extensions alternate forward, backward (49: +8, -8, +8, -8): 8 frames before it per backward step
    assert index == canonical_index
    assert np.array_equal(video[index], canonical)


@pytest.mark.parametrize(
    "num_frames, clip_frames, message",
    [
        (20, 17, ("pipeline.freeze_time_frames: 20 frames; the video model makes 8k+1 frames, at least 17 here "
                  "(e.g. 17 or 25)")),
        (25, 8, ("pipeline.freeze_time_clip_frames: 8 frames; the video model makes 8k+1 frames, at least 9 here "
                 "(e.g. 9 or 17)")),
        (9, 17, ("pipeline.freeze_time_frames: 9 frames; the video model makes 8k+1 frames, at least 17 here "
                 "(e.g. 17 or 25)")),
    ],
)  # fmt: skip
def test_frame_counts_that_break_8k_plus_1_fail_in_one_line(model, canonical, num_frames, clip_frames, message) -> None:
    with pytest.raises(InputError) as error:
        generate_freeze_time_video(model, canonical, "a cat", num_frames, clip_frames=clip_frames, steps=1)
    assert str(error.value) == message


def test_reference_video_equals_diffusers_ltx_pipeline(ltx_dir: Path) -> None:
    config = VideoGenerationConfig(video_model=str(ltx_dir), **SETTINGS)
    model = VideoModel.load(str(ltx_dir), config, field_name="pipeline.video_model", supported=TEXT_TO_VIDEO_PIPELINES)
    frames = model.generate_reference_video(PROMPT, 9, HEIGHT, WIDTH, STEPS, SEED)
    pipeline = LTXPipeline.from_pretrained(str(ltx_dir))
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        prompt=PROMPT, negative_prompt="blurry", num_frames=9, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
        guidance_scale=3.0, max_sequence_length=32, decode_timestep=0.05, decode_noise_scale=0.025,
        generator=torch.Generator().manual_seed(SEED),
    ).frames[0]  # fmt: skip
    assert np.array_equal(frames, np.stack([np.asarray(frame) for frame in expected]))


def test_other_text_to_video_pipelines_use_the_same_call(tmp_path: Path) -> None:
    build_tiny_cogvideox_pipeline(tmp_path / "cogvideox")
    config = VideoGenerationConfig(video_model=str(tmp_path / "cogvideox"), negative_prompt="", max_sequence_length=16)
    frames = VideoModels(config, tmp_path / "run").text_to_video().generate_reference_video("a cat", 9, 16, 16, 2, 0)
    assert frames.shape == (9, 16, 16, 3) and frames.dtype == np.uint8


def test_prompt_embeddings_are_computed_once_and_cached_in_the_run(ltx_dir: Path, tmp_path: Path, monkeypatch) -> None:
    config = VideoGenerationConfig(video_model=str(ltx_dir), **SETTINGS)
    models = VideoModels(config, tmp_path)
    text_to_video = models.text_to_video()
    first = text_to_video.prompt_embeddings(PROMPT)
    assert len(list((tmp_path / "prompt_embeddings").glob("*.pt"))) == 1
    # the frame-conditioned model shares the loaded components and the cache
    frame_conditioned = models.frame_conditioned()
    assert isinstance(frame_conditioned.pipeline, LTXConditionPipeline)
    assert frame_conditioned.pipeline.transformer is text_to_video.pipeline.transformer

    def no_encoding(*args, **kwargs):
        raise AssertionError("the text encoder ran again")

    monkeypatch.setattr(VideoModel, "_encode", no_encoding)
    assert torch.equal(frame_conditioned.prompt_embeddings(PROMPT)["prompt_embeds"], first["prompt_embeds"])
    # a resumed run: a new model object reads the file
    again = VideoModels(config, tmp_path).text_to_video().prompt_embeddings(PROMPT)
    assert all(torch.equal(again[name], first[name]) for name in first)


def test_stages_write_videos_and_a_resumed_run_regenerates_nothing(ltx_dir: Path, tmp_path: Path) -> None:
    config = FreezeTimeConfig(
        prompt=PROMPT, video_model=str(ltx_dir), height=HEIGHT, width=WIDTH, reference_frames=9,
        num_inference_steps=1, freeze_time_frames=25, canonical_frame=4, **SETTINGS,
    )  # fmt: skip
    models = VideoModels(config, tmp_path)
    reference_dir = reference_video_stage(config, tmp_path, models)
    folder, canonical_index = freeze_time_stage(config, tmp_path, reference_dir, models)
    reference, freeze_time = load_frames(reference_dir), load_frames(folder)
    assert reference.shape == (9, HEIGHT, WIDTH, 3) and freeze_time.shape == (25, HEIGHT, WIDTH, 3)
    assert np.array_equal(freeze_time[canonical_index], reference[4])
    assert (folder / "video.mp4").stat().st_size > 0
    # resumed with its settings: the model is unreachable now, so anything but reading the artefacts back would fail
    resumed = FreezeTimeConfig(prompt=PROMPT, video_model=str(tmp_path / "gone"), freeze_time_frames=25)
    assert reference_video_stage(resumed, tmp_path) == reference_dir
    assert freeze_time_stage(resumed, tmp_path) == (folder, canonical_index)

    # a retry with a longer freeze-time video after structure from motion failed (no cameras): made again
    config.freeze_time_frames = 33
    with pytest.warns(UserWarning, match="regenerated with --pipeline.freeze-time-frames 33"):
        folder, canonical_index = freeze_time_stage(config, tmp_path, reference_dir, models)
    assert load_frames(folder).shape[0] == 33 and np.array_equal(load_frames(folder)[canonical_index], reference[4])
    # once the cameras exist, the video they pose is kept whatever the settings say
    (tmp_path / "cameras").mkdir()
    (tmp_path / "cameras" / "transforms.json").write_text("{}")
    assert freeze_time_stage(resumed, tmp_path) == (folder, canonical_index)


def test_user_videos_are_read_resized_and_never_written(tmp_path: Path) -> None:
    user = tmp_path / "user_frames"
    user.mkdir()
    for index in range(9):
        Image.fromarray(np.full((40, 80, 3), index * 20, np.uint8)).save(user / f"{index:03d}.png")
    before = {path.name: hashlib.sha1(path.read_bytes()).hexdigest() for path in user.iterdir()}
    config = FreezeTimeConfig(reference_video=user, freeze_time_video=user, height=32, width=32,
                              freeze_time_canonical_index=3)  # fmt: skip
    run = tmp_path / "run"
    reference_dir = reference_video_stage(config, run)
    folder, canonical_index = freeze_time_stage(config, run, reference_dir)
    assert canonical_index == 3
    assert load_frames(reference_dir).shape == (9, 32, 32, 3) and load_frames(folder).shape == (9, 32, 32, 3)
    assert before == {path.name: hashlib.sha1(path.read_bytes()).hexdigest() for path in user.iterdir()}


def test_bad_inputs_fail_in_one_line(ltx_dir: Path, tmp_path: Path, monkeypatch) -> None:
    def error_of(call) -> str:
        with pytest.raises(InputError) as error:
            call()
        assert "\n" not in str(error.value)
        return str(error.value)

    run = tmp_path / "run"
    empty = error_of(lambda: reference_video_stage(FreezeTimeConfig(prompt="  "), run))
    assert empty.startswith("pipeline.prompt: empty")

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    config = FreezeTimeConfig(prompt="a cat", video_model="ns-4d-tests/absent")
    with pytest.raises(WeightsUnavailableError) as error:
        reference_video_stage(config, run)
    assert str(error.value) == (
        "pipeline.video_model: cannot load 'ns-4d-tests/absent' "
        "(not a local directory and not reachable on the Hugging Face hub)"
    )

    explicit = FreezeTimeConfig(prompt="a cat", video_model=str(ltx_dir), video_pipeline="StableDiffusionPipeline")
    assert error_of(lambda: reference_video_stage(explicit, run)) == (
        "pipeline.video_pipeline: 'StableDiffusionPipeline' is not a supported video pipeline here (supported: "
        "LTXPipeline, LTXConditionPipeline, LTXImageToVideoPipeline, CogVideoXPipeline, WanPipeline, MochiPipeline)"
    )
    cogvideox = tmp_path / "cogvideox"
    build_tiny_cogvideox_pipeline(cogvideox)  # text-to-video only: no frames at chosen positions
    freeze = FreezeTimeConfig(prompt="a cat", video_model=str(cogvideox), reference_video=ltx_dir)
    assert error_of(lambda: VideoModels(freeze, run).frame_conditioned()) == (
        f"pipeline.video_model: '{cogvideox}' is a CogVideoXPipeline, which is not a supported video pipeline here "
        "(supported: LTXPipeline, LTXConditionPipeline, LTXImageToVideoPipeline)"
    )

    short = tmp_path / "short"
    short.mkdir()
    for index in range(3):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(short / f"{index}.png")
    assert error_of(lambda: reference_video_stage(FreezeTimeConfig(reference_video=short), run)) == (
        f"pipeline.reference_video: {short} has 3 frames; at least 9 are needed"
    )
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    assert error_of(lambda: freeze_time_stage(FreezeTimeConfig(freeze_time_video=broken), run)) == (
        f"{broken}: cannot read a video (not a video file, or no decodable frames)"
    )
    odd = FreezeTimeConfig(prompt="a cat", video_model=str(ltx_dir), height=48, width=64)
    assert error_of(lambda: reference_video_stage(odd, run)) == (
        "pipeline.height/width: 48x64 px; LTXPipeline needs multiples of 32"
    )
    assert not (run / "reference_video").exists() and not (run / "freeze_time").exists()


def test_condition_pipeline_directory_loads_for_both_roles(tmp_path: Path) -> None:
    build_tiny_ltx_condition_pipeline(tmp_path / "ltx_condition")
    config = VideoGenerationConfig(video_model=str(tmp_path / "ltx_condition"))
    models = VideoModels(config, tmp_path / "run")
    assert isinstance(models.text_to_video().pipeline, LTXPipeline)
    assert isinstance(models.frame_conditioned().pipeline, LTXConditionPipeline)
