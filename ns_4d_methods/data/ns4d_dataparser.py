"""``ns4d-data``: nerfstudio ``transforms.json`` whose frames carry a time.

Each frame gives its time as ``time`` (seconds or already in [0, 1]); when frames carry no ``time`` the user asks
explicitly for their ``timestamp`` or their frame index (``--time-source``). Times are normalised to [0, 1] and the
original range is kept in the outputs' metadata (``time_range``). Everything is checked before anything is built, and
bad input ends with a one-line :class:`~ns_4d_methods.errors.InputError` naming the file and the field. The dataset
is only read: downscaling happens in memory (``--pipeline.datamanager.camera-res-scale-factor``), never by writing
``images_N`` folders.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Type

import numpy as np
import torch
from nerfstudio.cameras import camera_utils
from nerfstudio.cameras.cameras import CAMERA_MODEL_TO_TYPE, Cameras, CameraType
from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.data.utils.dataparsers_utils import (
    get_train_eval_split_all,
    get_train_eval_split_fraction,
    get_train_eval_split_interval,
)
from nerfstudio.plugins.registry_dataparser import DataParserSpecification
from PIL import Image, UnidentifiedImageError

from ns_4d_methods.errors import InputError

INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


@dataclass
class Ns4dDataParserConfig(DataParserConfig):
    """A nerfstudio ``transforms.json`` whose frames carry time."""

    _target: Type = field(default_factory=lambda: Ns4dDataParser)
    data: Path = Path()
    """Dataset directory holding ``transforms.json``, or the path of the JSON file itself."""
    time_source: Literal["time", "timestamp", "frame_index"] = "time"
    """Where each frame's time comes from: its ``time`` field, its ``timestamp`` field, or its position in
    ``frames`` (0, 1, 2, ...). Whichever is used is normalised to [0, 1]."""
    scale_factor: float = 1.0
    """Extra scale applied to camera positions after auto-scaling."""
    scene_scale: float = 1.0
    """Half-size of the scene box, in units after scaling."""
    orientation_method: Literal["pca", "up", "vertical", "none"] = "up"
    """How to orient the poses (nerfstudio's ``auto_orient_and_center_poses``)."""
    center_method: Literal["poses", "focus", "none"] = "poses"
    """How to centre the poses."""
    auto_scale_poses: bool = True
    """Scale poses so that every camera lies in the [-1, 1] cube."""
    eval_mode: Literal["fraction", "interval", "all"] = "fraction"
    """Train/eval split: a fraction of frames spread evenly, every n-th frame, or all frames in both."""
    train_split_fraction: float = 0.9
    """Fraction of frames used for training when ``eval_mode`` is ``fraction``."""
    eval_interval: int = 8
    """Every n-th frame is held out when ``eval_mode`` is ``interval``."""


def _fail(path: Path, what: str) -> InputError:
    return InputError(f"{path}: {what}")


def _read_transforms(data: Path) -> Tuple[Path, Dict[str, Any]]:
    path = data if data.suffix == ".json" else data / "transforms.json"
    if not path.is_file():
        raise _fail(path, "file not found (expected a nerfstudio transforms.json with timed frames)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _fail(path, f"not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise _fail(path, "expected a JSON object with a 'frames' list")
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise _fail(path, "'frames' is missing or empty (expected a non-empty list of frames)")
    return path, meta


def _frame_time(path: Path, index: int, frame: Dict[str, Any], source: str) -> float:
    if source == "frame_index":
        return float(index)
    if source not in frame:
        hint = "" if source != "time" else " (or pass --time-source timestamp|frame_index)"
        raise _fail(path, f"frames[{index}] ('{frame.get('file_path')}') has no '{source}' field{hint}")
    value = frame[source]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(path, f"frames[{index}].{source} is {value!r}; expected a finite number")
    return float(value)


def _image_size(path: Path, index: int, image: Path) -> Tuple[int, int]:
    if not image.is_file():
        raise _fail(path, f"frames[{index}].file_path: image {image} does not exist")
    try:
        with Image.open(image) as im:
            im.verify()  # checks the file's structure without decoding every pixel
        with Image.open(image) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise _fail(path, f"frames[{index}].file_path: image {image} is unreadable ({err})") from None


def _intrinsic(meta: Dict[str, Any], frame: Dict[str, Any], key: str) -> Optional[float]:
    value = frame.get(key, meta.get(key))
    return None if value is None else float(value)


@dataclass
class Ns4dDataParser(DataParser):
    """Parses a timed ``transforms.json`` into nerfstudio cameras with ``times`` in [0, 1]."""

    config: Ns4dDataParserConfig
    includes_time: bool = True

    def _generate_dataparser_outputs(self, split: str = "train") -> DataparserOutputs:
        path, meta = _read_transforms(self.config.data)
        data_dir = path.parent
        frames: List[Dict[str, Any]] = meta["frames"]

        times, filenames, poses, sizes = [], [], [], []
        for i, frame in enumerate(frames):
            if not isinstance(frame, dict) or "file_path" not in frame:
                raise _fail(path, f"frames[{i}] has no 'file_path'")
            times.append(_frame_time(path, i, frame, self.config.time_source))
            image = data_dir / frame["file_path"]
            filenames.append(image)
            sizes.append(_image_size(path, i, image))
            matrix = np.asarray(frame.get("transform_matrix", []), dtype=np.float64)
            if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
                raise _fail(path, f"frames[{i}].transform_matrix: expected a finite 4x4 matrix")
            poses.append(matrix)

        intrinsics = self._intrinsics(path, meta, frames, sizes)
        poses_t = torch.from_numpy(np.stack(poses).astype(np.float32))
        times_t = torch.tensor(times, dtype=torch.float32)
        t_min, t_max = float(times_t.min()), float(times_t.max())
        times_t = (times_t - t_min) / (t_max - t_min) if t_max > t_min else torch.zeros_like(times_t)

        indices = self._split_indices(filenames, split)
        poses_t, transform_matrix = camera_utils.auto_orient_and_center_poses(
            poses_t, method=self.config.orientation_method, center_method=self.config.center_method
        )
        scale = 1.0
        if self.config.auto_scale_poses:
            scale /= float(torch.max(torch.abs(poses_t[:, :3, 3])).clamp_min(1e-8))
        scale *= self.config.scale_factor
        poses_t[:, :3, 3] *= scale

        idx = torch.tensor(indices, dtype=torch.long)
        fx, fy, cx, cy, w, h, dist, camera_type = intrinsics
        cameras = Cameras(
            fx=fx[idx],
            fy=fy[idx],
            cx=cx[idx],
            cy=cy[idx],
            width=w[idx],
            height=h[idx],
            distortion_params=dist[idx],
            camera_to_worlds=poses_t[idx, :3, :4],
            camera_type=camera_type,
            times=times_t[idx, None],
        )
        s = self.config.scene_scale
        return DataparserOutputs(
            image_filenames=[filenames[i] for i in indices],
            cameras=cameras,
            scene_box=SceneBox(aabb=torch.tensor([[-s, -s, -s], [s, s, s]], dtype=torch.float32)),
            dataparser_scale=scale,
            dataparser_transform=transform_matrix,
            metadata={"time_range": (t_min, t_max), "time_source": self.config.time_source},
        )

    def _intrinsics(self, path: Path, meta: Dict[str, Any], frames: List[Dict[str, Any]], sizes):
        """Per-frame intrinsics tensors; checks that declared sizes match the images."""
        per_frame_size = all("w" in f and "h" in f for f in frames)
        has_intrinsics = all(_intrinsic(meta, f, k) is not None for f in frames for k in ("fl_x", "fl_y"))
        if len(set(sizes)) > 1 and not per_frame_size:
            raise _fail(
                path,
                f"images have different sizes {sorted(set(sizes))[:3]} but frames give no per-frame 'w'/'h' "
                "intrinsics; expected one image size or fl_x, fl_y, cx, cy, w, h in every frame",
            )
        if not has_intrinsics:
            raise _fail(path, "'fl_x'/'fl_y' missing (expected focal lengths in pixels, top-level or per frame)")
        values: Dict[str, List[float]] = {k: [] for k in INTRINSIC_KEYS}
        for i, (frame, (width, height)) in enumerate(zip(frames, sizes)):
            w = _intrinsic(meta, frame, "w") or float(width)
            h = _intrinsic(meta, frame, "h") or float(height)
            if (int(w), int(h)) != (width, height):
                raise _fail(
                    path,
                    f"frames[{i}]: image {frame['file_path']} is {width}x{height} but the intrinsics say "
                    f"w={int(w)}, h={int(h)}",
                )
            values["w"].append(w)
            values["h"].append(h)
            values["fl_x"].append(_intrinsic(meta, frame, "fl_x"))
            values["fl_y"].append(_intrinsic(meta, frame, "fl_y"))
            values["cx"].append(_intrinsic(meta, frame, "cx") or w / 2.0)
            values["cy"].append(_intrinsic(meta, frame, "cy") or h / 2.0)
        dist = torch.stack(
            [
                camera_utils.get_distortion_params(
                    **{k: _intrinsic(meta, f, k) or 0.0 for k in DISTORTION_KEYS}
                )
                for f in frames
            ]
        )
        model = meta.get("camera_model", "OPENCV")
        if model not in CAMERA_MODEL_TO_TYPE:
            raise _fail(path, f"camera_model is {model!r}; expected one of {sorted(CAMERA_MODEL_TO_TYPE)}")
        camera_type: CameraType = CAMERA_MODEL_TO_TYPE[model]

        def col(key: str) -> torch.Tensor:
            return torch.tensor(values[key], dtype=torch.float32)[:, None]

        return (
            col("fl_x"),
            col("fl_y"),
            col("cx"),
            col("cy"),
            col("w").long(),
            col("h").long(),
            dist,
            camera_type,
        )

    def _split_indices(self, filenames: List[Path], split: str) -> List[int]:
        if self.config.eval_mode == "fraction":
            train, evals = get_train_eval_split_fraction(filenames, self.config.train_split_fraction)
        elif self.config.eval_mode == "interval":
            train, evals = get_train_eval_split_interval(filenames, self.config.eval_interval)
        else:
            train, evals = get_train_eval_split_all(filenames)
        return [int(i) for i in (train if split == "train" else evals)]


ns4d_dataparser = DataParserSpecification(
    config=Ns4dDataParserConfig(),
    description="nerfstudio transforms.json whose frames carry time (seconds, [0,1], timestamp or frame index)",
)
