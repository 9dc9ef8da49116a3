"""The input of 4diffusion: a video of one object, on white, sampled at the instants the 4D scene is fitted at.

``ns-train 4diffusion --data bird.mp4`` hands ``--data`` to :class:`ObjectVideoDataManager`, an
:class:`~ns_4d_methods.data.sds_datamanager.SDSDataManager` that also reads the object video:

- **sources**: a video file (mp4, webm, mov, mkv, avi through ffmpeg; gif and animated webp through Pillow) or a
  folder of frames (png, webp, ...), read as RGBA. The object is cut out by the alpha channel; an input without one
  (or whose alpha is fully opaque) needs ``--pipeline.datamanager.video.masks DIR``: one mask image per source frame
  in name order (grey levels, or the alpha of RGBA masks; white = object).
- **one image** plus ``--pipeline.datamanager.video.image-to-video``: the paper's image-to-4D route. Stable Video
  Diffusion (diffusers' ``StableVideoDiffusionPipeline``, ``--pipeline.datamanager.video.svd-model``) animates the
  image composited on white; its frames are on white already. The video is made once, when training starts (see
  the 4diffusion pipeline, which keeps it in its checkpoints and under ``<run>/input/``).
- **sampling** (4Diffusion's): ``M`` frames of the ``N`` at ``int(N / M * i)``, composited on white (``rgb * a + 1 -
  a``), padded to a square with white and resized to ``resolution``. ``M = 8`` by default, as the official code
  always takes (25-32-frame inputs: a source frame every 3-4). **Longer videos**, an option: ``num_frames M`` (or
  ``0``: ``M = 8 * max(1, round(N / 32))``, the official spacing); the scene is then fitted at ``M`` instants
  ``i / (M - 1)``, every training step sees a window of 8 consecutive instants with a random start (the official
  code's ``frame_idx`` window), and the anchor video is generated in blocks of 8 that share their boundary frame
  (see the 4diffusion pipeline).

Bad input (a missing or unreadable file, no alpha and no masks, masks that do not match the frames, fewer than 8
frames) ends the run with one line naming the file; inputs are only read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Literal, Optional, Sequence, Tuple, Type, Union

import imageio_ffmpeg
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageSequence, UnidentifiedImageError

from ns_4d_methods.data.sds_datamanager import SDSDataManager, SDSDataManagerConfig
from ns_4d_methods.data.video_io import IMAGE_SUFFIXES, list_images
from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.model_loading import load_diffusion_pipeline

MIN_FRAMES = 8
"""4DM generates 8 instants at a time: inputs need at least that many frames."""
SOURCE_FRAMES_PER_WINDOW = 32
"""Automatic sampling takes 8 frames per this many source frames (the official inputs: 25-32 frames, 8 sampled)."""
PIL_VIDEO_SUFFIXES = {".gif", ".webp", ".apng"}
FFMPEG_VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v"}
OPAQUE = 255


@dataclass
class ObjectVideoConfig:
    """How the object video is read (``--data`` names it)."""

    masks: Optional[Path] = None
    """Folder of masks, one per source frame in name order (white = object), for inputs without alpha."""
    num_frames: int = 8
    """Frames sampled from the video at int(N / M * i) (the official code: always 8); more fit a longer video at
    more instants; 0: 8 per 32 source frames (at least 8)."""
    resolution: int = 256
    """Side of the square the sampled frames are padded and resized to."""
    image_to_video: bool = False
    """--data is one image: animate it with Stable Video Diffusion first (image-to-4D)."""
    svd_model: str = "stabilityai/stable-video-diffusion-img2vid-xt"
    """Stable Video Diffusion model for --image-to-video (hub id or local directory)."""
    svd_num_frames: int = 25
    """Frames Stable Video Diffusion generates."""
    svd_resolution: int = 576
    """Side of the square video Stable Video Diffusion generates (a multiple of 64)."""
    svd_steps: int = 25
    """Denoising steps of Stable Video Diffusion."""
    svd_motion_bucket_id: int = 127
    """Stable Video Diffusion's motion conditioning (higher: more motion)."""
    svd_noise_aug_strength: float = 0.02
    """Noise added to the conditioning image (Stable Video Diffusion's default)."""
    svd_fps: int = 7
    """Frame-rate conditioning of Stable Video Diffusion."""
    svd_decode_chunk_size: int = 8
    """Frames the video VAE decodes at once (lower: less memory)."""
    seed: int = 0
    """Seed of the generated video."""


@dataclass
class ObjectVideo:
    """The sampled frames of an object video."""

    frames: torch.Tensor
    """[M, 3, S, S] RGB in [0, 1], composited on white."""
    source_indices: List[int]
    """Index in the source of each sampled frame."""
    num_source_frames: int
    """Frames in the source (N)."""
    source: Path
    """The file or folder the frames come from."""


# ---- reading -----------------------------------------------------------------------------------------------------
def sample_indices(num_source_frames: int, num_frames: int) -> List[int]:
    """4Diffusion's frame sampling: ``int(N / M * i)`` for i < M."""
    return [int(num_source_frames / num_frames * i) for i in range(num_frames)]


def auto_num_frames(num_source_frames: int) -> int:
    """Frames to sample when none are asked for: 8 per 32 source frames, at least 8."""
    return MIN_FRAMES * max(1, round(num_source_frames / SOURCE_FRAMES_PER_WINDOW))


def _rgba(image: Image.Image) -> np.ndarray:
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return np.asarray(image.convert("RGBA"))
    rgb = np.asarray(image.convert("RGB"))
    return np.concatenate([rgb, np.full_like(rgb[..., :1], OPAQUE)], axis=-1)


def _read_image_rgba(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return _rgba(image)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise InputError(f"{path}: cannot read an image ({type(error).__name__})") from error


class FrameSource:
    """The RGBA frames of a video file or a folder of frames, counted first and then read one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        suffix = path.suffix.lower()
        if path.is_dir():
            self.kind = "folder"
            self.files = list_images(path)
            self.count = len(self.files)
        elif not path.is_file():
            raise InputError(f"--data {path}: no such file or directory (expected an object video or a frame folder)")
        elif suffix in PIL_VIDEO_SUFFIXES:
            self.kind = "pil"
            try:
                with Image.open(path) as image:
                    self.count = getattr(image, "n_frames", 1)
            except (OSError, UnidentifiedImageError, ValueError) as error:
                raise InputError(f"--data {path}: cannot read a video ({type(error).__name__})") from error
        elif suffix in FFMPEG_VIDEO_SUFFIXES:
            self.kind = "ffmpeg"
            self.input_params = self._decoder_params()
            try:
                self.count = imageio_ffmpeg.count_frames_and_secs(str(path))[0]
            except (RuntimeError, OSError, StopIteration) as error:
                raise InputError(
                    f"--data {path}: cannot read a video (not a video file, or no decodable frames)"
                ) from error
        else:
            known = sorted(PIL_VIDEO_SUFFIXES | FFMPEG_VIDEO_SUFFIXES)
            raise InputError(
                f"--data {path}: unknown video type '{suffix}' (expected one of {', '.join(known)} or a folder of "
                "frames)"
            )
        if self.count == 0:
            raise InputError(f"--data {path}: no frames")

    def _decoder_params(self) -> List[str]:
        """ffmpeg's native VP8/VP9 decoders drop the alpha plane that libvpx keeps."""
        try:
            reader = imageio_ffmpeg.read_frames(str(self.path), pix_fmt="rgba", bpp=4)
            meta = next(reader)
            reader.close()
        except (RuntimeError, OSError, StopIteration) as error:
            raise InputError(
                f"--data {self.path}: cannot read a video (not a video file, or no decodable frames)"
            ) from error
        codec = str(meta.get("codec", ""))
        if codec.startswith("vp9"):
            return ["-c:v", "libvpx-vp9"]
        if codec.startswith("vp8"):
            return ["-c:v", "libvpx"]
        return []

    def frames(self, indices: Sequence[int]) -> Iterator[Tuple[int, np.ndarray]]:
        """(index, uint8 RGBA [H, W, 4]) of the wanted frames, in order."""
        wanted = set(indices)
        if self.kind == "folder":
            for index in sorted(wanted):
                yield index, _read_image_rgba(self.files[index])
            return
        try:
            if self.kind == "pil":
                with Image.open(self.path) as image:
                    for index, frame in enumerate(ImageSequence.Iterator(image)):
                        if index in wanted:
                            yield index, _rgba(frame)
                return
            reader = imageio_ffmpeg.read_frames(str(self.path), pix_fmt="rgba", bpp=4, input_params=self.input_params)
            meta = next(reader)
            width, height = meta["size"]
            for index, raw in enumerate(reader):
                if index in wanted:
                    yield index, np.frombuffer(raw, np.uint8).reshape(height, width, 4).copy()
        except (RuntimeError, OSError, ValueError) as error:
            raise InputError(f"--data {self.path}: cannot read a video ({type(error).__name__})") from error


def _mask_files(masks: Path, count: int) -> List[Path]:
    files = list_images(masks)
    if len(files) != count:
        raise InputError(
            f"--pipeline.datamanager.video.masks {masks}: {len(files)} masks for {count} frames; expected one mask "
            "per source frame"
        )
    return files


def _read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.mode in ("RGBA", "LA"):
                return np.asarray(image.getchannel("A"))
            return np.asarray(image.convert("L"))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise InputError(f"{path}: cannot read a mask image ({type(error).__name__})") from error


def on_white(rgba: np.ndarray, resolution: int, alpha: Optional[np.ndarray] = None) -> torch.Tensor:
    """uint8 RGBA [H, W, 4] (or RGB plus ``alpha`` [H, W]) -> [3, S, S] in [0, 1]: composited on white, padded to a
    centred square with white, resized (area filter when shrinking)."""
    image = torch.from_numpy(np.ascontiguousarray(rgba)).float() / 255.0
    a = image[..., 3:] if alpha is None else torch.from_numpy(np.ascontiguousarray(alpha)).float()[..., None] / 255.0
    rgb = (image[..., :3] * a + (1.0 - a)).permute(2, 0, 1)
    height, width = rgb.shape[1:]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    rgb = F.pad(rgb, (left, side - width - left, top, side - height - top), value=1.0)
    if side != resolution:
        mode = "area" if side > resolution else "bilinear"
        rgb = F.interpolate(
            rgb[None],
            size=(resolution, resolution),
            mode=mode,
            **({"align_corners": False} if mode == "bilinear" else {}),
        )[0]
    return rgb.clamp(0.0, 1.0)


def read_object_video(path: Path, config: ObjectVideoConfig) -> ObjectVideo:
    """Samples, composites and resizes the frames of an object video (see the module docstring)."""
    source = FrameSource(path)
    count = source.count
    if count < MIN_FRAMES:
        raise InputError(f"--data {path}: {count} frames; expected at least {MIN_FRAMES}")
    num_frames = config.num_frames or auto_num_frames(count)
    if not MIN_FRAMES <= num_frames <= count:
        raise InputError(
            f"--pipeline.datamanager.video.num-frames {num_frames}: expected 0 or {MIN_FRAMES}..{count} (the frames "
            f"of {path})"
        )
    indices = sample_indices(count, num_frames)
    masks = _mask_files(config.masks, count) if config.masks is not None else None
    frames, has_alpha = {}, False
    for index, rgba in source.frames(indices):
        alpha = _read_mask(masks[index]) if masks is not None else None
        if alpha is not None and alpha.shape != rgba.shape[:2]:
            raise InputError(
                f"{masks[index]}: mask of size {alpha.shape[1]}x{alpha.shape[0]} for a frame of "
                f"{rgba.shape[1]}x{rgba.shape[0]}; expected the frame's size"
            )
        has_alpha = has_alpha or bool((rgba[..., 3] < OPAQUE).any())
        frames[index] = on_white(rgba, config.resolution, alpha)
    if len(frames) != len(set(indices)):
        raise InputError(f"--data {path}: only {len(frames)} of the {count} frames it reports could be decoded")
    if masks is None and not has_alpha:
        raise InputError(
            f"--data {path}: no alpha channel (or a fully opaque one); expected an RGBA object video or frames, or "
            "--pipeline.datamanager.video.masks DIR"
        )
    return ObjectVideo(torch.stack([frames[i] for i in indices]), indices, count, path)


# ---- image to video (Stable Video Diffusion) -----------------------------------------------------------------------
def read_object_image(path: Path, config: ObjectVideoConfig) -> torch.Tensor:
    """The image for --image-to-video as [3, S, S] on white (S = svd_resolution); alpha or a mask is required."""
    if not path.is_file():
        raise InputError(f"--data {path}: no such file (expected one object image with --image-to-video)")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(
            f"--data {path}: '{path.suffix}' is not an image type ({', '.join(sorted(IMAGE_SUFFIXES))}) for "
            "--image-to-video"
        )
    rgba = _read_image_rgba(path)
    alpha = None
    if config.masks is not None:
        alpha = _read_mask(_mask_files(config.masks, 1)[0])
    elif not (rgba[..., 3] < OPAQUE).any():
        raise InputError(
            f"--data {path}: no alpha channel (or a fully opaque one); expected an RGBA object image, or "
            "--pipeline.datamanager.video.masks DIR with one mask"
        )
    return on_white(rgba, config.svd_resolution, alpha)


@torch.no_grad()
def image_to_video(image: torch.Tensor, config: ObjectVideoConfig, device: Union[str, torch.device]) -> torch.Tensor:
    """Stable Video Diffusion's video [F, 3, S, S] in [0, 1] of ``image`` [3, S, S] (loaded, used and released)."""
    from diffusers import StableVideoDiffusionPipeline

    pipeline = load_diffusion_pipeline(
        StableVideoDiffusionPipeline, config.svd_model, "--pipeline.datamanager.video.svd-model", device
    )
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    side = config.svd_resolution
    frames = pipeline(
        image=image[None].to(device),
        height=side,
        width=side,
        num_frames=config.svd_num_frames,
        num_inference_steps=config.svd_steps,
        fps=config.svd_fps,
        motion_bucket_id=config.svd_motion_bucket_id,
        noise_aug_strength=config.svd_noise_aug_strength,
        decode_chunk_size=config.svd_decode_chunk_size,
        generator=generator,
        output_type="pt",
    ).frames[0]
    return frames.float().clamp(0.0, 1.0).cpu()


def sample_generated_video(frames: torch.Tensor, config: ObjectVideoConfig, source: Path) -> ObjectVideo:
    """Samples a generated video [N, 3, S, S] (on white) like a read one."""
    count = len(frames)
    num_frames = config.num_frames or auto_num_frames(count)
    if not MIN_FRAMES <= num_frames <= count:
        raise InputError(
            f"--pipeline.datamanager.video.num-frames {num_frames}: expected 0 or {MIN_FRAMES}..{count} "
            "(--svd-num-frames)"
        )
    indices = sample_indices(count, num_frames)
    resized = F.interpolate(frames[indices], size=(config.resolution,) * 2, mode="area")
    return ObjectVideo(resized.clamp(0, 1), indices, count, source)


# ---- the datamanager -----------------------------------------------------------------------------------------------
@dataclass
class ObjectVideoDataManagerConfig(SDSDataManagerConfig):
    """SDS cameras plus the object video named by --data."""

    _target: Type = field(default_factory=lambda: ObjectVideoDataManager)
    video: ObjectVideoConfig = field(default_factory=ObjectVideoConfig)
    """How the object video is read (masks, frames, image-to-video)."""
    num_frames: int = 0
    """Instants the scene is fitted at; 0: the frames sampled from the video (video.num_frames)."""


class ObjectVideoDataManager(SDSDataManager):
    """Reads the object video when training (``test_mode`` "val"); rendering and evaluation need no input.

    ``video`` holds the sampled frames; with ``--image-to-video`` it stays None until the pipeline made the video
    (``image`` holds the conditioning image until then, see :meth:`set_generated_video`).
    """

    config: ObjectVideoDataManagerConfig

    def __init__(
        self,
        config: ObjectVideoDataManagerConfig,
        *args,
        test_mode: Literal["test", "val", "inference"] = "val",
        **kwargs,
    ) -> None:
        self.video: Optional[ObjectVideo] = None
        self.image: Optional[torch.Tensor] = None
        video_config = config.video
        num_frames = config.num_frames or video_config.num_frames or MIN_FRAMES
        if test_mode == "val":
            if config.data is None:
                raise InputError(
                    "--data: missing; expected an object video (mp4/webm/gif, a folder of frames) or, with "
                    "--pipeline.datamanager.video.image-to-video, one image"
                )
            if video_config.image_to_video:
                self.image = read_object_image(config.data, video_config)
                sampled = video_config.num_frames or auto_num_frames(video_config.svd_num_frames)
            else:
                self.video = read_object_video(config.data, video_config)
                sampled = len(self.video.frames)
            if config.num_frames not in (0, sampled):
                raise InputError(
                    f"--pipeline.datamanager.num-frames {config.num_frames}: expected 0 (the {sampled} frames sampled "
                    "from the input; set --pipeline.datamanager.video.num-frames to change them)"
                )
            num_frames = sampled
        config = copy.copy(config)  # the instants the input decided; the saved config.yml keeps the user's value
        config.num_frames = num_frames
        super().__init__(config, *args, test_mode=test_mode, **kwargs)

    @property
    def needs_video(self) -> bool:
        """True while the --image-to-video input waits for its generated video."""
        return self.image is not None and self.video is None

    def generate_video(self, device: Union[str, torch.device]) -> torch.Tensor:
        """Stable Video Diffusion's video [F, 3, S, S] of the input image."""
        assert self.image is not None, "generate_video is for --image-to-video inputs"
        return image_to_video(self.image, self.config.video, device)

    def set_generated_video(self, frames: torch.Tensor) -> None:
        """Uses the generated video [F, 3, S, S] (new or restored from a checkpoint) as the object video."""
        assert self.config.data is not None
        video = sample_generated_video(frames, self.config.video, self.config.data)
        if len(video.frames) != self.config.num_frames:
            raise InputError(
                f"the generated video has {len(frames)} frames, sampled to {len(video.frames)}; this run fits "
                f"{self.config.num_frames} instants (expected the same --svd-num-frames and --num-frames)"
            )
        self.video = video
