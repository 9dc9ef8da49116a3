"""unified-edit: edit a 3D or 4D scene's training views consistently with disentangled self-attention injection
(:mod:`ns_4d_methods.guidance.attention_injection`), then fit the scene to the edited views.

The edit runs inside the training loop (no threads), at most one *edit unit* per training step, every
``steps_per_edit_unit`` steps from ``edit_start_step`` on:

1. **the edit pass.** Its first unit edits the reference view (``reference_view``; default the middle camera's view
   at that camera's middle time) PnP-style and keeps the reference's self-attention K/V; each further unit edits the
   next ``editor.batch_size`` training views, in time order, against that reference (their own structure, the
   reference's appearance). With the defaults the pass ends after ``ceil((N - 1) / batch_size) + 1`` steps and the
   rest of training fits the scene to the edited views, as the paper does.
2. **refresh passes** (optional, every ``refresh_every`` steps after a pass ended): the same edit, anchored to the
   originals: the structure features (ResNet, Q/K) still come from the inversion of the original view, and only the
   starting latent from the inversion of the model's current render of it (its camera and time). The renders agree
   across views because one scene produced them, so re-editing them pulls the views' edits together (the iterative
   dataset update of Instruct-NeRF2NeRF, with this paper's editor), while the anchor keeps each pass from editing
   the previous pass's edit.

Views are edited at one size (the reference's, long side at most ``max_edit_resolution``, sides rounded to the
model's size multiple) and resized back to their own. DDIM inversion and DDIM sampling have no randomness, so every
edit is reproducible. The prompt can be changed in the viewer; a pass keeps the prompt it started with.

Edits, checkpoints and resuming: see :mod:`ns_4d_methods.pipelines.editing_pipeline`. The reference's K/V are not
checkpointed (1.3 GB for SD 2.1 at 512 px); a run resumed in the middle of a pass edits the reference again first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Literal, Optional, Tuple, Type

import torch
from nerfstudio.data.datamanagers.base_datamanager import DataManagerConfig
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig
from nerfstudio.engine.trainer import Trainer
from nerfstudio.utils.rich_utils import CONSOLE
from nerfstudio.viewer.viewer_elements import ViewerText

from ns_4d_methods.data.edited_dataset import EditedFrameDataset
from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.attention_injection import (
    AttentionInjectionConfig,
    AttentionInjectionEditor,
    ReferenceContext,
)
from ns_4d_methods.guidance.frame_editor import edit_size, resize
from ns_4d_methods.pipelines.editing_pipeline import (
    EditingPipeline,
    EditingPipelineConfig,
    SchedulePosition,
    progress_bar,
)


@dataclass
class UnifiedEditPipelineConfig(EditingPipelineConfig):
    """Edits the training views with self-attention injection against one reference view, then fits the scene."""

    _target: Type = field(default_factory=lambda: UnifiedEditPipeline)
    datamanager: DataManagerConfig = field(
        default_factory=lambda: FullImageDatamanagerConfig(
            _target=FullImageDatamanager[EditedFrameDataset], cache_images_type="uint8"
        )
    )
    """Reads the training images through the edit store (full images for splatting, rays for NeRFs)."""
    prompt: str = ""
    """The edit prompt: a description of the edited scene, e.g. "a bronze statue of a man" (required)."""
    editor: AttentionInjectionConfig = field(default_factory=AttentionInjectionConfig)
    """The injection editor: model, DDIM steps, guidance, t_edit / t_context, inversion prompt, batch size."""
    reference_view: Optional[int] = None
    """Training image index of the reference view (default: the middle camera's view at that camera's middle time;
    on single-camera data, the middle training view in time)."""
    max_edit_resolution: int = 512
    """Long side, in pixels, that views are edited at (at most)."""
    steps_per_edit_unit: int = 1
    """Training steps between two edit units (the reference, or one batch of views)."""
    refresh_every: int = 0
    """Training steps between the end of a pass and a refresh pass that re-edits the model's renders; 0: none."""


@dataclass
class EditPassPosition(SchedulePosition):
    """Where the edit schedule stands (``passes`` counts the edit pass and the refresh passes)."""

    phase: Literal["edit", "wait"] = "edit"
    """Inside a pass, or waiting for the next refresh pass."""
    unit_in_pass: int = 0
    """Next unit of the current pass: 0 the reference, k >= 1 the k-th batch of the other views."""
    prompt: str = ""
    """The prompt of the current pass."""


class UnifiedEditPipeline(EditingPipeline):
    """Edit pass (and optional refresh passes) with the injection editor, then training on the edited views."""

    config: UnifiedEditPipelineConfig
    method = "unified-edit"

    def __init__(self, config: UnifiedEditPipelineConfig, *args: Any, **kwargs: Any) -> None:
        _check_config(config)  # before the datasets load: bad input fails fast
        super().__init__(config, *args, **kwargs)
        order = [index for group in self.cameras for index in group.indices]
        if config.reference_view is None:
            middle = self.cameras[len(self.cameras) // 2]
            self.reference = middle.indices[len(middle.indices) // 2]
        elif 0 <= config.reference_view < len(order):
            self.reference = config.reference_view
        else:
            raise InputError(
                f"--pipeline.reference-view {config.reference_view}: expected a training image index in "
                f"[0, {len(order) - 1}]"
            )
        others = [index for index in order if index != self.reference]
        size = config.editor.batch_size
        self.batches: List[List[int]] = [others[i : i + size] for i in range(0, len(others), size)]
        self.position = EditPassPosition()
        self.viewer_prompt = ViewerText("Edit prompt", config.prompt, hint="Used from the next pass on")
        # plain attributes (see hold_frozen): no Stable Diffusion weights in checkpoints
        self.editor: Optional[AttentionInjectionEditor] = None
        self._context: Optional[ReferenceContext] = None
        self.edit_size: Tuple[int, int] = (0, 0)  # every view's edit size: the reference's, bounded and rounded

    def setup_editing(self, trainer: Trainer) -> None:
        self.editor = AttentionInjectionEditor(self.config.editor, self.device, field_name="--pipeline.editor.model")
        height, width = self.train_dataset.original_image(self.reference).shape[:2]
        self.edit_size = edit_size(height, width, self.config.max_edit_resolution, self.editor.size_multiple)
        if self.config.refresh_every > 0 and self.has_lens_distortion and isinstance(
            self.datamanager, FullImageDatamanager
        ):
            # splatting renders pinhole views of the undistorted images; edits are made on the raw (distorted) ones
            raise InputError(
                "--pipeline.refresh-every: refresh passes re-edit pinhole renders, but this dataset's cameras have "
                "lens distortion; expected --pipeline.refresh-every 0, or undistorted data"
            )

    # ---- the schedule ----------------------------------------------------------------------------------------------
    def start_refresh_pass(self) -> None:
        self.position.phase, self.position.unit_in_pass = "edit", 0

    def run_edit_unit(self, step: int) -> None:
        """The next unit of the pass (the reference, or one batch), then the training images are refreshed."""
        position = self.position
        if position.unit_in_pass == 0:
            position.prompt = str(self.viewer_prompt.value)
        self.model.eval()  # renders for refresh passes without training-time behaviour
        try:
            if position.unit_in_pass == 0 or self._context is None:
                self._edit_reference()
            if position.unit_in_pass > 0:
                self._edit_batch(self.batches[position.unit_in_pass - 1])
        finally:
            self.model.train()
        position.unit_in_pass += 1
        position.units += 1
        position.last_unit_step = step
        if position.unit_in_pass > len(self.batches):
            position.phase, position.unit_in_pass, position.pass_end_step = "wait", 0, step
            position.passes += 1
            self._context = None  # the next pass edits the reference again
        self.refresh_train_images()

    # ---- editing ---------------------------------------------------------------------------------------------------
    def _images(self, indices: List[int], renders: bool) -> torch.Tensor:
        """The views' originals, or the model's renders of them, [B, 3, h, w] at the edit size."""
        images = [self.render(i)["rgb"] if renders else self.train_dataset.original_image(i) for i in indices]
        return torch.cat([resize(image.permute(2, 0, 1)[None].float(), self.edit_size) for image in images])

    def _inputs(self, indices: List[int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What the views' structure comes from (the originals) and, in refresh passes, what their starting latents
        come from (the renders)."""
        assert self.editor is not None
        device = self.editor.device
        start = self._images(indices, renders=True).to(device) if self.position.passes > 0 else None
        return self._images(indices, renders=False).to(device), start

    def _store(self, indices: List[int], edits: torch.Tensor) -> None:
        for index, edit in zip(indices, edits):
            height, width = self.train_dataset.original_image(index).shape[:2]
            self.put(index, resize(edit[None].float().cpu(), (height, width))[0].clamp(0, 1).permute(1, 2, 0))

    def _edit_reference(self) -> None:
        assert self.editor is not None
        source, start = self._inputs([self.reference])
        edited, self._context = self.editor.edit_reference(source, self.position.prompt, start)
        self._store([self.reference], edited)
        CONSOLE.log(
            f"unified-edit {self._pass_name()}: reference view {self.reference} edited "
            f"({len(self._context.steps)} shared steps, {self._context.nbytes / 2**20:.1f} MiB of K/V)"
        )

    def _edit_batch(self, indices: List[int]) -> None:
        assert self.editor is not None and self._context is not None
        source, start = self._inputs(indices)
        self._store(indices, self.editor.edit_batch(source, self.position.prompt, self._context, start))
        done = self.position.unit_in_pass
        CONSOLE.log(
            f"unified-edit {self._pass_name()}: batch {done}/{len(self.batches)} "
            f"{progress_bar(done / len(self.batches))} ({len(indices)} views)"
        )

    def _pass_name(self) -> str:
        passes = self.position.passes
        return "edit pass" if passes == 0 else f"refresh pass {passes}"

    def comparison_prompts(self) -> Tuple[str, str]:
        return self.position.prompt or self.config.prompt, self.config.editor.inversion_prompt


def _check_config(config: UnifiedEditPipelineConfig) -> None:
    if not config.prompt.strip():
        raise InputError(
            '--pipeline.prompt is empty; expected a description of the edited scene, e.g. --pipeline.prompt '
            '"a bronze statue of a man"'
        )
    for flag, value in (("steps-per-edit-unit", config.steps_per_edit_unit),
                        ("max-edit-resolution", config.max_edit_resolution)):
        if value < 1:
            raise InputError(f"--pipeline.{flag} {value}: expected at least 1")
    for flag, value in (("edit-start-step", config.edit_start_step), ("refresh-every", config.refresh_every)):
        if value < 0:
            raise InputError(f"--pipeline.{flag} {value}: expected 0 or more")
