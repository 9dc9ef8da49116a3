"""instruct4d: Instruct 4D-to-4D, editing a reconstructed 4D scene by an instruction while it keeps training.

The pipeline starts from a reconstruction (``--load-dir``) and keeps training it on a dataset that it edits as it
goes (iterative dataset update), on a schedule inside the training loop (no threads). ``get_train_loss_dict`` runs at
most one *edit unit* when one is due (every ``steps_per_edit_unit`` steps after ``edit_start_step``), then the usual
loss. The units, in order:

1. **key-view rounds** (one unit each). Monocular data (one camera, frames ordered by time): the first frame is the
   key view and gets a full InstructPix2Pix edit. Multi-camera data (``n3dv-data``, cameras named in the metadata's
   ``camera_names``): at the first frame, ``num_key_views`` random cameras are edited jointly with anchor attention;
   each key view is blended with the other key views projected into it through depth rendered from the model
   (``key_view_threshold``), then the key views are projected into every other camera (``other_view_threshold``),
   blended with its current image and the holes repainted by InstructPix2Pix. Rounds after the first start from
   the current images, with the strength on a cosine from 1 to ``key_round_final_strength``.
2. **a propagation pass**, one window per unit: per camera, flow-guided sliding windows in time
   (:mod:`ns_4d_methods.editing.flow_propagation`) carry the camera's edited first frame through its frames.
3. **refresh passes**, every ``refresh_every`` steps: the same windows, repainted from the model's current renders
   (anchored on the key frame's edit, with the first pass's seed per window), so the targets follow what the scene
   has become without drawing new, independent edits. The official multi-camera script edits key views for 12 rounds
   and then makes one pass; the monocular plugin keeps only its first pass. Refreshes every 2,000 steps are this
   package's choice (``--pipeline.refresh-every 0`` turns them off, the official behaviour); see ``refresh_every``
   for what they cost and how little they move the targets.

Edits are PNGs in an :class:`~ns_4d_methods.data.edit_store.EditStore` under ``<run>/edits`` (the dataset is never
written); the training images are read through :class:`~ns_4d_methods.data.edited_dataset.EditedFrameDataset`, and
the train dataloader's image cache is refreshed after every unit. The schedule position and the store's index are
saved in the checkpoint; resuming copies the earlier run's edits into the new run. The InstructPix2Pix weights are
never part of a checkpoint. At the end of training an original|edited video per camera is written to
``<run>/edit_videos/`` and scored (``<run>/edit_metrics.json``); see
:mod:`ns_4d_methods.pipelines.editing_pipeline`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Literal, Optional, Sequence, Type

import numpy as np
import torch
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.engine.trainer import Trainer
from nerfstudio.utils.rich_utils import CONSOLE
from nerfstudio.viewer.viewer_elements import ViewerNumber, ViewerText
from rich.progress import track

from ns_4d_methods.data.edited_dataset import EditedFrameDataset
from ns_4d_methods.editing.depth_projection import (
    KEY_VIEW_THRESHOLD,
    OTHER_VIEW_THRESHOLD,
    DepthKind,
    blend_with_current,
    hole_mask,
    project_key_views,
)
from ns_4d_methods.editing.flow_propagation import PropagatedWindow, propagate, window_ranges
from ns_4d_methods.editing.optical_flow import (
    MAX_FLOW_SIZE,
    RAFT_WEIGHTS,
    FlowBackend,
    FlowEstimator,
    build_flow_estimator,
)
from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.frame_editor import FrameEditor
from ns_4d_methods.guidance.ip2p_editor import IP2P_MODEL_ID, AnchorAttentionMode, InstructPix2PixEditor
from ns_4d_methods.pipelines.editing_pipeline import (
    EditingPipeline,
    EditingPipelineConfig,
    SchedulePosition,
    progress_bar,
)

Phase = Literal["key", "propagate", "wait", "refresh"]


@dataclass
class Instruct4DPipelineConfig(EditingPipelineConfig):
    """Instruct 4D-to-4D: edits a reconstructed 4D scene's training frames by an instruction while training on them."""

    _target: Type = field(default_factory=lambda: Instruct4DPipeline)
    datamanager: VanillaDataManagerConfig = field(
        default_factory=lambda: VanillaDataManagerConfig(
            _target=VanillaDataManager[EditedFrameDataset],
            train_num_images_to_sample_from=50,
            train_num_times_to_repeat_images=250,
        )
    )
    """Reads training images through the edit store; samples rays from a bounded subset of images at a time."""
    prompt: str = ""
    """The edit instruction, e.g. "Make it look like a bronze statue" (required)."""
    ip2p_model_id: str = IP2P_MODEL_ID
    """InstructPix2Pix weights: a Hugging Face hub id or a local ``save_pretrained`` directory."""
    guidance_scale: float = 7.5
    """Text guidance scale of InstructPix2Pix (the multi-camera script of the paper uses 9.5)."""
    image_guidance_scale: float = 1.5
    """Image guidance scale of InstructPix2Pix: higher keeps closer to the original frames."""
    full_edit_steps: int = 20
    """Denoising steps of a full edit (key views, from pure noise)."""
    refine_strength: float = 0.65
    """Noise level of the partial edits (propagated windows, repainted holes), as a fraction of the schedule
    (the official code's 600-700 of 1000 timesteps)."""
    refine_steps: int = 8
    """Steps of the full schedule for partial edits; ``int(refine_steps x refine_strength)`` run (8 x 0.65 -> 5)."""
    anchor: AnchorAttentionMode = "anchor_self"
    """Anchor attention: "anchor_self" ([anchor ; self] keys/values, the paper), "anchor" (anchor's only, the
    multi-camera code) or "off"."""
    window_size: int = 5
    """Frames per sliding window."""
    window_overlap: int = 1
    """Frames shared by consecutive windows."""
    flow_backend: FlowBackend = "raft"
    """Optical flow: "raft" (the paper's and the official code's, with ``raft_weights``) or "dis" (OpenCV's dense
    inverse search: no weights, cheaper on the CPU, less accurate on large motion)."""
    raft_weights: str = RAFT_WEIGHTS
    """RAFT weights: a torchvision weights enum name (default: torchvision's port of the original raft-things.pth,
    read from the torch hub cache or downloaded into it), or a file: the original ``raft-things.pth`` /
    ``raft-small.pth`` or a torchvision state dict. The official code runs RAFT with raft-things.pth, 20 iterations."""
    max_flow_size: int = MAX_FLOW_SIZE
    """Long side, in pixels, that RAFT computes flow at (larger frames are downscaled and the flow scaled back). RAFT's
    all-pairs correlation holds (H W / 64)^2 floats: 1.8 GB at the official N3DV training size 1352x1014 (computed at
    full size by default), 29 GB at N3DV's full 2704x2028."""
    num_key_views: int = 5
    """Cameras edited jointly per key-view round (multi-camera data)."""
    key_view_rounds: int = 12
    """Key-view rounds (multi-camera data; the paper's 12 warm-up rounds). Monocular data has one key view and
    one round."""
    key_round_final_strength: float = 0.8
    """Edit strength of the last key-view round; strengths follow a cosine from 1.0 down to this."""
    key_view_threshold: float = KEY_VIEW_THRESHOLD
    """Re-projection distance under which a pixel is valid when projecting among key views, in the official code's
    LLFF units (its N3DV loader divides poses by 1.08 x the nearest depth bound); converted to scene units with the
    dataset's ``llff_unit`` (n3dv-data), taken as scene units for data without it."""
    other_view_threshold: float = OTHER_VIEW_THRESHOLD
    """Re-projection distance under which a pixel is valid when projecting into other cameras (LLFF units, as
    ``key_view_threshold``)."""
    blend_ratio: float = 0.5
    """Weight of the projected edit against the current image where a projection is valid (rounds before the last;
    the last round repaints other cameras' whole images from the blend, as the official code)."""
    depth_kind: DepthKind = "ray"
    """What the model's "depth" output measures: "ray" (distance along the ray, NeRFs) or "z" (splatting)."""
    max_edit_resolution: int = 0
    """Long side, in pixels, that frames are edited at (at most; 0: the training resolution, as the official code edits
    N3DV at 1352x1014); frames are resized to multiples of 8 and back. A cap (e.g. 512) saves GPU memory and time at
    the cost of ~2.6x upsampling blur on N3DV. Full-size memory was not measured here (no GPU on the test machine)."""
    sequential_guidance: bool = False
    """Run InstructPix2Pix's three guidance branches (text + image, image only, unconditional) through the UNet one
    after the other instead of as one batch of 3 x window frames. Exact (anchor attention and the shared GroupNorm
    statistics work within a branch; equal to the batched edit within 1e-5), with a third of the UNet's activations
    alive at once: an edit's peak memory growth 425 -> 185 MiB (5 frames of 192x128, tiny model, CPU;
    tests/benchmarks/ip2p_branch_memory.py), for three smaller UNet calls per step. GPU memory was not measured (no
    GPU here). Frames are not split: the window's couplings span all its frames."""
    edit_seed: int = 0
    """Seed of every edit's noise and of the key-camera choice: edits are reproducible."""
    refresh_every: int = 2000
    """Training steps between the end of a pass and the start of a refresh pass from renders; 0: none, as the
    official code (multi-camera: 12 key-view rounds, then one pass; monocular: one pass). Not the paper's: a
    20,000-step edit of 86 frames (22 windows, a unit every 10 steps) then re-targets the scene 8 times to what it
    has become, for one window edit per frame each time (CPU, tiny model, 64x48: 1.4 s per frame, the first pass's
    cost, at load ~5; GPU not measured). Reusing each window's seed keeps refreshes from drawing new edits: on 17
    frames of the NR-NeRF capture with the tiny model and renders equal to the targets
    (tests/benchmarks/instruct4d_refresh.py), the targets move by a mean |delta| of 0.0052, 0.0003, 0.0000 over three
    successive passes with the seed reused, 0.177 each pass with fresh seeds (the edit itself: 0.392 from the
    originals): refreshes converge instead of re-randomising the targets. Their effect on the real InstructPix2Pix's
    edits was not measured (no GPU here)."""


@dataclass
class EditPosition(SchedulePosition):
    """Where the edit schedule stands (``passes`` counts propagation and refresh passes)."""

    phase: Phase = "key"
    """Key-view rounds, a propagation pass, waiting for the next refresh, or a refresh pass."""
    key_round: int = 0
    """Key-view rounds done."""
    camera: int = 0
    """Camera (position in the camera list) whose windows the current pass is editing."""
    window: int = 0
    """Next window of that camera."""


def key_round_strength(round_index: int, rounds: int, final: float) -> float:
    """Cosine from 1.0 (first round) to ``final`` (last round)."""
    if rounds <= 1:
        return 1.0
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * round_index / (rounds - 1)))


def seed_for(*parts: int) -> int:
    """A 31-bit seed that depends on every part (edit seed, pass, camera, ...)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


class TrainingFrames:
    """The :class:`~ns_4d_methods.editing.flow_propagation.FrameSource` over the training images: originals from
    the dataset, edits from the store and, in refresh passes, current images rendered by the model."""

    def __init__(self, pipeline: "Instruct4DPipeline", renders: bool) -> None:
        self.pipeline = pipeline
        self.dataset: EditedFrameDataset = pipeline.datamanager.train_dataset
        self.renders = renders

    def original(self, frame: int) -> torch.Tensor:
        return self.dataset.original_image(frame)

    def current(self, frame: int) -> torch.Tensor:
        return self.pipeline.render(frame)["rgb"] if self.renders else self.dataset.current_image(frame)

    def edited(self, frame: int) -> torch.Tensor:
        return self.dataset.current_image(frame)


class Instruct4DPipeline(EditingPipeline):
    """Iterative dataset update with key-view editing, depth projection and flow-guided propagation."""

    config: Instruct4DPipelineConfig
    datamanager: VanillaDataManager
    method = "instruct4d"

    def __init__(self, config: Instruct4DPipelineConfig, *args: Any, **kwargs: Any) -> None:
        _check_config(config)  # before the datasets load: bad input fails fast
        super().__init__(config, *args, **kwargs)
        _check_patches(config, self.train_dataset)
        self.position = EditPosition()
        # The viewer collects ViewerElements among the pipeline's attributes; edits read them at every unit.
        self.viewer_prompt = ViewerText("Edit instruction", config.prompt, hint="Used from the next edit on")
        self.viewer_guidance_scale = ViewerNumber("Text guidance scale", config.guidance_scale)
        self.viewer_image_guidance_scale = ViewerNumber("Image guidance scale", config.image_guidance_scale)
        # Plain objects, so torch registers neither the InstructPix2Pix weights nor RAFT's: no checkpoint holds them.
        self.editor: Optional[FrameEditor] = None
        self.flow: Optional[FlowEstimator] = None
        self._windows: Optional[Iterator[PropagatedWindow]] = None  # the running propagation (one camera's windows)
        # depth of each camera's first frame, rendered once (from the reconstruction, before it trains on edits) and
        # reused by every key-view round, as the official code caches it; not checkpointed: a resume re-renders it
        self._key_depths: dict[int, torch.Tensor] = {}

    # ---- setup ------------------------------------------------------------------------------------------------------
    def setup_editing(self, trainer: Trainer) -> None:
        """Loads the LPIPS loss's network, the editor and the flow estimator."""
        if trainer.config.load_dir is None and trainer.config.load_checkpoint is None:
            raise InputError(
                "instruct4d edits a reconstruction: pass --load-dir <run>/nerfstudio_models of a nerfacto-4d run "
                "on this scene (or --load-checkpoint)"
            )
        if hasattr(self.model, "load_lpips_loss"):
            self.model.load_lpips_loss()  # small, and its absence is one line: before the diffusion model
        ip2p = InstructPix2PixEditor(
            self.config.ip2p_model_id, field_name="--pipeline.ip2p-model-id", device=self.device,
            sequential_branches=self.config.sequential_guidance,
        )
        self.editor = FrameEditor(ip2p, self.config.max_edit_resolution)
        self.flow = build_flow_estimator(
            self.config.flow_backend,
            raft_weights=self.config.raft_weights,
            field_name="--pipeline.raft-weights",
            max_size=self.config.max_flow_size,
            device=self.device,
        )

    # ---- the schedule ----------------------------------------------------------------------------------------------
    def start_refresh_pass(self) -> None:
        self.position.phase, self.position.camera, self.position.window = "refresh", 0, 0
        self._windows = None

    @property
    def num_key_rounds(self) -> int:
        return self.config.key_view_rounds if len(self.cameras) > 1 else 1

    def run_edit_unit(self, step: int) -> None:
        """One edit unit: the next key-view round or the next window, then the training images are refreshed."""
        position = self.position
        self.model.eval()  # renders (depth, refresh passes) without training-time behaviour
        try:
            if position.phase == "key":
                self._key_view_round(position.key_round)
                position.key_round += 1
                if position.key_round >= self.num_key_rounds:
                    position.phase, position.camera, position.window = "propagate", 0, 0
                    self._skip_cameras_without_windows(step)
            else:
                self._next_window(step)
        finally:
            self.model.train()
        position.units += 1
        position.last_unit_step = step
        self.refresh_train_images()

    def _windows_of(self, camera: int) -> List[range]:
        return window_ranges(len(self.cameras[camera].indices), self.config.window_size, self.config.window_overlap)

    def _skip_cameras_without_windows(self, step: int) -> None:
        """Moves past cameras with nothing (left) to propagate; ends the pass after the last camera."""
        position = self.position
        while position.camera < len(self.cameras) and position.window >= len(self._windows_of(position.camera)):
            position.camera, position.window = position.camera + 1, 0
            self._windows = None
        if position.camera >= len(self.cameras):
            position.phase, position.camera, position.pass_end_step = "wait", 0, step
            position.passes += 1

    def _next_window(self, step: int) -> None:
        position = self.position
        self._skip_cameras_without_windows(step)
        if position.phase == "wait":
            return
        group = self.cameras[position.camera]
        if self._windows is None:
            self._windows = propagate(
                group.indices,
                TrainingFrames(self, renders=position.phase == "refresh"),
                self._repaint_window,
                self.flow,
                window_size=self.config.window_size,
                overlap=self.config.window_overlap,
                start_window=position.window,
                # every pass draws the same noise per window: a refresh re-edits the renders toward the same target
                seed=seed_for(self.config.edit_seed, group.camera_id),
                from_current=position.phase == "refresh",
            )
        window: PropagatedWindow = next(self._windows)
        for index, image in zip(window.frames, window.images):
            self.put(index, image)
        total = len(self._windows_of(position.camera))
        source = "from renders" if position.phase == "refresh" else (
            f"flow valid on {float(window.valid_fraction.mean()):.0%} of pixels"
        )
        CONSOLE.log(
            f"instruct4d {position.phase} pass {position.passes + 1}: {group.name} window {window.index + 1}/{total} "
            f"{progress_bar((window.index + 1) / total)} ({source})"
        )
        position.window += 1
        self._skip_cameras_without_windows(step)

    # ---- editing -----------------------------------------------------------------------------------------------------
    def _edit(
        self, conditions: torch.Tensor, inits: torch.Tensor, *, strength: float, steps: int, seed: int
    ) -> torch.Tensor:
        """InstructPix2Pix on frames [F, H, W, 3] (frame 0 the anchor) with the instruction and guidance scales as they
        are now (the viewer can change them between units)."""
        return self.editor(
            conditions,
            inits,
            prompt=self.viewer_prompt.value,
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=float(self.viewer_guidance_scale.value),
            image_guidance_scale=float(self.viewer_image_guidance_scale.value),
            anchor=self.config.anchor,
            seed=seed,
        )

    def _repaint_window(self, conditions: torch.Tensor, inits: torch.Tensor, *, seed: int) -> torch.Tensor:
        config = self.config
        return self._edit(conditions, inits, strength=config.refine_strength, steps=config.refine_steps, seed=seed)

    def _key_view_round(self, round_index: int) -> None:
        config, frames = self.config, TrainingFrames(self, renders=False)
        firsts = [group.indices[0] for group in self.cameras]
        rng = np.random.default_rng([config.edit_seed, round_index])
        chosen = rng.choice(len(firsts), size=min(config.num_key_views, len(firsts)), replace=False).tolist()
        keys = [firsts[c] for c in chosen]
        others = [index for c, index in enumerate(firsts) if c not in chosen]
        strength = key_round_strength(round_index, self.num_key_rounds, config.key_round_final_strength)
        names = ", ".join(self.cameras[c].name for c in chosen)
        CONSOLE.log(
            f"instruct4d key-view round {round_index + 1}/{self.num_key_rounds}: {names} (strength {strength:.2f})"
        )

        key_originals = torch.stack([frames.original(i) for i in keys])
        key_inits = key_originals if round_index == 0 else torch.stack([frames.current(i) for i in keys])
        seed = seed_for(config.edit_seed, 1 << 20, round_index)
        key_edits = self._edit(key_originals, key_inits, strength=strength, steps=config.full_edit_steps, seed=seed)
        if len(keys) > 1 or others:
            key_depths = torch.stack([self._first_frame_depth(i) for i in keys])
        if len(keys) > 1:
            key_edits = self._agree_key_views(keys, key_edits, key_depths)
        for index, image in zip(keys, key_edits):
            self.put(index, image)

        chunk_size = max(1, config.window_size - 1)  # targets per repaint batch, next to the anchor: one window
        chunks = [others[i : i + chunk_size] for i in range(0, len(others), chunk_size)]
        progress = track(chunks, description="instruct4d: projecting key views", console=CONSOLE, transient=True)
        last_round = round_index == self.num_key_rounds - 1
        for chunk_number, chunk in enumerate(progress):
            depths = torch.stack([self._first_frame_depth(i) for i in chunk])
            projected, valid = project_key_views(
                depths, *self._camera_matrices(chunk), key_edits, key_depths, *self._camera_matrices(keys),
                threshold=self.scene_threshold(config.other_view_threshold), depth_kind=config.depth_kind,
            )
            current = torch.stack([frames.current(i) for i in chunk])
            blended = blend_with_current(current, projected, valid, config.blend_ratio)
            conditions = torch.stack([key_originals[0]] + [frames.original(i) for i in chunk])
            repainted = self._edit(
                conditions, torch.cat([key_edits[:1], blended]), strength=config.refine_strength,
                steps=config.refine_steps, seed=seed + 1 + chunk_number,
            )[1:]
            # before the last round, projected pixels stay and only what no key view covers is repainted; the last
            # round keeps the whole repaint, so no seam between projected and repainted pixels remains
            kept = repainted if last_round else torch.where(hole_mask(valid)[..., None], repainted, blended)
            for index, image in zip(chunk, kept):
                self.put(index, image)

    def _agree_key_views(self, keys: List[int], edits: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
        """Each key view blended with the other key views projected into it (the looser key-view threshold)."""
        intrinsics, poses = self._camera_matrices(keys)
        agreed = []
        for k in range(len(keys)):
            rest = [j for j in range(len(keys)) if j != k]
            projected, valid = project_key_views(
                depths[k : k + 1], intrinsics[k : k + 1], poses[k : k + 1], edits[rest], depths[rest], intrinsics[rest],
                poses[rest], threshold=self.scene_threshold(self.config.key_view_threshold),
                depth_kind=self.config.depth_kind,
            )
            agreed.append(blend_with_current(edits[k], projected[0], valid[0], self.config.blend_ratio))
        return torch.stack(agreed)

    # ---- helpers -----------------------------------------------------------------------------------------------------
    def _first_frame_depth(self, index: int) -> torch.Tensor:
        """Depth [H, W] of training image ``index`` (a camera's first frame), rendered once."""
        if index not in self._key_depths:
            self._key_depths[index] = self.render(index)["depth"][..., 0]
        return self._key_depths[index]

    def scene_threshold(self, llff_threshold: float) -> float:
        """A re-projection threshold in the official LLFF units, in this dataset's scene units."""
        return llff_threshold * float(self.datamanager.train_dataset.metadata.get("llff_unit", 1.0))

    def _camera_matrices(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pinhole intrinsics [N, 3, 3] and OpenGL camera-to-world [N, 4, 4] of training images."""
        cameras, rows = self.datamanager.train_dataset.cameras, torch.tensor(list(indices))
        intrinsics = torch.zeros(len(rows), 3, 3)
        intrinsics[:, 0, 0], intrinsics[:, 1, 1] = cameras.fx[rows, 0], cameras.fy[rows, 0]
        intrinsics[:, 0, 2], intrinsics[:, 1, 2], intrinsics[:, 2, 2] = cameras.cx[rows, 0], cameras.cy[rows, 0], 1.0
        poses = torch.eye(4).repeat(len(rows), 1, 1)
        poses[:, :3, :] = cameras.camera_to_worlds[rows]
        return intrinsics, poses

    def comparison_prompts(self) -> tuple[str, str]:
        return str(self.viewer_prompt.value), ""


def _check_patches(config: Instruct4DPipelineConfig, dataset: EditedFrameDataset) -> None:
    """Patch sampling and the LPIPS term: whole patches per batch (nerfstudio would round the batch down, to no rays
    when it holds less than one), frames that hold a patch, and the model's patches the datamanager's."""
    patch, rays = config.datamanager.patch_size, config.datamanager.train_num_rays_per_batch
    lpips = getattr(config.model, "lpips_loss_weight", 0.0) > 0
    off = ", or --pipeline.model.lpips-loss-weight 0 trains without the LPIPS term" if lpips else ""
    if patch > 1 and (rays < patch * patch or rays % (patch * patch)):
        raise InputError(
            f"--pipeline.datamanager.train-num-rays-per-batch {rays} is not a whole number of {patch}x{patch} patches "
            f"(--pipeline.datamanager.patch-size); expected a multiple of {patch * patch}{off}"
        )
    height, width = int(dataset.cameras.height.min()), int(dataset.cameras.width.min())
    if min(height, width) < patch:
        raise InputError(
            f"training frames of {width}x{height} px are smaller than the {patch}x{patch} patches of "
            f"--pipeline.datamanager.patch-size; expected a smaller patch size{off}"
        )
    if lpips and patch != config.model.lpips_patch_size:
        size = config.model.lpips_patch_size
        raise InputError(
            f"--pipeline.datamanager.patch-size {patch}: the LPIPS loss takes {size}x{size} patches "
            f"(--pipeline.model.lpips-patch-size); expected equal sizes{off}"
        )


def _check_config(config: Instruct4DPipelineConfig) -> None:
    if not config.prompt.strip():
        raise InputError(
            '--pipeline.prompt is empty; expected an edit instruction, e.g. --pipeline.prompt "Make it snowy"'
        )
    if config.window_size < 2 or not 0 <= config.window_overlap < config.window_size:
        raise InputError(
            f"--pipeline.window-size {config.window_size} / --pipeline.window-overlap {config.window_overlap}: "
            "expected a window of at least 2 frames and 0 <= overlap < window size"
        )
    if not 0.0 < config.refine_strength <= 1.0 or int(config.refine_steps * config.refine_strength) < 1:
        raise InputError(
            f"--pipeline.refine-strength {config.refine_strength} with --pipeline.refine-steps {config.refine_steps} "
            "runs no denoising step; expected a strength in (0, 1] and int(steps x strength) >= 1"
        )
    for flag, value in (
        ("steps-per-edit-unit", config.steps_per_edit_unit),
        ("num-key-views", config.num_key_views),
        ("key-view-rounds", config.key_view_rounds),
        ("full-edit-steps", config.full_edit_steps),
    ):
        if value < 1:
            raise InputError(f"--pipeline.{flag} {value}: expected at least 1")
