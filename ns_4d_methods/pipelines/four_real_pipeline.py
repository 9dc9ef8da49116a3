"""4real: text to a 4D scene (4Real, arXiv 2406.07472) in five stages of one resumable ``ns-train`` run.

1. **reference video** from the prompt (:func:`~ns_4d_methods.guidance.video_models.reference_video_stage`), or the
   user's ``--pipeline.reference-video``;
2. **freeze-time video** around the canonical frame (:func:`~ns_4d_methods.guidance.freeze_time.freeze_time_stage`),
   or the user's ``--pipeline.freeze-time-video``;
3. **cameras** of the freeze-time video by structure from motion
   (:func:`~ns_4d_methods.data.structure_from_motion.cameras_stage`): frames without a pose are dropped, the
   reference video is a static camera at the canonical frame's pose, the Gaussians start from the SfM points;
4. **canonical Gaussians** (``canonical_steps`` training steps) on the freeze-time frames with a per-frame deformation:
   L1 + 0.2 D-SSIM + the small-motion loss, nerfstudio's camera optimizer refining the poses; multi-view video SDS
   in the last ``sds_steps``;
5. **temporal deformation** (``temporal_steps``, zero at the canonical time) on the reference frames from the
   reference camera, the freeze-time frames still supervised (frames drawn from both videos): L1 + D-SSIM, L_norm,
   L_diff, L_rigid, L_rot; in the last ``sds_steps`` joint temporal video SDS (a registered freeze-time camera other
   than the reference, time moving outward from the canonical time) and multi-view video SDS (one time, the camera
   moving within the freeze-time arc), one of the two (weights ``temporal_sds_weight`` and ``multiview_sds_weight``)
   chosen at random each step.

Each parameter group's learning-rate schedule starts with its stage (:mod:`ns_4d_methods.phase_start_schedule`;
:meth:`FourRealPipelineConfig.param_group_phases`): the temporal deformation first trains at its nominal 8e-4.

Stages 1-3 run when the pipeline is built (the model's size depends on them) and write their artefacts under the
run directory (``run_dir``, which ``ns-train`` sets: this run's directory, or the resumed run's with
``--load-dir``); each is skipped when its artefacts exist, so a resumed run never regenerates anything. Stages 4-5
are training steps: the stage follows from the step, and its position is kept in every checkpoint. The stage and its
progress are printed to the console and shown in the viewer's control panel. At the end of training the run gets
``videos/orbit.mp4`` (a camera orbit at the canonical time), ``videos/time.mp4`` (the reference camera, time moving),
``videos/space_time.mp4`` (the camera along the freeze-time arc while time moves) and ``metrics.json`` with their
X-CLIP scores against the prompt (X-CLIP's own video-text logits; skipped with one line without X-CLIP weights).
"""

from __future__ import annotations

import copy
import gc
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Type

import numpy as np
import torch
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.utils.rich_utils import CONSOLE
from nerfstudio.viewer.viewer_elements import ViewerText

from ns_4d_methods.data.four_real_datamanager import (
    CAMERAS_FOLDER,
    FREEZE_TIME_FOLDER,
    REFERENCE_FOLDER,
    FourRealDataManager,
    FourRealDataManagerConfig,
)
from ns_4d_methods.data.structure_from_motion import TRANSFORMS, StructureFromMotionConfig, cameras_stage
from ns_4d_methods.data.video_io import write_video
from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.freeze_time import FreezeTimeConfig, freeze_time_stage
from ns_4d_methods.guidance.model_loading import hold_frozen
from ns_4d_methods.guidance.sds_schedule import SqrtAnnealingConfig
from ns_4d_methods.guidance.video_models import (
    VideoModel,
    VideoModels,
    check_prompt,
    reference_video_stage,
    resolve_pipeline_class,
    stage_meta,
)
from ns_4d_methods.guidance.video_sds import SDS_PIPELINES, LTXVideoPrior, VideoPrior, video_sds_loss
from ns_4d_methods.models.four_real import FourRealModel, FourRealModelConfig
from ns_4d_methods.models.image_metrics import image_metrics
from ns_4d_methods.models.xclip_score import XCLIP_MODEL, load_xclip_or_skip
from ns_4d_methods.phase_start_schedule import PhaseStartSchedulerConfig
from ns_4d_methods.pipelines.dynamic_pipeline import DynamicPipeline, DynamicPipelineConfig
from ns_4d_methods.pipelines.editing_pipeline import progress_bar
from ns_4d_methods.render.sds_camera_paths import orbit_cameras, time_cameras
from ns_4d_methods.trainer import Trainer4D, Trainer4DConfig, latest_checkpoint

Stage = Literal["canonical", "temporal"]
STAGE_NAMES = {"canonical": "4/5 canonical Gaussians", "temporal": "5/5 temporal deformation"}


@dataclass
class FourRealPipelineConfig(DynamicPipelineConfig, FreezeTimeConfig):
    """4Real: reference and freeze-time videos, their cameras, canonical Gaussians, temporal deformation."""

    _target: Type = field(default_factory=lambda: FourRealPipeline)
    datamanager: FourRealDataManagerConfig = field(default_factory=FourRealDataManagerConfig)
    """The videos' frames and the video SDS camera paths."""
    model: FourRealModelConfig = field(default_factory=FourRealModelConfig)
    """Deformable Gaussians with the per-frame deformation."""
    run_dir: Optional[Path] = None
    """Directory of the stage artefacts (videos, cameras, prompt embeddings). ns-train sets it to this run's
    directory, or to the resumed run's with --load-dir; point it at another 4real run to reuse its videos and
    cameras."""
    sfm: StructureFromMotionConfig = field(default_factory=StructureFromMotionConfig)
    """Structure from motion on the freeze-time video."""
    canonical_steps: int = 20000
    """Training steps of stage 4, the canonical Gaussians (4Real: about 20k)."""
    temporal_steps: int = 20000
    """Training steps of stage 5, the temporal deformation (4Real: about 20k); training past it stays in stage 5."""
    sds_steps: int = 5000
    """Video SDS runs in the last sds_steps of each stage (4Real: 5k); 0 turns it off."""
    sds_model: str = ""
    """Hub id or local directory of the LTX-Video pipeline distilled by video SDS; empty: video_model."""
    sds_guidance_scale: float = 3.0
    """Classifier-free guidance scale of the video SDS velocity (LTX-Video's sampling default)."""
    sds_timesteps: SqrtAnnealingConfig = field(
        default_factory=lambda: SqrtAnnealingConfig(t_max=0.5, t_min=0.02, max_steps=5000)
    )
    """Noise level of video SDS (timestep / 1000), annealed over each stage's SDS steps (HiFA's square-root schedule,
    its max_steps mapped onto sds_steps; the paper states no range, and starting at 0.5 keeps the estimate close to
    the scene being refined)."""
    temporal_sds_weight: float = 20.0
    """Weight of the temporal video SDS loss (4Real: 20)."""
    multiview_sds_weight: float = 5.0
    """Weight of the multi-view video SDS loss (4Real: 5)."""
    xclip_model: str = XCLIP_MODEL
    """X-CLIP model (hub id or local directory) of metrics.json's video-text score; skipped when not loadable."""
    log_every: int = 500
    """Training steps between two progress lines in the console."""

    def param_group_phases(self) -> Dict[str, Tuple[int, int]]:
        """(first step, length) of the learning-rate schedules that follow the stages
        (:mod:`ns_4d_methods.phase_start_schedule`): the canonical means over both stages, the per-frame deformation
        over stage 4, the temporal deformation over stage 5 from its first step."""
        canonical, temporal = self.canonical_steps, self.temporal_steps
        return {
            "means": (0, canonical + temporal),
            "per_frame_deformation": (0, canonical),
            "deformation": (canonical, temporal),
        }

    def param_group_starts(self) -> Dict[str, int]:
        """First training step of each parameter group that waits for a stage (the suite's learning-rate rule)."""
        return {name: start for name, (start, _) in self.param_group_phases().items() if start > 0}


@dataclass
class StagePosition:
    """Where the run stands in stages 4-5 (kept in every checkpoint)."""

    stage: str = "canonical"
    """The current training stage: "canonical" or "temporal"."""
    stage_step: int = 0
    """Steps done in the current stage."""
    canonical_steps: int = 0
    """Length of stage 4 the run was started with (a resumed run must keep it)."""
    sds_counts: Dict[str, int] = field(default_factory=lambda: {"temporal": 0, "multiview": 0})
    """Video SDS steps done, by path kind."""


class FourRealPipeline(DynamicPipeline):
    """Runs stages 1-3 when built (in training), then trains stages 4-5 and writes the result videos and metrics."""

    config: FourRealPipelineConfig
    datamanager: FourRealDataManager
    model: FourRealModel

    def __init__(
        self,
        config: FourRealPipelineConfig,
        device: str,
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        grad_scaler: Optional[Any] = None,
    ) -> None:
        if config.run_dir is None:
            raise InputError("pipeline.run_dir: not set; expected the directory of the 4real run (ns-train sets it)")
        self.prompt = check_prompt(config.prompt)
        prior, summary = None, "stages 1-3 read from the run directory"
        if test_mode == "val":  # training: the prior first (an unreachable model fails before any work), then
            # whatever of stages 1-3 is missing, sharing the loaded video model
            models = VideoModels(config, config.run_dir, device)
            if config.sds_steps > 0:
                prior = load_prior(config, models, device, self.prompt)
            summary = prepare_inputs(config, config.run_dir, models, device)
            # the prior keeps the transformer, VAE and scheduler; the text encoder (T5-XXL for LTX) and any other
            # generation pipeline go now
            del models
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        config.datamanager.data = Path(config.run_dir)
        config.datamanager.canonical_frame = config.canonical_frame
        super().__init__(config, device, test_mode, world_size, local_rank, grad_scaler)
        hold_frozen(self, "prior", prior)
        self.position = StagePosition(canonical_steps=config.canonical_steps)
        self.output_dir: Optional[Path] = None
        self.viewer_inputs = ViewerText("4Real inputs", summary, disabled=True)
        self.viewer_stage = ViewerText("4Real stage", "", disabled=True)
        self.generator = torch.Generator().manual_seed(config.datamanager.seed)

    # ---- the schedule ----------------------------------------------------------------------------------------------
    def stage_at(self, step: int) -> Tuple[Stage, int, int]:
        """The stage of training step ``step``, the steps done in it, and its length."""
        config = self.config
        if step < config.canonical_steps:
            return "canonical", step, config.canonical_steps
        return "temporal", step - config.canonical_steps, config.temporal_steps

    def sds_due(self, stage_step: int, length: int) -> bool:
        return self.config.sds_steps > 0 and stage_step >= length - self.config.sds_steps

    def get_train_loss_dict(self, step: int):
        stage, stage_step, length = self.stage_at(step)
        if stage != self.position.stage or stage_step == 0:
            CONSOLE.log(f"4real: stage {STAGE_NAMES[stage]}, {length} steps from step {step}")
        self.position.stage = stage
        self.model.temporal = stage == "temporal"
        self.datamanager.stage = stage
        camera, batch = self.datamanager.next_train(step)
        outputs = self.model(camera)
        metrics = self.model.get_metrics_dict(outputs, batch)
        losses = self.model.get_loss_dict(outputs, batch, metrics)
        sds = self.sds_due(stage_step, length)
        if sds:
            losses.update(self.video_sds_losses(step, stage, stage_step - (length - self.config.sds_steps)))
        self.position.stage_step = stage_step + 1
        self._report(step, stage, stage_step + 1, length, sds)
        return outputs, losses, metrics

    def video_sds_losses(self, step: int, stage: Stage, sds_step: int) -> Dict[str, torch.Tensor]:
        """One video SDS loss: multi-view at the canonical time in stage 4; temporal or multi-view (at random) in
        stage 5."""
        assert self.prior is not None, "video SDS needs the prior (loaded when training)"
        config = self.config
        if stage == "canonical":
            kind, frame = "multiview", config.canonical_frame
        else:
            kind = "temporal" if torch.rand(1, generator=self.generator) < 0.5 else "multiview"
            frame = None
        path, condition = self.datamanager.sds_path(kind, step, self.refined_pose, frame)  # from refined poses
        schedule = config.sds_timesteps  # its own length, mapped onto the stage's SDS steps
        position = round(sds_step / max(config.sds_steps, 1) * schedule.max_steps)
        sigma = max(schedule.sample(position, 1000, self.generator), 1) / 1000.0
        renders = self.model.render_path(path)
        frame_rate = self.path_frame_rate(path)
        output = video_sds_loss(renders, condition, self.prior, sigma, path, self.generator, frame_rate)
        self.position.sds_counts[kind] += 1
        weight = config.temporal_sds_weight if kind == "temporal" else config.multiview_sds_weight
        return {f"{kind}_sds_loss": weight * output.loss}

    def path_frame_rate(self, path) -> float:
        """Frames per second of a path's renders: a temporal path steps time by a fraction of the reference video
        (``frame_rate`` frames per second, times 0 to 1 over its length), so its 16 renders may span 48 frames (8.3
        fps at 25); a multi-view path (time still) plays at ``frame_rate``, as the freeze-time video."""
        times = path.times.reshape(-1)
        step = float((times[-1] - times[0]).abs()) / (len(times) - 1)
        if step == 0.0:
            return float(self.config.frame_rate)
        return float(self.config.frame_rate) / (step * (len(self.datamanager.inputs.reference) - 1))

    @torch.no_grad()
    def refined_pose(self, camera) -> torch.Tensor:
        """The camera optimizer's refined pose [1, 3, 4] of a training camera (``cam_idx`` in its metadata)."""
        return self.model.camera_optimizer.apply_to_camera(camera.to(self.device)).cpu()

    @torch.no_grad()
    def refined_reference(self, time: float):
        """The reference camera at ``time`` with the camera optimizer's refinement applied (and no camera index)."""
        camera = self.datamanager.reference_camera(time)
        camera.camera_to_worlds = self.model.camera_optimizer.apply_to_camera(camera.to(self.device)).cpu()
        camera.metadata = None
        return camera

    def _report(self, step: int, stage: Stage, done: int, length: int, sds: bool) -> None:
        fraction = min(done / max(length, 1), 1.0)
        text = f"{STAGE_NAMES[stage]}: step {done}/{length}" + (" · video SDS" if sds else "")
        self.viewer_stage.value = text
        if done % self.config.log_every == 0 or done == length:
            CONSOLE.log(f"4real {progress_bar(fraction)} {text} (training step {step})")

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def get_extra_state(self) -> Dict:
        return asdict(self.position)

    def set_extra_state(self, state: Dict) -> None:
        position = StagePosition(**state)
        if position.canonical_steps != self.config.canonical_steps:
            raise InputError(
                f"--pipeline.canonical-steps {self.config.canonical_steps}: the checkpoint's run has "
                f"{position.canonical_steps}; expected the same stage lengths when resuming"
            )
        self.position = position
        CONSOLE.log(f"4real: checkpoint in stage {STAGE_NAMES[position.stage]} after {position.stage_step} steps")

    # ---- outputs ---------------------------------------------------------------------------------------------------
    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> List[TrainingCallback]:
        assert training_callback_attributes.trainer is not None
        self.output_dir = Path(training_callback_attributes.trainer.base_dir)
        callbacks = super().get_training_callbacks(training_callback_attributes)
        callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN], self.write_outputs))
        return callbacks

    @torch.no_grad()
    def render_video(self, cameras) -> List[np.ndarray]:
        """uint8 frames of the model's renders of ``cameras`` (each at its time)."""
        frames = []
        for index in range(len(cameras)):
            rgb = self.model.get_outputs_for_camera(cameras[index : index + 1].to(self.device))["rgb"]
            frames.append((rgb.clamp(0, 1) * 255).round().byte().cpu().numpy())
        return frames

    def result_videos(self) -> Dict[str, List[np.ndarray]]:
        """The orbit video (at the canonical time, over the freeze-time cameras' azimuths about the pivot), the time
        video (the reference camera, times 0 to 1) and the space-time video (the orbit's cameras, times 0 to 1: the
        4D result from viewpoints the reference video does not show)."""
        datamanager = self.datamanager
        reference = self.refined_reference(datamanager.canonical_time)
        centres = datamanager.inputs.cameras.camera_to_worlds[:, :, 3]
        start = reference.camera_to_worlds[0, :, 3]
        azimuths = torch.atan2(centres[:, 1], centres[:, 0]) - math.atan2(float(start[1]), float(start[0]))
        azimuths = torch.remainder(azimuths + math.pi, 2 * math.pi) - math.pi
        count = len(datamanager.inputs.reference)
        sweep = torch.linspace(float(azimuths.min()), float(azimuths.max()), count)
        orbit = orbit_cameras(reference, torch.zeros(3), sweep.tolist(), datamanager.canonical_time)
        space_time = copy.deepcopy(orbit)
        space_time.times = torch.linspace(0.0, 1.0, count)[:, None]
        return {
            "orbit": self.render_video(orbit),
            "time": self.render_video(time_cameras(reference, count)),
            "space_time": self.render_video(space_time),
        }

    def write_outputs(self, step: Optional[int] = None) -> Dict[str, Any]:
        """Writes ``videos/{orbit,time,space_time}.mp4`` and ``metrics.json`` into the run directory; returns the
        metrics."""
        assert self.output_dir is not None
        self.eval()
        videos = self.result_videos()
        for name, frames in videos.items():
            write_video(self.output_dir / "videos" / f"{name}.mp4", frames, self.config.frame_rate)
        reference = self.datamanager.inputs.reference
        psnrs = [
            image_metrics(reference[index].float() / 255, torch.from_numpy(frame).float() / 255, None)["psnr"]
            for index, frame in enumerate(videos["time"])
        ]
        run_dir = Path(self.config.run_dir or self.output_dir)
        metrics: Dict[str, Any] = {
            "prompt": self.prompt,
            "stage": self.position.stage,
            "stage_step": self.position.stage_step,
            "inputs": {
                "reference_video": str(run_dir / REFERENCE_FOLDER / "video.mp4"),
                "freeze_time_video": str(run_dir / FREEZE_TIME_FOLDER / "video.mp4"),
                "transforms": str(run_dir / CAMERAS_FOLDER / TRANSFORMS),
            },
            "reference_psnr": float(np.mean(psnrs)),
            "xclip_model": self.config.xclip_model,
        }
        scorer = load_xclip_or_skip(self.config.xclip_model, self.device, "--pipeline.xclip-model")
        if scorer is not None:
            metrics["xclip"] = {name: scorer.score(frames, self.prompt) for name, frames in videos.items()}
        (self.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        CONSOLE.log(f"4real: result videos in {self.output_dir / 'videos'}, metrics in {self.output_dir}/metrics.json")
        self.train()
        return metrics


def prepare_inputs(config: FourRealPipelineConfig, run_dir: Path, models: VideoModels, device: str) -> str:
    """Stages 1-3 (each skipped when its artefacts exist); returns a one-line summary of the inputs."""
    run_dir = Path(run_dir)

    def announce(name: str, done: bool) -> None:
        CONSOLE.log(f"4real: stage {name}" + (f" (found in {run_dir}, kept)" if done else ""))

    announce("1/5 reference video", stage_meta(run_dir / REFERENCE_FOLDER) is not None)
    reference = reference_video_stage(config, run_dir, models, device)
    announce("2/5 freeze-time video", stage_meta(run_dir / FREEZE_TIME_FOLDER) is not None)
    freeze, canonical_index = freeze_time_stage(config, run_dir, reference, models, device)
    announce("3/5 cameras by structure from motion", (run_dir / CAMERAS_FOLDER / TRANSFORMS).is_file())
    cameras = cameras_stage(freeze, run_dir, config.sfm, canonical_index)
    reference_meta, freeze_meta = stage_meta(reference), stage_meta(freeze)
    assert reference_meta is not None and freeze_meta is not None
    summary = (
        f"reference {reference_meta['num_frames']} frames ({reference_meta['source']}), freeze-time "
        f"{freeze_meta['num_frames']} frames ({freeze_meta['source']}), cameras {len(cameras.frame_indices)}/"
        f"{cameras.num_frames} registered ({run_dir / CAMERAS_FOLDER})"
    )
    CONSOLE.log(f"4real: {summary}")
    return summary


def load_prior(config: FourRealPipelineConfig, models: Optional[VideoModels], device: str, prompt: str) -> VideoPrior:
    """The video SDS prior: ``sds_model``, or the reference video's model (sharing its loaded weights)."""
    assert config.run_dir is not None
    if config.sds_model and config.sds_model != config.video_model:
        video_model = VideoModel.load(
            config.sds_model, config, field_name="pipeline.sds_model", supported=SDS_PIPELINES, device=device,
            cache_dir=Path(config.run_dir) / "prompt_embeddings",
        )  # fmt: skip
    else:
        resolve_pipeline_class(
            config.video_model, "pipeline.video_model", config.video_pipeline, SDS_PIPELINES, "pipeline.video_pipeline"
        )
        models = models or VideoModels(config, config.run_dir, device)
        video_model = models.text_to_video()
    return LTXVideoPrior(video_model, prompt, config.sds_guidance_scale)


@dataclass
class FourRealTrainerConfig(Trainer4DConfig):
    """Trainer4D for 4real: the experiment is named after the prompt, and the pipeline learns its run directory
    before it is built (stages 1-3 write there)."""

    _target: Type = field(default_factory=lambda: FourRealTrainer)

    def set_experiment_name(self) -> None:
        if self.experiment_name is None:
            slug = re.sub(r"[^a-z0-9]+", "-", self.pipeline.prompt.lower()).strip("-")[:48].strip("-")
            self.experiment_name = slug or "4real"


class FourRealTrainer(Trainer4D):
    """Sets ``pipeline.run_dir`` (this run's directory, or the resumed run's) and records it in ``config.yml``, so
    that a resumed run and ``ns-render`` find the stage artefacts."""

    config: FourRealTrainerConfig

    def setup(self, test_mode: Literal["test", "val", "inference"] = "val") -> None:
        config = self.config
        fit_schedules_to_stages(config)
        if config.pipeline.run_dir is None:
            if config.load_dir is not None:
                latest_checkpoint(config.load_dir)  # one-line error for a wrong directory
                config.pipeline.run_dir = config.load_dir.parent
            elif config.load_checkpoint is not None and config.load_checkpoint.is_file():
                config.pipeline.run_dir = config.load_checkpoint.parent.parent
            else:
                config.pipeline.run_dir = self.base_dir
        config.save_config()
        super().setup(test_mode)


def fit_schedules_to_stages(config: FourRealTrainerConfig) -> None:
    """Sets the start and length of the stage-following schedules (``PhaseStartSchedulerConfig``) from the stage
    lengths in force, so that --pipeline.canonical-steps / --pipeline.temporal-steps move them too."""
    for name, (start, steps) in config.pipeline.param_group_phases().items():
        scheduler = config.optimizers.get(name, {}).get("scheduler")
        if isinstance(scheduler, PhaseStartSchedulerConfig):
            scheduler.start_step, scheduler.max_steps = start, steps
