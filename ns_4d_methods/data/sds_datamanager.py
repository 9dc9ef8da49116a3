"""The datamanager of the score-distillation methods (4diffusion, 4real): it invents cameras instead of reading images.

What every SDS method gets from :class:`SDSDataManager` (learned from nerfstudio's ``RandomCamerasDataManager``):

- **no images needed**: ``--data`` is optional (subclasses read their inputs from it);
- **time**: the scene is supervised at ``num_frames`` instants ``t_i = i / (num_frames - 1)``; each training batch
  covers a window of ``window`` consecutive instants, and the window slides (a random start each step) when
  ``num_frames > window``; cameras carry their times and ``includes_time`` is True, so the viewer shows its time
  slider and ``ns-render`` moves through time;
- **a resolution schedule**: ``resolutions[k]`` pixels from step ``resolution_milestones[k - 1]`` on;
- **``next_train(step)``** returns nerfstudio :class:`Cameras` (one per rendered view, frames-major) and a batch dict
  holding the :class:`SDSViews` that describes them;
- **fixed cameras** for the viewer, ``ns-render`` and evaluation (``train_dataset`` and ``eval_dataset``): an orbit
  around the object whose time rises with the azimuth, so ``ns-render interpolate`` makes a turntable video in which
  time moves; plus :meth:`SDSDataManager.view_cameras` for cameras at the input view's elevation and distance, at
  chosen azimuths and instants (anchor frames, result videos, metrics).

The default sampler, :class:`OrbitSamplerConfig`, is 4Diffusion's: ``num_views`` orthogonal views at azimuths
``(u + k) / num_views * 360 - 180`` (one uniform ``u`` per step), one elevation from U[0, 5] deg, distance 1.1 and
fovy 45 deg, rendered at every instant of the window.

Extending it (e.g. 4real): subclass :class:`SDSDataManagerConfig`/:class:`SDSDataManager`, read inputs from
``config.data`` in ``__init__`` before calling ``super().__init__`` (set ``num_frames`` from them), swap
``sampler`` for another config whose ``sample(times, resolution, generator)`` returns :class:`SDSViews`
(e.g. a camera path at one instant, or one camera over many instants), and add image batches to the dict that
``next_train`` returns by overriding it and calling ``super().next_train(step)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Type, Union

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.configs.base_config import InstantiateConfig
from nerfstudio.configs.config_utils import to_immutable_dict
from nerfstudio.data.datamanagers.base_datamanager import DataManager, DataManagerConfig
from nerfstudio.data.datamanagers.random_cameras_datamanager import RandomCamerasDataManager
from nerfstudio.data.datasets.base_dataset import InputDataset
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.data.utils.dataloaders import FixedIndicesEvalDataloader, RandIndicesEvalDataloader
from torch import Tensor
from torch.nn import Parameter

from ns_4d_methods.errors import InputError
from ns_4d_methods.render.orbit_cameras import orbit_cameras


@dataclass
class SDSViews:
    """The views of one SDS batch: ``num_views`` cameras rendered at each of ``num_frames`` instants."""

    cameras: Cameras
    """[num_frames * num_views] cameras, frames-major (f n): all views of the first instant, then the next."""
    elevation: Tensor
    """[num_views] elevations in degrees."""
    azimuth: Tensor
    """[num_views] azimuths in degrees (threestudio convention, see :mod:`ns_4d_methods.render.orbit_cameras`)."""
    distance: Tensor
    """[num_views] camera distances."""
    fovy: Tensor
    """[num_views] vertical fields of view in degrees."""
    frame_indices: Tensor
    """[num_frames] indices of the instants into the datamanager's ``frame_times``."""
    times: Tensor
    """[num_frames] the instants, in [0, 1]."""
    resolution: int
    """Width and height of every view in pixels."""

    @property
    def num_views(self) -> int:
        return len(self.azimuth)

    @property
    def num_frames(self) -> int:
        return len(self.times)


@dataclass
class OrbitSamplerConfig(InstantiateConfig):
    """4Diffusion's SDS views: ``num_views`` views evenly spread in azimuth from a random start, one elevation,
    distance and field of view per step, all seen at every instant of the window."""

    _target: Type = field(default_factory=lambda: OrbitSampler)
    num_views: int = 4
    """Views per instant (4DM takes 4 orthogonal views)."""
    elevation_range: Tuple[float, float] = (0.0, 5.0)
    """Range of the elevation in degrees (uniform)."""
    distance_range: Tuple[float, float] = (1.1, 1.1)
    """Range of the camera distance from the origin (uniform)."""
    fovy_range: Tuple[float, float] = (45.0, 45.0)
    """Range of the vertical field of view in degrees (uniform)."""
    azimuth_range: Tuple[float, float] = (-180.0, 180.0)
    """Azimuth range that the views divide evenly (degrees)."""


class OrbitSampler:
    """Draws :class:`SDSViews` as :class:`OrbitSamplerConfig` describes."""

    def __init__(self, config: OrbitSamplerConfig) -> None:
        self.config = config

    def sample(self, times: Tensor, frame_indices: Tensor, resolution: int, generator: torch.Generator) -> SDSViews:
        config = self.config
        num_views = config.num_views

        def uniform(low_high: Tuple[float, float]) -> Tensor:
            low, high = low_high
            return (low + (high - low) * torch.rand(1, generator=generator)).expand(num_views)

        low, high = config.azimuth_range
        u = torch.rand(1, generator=generator)
        azimuth = (u + torch.arange(num_views)) / num_views * (high - low) + low
        elevation, distance, fovy = (
            uniform(config.elevation_range),
            uniform(config.distance_range),
            uniform(config.fovy_range),
        )
        num_frames = len(times)
        cameras = orbit_cameras(
            elevation.repeat(num_frames),
            azimuth.repeat(num_frames),
            distance.repeat(num_frames),
            fovy.repeat(num_frames),
            resolution,
            times=times.repeat_interleave(num_views),
        )
        return SDSViews(cameras, elevation, azimuth, distance, fovy, frame_indices, times, resolution)


class CameraSetDataset(InputDataset):
    """A fixed set of cameras with their images (white when none are given), for the viewer, renders and eval."""

    def __init__(self, cameras: Cameras, scene_box: SceneBox, images: Optional[Tensor] = None) -> None:
        # InputDataset.__init__ wants dataparser outputs with image files; this dataset has neither
        self._dataparser_outputs = None
        self.cameras = cameras
        self.scene_box = scene_box
        self.images = images
        self.alpha_color = None
        self.mask_filenames = None
        self.metadata = to_immutable_dict({})
        self.scale_factor = 1.0

    def __len__(self) -> int:
        return len(self.cameras)

    def __getitem__(self, index: int) -> Dict:
        if self.images is not None:
            image = self.images[index]
        else:
            image = torch.ones(int(self.cameras.height[index]), int(self.cameras.width[index]), 3)
        return {"image": image, "image_idx": index}


@dataclass
class SDSDataManagerConfig(DataManagerConfig):
    """Cameras for score distillation: random views over a sliding window of instants, no images."""

    _target: Type = field(default_factory=lambda: SDSDataManager)
    num_frames: int = 8
    """Instants the scene is supervised at, t_i = i / (num_frames - 1) (subclasses may set it from their input)."""
    window: int = 8
    """Instants per training batch (4DM sees 8); the window slides over the num_frames instants."""
    sampler: OrbitSamplerConfig = field(default_factory=OrbitSamplerConfig)
    """How the views of a training batch are drawn."""
    resolutions: Tuple[int, ...] = (64, 192, 256)
    """Render resolution of the training views, one per phase of the schedule."""
    resolution_milestones: Tuple[int, ...] = (5000, 10000)
    """Steps at which the next resolution starts (one fewer than resolutions)."""
    input_elevation: float = 0.0
    """Elevation of the input view (degrees)."""
    input_azimuth: float = -90.0
    """Azimuth of the input view (degrees, threestudio convention). 4DM (like ImageDream) takes the input frames as
    its front view, ImageDream's azimuth 0, which is -90 in this convention."""
    input_distance: float = 1.1
    """Distance of the input view from the origin."""
    input_fovy: float = 45.0
    """Vertical field of view of the input view (degrees)."""
    num_eval_cameras: int = 32
    """Cameras of the fixed orbit for the viewer, ns-render and evaluation (time rises with the azimuth)."""
    eval_resolution: int = 256
    """Resolution of the fixed orbit cameras."""
    scene_radius: float = 1.0
    """Half-size of the scene box [-r, r]^3 around the object."""
    seed: int = 0
    """Seed of the camera sampling."""


class SDSDataManager(RandomCamerasDataManager):
    """Cameras with times for SDS training, plus fixed cameras for the viewer and evaluation.

    It derives from nerfstudio's ``RandomCamerasDataManager`` (without its constructor) so that nerfstudio's tools
    that accept that class (``ns-render spiral``) accept this one.
    """

    config: SDSDataManagerConfig
    includes_time = True

    def __init__(
        self,
        config: SDSDataManagerConfig,
        device: Union[torch.device, str] = "cpu",
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        **kwargs,
    ) -> None:
        self.config = config
        self.device = device
        self.world_size = world_size
        self.local_rank = local_rank
        self.sampler = None
        self.test_mode = test_mode
        self.test_split = "test" if test_mode in ("test", "inference") else "val"
        _check_config(config)
        self.camera_sampler = config.sampler.setup()
        self.generator = torch.Generator().manual_seed(config.seed)
        self.frame_times = torch.linspace(0.0, 1.0, config.num_frames) if config.num_frames > 1 else torch.zeros(1)
        self.current_resolution = config.resolutions[0]

        radius = config.scene_radius
        scene_box = SceneBox(torch.tensor([[-radius] * 3, [radius] * 3], dtype=torch.float32))
        self.train_dataset = CameraSetDataset(self.orbit_eval_cameras(), scene_box)
        self.eval_dataset = self.train_dataset
        self.eval_dataloader = RandIndicesEvalDataloader(input_dataset=self.eval_dataset, device=self.device)
        self.fixed_indices_eval_dataloader = FixedIndicesEvalDataloader(
            input_dataset=self.eval_dataset, device=self.device
        )
        DataManager.__init__(self)

    # ---- cameras ---------------------------------------------------------------------------------------------------
    def resolution(self, step: int) -> int:
        """Render resolution of the training views at ``step``."""
        passed = sum(step >= milestone for milestone in self.config.resolution_milestones)
        return self.config.resolutions[passed]

    def window_frames(self, start: Optional[int] = None) -> Tensor:
        """Indices of the instants of a window starting at ``start`` (None: a random start)."""
        window = min(self.config.window, self.config.num_frames)
        if start is None:
            start = int(torch.randint(0, self.config.num_frames - window + 1, (1,), generator=self.generator))
        return torch.arange(start, start + window)

    def view_cameras(self, azimuths: Sequence[float], times: Tensor, resolution: int) -> Cameras:
        """Cameras at the input view's elevation, distance and fovy, at each of ``azimuths`` (degrees), seeing each
        of the instants ``times``; frames-major ([times * azimuths])."""
        config = self.config
        azimuths = torch.as_tensor(list(azimuths), dtype=torch.float32)
        times = torch.as_tensor(times, dtype=torch.float32).reshape(-1)
        return orbit_cameras(
            config.input_elevation,
            azimuths.repeat(len(times)),
            config.input_distance,
            config.input_fovy,
            resolution,
            times=times.repeat_interleave(len(azimuths)),
        )

    def orbit_eval_cameras(self) -> Cameras:
        """The fixed orbit: ``num_eval_cameras`` cameras from the input view once around, time rising from 0 to 1."""
        config = self.config
        count = config.num_eval_cameras
        azimuths = config.input_azimuth + torch.arange(count, dtype=torch.float32) * (360.0 / count)
        times = torch.linspace(0.0, 1.0, count) if count > 1 else torch.zeros(1)
        return orbit_cameras(
            config.input_elevation, azimuths, config.input_distance, config.input_fovy, config.eval_resolution, times
        )

    # ---- nerfstudio's datamanager interface ------------------------------------------------------------------------
    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        """The views of training step ``step``: cameras [window * num_views] (frames-major) and ``{"views": ...}``."""
        self.train_count += 1
        self.current_resolution = self.resolution(step)
        frames = self.window_frames()
        views = self.camera_sampler.sample(self.frame_times[frames], frames, self.current_resolution, self.generator)
        return views.cameras.to(self.device), {"views": views}

    def next_eval(self, step: int) -> Tuple[Cameras, Dict]:
        self.eval_count += 1
        return self.next_train(step)

    def next_eval_image(self, step: int) -> Tuple[Cameras, Dict]:
        index = step % len(self.eval_dataset)
        return self.eval_dataloader.get_camera(index)

    def get_train_rays_per_batch(self) -> int:
        window = min(self.config.window, self.config.num_frames)
        return window * self.config.sampler.num_views * self.current_resolution**2

    def get_eval_rays_per_batch(self) -> int:
        return self.config.eval_resolution**2

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        return {}


def _check_config(config: SDSDataManagerConfig) -> None:
    if len(config.resolutions) != len(config.resolution_milestones) + 1:
        raise InputError(
            f"--pipeline.datamanager.resolutions {list(config.resolutions)} and resolution-milestones "
            f"{list(config.resolution_milestones)}: expected one more resolution than milestones"
        )
    if list(config.resolution_milestones) != sorted(config.resolution_milestones):
        raise InputError("--pipeline.datamanager.resolution-milestones: expected increasing steps")
    if config.num_frames < 1 or config.window < 1:
        raise InputError("--pipeline.datamanager.num-frames and window: expected at least 1")
    if config.sampler.num_views < 1:
        raise InputError("--pipeline.datamanager.sampler.num-views: expected at least 1")
