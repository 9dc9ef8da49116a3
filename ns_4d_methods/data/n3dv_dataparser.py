"""``n3dv-data``: synchronised multi-camera captures in the N3DV/DyNeRF layout, read frame by frame.

A scene folder holds ``poses_bounds.npy`` (one LLFF row per camera: a 3x5 matrix [R | t | (h, w, focal)] with axes
[down, right, back], then the near and far bounds) and, per camera, a video ``camXX.mp4`` or a frame folder ``camXX/``
(or ``camXX/images/``) of images sorted by name. Cameras taken in order (cam00, cam01, ...) match the rows in order.
Every (camera, frame) pair becomes one nerfstudio camera whose time is frame index / (num_frames - 1); the held-out
cameras (N3DV: camera 0) form the eval split.

Frames are never all decoded at parse time: the outputs name each image's source in ``metadata["frame_sources"]``
(the frame file, or the video and its frame index) and :class:`N3DVFrameDataset` reads one frame when asked,
downscaled in memory. The dataset folder is only read. Bad input ends with a one-line
:class:`~ns_4d_methods.errors.InputError` naming the file or field.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Type

import cv2
import numpy as np
import numpy.typing as npt
import torch
from nerfstudio.cameras import camera_utils
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.datasets.base_dataset import InputDataset
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.plugins.registry_dataparser import DataParserSpecification
from PIL import Image, UnidentifiedImageError

from ns_4d_methods.errors import InputError

VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CAMERA_NAME = re.compile(r"cam(\d+)")
# LLFF stores camera axes as [down, right, back]; nerfstudio/OpenGL wants [right, up, back].
LLFF_TO_OPENGL = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


@dataclass
class N3DVDataParserConfig(DataParserConfig):
    """A synchronised multi-camera capture: ``poses_bounds.npy`` plus ``camXX.mp4`` videos or ``camXX/`` frames."""

    _target: Type = field(default_factory=lambda: N3DVDataParser)
    data: Path = Path()
    """Scene folder holding ``poses_bounds.npy`` and one ``camXX.mp4`` or ``camXX/`` frame folder per camera."""
    downscale: int = 1
    """Integer factor by which frames are shrunk when read (in memory; nothing is written to the dataset)."""
    held_out_cameras: Tuple[int, ...] = (0,)
    """Cameras, by the number in their name (``cam00`` is 0), that form the eval split and are never trained on.
    N3DV holds out camera 0. Empty: every camera is in both splits."""
    num_frames: Optional[int] = None
    """Use the first n frames of every camera; None uses all of them."""
    frame_stride: int = 1
    """Use every n-th of those frames (times keep their place in the clip)."""
    orientation_method: Literal["pca", "up", "vertical", "none"] = "up"
    """How to orient the poses (nerfstudio's ``auto_orient_and_center_poses``)."""
    center_method: Literal["poses", "focus", "none"] = "poses"
    """How to centre the poses."""
    auto_scale_poses: bool = True
    """Scale poses so that every camera lies in the [-1, 1] cube."""
    scale_factor: float = 1.0
    """Extra scale applied to camera positions after auto-scaling."""
    scene_scale: float = 1.0
    """Half-size of the scene box, in units after scaling."""


@dataclass
class _CameraSource:
    """One camera's frames as found on disk."""

    name: str
    path: Path
    """The video, or the folder the frames are in."""
    frames: Optional[List[Path]]
    """The frame files in order; None for a video."""
    count: int
    width: int
    height: int
    fps: Optional[float]
    """Frame rate of a video; None for a frame folder."""

    def source(self, frame: int) -> Tuple[Path, int]:
        return (self.path, frame) if self.frames is None else (self.frames[frame], frame)


def _probe_video(path: Path) -> _CameraSource:
    capture = cv2.VideoCapture(str(path))
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
        readable, frame = capture.read() if count > 0 else (False, None)
        if not readable:
            raise InputError(f"{path}: unreadable video (expected an mp4 that OpenCV can decode)")
        fps = round(float(capture.get(cv2.CAP_PROP_FPS)), 3)  # 30000/1001 is 29.97 for every camera
    finally:
        capture.release()
    return _CameraSource(path.stem, path, None, count, frame.shape[1], frame.shape[0], fps)


def _frame_files(folder: Path) -> List[Path]:
    if (folder / "images").is_dir():
        folder = folder / "images"
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _probe_folder(name: str, folder: Path, frames: List[Path]) -> _CameraSource:
    try:
        with Image.open(frames[0]) as image:  # reads the header only
            width, height = image.size
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"{frames[0]}: unreadable image ({err})") from None
    return _CameraSource(name, frames[0].parent, frames, len(frames), width, height, None)


def _find_cameras(data: Path) -> List[_CameraSource]:
    found = {p.name for p in data.iterdir() if p.is_dir()}
    found |= {p.stem for p in data.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES}
    names = sorted((n for n in found if CAMERA_NAME.fullmatch(n)), key=lambda name: (int(name[3:]), name))
    if not names:
        raise InputError(f"{data}: no cameras found (expected camXX.mp4 videos or camXX/ frame folders)")
    cameras = []
    for name in names:
        folder = data / name
        frames = _frame_files(folder) if folder.is_dir() else []
        videos = [data / f"{name}{s}" for s in VIDEO_SUFFIXES if (data / f"{name}{s}").is_file()]
        if frames:
            cameras.append(_probe_folder(name, folder, frames))
        elif videos:
            cameras.append(_probe_video(videos[0]))
        else:
            expected = f"{'/'.join(IMAGE_SUFFIXES)} frames or a {name}.mp4"
            raise InputError(f"{folder}: empty frame folder (expected {expected})")
    return cameras


def _check_synchronised(cameras: List[_CameraSource]) -> None:
    """Cameras must share one frame count and (videos) one frame rate; the odd one out is named."""
    for attribute, unit in (("count", "frames"), ("fps", "fps")):
        values = [getattr(c, attribute) for c in cameras if getattr(c, attribute) is not None]
        if not values:
            continue
        usual = Counter(values).most_common(1)[0][0]
        odd = [c for c in cameras if getattr(c, attribute) not in (None, usual)]
        if odd:
            c = odd[0]
            raise InputError(
                f"{c.path}: camera {c.name} has {getattr(c, attribute):g} {unit} but the other cameras have "
                f"{usual:g}; expected synchronised cameras with equal frame counts and frame rates"
            )


def _read_poses_bounds(path: Path, num_cameras: int) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"{path}: file not found (expected an N x 17 LLFF poses_bounds.npy, one row per camera)")
    try:
        rows = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise InputError(f"{path}: not a readable .npy array ({err})") from None
    if rows.ndim != 2 or rows.shape[1] != 17 or not np.isfinite(rows).all():
        raise InputError(f"{path}: array of shape {rows.shape}; expected finite N x 17 LLFF rows")
    if rows.shape[0] != num_cameras:
        raise InputError(
            f"{path}: {rows.shape[0]} rows but {num_cameras} cameras were found; expected one row per camera"
        )
    return rows.astype(np.float64)


@dataclass
class N3DVDataParser(DataParser):
    """Parses an N3DV/DyNeRF capture into one timed nerfstudio camera per (camera, frame)."""

    config: N3DVDataParserConfig
    includes_time: bool = True

    def _generate_dataparser_outputs(self, split: str = "train") -> DataparserOutputs:
        cfg = self.config
        if not cfg.data.is_dir():
            raise InputError(f"{cfg.data}: scene folder not found (expected poses_bounds.npy and camXX videos)")
        for name, value in (("downscale", cfg.downscale), ("frame_stride", cfg.frame_stride)):
            if value < 1:
                raise InputError(f"{name} is {value}; expected an integer >= 1")
        cameras = _find_cameras(cfg.data)
        rows = _read_poses_bounds(cfg.data / "poses_bounds.npy", len(cameras))
        _check_synchronised(cameras)

        total = cameras[0].count
        clip = total if cfg.num_frames is None else cfg.num_frames
        if not 1 <= clip <= total:
            raise InputError(f"num_frames is {cfg.num_frames}; expected 1 to {total} (the cameras' frame count)")
        frames = list(range(0, clip, cfg.frame_stride))
        # Times keep each frame's place in the clip, so a stride samples the same timeline.
        frame_times = [f / (clip - 1) if clip > 1 else 0.0 for f in frames]

        eval_cams, train_cams = self._split(cameras)
        chosen = train_cams if split == "train" else eval_cams
        poses, transform, scale = self._poses(rows)
        intrinsics = self._intrinsics(rows, cameras)

        sources, names, pose_idx, times = [], [], [], []
        for i in chosen:
            for frame, time in zip(frames, frame_times):
                sources.append(cameras[i].source(frame))
                names.append(cameras[i].name)
                pose_idx.append(i)
                times.append(time)
        idx = torch.tensor(pose_idx, dtype=torch.long)
        fx, fy, cx, cy, width, height = (column[idx] for column in intrinsics)
        s = cfg.scene_scale
        return DataparserOutputs(
            image_filenames=[path for path, _ in sources],
            cameras=Cameras(
                camera_to_worlds=poses[idx],
                fx=fx,
                fy=fy,
                cx=cx,
                cy=cy,
                width=width,
                height=height,
                camera_type=CameraType.PERSPECTIVE,
                times=torch.tensor(times, dtype=torch.float32)[:, None],
            ),
            scene_box=SceneBox(aabb=torch.tensor([[-s, -s, -s], [s, s, s]], dtype=torch.float32)),
            dataparser_scale=scale,
            dataparser_transform=transform,
            # one unit of the official Instruct 4D-to-4D N3DV loader (poses / (1.08 x nearest bound)), in scene units
            metadata={
                "frame_sources": sources,
                "camera_names": names,
                "llff_unit": LLFF_UNIT * float(rows[:, 15].min()) * scale,
            },
        )

    def _split(self, cameras: List[_CameraSource]) -> Tuple[List[int], List[int]]:
        """Camera positions of the eval and the train split."""
        numbers = [int(c.name[3:]) for c in cameras]
        missing = [n for n in self.config.held_out_cameras if n not in numbers]
        if missing:
            raise InputError(
                f"held_out_cameras names camera {missing[0]}, which {self.config.data} does not have; "
                f"expected some of {numbers}"
            )
        held = [i for i, n in enumerate(numbers) if n in self.config.held_out_cameras]
        train = [i for i in range(len(cameras)) if i not in held]
        if not train:
            raise InputError(f"held_out_cameras holds out all {len(cameras)} cameras; expected some left to train on")
        return (held or train), train

    def _poses(self, rows: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """OpenGL camera-to-world [N, 3, 4], oriented, centred and scaled like nerfstudio's parsers."""
        llff = rows[:, :15].reshape(-1, 3, 5)
        poses = np.zeros((len(rows), 4, 4))
        poses[:, :3, :3] = llff[:, :, :3] @ LLFF_TO_OPENGL
        poses[:, :3, 3] = llff[:, :, 3]
        poses[:, 3, 3] = 1.0
        oriented, transform = camera_utils.auto_orient_and_center_poses(
            torch.from_numpy(poses).float(),
            method=self.config.orientation_method,
            center_method=self.config.center_method,
        )
        scale = 1.0
        if self.config.auto_scale_poses:
            scale /= float(torch.max(torch.abs(oriented[:, :3, 3])).clamp_min(1e-8))
        scale *= self.config.scale_factor
        oriented[:, :3, 3] *= scale
        return oriented, transform, scale

    def _intrinsics(self, rows: np.ndarray, cameras: List[_CameraSource]) -> Sequence[torch.Tensor]:
        """Per-camera fx, fy, cx, cy, width, height [N, 1] of the frames as read (after ``downscale``)."""
        path = self.config.data / "poses_bounds.npy"
        values = []
        for row, camera in zip(rows, cameras):
            hwf_height, hwf_width, focal = row[:15].reshape(3, 5)[:, 4]
            if abs(camera.width / camera.height - hwf_width / hwf_height) > 0.01 * hwf_width / hwf_height:
                raise InputError(
                    f"{path}: camera {camera.name} is {camera.width}x{camera.height} but its row gives "
                    f"h={hwf_height:g}, w={hwf_width:g}; expected frames of the same aspect ratio"
                )
            # hwf describes the original frames; focal scales with the frames actually read.
            width, height = camera.width // self.config.downscale, camera.height // self.config.downscale
            values.append(
                [focal * width / hwf_width, focal * height / hwf_height, width / 2.0, height / 2.0, width, height]
            )
        table = torch.tensor(values, dtype=torch.float64)
        return [table[:, i : i + 1].float() for i in range(4)] + [table[:, i : i + 1].long() for i in (4, 5)]


LLFF_UNIT = 1.8 * 0.6
"""The official Instruct 4D-to-4D N3DV loader divides positions by ``1.8 x 0.6 x`` the nearest depth bound."""


@dataclass
class _OpenVideo:
    """A video kept open between reads."""

    capture: cv2.VideoCapture
    next_frame: int = 0
    """The frame the capture decodes next; -1 when unknown."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Datamanagers read images from a thread pool; one capture decodes for one thread at a time."""


class N3DVFrameDataset(InputDataset):
    """Reads one frame per request from the sources in ``metadata["frame_sources"]``: a frame file, or a frame of a
    video (one open capture per video, seeking only when frames are not read in order). Frames are resized to their
    camera's size, which includes the parser's ``downscale`` and the datamanager's ``camera_res_scale_factor``.
    Datasets without ``frame_sources`` read their image files as nerfstudio's ``InputDataset`` does."""

    def __init__(self, dataparser_outputs: DataparserOutputs, scale_factor: float = 1.0):
        super().__init__(dataparser_outputs, scale_factor)
        self._sources: Optional[List[Tuple[Path, int]]] = self.metadata.get("frame_sources")
        self._open_captures()

    def _open_captures(self) -> None:
        self._captures: Dict[Path, _OpenVideo] = {}
        self._captures_lock = threading.Lock()

    def __getstate__(self) -> Dict:
        # Open captures cannot be pickled (nerfstudio's parallel datamanager spawns processes); each reopens its own.
        state = self.__dict__.copy()
        del state["_captures"], state["_captures_lock"]
        return state

    def __setstate__(self, state: Dict) -> None:
        self.__dict__.update(state)
        self._open_captures()

    def get_numpy_image(self, image_idx: int) -> npt.NDArray[np.uint8]:
        """The frame as uint8 [H, W, 3] RGB at its camera's resolution."""
        if self._sources is None:
            return super().get_numpy_image(image_idx)
        path, frame = self._sources[image_idx]
        if path.suffix.lower() in VIDEO_SUFFIXES:
            bgr = self._video_frame(path, frame)
        else:
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise InputError(f"{path}: unreadable image")
        size = (int(self.cameras.width[image_idx]), int(self.cameras.height[image_idx]))
        if (bgr.shape[1], bgr.shape[0]) != size:
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)  # area averaging: no aliasing when shrinking
        return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def _video_frame(self, path: Path, frame: int) -> np.ndarray:
        with self._captures_lock:
            video = self._captures.get(path)
            if video is None:
                video = self._captures[path] = _OpenVideo(cv2.VideoCapture(str(path)))
        with video.lock:
            if video.next_frame != frame:  # reading in order needs no seek
                video.capture.set(cv2.CAP_PROP_POS_FRAMES, frame)
            readable, bgr = video.capture.read()
            video.next_frame = frame + 1 if readable else -1
        if not readable:
            raise InputError(f"{path}: cannot decode frame {frame}")
        return bgr


n3dv_dataparser = DataParserSpecification(
    config=N3DVDataParserConfig(),
    description="synchronised multi-camera videos or frame folders with LLFF poses_bounds.npy (N3DV/DyNeRF layout)",
)
