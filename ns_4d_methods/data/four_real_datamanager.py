"""4Real's datamanager: the shared SDS datamanager fed with the two videos, and 4Real's video SDS camera paths.

It reads the run's stage artefacts from ``config.data`` (the run directory; the 4real pipeline sets it):

- ``reference_video/frames`` — the reference video, seen by one static camera, the *reference camera*, at the
  canonical frame's pose; frame j is time ``j / (R - 1)``;
- ``freeze_time/frames`` and its ``meta.json`` (``canonical_index``) — the freeze-time video;
- ``cameras/`` (:mod:`ns_4d_methods.data.structure_from_motion`: nerfstudio's ``transforms.json`` and
  ``sparse_pc.ply``) — the poses and shared intrinsics of the freeze-time frames that structure from motion registered
  (the others are left out) and the sparse points with their colours.

The scene is normalised: turned so that the cameras' mean up direction is +z, centred on the pivot (the point the
reference camera looks at, at the median depth of the points) and scaled so that the reference camera is one unit from
it. Its datasets (``train_dataset``: the registered freeze-time frames at the canonical time, each its own camera for
nerfstudio's camera optimizer; ``eval_dataset``: the reference frames from the reference camera, with their times)
give the viewer, ``ns-render`` and evaluation real cameras and images.

A training batch (:meth:`next_train`) is one frame: in the canonical stage a random freeze-time frame (camera
metadata ``cam_idx`` and ``freeze_frame``); in the temporal stage a random frame of both videos together, so that the
freeze-time frames stay supervised while the reference frames (their time, ``previous_time`` the frame before it)
teach the motion. :meth:`sds_path` draws 4Real's video SDS paths (:mod:`ns_4d_methods.render.sds_camera_paths`), at
the resolution of the SDS datamanager's schedule (the height; the width keeps the video's aspect, both multiples of
the prior's 32 pixels):

- temporal: a registered freeze-time camera other than the reference camera, held still, conditioned on its real
  freeze-time frame (which shows the canonical time), time moving outward from the canonical time to 0 or 1: the
  motion seen from a viewpoint the reference video does not show;
- multi-view: a reference frame's time, conditioned on that frame, the reference camera orbiting about the pivot to a
  random pose within the registered freeze-time arc.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from nerfstudio.cameras.camera_utils import rotation_matrix_between
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.dataparsers.base_dataparser import DataparserOutputs
from nerfstudio.data.utils.dataloaders import FixedIndicesEvalDataloader, RandIndicesEvalDataloader
from torch import Tensor

from ns_4d_methods.data.sds_datamanager import CameraSetDataset, SDSDataManager, SDSDataManagerConfig
from ns_4d_methods.data.structure_from_motion import TRANSFORMS, load_sfm_result
from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.video_models import load_frames, stage_meta
from ns_4d_methods.render.sds_camera_paths import multiview_path, pivot_in_front, temporal_path

REFERENCE_FOLDER = "reference_video"
FREEZE_TIME_FOLDER = "freeze_time"
CAMERAS_FOLDER = "cameras"
SIZE_MULTIPLE = 32

Stage = Literal["canonical", "temporal"]


@dataclass
class FourRealDataManagerConfig(SDSDataManagerConfig):
    """The freeze-time and reference videos as training frames, and 4Real's video SDS camera paths."""

    _target: Type = field(default_factory=lambda: FourRealDataManager)
    resolutions: Tuple[int, ...] = (256,)
    """Height of the video SDS renders, one per phase of the schedule (the width follows the video's aspect; LTX-Video
    at 256 x 384 sees 288 tokens per 17 frames)."""
    resolution_milestones: Tuple[int, ...] = ()
    """Steps at which the next SDS resolution starts (one fewer than resolutions)."""
    sds_frames: int = 16
    """Rendered frames per video SDS path, after the conditioning frame (LTX-Video: a multiple of 8)."""
    max_azimuth: Optional[float] = None
    """Largest azimuth (degrees, about the reference camera's up axis through the pivot) of the multi-view path's
    perturbed end pose, either way; None: the azimuths the registered freeze-time cameras span (the arc whose frames
    supervise the scene; a fixed +-30 deg left part of a wider arc unreached and could go past a narrower one)."""
    max_elevation: Optional[float] = None
    """Largest elevation (degrees, about the reference camera's right axis) of that pose, either way; None: the
    elevations the registered freeze-time cameras span."""
    canonical_frame: int = 0
    """Reference-video frame that the freeze-time video shows (the pipeline sets it from its own option)."""
    scene_radius: float = 1.5
    """Half-size of the scene box around the pivot (the reference camera is one unit from it)."""


class FrameDataset(CameraSetDataset):
    """Cameras with uint8 frames [N, H, W, 3], served as float images in [0, 1] (what nerfstudio's viewer expects)."""

    def __getitem__(self, index: int) -> Dict:
        assert self.images is not None
        return {"image": self.images[index].float() / 255.0, "image_idx": index}


@dataclass
class FourRealInputs:
    """The normalised videos and cameras of a run."""

    reference: Tensor
    """[R, H, W, 3] uint8 reference frames."""
    freeze: Tensor
    """[K', H, W, 3] uint8 registered freeze-time frames."""
    freeze_indices: List[int]
    """Index in the freeze-time video of each registered frame."""
    num_freeze_frames: int
    """Frames of the freeze-time video (registered or not)."""
    canonical_index: int
    """Index of the canonical frame in the freeze-time video."""
    cameras: Cameras
    """[K'] cameras of the registered freeze-time frames (no times)."""
    points: Tensor
    """[P, 3] sparse points."""
    colours: Tensor
    """[P, 3] uint8 their colours."""
    scene_from_world: Tensor
    """[3, 4] rotation and translation from the SfM world to the scene (before scaling; nerfstudio's
    ``dataparser_transform``)."""
    scene_scale: float
    """Scale after that transform (nerfstudio's ``dataparser_scale``)."""


def load_inputs(run_dir: Path) -> FourRealInputs:
    """Reads and normalises a run's stage artefacts (see the module docstring); one-line errors when they are
    missing."""
    run_dir = Path(run_dir)
    freeze_meta = stage_meta(run_dir / FREEZE_TIME_FOLDER)
    if stage_meta(run_dir / REFERENCE_FOLDER) is None or freeze_meta is None or not (
        run_dir / CAMERAS_FOLDER / TRANSFORMS
    ).is_file():
        raise InputError(
            f"{run_dir}: the 4real stage artefacts ({REFERENCE_FOLDER}/, {FREEZE_TIME_FOLDER}/, {CAMERAS_FOLDER}/"
            f"{TRANSFORMS}) are incomplete; expected the directory of a 4real run whose first three stages finished"
        )
    reference = torch.from_numpy(load_frames(run_dir / REFERENCE_FOLDER))
    freeze_all = load_frames(run_dir / FREEZE_TIME_FOLDER)
    canonical_index = int(freeze_meta["canonical_index"])
    sfm = load_sfm_result(run_dir / CAMERAS_FOLDER)
    sfm.pose_of(canonical_index)  # one-line error when the reference camera has no pose
    indices = sfm.frame_indices.tolist()
    count = len(indices)
    height, width = freeze_all.shape[1:3]
    c2w = torch.from_numpy(sfm.camera_to_worlds[:, :3]).float()
    xyz, rgb = torch.from_numpy(sfm.points).float(), torch.from_numpy(sfm.colors)

    # up: the cameras' mean up direction -> +z; centre: the reference camera's pivot; scale: one unit to it
    turn = rotation_matrix_between(F.normalize(c2w[:, :, 1].mean(0), dim=0), torch.tensor([0.0, 0.0, 1.0]))
    c2w = torch.cat([turn @ c2w[:, :, :3], turn @ c2w[:, :, 3:4]], dim=-1)
    xyz = xyz @ turn.T
    reference_pose = c2w[indices.index(canonical_index)]
    pivot = pivot_in_front(reference_pose, xyz)
    scale = 1.0 / float((reference_pose[:, 3] - pivot).norm())
    c2w[:, :, 3] = (c2w[:, :, 3] - pivot) * scale
    xyz = (xyz - pivot) * scale

    def column(value: float) -> Tensor:
        return torch.full((count, 1), float(value))

    sx, sy = width / sfm.width, height / sfm.height  # intrinsics of the frames as stored here
    cameras = Cameras(
        camera_to_worlds=c2w, fx=column(sfm.focal * sx), fy=column(sfm.focal * sy), cx=column(sfm.cx * sx),
        cy=column(sfm.cy * sy), width=column(width).long(), height=column(height).long(),
        camera_type=CameraType.PERSPECTIVE,
    )  # fmt: skip
    return FourRealInputs(
        reference=reference,
        freeze=torch.from_numpy(freeze_all[indices]),
        freeze_indices=indices,
        num_freeze_frames=len(freeze_all),
        canonical_index=canonical_index,
        cameras=cameras,
        points=xyz,
        colours=rgb,
        scene_from_world=torch.cat([turn, -pivot[:, None]], dim=1),
        scene_scale=scale,
    )


def _with_times(cameras: Cameras, times: Tensor) -> Cameras:
    return Cameras(
        camera_to_worlds=cameras.camera_to_worlds, fx=cameras.fx, fy=cameras.fy, cx=cameras.cx, cy=cameras.cy,
        width=cameras.width, height=cameras.height, camera_type=cameras.camera_type,
        times=times.reshape(-1, 1).float(),
    )  # fmt: skip


class FourRealDataManager(SDSDataManager):
    """The SDS datamanager with 4Real's videos as training frames and its video SDS paths.

    ``stage`` ("canonical" or "temporal") is set by the pipeline and picks the video that :meth:`next_train` draws
    from.
    """

    config: FourRealDataManagerConfig

    def __init__(
        self,
        config: FourRealDataManagerConfig,
        device: Union[torch.device, str] = "cpu",
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        **kwargs,
    ) -> None:
        if config.data is None:
            raise InputError("pipeline.datamanager.data: not set; expected the 4real run directory")
        self.inputs = inputs = load_inputs(config.data)
        num_reference = len(inputs.reference)
        if not 0 <= config.canonical_frame < num_reference:
            raise InputError(
                f"pipeline.canonical_frame: {config.canonical_frame} is not a frame of the reference video "
                f"({num_reference} frames)"
            )
        config.num_frames = config.window = num_reference
        super().__init__(config, device, test_mode, world_size, local_rank, **kwargs)
        self.stage: Stage = "canonical"
        self.reference_times = self.frame_times
        self.canonical_time = float(self.reference_times[config.canonical_frame])
        self.reference_index = inputs.freeze_indices.index(inputs.canonical_index)
        """Training-camera index of the canonical frame: the reference camera (and its camera refinement)."""

        scene_box = self.train_dataset.scene_box
        freeze_cameras = _with_times(inputs.cameras, torch.full((len(inputs.cameras),), self.canonical_time))
        self.train_dataset = FrameDataset(freeze_cameras, scene_box, inputs.freeze)
        self.train_dataset.metadata = {
            "freeze_frames": inputs.num_freeze_frames,
            "canonical_freeze_frame": inputs.canonical_index,
            "canonical_time": self.canonical_time,
        }
        self.arc = freeze_time_arc(inputs.cameras, self.reference_index)
        """(azimuths, elevations) in radians of the registered freeze-time cameras, seen from the reference."""
        reference_cameras = _with_times(
            inputs.cameras[torch.full((num_reference,), self.reference_index)], self.reference_times
        )
        self.eval_dataset = FrameDataset(reference_cameras, scene_box, inputs.reference)
        self.eval_dataloader = RandIndicesEvalDataloader(input_dataset=self.eval_dataset, device=self.device)
        self.fixed_indices_eval_dataloader = FixedIndicesEvalDataloader(
            input_dataset=self.eval_dataset, device=self.device
        )
        # nerfstudio's pipeline starts Gaussian models from the dataparser outputs' points
        self.train_dataparser_outputs = DataparserOutputs(
            image_filenames=[], cameras=freeze_cameras, scene_box=scene_box,
            metadata={"points3D_xyz": inputs.points, "points3D_rgb": inputs.colours},
            dataparser_transform=inputs.scene_from_world, dataparser_scale=inputs.scene_scale,
        )  # fmt: skip

    # ---- training frames -------------------------------------------------------------------------------------------
    def reference_camera(self, time: float) -> Cameras:
        """The reference camera at ``time`` (its training index as ``cam_idx``, so camera refinement applies)."""
        camera = _with_times(self.inputs.cameras[self.reference_index : self.reference_index + 1], torch.tensor([time]))
        camera.metadata = {"cam_idx": self.reference_index}
        return camera

    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        """One frame (the module docstring): its camera and ``{"image", "freeze_frame"}`` (a freeze-time frame) or
        ``{"image", "time", "previous_time"}`` (a reference frame)."""
        self.train_count += 1
        num_freeze, num_reference = len(self.train_dataset), len(self.inputs.reference)
        count = num_freeze if self.stage == "canonical" else num_freeze + num_reference
        index = int(torch.randint(count, (1,), generator=self.generator))
        if index < num_freeze:
            camera = self.train_dataset.cameras[index : index + 1]
            frame = self.inputs.freeze_indices[index]
            camera.metadata = {"cam_idx": index, "freeze_frame": frame}
            batch = {"image": self.inputs.freeze[index], "freeze_frame": frame}
        else:
            index -= num_freeze
            time = float(self.reference_times[index])
            previous = self.reference_times[index - 1 if index > 0 else 1]
            camera = self.reference_camera(time)
            batch = {"image": self.inputs.reference[index], "time": time, "previous_time": float(previous)}
        return camera.to(self.device), batch

    def get_train_rays_per_batch(self) -> int:
        return int(self.inputs.freeze.shape[1] * self.inputs.freeze.shape[2])

    # ---- video SDS -------------------------------------------------------------------------------------------------
    def sds_size(self, step: int) -> Tuple[int, int]:
        """(height, width) of the SDS renders at ``step``."""
        height = self.resolution(step)
        frame_height, frame_width = self.inputs.reference.shape[1:3]
        width = max(SIZE_MULTIPLE, round(height * frame_width / frame_height / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        return height, width

    def sds_path(
        self,
        kind: Literal["temporal", "multiview"],
        step: int,
        refine: Optional[Callable[[Cameras], Tensor]] = None,
        frame: Optional[int] = None,
    ) -> Tuple[Cameras, Tensor]:
        """A video SDS path (module docstring) and its real conditioning frame [3, h, w] in [0, 1].

        ``frame``: the multi-view path's reference frame (None: a random one). ``refine`` maps a training camera
        (with its ``cam_idx``) to its refined pose [1, 3, 4]; None keeps the stored poses.
        """
        config = self.config
        height, width = self.sds_size(step)
        if kind == "temporal":
            others = [index for index in range(len(self.inputs.cameras)) if index != self.reference_index]
            if not others:
                raise InputError(f"{self.config.data}: only the reference camera is registered; temporal video SDS "
                                 "needs another freeze-time camera")
            index = others[int(torch.randint(len(others), (1,), generator=self.generator))]
        else:
            index = self.reference_index
        camera = _with_times(self.inputs.cameras[index : index + 1], torch.tensor([self.canonical_time]))
        camera.metadata = {"cam_idx": index}
        if refine is not None:
            camera.camera_to_worlds = refine(camera).reshape(1, 3, 4).detach().cpu().float()
        camera.metadata = None
        frame_height, frame_width = self.inputs.reference.shape[1:3]
        camera.fx, camera.cx = camera.fx * width / frame_width, camera.cx * width / frame_width
        camera.fy, camera.cy = camera.fy * height / frame_height, camera.cy * height / frame_height
        camera.width = torch.full_like(camera.width, width)
        camera.height = torch.full_like(camera.height, height)
        if kind == "temporal":
            ends = [end for end in (0.0, 1.0) if end != self.canonical_time]
            end = ends[int(torch.randint(len(ends), (1,), generator=self.generator))]
            path = temporal_path(camera, self.canonical_time, end, config.sds_frames)
            image = self.inputs.freeze[index]
        else:
            if frame is None:
                frame = int(torch.randint(len(self.inputs.reference), (1,), generator=self.generator))
            azimuth, elevation = (
                self._uniform(*span) if limit is None else math.radians(limit) * self._uniform(-1.0, 1.0)
                for limit, span in zip((config.max_azimuth, config.max_elevation), self.arc)
            )
            time = float(self.reference_times[frame])
            path = multiview_path(camera, torch.zeros(3), azimuth, elevation, time, config.sds_frames)
            image = self.inputs.reference[frame]
        image = image.permute(2, 0, 1)[None].float() / 255.0
        condition = F.interpolate(image, size=(height, width), mode="area")[0]
        return path.to(self.device), condition.to(self.device)

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(1, generator=self.generator))


def freeze_time_arc(cameras: Cameras, reference_index: int) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """(smallest, largest) azimuth and elevation (radians) of the cameras' centres about the pivot (the origin), in
    the reference camera's frame: azimuth about its up axis, elevation towards it (as ``orbit_turn`` turns)."""
    reference = cameras.camera_to_worlds[reference_index]
    centres = cameras.camera_to_worlds[:, :, 3] @ reference[:, :3]  # in the reference camera's axes
    azimuths = torch.atan2(centres[:, 0], centres[:, 2])
    elevations = torch.asin((centres[:, 1] / centres.norm(dim=-1)).clamp(-1.0, 1.0))
    return (float(azimuths.min()), float(azimuths.max())), (float(elevations.min()), float(elevations.max()))
