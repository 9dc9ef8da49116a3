"""Reading images and videos for the command lines and methods (uint8 RGB frames, streamed, with one-line errors),
and writing videos."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple

import cv2
import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ns_4d_methods.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}

Size = Tuple[int, int]  # (height, width)


def read_image(path: Path) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3]."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as error:
        raise InputError(f"{path}: cannot read an image ({type(error).__name__})") from error


def resize(frame: np.ndarray, size: Size) -> np.ndarray:
    if frame.shape[:2] == size:
        return frame
    return cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def probe_video(path: Path) -> Tuple[int, float, Size]:
    """Frame count (as the container reports it), frame rate and frame size of a readable video."""
    capture = cv2.VideoCapture(str(path))
    try:
        ok, frame = capture.read() if capture.isOpened() else (False, None)
        if not ok:
            raise InputError(f"{path}: cannot read a video (not a video file, or no decodable frames)")
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = capture.get(cv2.CAP_PROP_FPS) or 24.0
        return max(count, 1), fps, frame.shape[:2]
    finally:
        capture.release()


def read_video(path: Path, size: Optional[Size] = None, max_frames: Optional[int] = None) -> Iterator[np.ndarray]:
    """The frames of a video as uint8 RGB [H, W, 3], resized to ``size``, one at a time."""
    capture = cv2.VideoCapture(str(path))
    try:
        count = 0
        while max_frames is None or count < max_frames:
            ok, frame = capture.read()
            if not ok:
                return
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            yield resize(frame, size) if size else frame
            count += 1
    finally:
        capture.release()


def list_images(folder: Path) -> List[Path]:
    if not folder.is_dir():
        raise InputError(f"{folder}: not a directory")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def to_tensor(frame: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float() / 255.0


def to_frame(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


def write_video(path: Path, frames: Iterable[np.ndarray], fps: int) -> Path:
    """Writes uint8 RGB frames [H, W, 3] (all of one size, streamed) as an H.264 mp4 that players show."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    try:
        for frame in frames:
            if writer is None:
                height, width = frame.shape[:2]
                writer = imageio_ffmpeg.write_frames(
                    str(path), (width, height), fps=fps, macro_block_size=2, ffmpeg_log_level="error"
                )
                writer.send(None)  # start ffmpeg
            writer.send(np.ascontiguousarray(frame))
    finally:
        if writer is not None:
            writer.close()
    return path
