"""What the editing methods (instruct4d, unified-edit) share: training on images that they edit as they go.

An :class:`EditingPipeline` reads its training images through
:class:`~ns_4d_methods.data.edited_dataset.EditedFrameDataset`, whose edits live in an
:class:`~ns_4d_methods.data.edit_store.EditStore` under ``<run>/edits`` (the dataset is never written). It

- opens the store once the trainer exists (nerfstudio hands the trainer over only in ``get_training_callbacks``,
  after the checkpoint was loaded) and restores the edits a checkpoint refers to;
- runs the subclass's edit units inside the training loop (no threads): at most one per step, every
  ``steps_per_edit_unit`` steps from ``edit_start_step`` on, and a refresh pass ``refresh_every`` steps after a pass
  ends;
- keeps its schedule position and the store's index in every checkpoint (``get_extra_state``);
- refreshes the train dataloader's image cache after edits, for ray-sampling and full-image datamanagers alike;
- renders training views (camera and time) for edits that start from the model's current images;
- at the end of training writes the original | edited videos and their metric report
  (:mod:`ns_4d_methods.editing.comparison_videos`), with the scores of the fitted scene's renders from the eval
  cameras (``scene``) beside those of the edited training images (``all``);
- keeps the dataset's alpha on edited images (:meth:`EditingPipeline.with_dataset_alpha`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.engine.trainer import Trainer
from nerfstudio.utils.rich_utils import CONSOLE

from ns_4d_methods.data.edit_store import EditStore
from ns_4d_methods.data.edited_dataset import EditedFrameDataset
from ns_4d_methods.editing.comparison_videos import ComparisonGroup, run_metrics, write_comparison_videos
from ns_4d_methods.editing.edit_metrics import CLIP_MODEL, ClipEmbedder, edit_metrics, format_report, load_clip_or_skip
from ns_4d_methods.errors import InputError
from ns_4d_methods.pipelines.dynamic_pipeline import DynamicPipeline, DynamicPipelineConfig

CAMERA_NAME = re.compile(r"cam(\d+)")
RAW_INTRINSICS = ("fx", "fy", "cx", "cy", "width", "height")


@dataclass
class EditingPipelineConfig(DynamicPipelineConfig):
    """Settings every editing method has."""

    clip_model: str = CLIP_MODEL
    """CLIP model for the metric report written at the end of training (hub id or local directory); the CLIP scores
    are skipped with one message when its weights are not available."""
    video_fps: int = 15
    """Frame rate of the original|edited comparison videos."""
    edit_start_step: int = 0
    """Training steps before the first edit unit (counted from the first step of this run)."""
    steps_per_edit_unit: int = 10
    """Training steps between two edit units."""
    refresh_every: int = 2000
    """Training steps between the end of a pass and the start of a refresh pass from renders; 0: no refreshes."""


@dataclass
class SchedulePosition:
    """When the edit schedule last acted; the subclasses' positions add where it stands."""

    phase: str = "wait"
    """The subclass's phase; "wait" between passes."""
    passes: int = 0
    """Passes completed."""
    units: int = 0
    """Edit units done."""
    first_step: Optional[int] = None
    """Training step at which this edit run started (resumes keep it)."""
    last_unit_step: Optional[int] = None
    """Step of the last edit unit."""
    pass_end_step: Optional[int] = None
    """Step at which the last pass ended."""


@dataclass
class CameraFrames:
    """One camera's training images in time order."""

    name: str
    """The camera's name (``camXX`` for multi-camera captures)."""
    camera_id: int
    """The camera's number in edit-store keys (``camXX`` -> XX)."""
    indices: List[int]
    """Dataset image indices, in time order."""
    frame_ids: List[int]
    """Frame numbers of those images (the video frame, or the rank in time)."""


def group_frames(dataset: EditedFrameDataset) -> List[CameraFrames]:
    """Training images grouped by camera (``camera_names`` metadata; one camera without it), each in time order
    (in index order for data without times)."""
    times = dataset.cameras.times
    count = len(dataset)
    order = sorted(range(count), key=lambda i: float(times[i]) if times is not None else i)
    names: Sequence[str] = dataset.metadata.get("camera_names") or ["cam00"] * count
    sources = dataset.metadata.get("frame_sources")
    groups: Dict[str, CameraFrames] = {}
    for i in order:
        name = names[i]
        if name not in groups:
            number = CAMERA_NAME.fullmatch(name)
            groups[name] = CameraFrames(name, int(number.group(1)) if number else len(groups), [], [])
        group = groups[name]
        group.frame_ids.append(int(sources[i][1]) if sources else len(group.indices))
        group.indices.append(i)
    return sorted(groups.values(), key=lambda g: g.camera_id)


def progress_bar(fraction: float, width: int = 20) -> str:
    """A text progress bar for log lines (a live bar would fight nerfstudio's step table for the terminal)."""
    filled = round(fraction * width)
    return "\u2588" * filled + "\u00b7" * (width - filled)


class EditingPipeline(DynamicPipeline):
    """Base of the editing pipelines. Subclasses set ``method`` and ``position`` (a :class:`SchedulePosition`
    subclass, saved with every checkpoint) and implement :meth:`setup_editing`, :meth:`run_edit_unit`,
    :meth:`start_refresh_pass` and :meth:`comparison_prompts`.
    """

    config: EditingPipelineConfig
    method = "edit"
    """Name used in log lines and messages."""

    def __init__(self, config: EditingPipelineConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        dataset = self.train_dataset
        if not isinstance(dataset, EditedFrameDataset):
            raise TypeError(f"{self.method} needs a datamanager over EditedFrameDataset, got {type(dataset).__name__}")
        self.cameras = group_frames(dataset)
        self._keys: Dict[int, Tuple[int, int]] = {
            index: (group.camera_id, frame)
            for group in self.cameras
            for index, frame in zip(group.indices, group.frame_ids)
        }
        self.position: Any = SchedulePosition()
        self.edit_store: Optional[EditStore] = None
        self.run_dir: Optional[Path] = None
        self._checkpointed_edits: Optional[Dict] = None
        self._stale: Set[int] = set()  # edited since the dataloader's cache was last refreshed
        # nerfstudio's full-image datamanager undistorts its cache and overwrites the cameras' intrinsics in place;
        # these raw ones let it undistort edited images again (see refresh_train_images)
        cameras = dataset.cameras
        self._raw_intrinsics = {name: getattr(cameras, name).clone() for name in RAW_INTRINSICS}

    @property
    def train_dataset(self) -> EditedFrameDataset:
        return self.datamanager.train_dataset

    # ---- setup ---------------------------------------------------------------------------------------------------
    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> List[TrainingCallback]:
        assert training_callback_attributes.trainer is not None
        self.open_editing(training_callback_attributes.trainer)
        callbacks = super().get_training_callbacks(training_callback_attributes)
        callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN], self.finish_editing))
        return callbacks

    def open_editing(self, trainer: Trainer) -> None:
        """Loads the editing models and opens the edit store under the trainer's run directory (``base_dir``),
        restoring the edits of a loaded checkpoint."""
        self.run_dir = Path(trainer.base_dir)
        self.setup_editing(trainer)
        self._open_edit_store()

    def setup_editing(self, trainer: Trainer) -> None:
        """Loads the subclass's editing models; called once the trainer (and any checkpoint) is there."""
        raise NotImplementedError

    def _open_edit_store(self) -> None:
        assert self.run_dir is not None
        self.edit_store = EditStore(self.run_dir / "edits")
        if self._checkpointed_edits is not None:
            try:
                self.edit_store.restore(self._checkpointed_edits)
            except FileNotFoundError as error:
                raise InputError(f"{error}; expected the edits of the run the checkpoint comes from") from None
            CONSOLE.log(f"{self.method}: restored {len(self.edit_store)} edited images into {self.edit_store.root}")
        self.train_dataset.edit_store = self.edit_store
        self.refresh_train_images(i for i in range(len(self.train_dataset)) if i in self.edit_store)

    # ---- the schedule ----------------------------------------------------------------------------------------------
    def get_train_loss_dict(self, step: int):
        if self.edit_store is not None and self._edit_due(step):
            # the editors pick their own precision; the trainer's mixed-precision autocast stays out of them
            with torch.autocast(device_type=self.device.type, enabled=False):
                self.run_edit_unit(step)
        return super().get_train_loss_dict(step)

    def _edit_due(self, step: int) -> bool:
        position, config = self.position, self.config
        if position.first_step is None:
            position.first_step = step
        if step - position.first_step < config.edit_start_step:
            return False
        if position.last_unit_step is not None and step - position.last_unit_step < config.steps_per_edit_unit:
            return False
        if position.phase == "wait":
            if config.refresh_every <= 0 or step - (position.pass_end_step or 0) < config.refresh_every:
                return False
            self.start_refresh_pass()
        return True

    def run_edit_unit(self, step: int) -> None:
        """One edit unit; it records itself in ``position`` (``units``, ``last_unit_step``, pass ends)."""
        raise NotImplementedError

    def start_refresh_pass(self) -> None:
        """Moves ``position`` from "wait" to the start of a refresh pass."""
        raise NotImplementedError

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def get_extra_state(self) -> Dict:
        edits = self.edit_store.state() if self.edit_store is not None else self._checkpointed_edits
        return {"position": asdict(self.position), "edits": edits, "num_train_images": len(self.train_dataset)}

    def set_extra_state(self, state: Dict) -> None:
        expected = len(self.train_dataset)
        if state["num_train_images"] != expected:
            raise InputError(
                f"the checkpoint edits a scene with {state['num_train_images']} training images, but this dataset "
                f"has {expected}; expected a checkpoint of the same scene"
            )
        self.position = type(self.position)(**state["position"])
        self._checkpointed_edits = state["edits"]

    def load_pipeline(self, loaded_state: Dict[str, Any], step: int) -> None:
        try:
            super().load_pipeline(loaded_state, step)
        except RuntimeError as error:
            lines = [line.strip() for line in str(error).splitlines()]
            detail = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected"))),
                          lines[0])
            raise InputError(
                f"the checkpoint (--load-dir/--load-checkpoint) does not fit this model: {detail} Expected a "
                f"checkpoint of {self.method}'s model on this scene with the same model settings"
            ) from None

    @property
    def has_lens_distortion(self) -> bool:
        distortion = self.train_dataset.cameras.distortion_params
        return distortion is not None and bool(torch.any(distortion != 0))

    # ---- images ------------------------------------------------------------------------------------------------------
    def render(self, index: int) -> Dict[str, torch.Tensor]:
        """The model's outputs for training image ``index`` (its camera and time), on the CPU."""
        camera = self.train_dataset.cameras[index : index + 1].to(self.device)
        return {key: value.cpu() for key, value in self.model.get_outputs_for_camera(camera).items()}

    def put(self, index: int, image: torch.Tensor) -> None:
        """Stores the edit [H, W, 3] in [0, 1] of training image ``index``, with the original's alpha if it has one."""
        assert self.edit_store is not None
        self.edit_store.put(index, self._keys[index], self.with_dataset_alpha(index, image.detach().cpu().numpy()))
        self._stale.add(index)

    def with_dataset_alpha(self, index: int, image: np.ndarray) -> np.ndarray:
        """The edit [H, W, 3] in [0, 1] with training image ``index``'s own alpha appended, so that training
        composites it on the dataset's background exactly as the original: the diffusion model tints the
        background differently in every view, which a white-background model would otherwise learn as floaters."""
        alpha = self.train_dataset.original_alpha(index)
        if alpha is None:
            return image
        return np.concatenate([image.clip(0.0, 1.0), alpha.astype(np.float32) / 255.0], axis=-1)

    def refresh_train_images(self, indices: Optional[Iterable[int]] = None) -> None:
        """Makes the train dataloader see the current versions of ``indices`` (default: those edited since the last
        refresh)."""
        indices, self._stale = (self._stale if indices is None else set(indices)), set()
        if not indices:
            return  # the cache already holds the current images
        datamanager = self.datamanager
        if isinstance(datamanager, FullImageDatamanager):
            if "cached_train" not in vars(datamanager):
                return  # not cached yet: the first access reads the current images
            if self.has_lens_distortion:
                # nerfstudio undistorts the whole cache at once: give back the raw intrinsics and let it redo it
                cameras = self.train_dataset.cameras
                for name, value in self._raw_intrinsics.items():
                    getattr(cameras, name).copy_(value)
                del datamanager.cached_train
                return
            for index in indices:
                image = self.train_dataset.get_data(index, image_type=datamanager.config.cache_images_type)["image"]
                old = datamanager.cached_train[index]["image"]
                datamanager.cached_train[index]["image"] = image.to(old.device)
        else:
            # the dataloader yields its cached batch object at every step: replace the edited images in it, in place,
            # instead of reloading the whole batch (50 images by default) after every edit unit
            batch = datamanager.train_image_dataloader.cached_collated_batch
            if batch is None:
                return  # not loaded yet: the first batch reads the current images
            images = batch["image"]
            for row, index in enumerate(batch["image_idx"].tolist()):
                if index in indices:
                    images[row] = self.train_dataset[index]["image"].to(images[row].device, images[row].dtype)

    # ---- outputs -----------------------------------------------------------------------------------------------------
    def comparison_prompts(self) -> Tuple[str, str]:
        """The edit prompt and the source prompt that the metric report scores against."""
        raise NotImplementedError

    def finish_editing(self, step: Optional[int] = None) -> Optional[Dict[str, object]]:
        """Writes ``<run>/edit_videos`` (original | edited per camera) and ``<run>/edit_metrics.json``; returns the
        metric report (None when nothing was edited)."""
        if self.run_dir is None or self.edit_store is None or len(self.edit_store) == 0:
            return None
        dataset = self.train_dataset
        prompt, source_prompt = self.comparison_prompts()
        folder = write_comparison_videos(
            self.run_dir, [ComparisonGroup(group.name, group.indices) for group in self.cameras],
            dataset.original_image, dataset.current_image, prompt=prompt, source_prompt=source_prompt,
            temporal=dataset.cameras.times is not None, fps=self.config.video_fps,
        )
        CONSOLE.log(f"{self.method}: original|edited videos in {folder}")
        clip = load_clip_or_skip(self.config.clip_model, self.device, "--pipeline.clip-model")
        report = run_metrics(self.run_dir, clip)
        scene = self.scene_metrics(clip, prompt, source_prompt)
        if scene is not None:
            report["scene"] = scene
            CONSOLE.print(f"{self.method} scene metrics (renders of the fitted scene, eval cameras):\n"
                          f"{format_report(scene)}")
        (self.run_dir / "edit_metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        CONSOLE.print(f"{self.method} edit metrics (edited training images, all cameras):\n"
                      f"{format_report(report['all'])}")
        return report

    @torch.no_grad()
    def scene_metrics(self, clip: Optional[ClipEmbedder], prompt: str, source_prompt: str) -> Optional[Dict]:
        """The edit metrics of the fitted scene: its renders from the eval cameras (in time order) against the
        original eval images, as the paper scores the edited scene rather than the edited training images; None
        without eval images. Warp errors only for time-aware data."""
        dataset = getattr(self.datamanager, "eval_dataset", None)
        if dataset is None or len(dataset) == 0:
            return None
        times = dataset.cameras.times
        order = sorted(range(len(dataset)), key=lambda i: float(times[i]) if times is not None else i)
        was_training = self.model.training
        self.model.eval()

        def pairs() -> Iterator[Tuple[np.ndarray, np.ndarray]]:
            for index in order:
                camera = dataset.cameras[index : index + 1].to(self.device)
                render = self.model.get_outputs_for_camera(camera)["rgb"].clamp(0, 1)
                original = dataset.get_image_float32(index)[..., :3]
                if render.shape[:2] != original.shape[:2]:
                    render = torch.nn.functional.interpolate(
                        render.permute(2, 0, 1)[None], size=original.shape[:2], mode="bilinear", antialias=True
                    )[0].permute(1, 2, 0)
                yield to_uint8(original), to_uint8(render)

        try:
            return edit_metrics(pairs(), prompt, source_prompt, clip, temporal=times is not None)
        finally:
            self.model.train(was_training)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H, W, 3] float in [0, 1] -> uint8 on the CPU."""
    return (image.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()

