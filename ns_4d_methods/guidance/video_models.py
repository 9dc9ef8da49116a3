"""Open video diffusion models for 4Real's reference video (text-to-video) and freeze-time video (frame-conditioned).

4Real's own video model is private; diffusers' video pipelines stand in (4REAL.md section 1). A model is named by a
config value that is a hub id or a ``save_pretrained`` directory and loaded through
:func:`ns_4d_methods.guidance.model_loading.load_diffusion_pipeline` (one-line error when unreachable, all parts
frozen). The pipeline class is the explicit ``video_pipeline`` option or, when that is empty, the ``_class_name`` of
the model's ``model_index.json``, mapped to the class a role needs: LTX weights serve both roles (``LTXPipeline`` for
text-to-video, ``LTXConditionPipeline`` for frames at chosen positions), sharing one set of loaded components.

Precision: bf16 on CUDA for the models trained in bf16 (LTX, Wan, Mochi), fp16 on CUDA otherwise, fp32 on the CPU.

Prompt embeddings are computed once per run with the pipeline's own ``encode_prompt`` (prompt and negative prompt)
and cached twice: in memory, and as a file ``<run_dir>/prompt_embeddings/<sha1>.pt`` keyed by model, pipeline
family, prompt, negative prompt and token length, so a resumed run (or the SDS stage) never runs the text encoder for
a prompt again. Generation is the pipeline's own ``__call__`` with those embeddings: no sampler is written here.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image

from ns_4d_methods.data.camera_drift import camera_drift
from ns_4d_methods.data.video_io import list_images, probe_video, read_image, read_video
from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.model_loading import from_pretrained_or_fail, load_diffusion_pipeline

LTX_MODEL_ID = "Lightricks/LTX-Video-0.9.5"
"""LTX-Video weights that both LTXPipeline and LTXConditionPipeline load (diffusers' LTXConditionPipeline example)."""
LTX_NEGATIVE_PROMPT = "worst quality, inconsistent motion, blurry, jittery, distorted"

# model_index.json class -> the class that generates a video from text alone (same components)
TEXT_TO_VIDEO_PIPELINES = {
    "LTXPipeline": "LTXPipeline",
    "LTXConditionPipeline": "LTXPipeline",
    "LTXImageToVideoPipeline": "LTXPipeline",
    "CogVideoXPipeline": "CogVideoXPipeline",
    "WanPipeline": "WanPipeline",
    "MochiPipeline": "MochiPipeline",
}
# model_index.json class -> the class that conditions on frames at chosen positions (only LTX does, in one call)
FRAME_CONDITIONED_PIPELINES = {
    "LTXPipeline": "LTXConditionPipeline",
    "LTXConditionPipeline": "LTXConditionPipeline",
    "LTXImageToVideoPipeline": "LTXConditionPipeline",
}
BF16_FAMILIES = ("LTX", "Wan", "Mochi")

# what encode_prompt returns, by tuple length: LTX and Mochi give attention masks, CogVideoX and Wan do not
_EMBEDDING_NAMES = {
    4: ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask"),
    2: ("prompt_embeds", "negative_prompt_embeds"),
}

FRAMES_FOLDER = "frames"
META_FILE = "meta.json"
PREVIEW_FILE = "video.mp4"
MIN_REFERENCE_FRAMES = 9
"""Shortest reference video accepted: one LTX clip unit (8k+1 with k = 1)."""


@dataclass
class VideoGenerationConfig:
    """The reference video stage and what both video stages share (fields of the 4real pipeline config)."""

    prompt: str = ""
    """The scene to generate, e.g. "a corgi running on a beach" (required unless both videos are given)."""
    video_model: str = LTX_MODEL_ID
    """Hub id or local directory of the text-to-video diffusers pipeline that makes the reference video."""
    video_pipeline: str = ""
    """diffusers class of ``video_model`` (e.g. LTXPipeline, CogVideoXPipeline, WanPipeline); empty: its
    model_index.json."""
    model_dtype: str = "auto"
    """Precision of the video models: auto (bf16 on CUDA for LTX/Wan/Mochi, fp16 for others, fp32 on CPU),
    float32, float16 or bfloat16."""
    negative_prompt: str = LTX_NEGATIVE_PROMPT
    """Negative prompt of classifier-free guidance."""
    guidance_scale: float = 3.0
    """Classifier-free guidance scale of both video models."""
    num_inference_steps: int = 40
    """Sampling steps of every video generation call."""
    seed: int = 0
    """Seed of the video generation (each freeze-time call uses seed + its call number)."""
    height: int = 512
    """Height of both generated videos (a multiple of the VAE's 32 px for LTX); user videos are cropped and resized
    to it."""
    width: int = 768
    """Width of both generated videos (as ``height``)."""
    reference_frames: int = 49
    """Frames of the generated reference video (LTX: 8k+1)."""
    frame_rate: int = 25
    """Frame rate passed to models that take it (LTX's rotary time coordinates) and of the preview videos."""
    max_sequence_length: int = 0
    """Text tokens of the prompt embeddings; 0: the pipeline's own default (LTXPipeline 128)."""
    decode_timestep: float = 0.05
    """Timestep of LTX's timestep-conditioned VAE decoder (LTX 0.9.1+; ignored by other VAEs)."""
    decode_noise_scale: float = 0.025
    """Noise mixed into the latents before that decoder."""
    reference_video: Optional[Path] = None
    """A video file or image folder to use as the reference video instead of generating one."""
    static_camera_wording: str = "The camera is static: a fixed shot, no pan, no zoom."
    """Appended to the prompt of the generated reference video, which 4Real treats as seen by one static camera
    (nothing else asks the video model for one); empty: the prompt as it is."""
    max_camera_drift: float = 0.02
    """Camera motion of the reference video (:mod:`ns_4d_methods.data.camera_drift`: largest mean corner
    displacement from frame 0, as a fraction of the diagonal) above which a warning says that it moves."""


def _parse_dtype(config: VideoGenerationConfig, family: str, device: torch.device) -> torch.dtype:
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if config.model_dtype in names:
        return names[config.model_dtype]
    if config.model_dtype != "auto":
        raise InputError(f"pipeline.model_dtype: '{config.model_dtype}' is not auto, {', '.join(names)}")
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if family.startswith(BF16_FAMILIES) else torch.float16


class PipelineModelIndex:
    """``model_index.json`` of a diffusers pipeline, loadable through :func:`from_pretrained_or_fail`."""

    @staticmethod
    def from_pretrained(name_or_path: str, **kwargs: Any) -> Dict[str, Any]:
        from diffusers import DiffusionPipeline  # imported when used: listing the methods (ns-train --help) skips it

        return DiffusionPipeline.load_config(name_or_path, **kwargs)


def resolve_pipeline_class(
    name_or_path: str, field_name: str, explicit: str, supported: Dict[str, str], class_field: str
) -> type:
    """The diffusers pipeline class to load ``name_or_path`` with, for a role given by its ``supported`` table."""
    if explicit:
        found, origin = explicit, f"{class_field}: '{explicit}'"
    else:
        found = from_pretrained_or_fail(PipelineModelIndex, name_or_path, field_name).get("_class_name", "")
        origin = f"{field_name}: '{name_or_path}' is a {found or 'pipeline without a _class_name'}, which"
    if found not in supported:
        raise InputError(f"{origin} is not a supported video pipeline here (supported: {', '.join(supported)})")
    import diffusers

    return getattr(diffusers, supported[found])


class VideoModel:
    """One frozen diffusers video pipeline with cached prompt embeddings and small generation calls.

    Args:
        pipeline: the loaded pipeline (frozen, on its device).
        model_key: names the weights in the embedding cache's key (the config value they were loaded from).
        config: sampling settings (negative prompt, guidance, steps are per call).
        cache_dir: folder for the embedding files; None: memory only.
    """

    def __init__(
        self, pipeline: Any, model_key: str, config: VideoGenerationConfig, cache_dir: Optional[Path] = None
    ) -> None:
        self.pipeline = pipeline
        self.pipeline.set_progress_bar_config(disable=True)
        self.model_key = model_key
        self.config = config
        self.cache_dir = cache_dir
        self._embeddings: Dict[str, Dict[str, torch.Tensor]] = {}
        self._call_parameters = inspect.signature(pipeline.__call__).parameters

    @classmethod
    def load(
        cls,
        name_or_path: str,
        config: VideoGenerationConfig,
        *,
        field_name: str,
        supported: Dict[str, str],
        pipeline_class: str = "",
        class_field: str = "pipeline.video_pipeline",
        device: torch.device | str = "cpu",
        cache_dir: Optional[Path] = None,
    ) -> "VideoModel":
        """Loads ``name_or_path`` as the class its role needs (``supported``: TEXT_TO_VIDEO_ or
        FRAME_CONDITIONED_PIPELINES), in the config's precision."""
        device = torch.device(device)
        pipeline_cls = resolve_pipeline_class(name_or_path, field_name, pipeline_class, supported, class_field)
        dtype = _parse_dtype(config, pipeline_cls.__name__, device)
        pipeline = load_diffusion_pipeline(pipeline_cls, name_or_path, field_name, device, dtype)
        return cls(pipeline, str(name_or_path), config, cache_dir)

    def as_pipeline(self, pipeline_cls: type) -> "VideoModel":
        """The same loaded components (and embedding cache directory) behind another pipeline class."""
        if isinstance(self.pipeline, pipeline_cls):
            return self
        return VideoModel(pipeline_cls(**self.pipeline.components), self.model_key, self.config, self.cache_dir)

    @property
    def device(self) -> torch.device:
        return self.pipeline._execution_device

    @property
    def family(self) -> str:
        """Text-encoder family of the embeddings: LTX pipelines share them, other pipelines have their own."""
        name = type(self.pipeline).__name__
        return "LTX" if name.startswith("LTX") else name

    @property
    def max_sequence_length(self) -> int:
        return self.config.max_sequence_length or self._call_parameters["max_sequence_length"].default

    def prompt_embeddings(self, prompt: str) -> Dict[str, torch.Tensor]:
        """The ``__call__`` keyword arguments for ``prompt`` and the negative prompt, computed once per run."""
        negative = self.config.negative_prompt
        key_text = json.dumps([self.model_key, self.family, prompt, negative, self.max_sequence_length])
        key = hashlib.sha1(key_text.encode()).hexdigest()
        if key not in self._embeddings:
            path = self.cache_dir / f"{key}.pt" if self.cache_dir is not None else None
            if path is not None and path.is_file():
                embeddings = torch.load(path, map_location="cpu", weights_only=True)
            else:
                embeddings = self._encode(prompt, negative)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(embeddings, path)
            self._embeddings[key] = embeddings
        dtype = self.pipeline.transformer.dtype
        return {
            name: value.to(self.device, dtype if value.is_floating_point() else value.dtype)
            for name, value in self._embeddings[key].items()
        }

    @torch.no_grad()
    def _encode(self, prompt: str, negative_prompt: str) -> Dict[str, torch.Tensor]:
        outputs = self.pipeline.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=True,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return {name: value.cpu() for name, value in zip(_EMBEDDING_NAMES[len(outputs)], outputs)}

    def _call(self, prompt: str, seed: int, **kwargs: Any) -> np.ndarray:
        """Runs the pipeline with the cached embeddings; returns uint8 frames [F, H, W, 3] (rounded like diffusers'
        PIL output)."""
        multiple = getattr(self.pipeline, "vae_spatial_compression_ratio", 1)  # LTX's 32 px; others check their own
        if kwargs["height"] % multiple or kwargs["width"] % multiple:
            raise InputError(
                f"pipeline.height/width: {kwargs['height']}x{kwargs['width']} px; {type(self.pipeline).__name__} "
                f"needs multiples of {multiple}"
            )
        settings = {
            "guidance_scale": self.config.guidance_scale,
            "frame_rate": self.config.frame_rate,
            "decode_timestep": self.config.decode_timestep,
            "decode_noise_scale": self.config.decode_noise_scale,
            "max_sequence_length": self.max_sequence_length,
        }
        # model-specific settings only where the pipeline takes them (frame_rate and decoding are LTX's)
        kwargs.update({name: value for name, value in settings.items() if name in self._call_parameters})
        generator = torch.Generator(self.device).manual_seed(seed)
        frames = self.pipeline(
            **self.prompt_embeddings(prompt), generator=generator, output_type="np", **kwargs
        ).frames[0]
        return (np.asarray(frames) * 255).round().clip(0, 255).astype(np.uint8)

    def generate_reference_video(
        self, prompt: str, num_frames: int, height: int, width: int, steps: int, seed: int
    ) -> np.ndarray:
        """A video from text alone: uint8 frames [num_frames, height, width, 3]."""
        return self._call(
            prompt, seed, num_frames=num_frames, height=height, width=width, num_inference_steps=steps
        )

    def generate_conditioned(
        self,
        conditions: Sequence[Any],
        prompt: str,
        num_frames: int,
        height: int,
        width: int,
        steps: int,
        seed: int,
        **kwargs: Any,
    ) -> np.ndarray:
        """A video conditioned on frames (``LTXVideoCondition`` items): uint8 frames [num_frames, height, width, 3]."""
        return self._call(
            prompt,
            seed,
            conditions=list(conditions),
            num_frames=num_frames,
            height=height,
            width=width,
            num_inference_steps=steps,
            **kwargs,
        )


def to_pil(frames: Sequence[np.ndarray]) -> List[Image.Image]:
    return [Image.fromarray(frame) for frame in frames]


def fit_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crops a frame to the aspect ratio of (height, width) and resizes it there (area filter)."""
    h, w = frame.shape[:2]
    if h * width > w * height:  # too tall
        crop = round(w * height / width)
        frame = frame[(h - crop) // 2 : (h - crop) // 2 + crop]
    elif h * width < w * height:  # too wide
        crop = round(h * width / height)
        frame = frame[:, (w - crop) // 2 : (w - crop) // 2 + crop]
    if frame.shape[:2] == (height, width):
        return np.ascontiguousarray(frame)
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BOX))


def read_user_video(path: Path, field_name: str, height: int, width: int, min_frames: int) -> np.ndarray:
    """A user's video file or image folder as uint8 frames [F, height, width, 3], with a one-line error when it is
    missing, unreadable or shorter than ``min_frames``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{field_name}: {path} does not exist (expected a video file or a folder of images)")
    if path.is_dir():
        frames = [read_image(image) for image in list_images(path)]
    else:
        probe_video(path)  # one-line error for an unreadable file
        frames = list(read_video(path))
    if len(frames) < min_frames:
        raise InputError(f"{field_name}: {path} has {len(frames)} frames; at least {min_frames} are needed")
    return np.stack([fit_frame(frame, height, width) for frame in frames])


def save_video(frames: np.ndarray, folder: Path, fps: int, meta: Dict[str, Any]) -> Path:
    """Writes ``folder/frames/00000.png ...``, a preview ``folder/video.mp4`` and ``folder/meta.json``, atomically:
    everything goes to ``<folder>.partial`` first and is renamed at the end, so a killed run never leaves a folder
    that looks complete."""
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    (partial / FRAMES_FOLDER).mkdir(parents=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(partial / FRAMES_FOLDER / f"{index:05d}.png")
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(partial / PREVIEW_FILE), (width, height), fps=fps, macro_block_size=1, ffmpeg_log_level="error"
    )
    writer.send(None)  # start ffmpeg
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()
    (partial / META_FILE).write_text(json.dumps({"num_frames": len(frames), **meta}, indent=1) + "\n")
    partial.rename(folder)
    return folder


def load_frames(folder: Path) -> np.ndarray:
    """The frames a stage saved (``folder/frames``) as uint8 [F, H, W, 3]."""
    return np.stack([read_image(path) for path in list_images(Path(folder) / FRAMES_FOLDER)])


def stage_meta(folder: Path) -> Optional[Dict[str, Any]]:
    """The ``meta.json`` of a finished stage folder, or None when the stage has not finished."""
    path = Path(folder) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_prompt(prompt: str) -> str:
    if not prompt.strip():
        raise InputError('pipeline.prompt: empty; describe the scene, e.g. --pipeline.prompt "a corgi on a beach"')
    return prompt.strip()


class VideoModels:
    """Loads the run's video models on first use, once: the text-to-video model of the reference video and the
    frame-conditioned model of the freeze-time video, one set of components when both name the same weights.

    ``config`` is a :class:`VideoGenerationConfig` (or the freeze-time config that extends it, whose
    ``freeze_time_model`` names the frame-conditioned weights; empty: ``video_model``).
    """

    def __init__(self, config: VideoGenerationConfig, run_dir: Path, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.cache_dir = Path(run_dir) / "prompt_embeddings"
        self.device = torch.device(device)
        self._text_to_video: Optional[VideoModel] = None
        self._frame_conditioned: Optional[VideoModel] = None

    def text_to_video(self) -> VideoModel:
        if self._text_to_video is None:
            self._text_to_video = VideoModel.load(
                self.config.video_model, self.config, field_name="pipeline.video_model",
                supported=TEXT_TO_VIDEO_PIPELINES, pipeline_class=self.config.video_pipeline,
                device=self.device, cache_dir=self.cache_dir,
            )  # fmt: skip
        return self._text_to_video

    def frame_conditioned(self) -> VideoModel:
        if self._frame_conditioned is None:
            name = getattr(self.config, "freeze_time_model", "") or self.config.video_model
            shared = self._text_to_video
            if shared is not None and name == self.config.video_model and shared.family == "LTX":
                from diffusers import LTXConditionPipeline

                self._frame_conditioned = shared.as_pipeline(LTXConditionPipeline)
            else:
                field_name = "pipeline.freeze_time_model" if name != self.config.video_model else "pipeline.video_model"
                self._frame_conditioned = VideoModel.load(
                    name, self.config, field_name=field_name, supported=FRAME_CONDITIONED_PIPELINES,
                    device=self.device, cache_dir=self.cache_dir,
                )  # fmt: skip
        return self._frame_conditioned


def reference_video_stage(
    config: VideoGenerationConfig,
    run_dir: Path,
    models: Optional[VideoModels] = None,
    device: torch.device | str = "cpu",
) -> Path:
    """Stage 1: the reference video, as ``<run_dir>/reference_video/frames/*.png`` (+ ``video.mp4``, ``meta.json``).

    Generated from ``config.prompt`` by the text-to-video model, or taken from ``config.reference_video`` (cropped
    and resized to ``config.height`` x ``config.width``; at least :data:`MIN_REFERENCE_FRAMES` frames). Returns the
    stage folder; when it already exists (a resumed run) nothing is loaded or generated.
    """
    folder = Path(run_dir) / "reference_video"
    if stage_meta(folder) is not None:
        return folder
    if config.reference_video is not None:
        frames = read_user_video(
            config.reference_video, "pipeline.reference_video", config.height, config.width, MIN_REFERENCE_FRAMES
        )
        meta = {"source": str(config.reference_video)}
    else:
        prompt = " ".join(filter(None, (check_prompt(config.prompt), config.static_camera_wording)))
        models = models or VideoModels(config, run_dir, device)
        frames = models.text_to_video().generate_reference_video(
            prompt, config.reference_frames, config.height, config.width, config.num_inference_steps, config.seed
        )
        meta = {"source": config.video_model, "prompt": prompt, "seed": config.seed}
    drift = camera_drift(frames)
    if drift is not None and drift > config.max_camera_drift:
        warnings.warn(
            f"the reference video's camera moves ({drift:.1%} of the diagonal from frame 0, more than "
            f"--pipeline.max-camera-drift {config.max_camera_drift}): 4real treats it as one static camera, so the "
            f"motion is learnt wrong; regenerate it (another --pipeline.seed) or give a static one",
            stacklevel=2,
        )
    return save_video(frames, folder, config.frame_rate, {**meta, "camera_drift": drift})

