"""4diffusion: a monocular object video to a dynamic NeRF, distilled from the 4DM multi-view video diffusion prior.

When training starts (``get_training_callbacks``, after any checkpoint was loaded) the pipeline

1. loads the 4DM prior (``--pipeline.prior-model``, a directory written by ``ns-4d-convert 4dm``; fp16 on CUDA);
2. with ``--image-to-video``, makes the input video with Stable Video Diffusion (or takes it back from the
   checkpoint); the sampled input frames go to ``<run>/input/``;
3. generates the **anchor video** once: 4DM samples 4 views (azimuths 0/90/180/270 deg, ImageDream's 90/180/270/360,
   the last one being the input view) x 8 instants with DDIM (``anchor_steps`` 100, CFG ``anchor_guidance_scale``
   5, the demo's negative prompt), conditioned on the input frames. Longer inputs (``--pipeline.datamanager.video.
   num-frames`` above 8) get it in blocks of 8 instants that share their boundary frame: each block is generated
   with the previous block's last frame(s) pinned (:meth:`FourDMPrior.sample_latents`), so the unseen side does
   not jump between blocks. Every frame is then matted (``matting_model``, :mod:`ns_4d_methods.guidance.matting`:
   the object kept, the rest white), as the official code does with rembg. It is written to ``<run>/anchor/``
   (one PNG per view and instant, and ``anchor.mp4``) and kept in every checkpoint, so a resumed run reuses it.

Every training step then adds

- **4D-aware SDS** (:mod:`ns_4d_methods.guidance.sds_4d`) on the datamanager's 4 views x 8 instants;
- the **anchor loss**: one random instant, rendered at anchor view ``anchor_view`` (official default 0: azimuth 0,
  90 deg from the input view) at the prior's resolution, against the anchor frame
  (:meth:`FourDiffusionModel.anchor_loss`);
- the model's **regularisers** (orientation on the 4 views at one instant of the window, sparsity, opacity entropy,
  the proposal networks' interlevel loss).

At the end of training it writes ``<run>/videos/`` (one video per anchor view, azimuths 0/90/180/270, with time
moving, and ``orbit.mp4``: a full turn from the input view while time runs) and ``<run>/metrics.json``
(:mod:`ns_4d_methods.models.generation_metrics`: CLIP-I, CLIP-C, and PSNR/SSIM/LPIPS against ``--pipeline.gt-views``).
The viewer shows the scene as it trains, with its time slider; ``ns-render`` renders it.

Memory (the official code needs more than 24 GB): the prior runs in fp16 on CUDA, ``--pipeline.sds.grad-views K``
keeps the VAE encoder's gradient for K of the 32 renders, and the model renders in checkpointed chunks
(``--pipeline.model.render-chunk-rays``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Type

import numpy as np
import torch
import torch.nn.functional as F
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.utils.rich_utils import CONSOLE
from PIL import Image
from torch import Tensor

from ns_4d_methods.data.object_video import ObjectVideoDataManager, ObjectVideoDataManagerConfig
from ns_4d_methods.data.video_io import to_frame, write_video
from ns_4d_methods.editing.edit_metrics import CLIP_MODEL, load_clip_or_skip
from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.four_dm_prior import ANCHOR_AZIMUTHS_DEG, FourDMPrior, camera_vector_from_c2w
from ns_4d_methods.guidance.matting import MATTING_MODEL, ObjectMatting
from ns_4d_methods.guidance.model_loading import hold_frozen
from ns_4d_methods.guidance.sds_4d import FourDAwareSDS, FourDAwareSDSConfig
from ns_4d_methods.models.four_diffusion import FourDiffusionModel, FourDiffusionModelConfig
from ns_4d_methods.models.generation_metrics import (
    clip_consistency,
    clip_similarity,
    read_gt_views,
    read_on_white,
)
from ns_4d_methods.models.image_metrics import LazyLPIPS, image_metrics
from ns_4d_methods.pipelines.dynamic_pipeline import DynamicPipeline, DynamicPipelineConfig
from ns_4d_methods.render.orbit_cameras import orbit_cameras

# the official config's negative prompt for SDS, and the official demo's for the anchor video
SDS_NEGATIVE_PROMPT = (
    "ugly, bad anatomy, blurry, pixelated obscure, unnatural colors, poor lighting, dull, and unclear, cropped, "
    "lowres, low quality, artifacts, duplicate, morbid, mutilated, poorly drawn face, deformed, dehydrated, "
    "bad proportions"
)
ANCHOR_NEGATIVE_PROMPT = (
    "uniform low no texture ugly, boring, bad anatomy, blurry, pixelated,  obscure, unnatural colors, poor lighting, "
    "dull, and unclear."
)


@dataclass
class FourDiffusionPipelineConfig(DynamicPipelineConfig):
    """4Diffusion: 4D-aware SDS from 4DM plus the anchor loss, on a dynamic NeRF fitted to an object video."""

    _target: Type = field(default_factory=lambda: FourDiffusionPipeline)
    datamanager: ObjectVideoDataManagerConfig = field(default_factory=ObjectVideoDataManagerConfig)
    """SDS cameras (4 views x 8 instants, resolution schedule) and the object video named by --data."""
    model: FourDiffusionModelConfig = field(default_factory=FourDiffusionModelConfig)
    """The dynamic NeRF, its regularisers and the anchor loss."""
    prompt: str = ""
    """Text prompt describing the object, e.g. "a blue jay" (required)."""
    negative_prompt: str = SDS_NEGATIVE_PROMPT
    """Negative prompt of 4D-aware SDS (the official config's)."""
    prior_model: str = "4dm"
    """The 4DM prior: a directory written by ns-4d-convert 4dm (UNet, scheduler, VAE, text and image encoders)."""
    prior_dtype: Literal["auto", "float16", "float32"] = "auto"
    """Precision of the prior; auto: float16 on CUDA, float32 on the CPU."""
    sds: FourDAwareSDSConfig = field(default_factory=FourDAwareSDSConfig)
    """4D-aware SDS: guidance scale, std rescale, timestep annealing, VAE gradient views."""
    anchor_steps: int = 100
    """DDIM steps of the anchor video."""
    anchor_guidance_scale: float = 5.0
    """Classifier-free guidance scale of the anchor video."""
    anchor_negative_prompt: str = ANCHOR_NEGATIVE_PROMPT
    """Negative prompt of the anchor video (the official demo's)."""
    anchor_view: int = 0
    """Anchor view of the anchor loss: 0-3, the anchor video's views at azimuths 0/90/180/270 (ImageDream's
    90/180/270/360). The official default, anchor_view_num 0: azimuth 0, i.e. 90 deg counter-clockwise (seen from
    above) from the input view at -90, a side view the image prompt does not show (the official code renders it
    from camera (anchor_view_num + 2) % 4 of its cameras at -180/-90/0/90, the same azimuth). 3 is the input view."""
    matting: bool = True
    """Matte every anchor frame (object kept, the rest white) before it becomes a target, as the official code does
    with rembg; False: the decoded frames as they are."""
    matting_model: str = MATTING_MODEL
    """Segmentation model of the matting step (CLIPSeg, prompted with --pipeline.prompt; hub id or local directory).
    The official code uses rembg's U^2-Net, an ONNX file outside the model hubs."""
    matting_threshold: float = 0.5
    """Foreground probability above which an anchor pixel is kept (the official mask: alpha > 0.5)."""
    anchor_resolution: int = 0
    """Render size for the anchor loss; 0: the prior's image size (256 for 4DM)."""
    seed: int = 23
    """Seed of the anchor video and of the SDS noise (the official seed)."""
    gt_views: Optional[Path] = None
    """Folder of ground-truth novel-view videos (views.json) to score the result against at the end."""
    clip_model: str = CLIP_MODEL
    """CLIP model for CLIP-I and CLIP-C (hub id or local directory); skipped with one line when unavailable."""
    video_frames: int = 32
    """Frames of each result video (time from 0 to 1)."""
    video_fps: int = 8
    """Frame rate of the result videos."""


class FourDiffusionPipeline(DynamicPipeline):
    """Anchor generation, per-step SDS + anchor loss + regularisers, and the end-of-training outputs."""

    config: FourDiffusionPipelineConfig
    datamanager: ObjectVideoDataManager
    model: FourDiffusionModel

    def __init__(
        self, config: FourDiffusionPipelineConfig, device: str, test_mode: str = "val", *args: Any, **kwargs: Any
    ) -> None:
        if test_mode == "val":
            _check_config(config)  # before the input is read: bad flags fail fast
        super().__init__(config, device, test_mode, *args, **kwargs)
        hold_frozen(self, "prior", None)  # the 4DM weights stay out of checkpoints
        self.sds: Optional[FourDAwareSDS] = None
        self.anchor: Optional[Tensor] = None  # uint8 [M, 4, 3, S, S]
        self.anchor_key: Optional[str] = None  # what the anchor was generated from (see _anchor_key)
        self.generated_video: Optional[Tensor] = None  # uint8 [N, 3, S, S], --image-to-video only
        self.run_dir: Optional[Path] = None
        self.generator = torch.Generator().manual_seed(config.seed)
        self._prompts: Dict[str, Any] = {}
        self._conditions: Dict[int, Any] = {}
        self._checkpoint_state: Optional[Dict[str, Any]] = None

    @property
    def prompt(self) -> str:
        """--pipeline.prompt, or nerfstudio's --prompt alias (which it writes to the model config)."""
        return self.config.prompt.strip() or str(getattr(self.config.model, "prompt", "") or "").strip()

    # ---- setup -----------------------------------------------------------------------------------------------------
    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> List[TrainingCallback]:
        assert training_callback_attributes.trainer is not None
        self.setup_generation(Path(training_callback_attributes.trainer.base_dir))
        callbacks = super().get_training_callbacks(training_callback_attributes)
        callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN], self.write_outputs))
        return callbacks

    def setup_generation(self, run_dir: Path) -> None:
        """Loads the prior (unless one is attached already), makes or restores the input video and the anchor."""
        self.run_dir = run_dir
        self.model.load_anchor_lpips()  # before anything slow: missing LPIPS weights stop the run in one line
        if self.prior is None:
            hold_frozen(self, "prior", self._load_prior())
        prior: FourDMPrior = self.prior
        datamanager, config = self.datamanager, self.config
        if (datamanager.config.window, datamanager.config.sampler.num_views) != (prior.num_frames, prior.num_views):
            raise InputError(
                f"--pipeline.datamanager.window {datamanager.config.window} and sampler.num-views "
                f"{datamanager.config.sampler.num_views}: the prior takes {prior.num_frames} instants x "
                f"{prior.num_views} views"
            )
        state = self._checkpoint_state or {}
        if datamanager.needs_video:
            self._make_input_video(state.get("generated_video"))
        assert datamanager.video is not None
        self._write_input_frames()
        self._prompts = {
            "sds": prior.encode_prompt(self.prompt, config.negative_prompt),
            "anchor": prior.encode_prompt(self.prompt, config.anchor_negative_prompt),
        }
        self._restore_or_generate_anchor(state)
        self.sds = FourDAwareSDS(config.sds, prior)

    def _load_prior(self) -> FourDMPrior:
        dtype = {"auto": None, "float16": torch.float16, "float32": torch.float32}[self.config.prior_dtype]
        return FourDMPrior(self.config.prior_model, self.device, field_name="--pipeline.prior-model", dtype=dtype)

    def _make_input_video(self, restored: Optional[Tensor]) -> None:
        if restored is not None:
            CONSOLE.log("4diffusion: input video restored from the checkpoint (not generated again)")
            frames = restored
        else:
            CONSOLE.log(f"4diffusion: animating {self.datamanager.config.data} with Stable Video Diffusion")
            frames = (self.datamanager.generate_video(self.device) * 255.0 + 0.5).to(torch.uint8)
        self.generated_video = frames
        self.datamanager.set_generated_video(frames.float() / 255.0)
        assert self.run_dir is not None
        fps = self.datamanager.config.video.svd_fps
        write_video(self.run_dir / "input" / "generated.mp4", (to_frame(f.float() / 255.0) for f in frames), fps=fps)

    def _write_input_frames(self) -> None:
        assert self.run_dir is not None and self.datamanager.video is not None
        folder = self.run_dir / "input"
        folder.mkdir(parents=True, exist_ok=True)
        for index, frame in zip(self.datamanager.video.source_indices, self.datamanager.video.frames):
            path = folder / f"frame_{index:05d}.png"
            if not path.exists():
                Image.fromarray(to_frame(frame)).save(path)

    # ---- the anchor video ------------------------------------------------------------------------------------------
    def condition(self, start: int) -> Any:
        """The prior's image condition for the window of 8 instants from ``start`` (cached)."""
        if start not in self._conditions:
            video = self.datamanager.video
            assert video is not None and self.prior is not None
            size = self.prior.image_size
            frames = video.frames[start : start + self.prior.num_frames]
            if frames.shape[-1] != size:
                frames = F.interpolate(frames, size=(size, size), mode="area")
            # the image latents are posterior samples: seeded, so that the anchor depends on the seed alone
            generator = torch.Generator().manual_seed(self.config.seed + start)
            self._conditions[start] = self.prior.encode_condition(frames.to(self.device), generator)
        return self._conditions[start]

    def anchor_windows(self) -> List[int]:
        """Starts of the blocks of 8 instants the anchor video is generated in: each starts at the previous block's
        last instant (they share it), the last one ends at M."""
        count, window = self.datamanager.config.num_frames, self.datamanager.config.window
        starts = list(range(0, count - window + 1, window - 1))
        if starts[-1] + window < count:
            starts.append(count - window)
        return starts

    def _anchor_key(self) -> str:
        """What the anchor depends on: prompt, negative prompt, sampling settings and the input frames."""
        config, video = self.config, self.datamanager.video
        assert video is not None
        digest = hashlib.sha1()
        digest.update(
            json.dumps(
                [
                    self.prompt,
                    config.anchor_negative_prompt,
                    config.anchor_steps,
                    config.anchor_guidance_scale,
                    config.seed,
                    config.matting and (config.matting_model, config.matting_threshold),
                ]
            ).encode()
        )
        digest.update((video.frames * 255.0 + 0.5).to(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _restore_or_generate_anchor(self, state: Dict[str, Any]) -> None:
        key = self._anchor_key()
        if state.get("anchor") is not None:
            if state.get("anchor_key") != key:
                raise InputError(
                    "the checkpoint's anchor video was generated for another prompt or input video; expected the "
                    "--pipeline.prompt and --data of the run the checkpoint comes from"
                )
            self.anchor = state["anchor"]
            CONSOLE.log("4diffusion: anchor video restored from the checkpoint (not generated again)")
        else:
            self.anchor = self.generate_anchor()
        self.anchor_key = key
        self._write_anchor()

    @torch.no_grad()
    def generate_anchor(self) -> Tensor:
        """The anchor video, uint8 [M, 4, 3, S, S]: 4DM's DDIM samples per block of 8 instants (a block's instants
        generated before are pinned), matted unless ``matting`` is off."""
        prior, config, datamanager = self.prior, self.config, self.datamanager
        assert prior is not None
        count = datamanager.config.num_frames
        matting = None  # loaded first: a missing model fails before the slow sampling
        if config.matting:
            matting = ObjectMatting(config.matting_model, self.device, "--pipeline.matting-model")
        latents: Optional[Tensor] = None  # [M, 4, C, h, w]
        generator = torch.Generator().manual_seed(config.seed)
        done = 0
        for start in self.anchor_windows():
            frames = torch.arange(start, start + prior.num_frames)
            cameras = datamanager.view_cameras(ANCHOR_AZIMUTHS_DEG, datamanager.frame_times[frames], resolution=1)
            CONSOLE.log(
                f"4diffusion: generating the anchor video, instants {start}-{start + prior.num_frames - 1} "
                f"of {count} ({config.anchor_steps} DDIM steps)"
            )
            block = prior.sample_latents(
                self._prompts["anchor"],
                self.condition(start),
                camera_vector_from_c2w(cameras.camera_to_worlds).to(self.device),
                num_steps=config.anchor_steps,
                guidance_scale=config.anchor_guidance_scale,
                generator=generator,
                known=None if latents is None else latents[start:done].flatten(0, 1),
            )
            block = block.reshape(prior.num_frames, prior.num_views, *block.shape[1:])
            if latents is None:
                latents = block.new_zeros(count, *block.shape[1:])
            latents[start : start + prior.num_frames] = block
            done = start + prior.num_frames
        assert latents is not None
        images = prior.decode_latents(latents.flatten(0, 1)).cpu()  # [M x 4, 3, S, S]
        if matting is not None:
            CONSOLE.log(f"4diffusion: matting the anchor video with {config.matting_model}")
            images = matting(images, self.prompt, config.matting_threshold)
        images = (images.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)
        return images.reshape(count, prior.num_views, *images.shape[1:])

    def _write_anchor(self) -> None:
        assert self.run_dir is not None and self.anchor is not None
        folder = self.run_dir / "anchor"
        for view in range(self.anchor.shape[1]):
            (folder / f"view{view}").mkdir(parents=True, exist_ok=True)
            for instant in range(self.anchor.shape[0]):
                path = folder / f"view{view}" / f"{instant:03d}.png"
                if not path.exists():
                    Image.fromarray(self.anchor[instant, view].permute(1, 2, 0).numpy()).save(path)
        rows = (torch.cat(list(frame), dim=-1).permute(1, 2, 0).numpy() for frame in self.anchor)  # views side by side
        path = folder / "anchor.mp4"
        if not path.exists():
            write_video(path, rows, fps=self.config.video_fps)

    # ---- training --------------------------------------------------------------------------------------------------
    def get_train_loss_dict(self, step: int) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], Dict[str, Any]]:
        if self.sds is None or self.anchor is None:
            raise RuntimeError(
                "4diffusion trains after setup_generation (the trainer calls it via get_training_callbacks)"
            )
        model, datamanager = self.model, self.datamanager
        cameras, batch = datamanager.next_train(step)
        views = batch["views"]
        outputs = model.render_views(cameras)
        start = int(views.frame_indices[0])
        vectors = camera_vector_from_c2w(cameras.camera_to_worlds).to(self.device)
        sds = self.sds(outputs["rgb"], vectors, self._prompts["sds"], self.condition(start), step, self.generator)
        loss_dict = {"sds": sds.loss}

        normal_views = None
        if model.orientation_active:
            instant = int(torch.randint(0, views.num_frames, (1,), generator=self.generator))
            normal_views = model.render_views(
                cameras[instant * views.num_views : (instant + 1) * views.num_views], with_normals=True
            )
        loss_dict.update(model.regularisers(outputs, normal_views, step))

        instant = int(torch.randint(0, len(self.anchor), (1,), generator=self.generator))
        render, target = self.anchor_pair(instant)
        loss_dict.update(model.anchor_loss(render, target))
        metrics = {"timestep": torch.tensor(float(sds.timestep)), "resolution": torch.tensor(float(views.resolution))}
        return outputs, loss_dict, metrics

    def anchor_resolution(self) -> int:
        assert self.prior is not None
        return self.config.anchor_resolution or self.prior.image_size

    def anchor_pair(self, instant: int, grad: bool = True) -> Tuple[Tensor, Tensor]:
        """The render at the anchor view at ``instant`` and its anchor frame, both [1, 3, R, R] in [0, 1]."""
        assert self.anchor is not None
        size = self.anchor_resolution()
        datamanager = self.datamanager
        view = self.config.anchor_view
        camera = datamanager.view_cameras(
            [ANCHOR_AZIMUTHS_DEG[view]], datamanager.frame_times[instant : instant + 1], size
        )
        with torch.set_grad_enabled(grad):
            render = self.model.render_views(camera)["rgb"]
        target = self.anchor[instant, view][None].float().to(self.device) / 255.0
        if target.shape[-1] != size:
            target = F.interpolate(target, size=(size, size), mode="area")
        return render, target

    @torch.no_grad()
    def get_eval_loss_dict(self, step: int) -> Tuple[Dict, Dict[str, Tensor], Dict[str, Tensor]]:
        """The anchor loss at instant ``step mod M`` (no gradient)."""
        self.eval()
        try:
            assert self.anchor is not None
            render, target = self.anchor_pair(step % len(self.anchor), grad=False)
            return {}, self.model.anchor_loss(render, target), {}
        finally:
            self.train()

    @torch.no_grad()
    def get_eval_image_metrics_and_images(self, step: int) -> Tuple[Dict[str, float], Dict[str, Tensor]]:
        """The render at the anchor view next to its anchor frame, with their PSNR/SSIM."""
        self.eval()
        try:
            assert self.anchor is not None
            render, target = self.anchor_pair(step % len(self.anchor), grad=False)
            render, target = render[0].permute(1, 2, 0), target[0].permute(1, 2, 0)
            metrics = {f"anchor_{k}": v for k, v in image_metrics(target, render, None).items()}
            metrics["num_rays"] = render.shape[0] * render.shape[1]
            return metrics, {"anchor|render": torch.cat([target, render], dim=1)}
        finally:
            self.train()

    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ) -> Dict[str, float]:
        return self.evaluate()

    # ---- outputs ---------------------------------------------------------------------------------------------------
    def render_frames(self, cameras) -> List[np.ndarray]:
        """uint8 frames [H, W, 3] of ``cameras``, rendered one at a time without gradient."""
        frames = []
        for index in range(len(cameras)):
            outputs = self.model.get_outputs_for_camera(cameras[index : index + 1].to(self.device))
            frames.append(to_frame(outputs["rgb"].permute(2, 0, 1).cpu()))
        return frames

    @torch.no_grad()
    def write_outputs(self, step: Optional[int] = None) -> Optional[Dict[str, float]]:
        """Writes ``<run>/videos/`` and ``<run>/metrics.json``; returns the metrics."""
        if self.run_dir is None:
            return None
        self.eval()
        try:
            datamanager, config = self.datamanager, self.config
            size = datamanager.config.eval_resolution
            times = torch.linspace(0.0, 1.0, config.video_frames)
            folder = self.run_dir / "videos"
            for view, azimuth in enumerate(ANCHOR_AZIMUTHS_DEG):
                frames = self.render_frames(datamanager.view_cameras([azimuth], times, size))
                write_video(folder / f"view{view}_az{int(azimuth):03d}.mp4", frames, fps=config.video_fps)
            config_dm = datamanager.config
            turn = config_dm.input_azimuth + torch.linspace(0.0, 360.0, config.video_frames + 1)[:-1]
            orbit = orbit_cameras(
                config_dm.input_elevation, turn, config_dm.input_distance, config_dm.input_fovy, size, times
            )
            write_video(folder / "orbit.mp4", self.render_frames(orbit), fps=config.video_fps)
            CONSOLE.log(f"4diffusion: result videos in {folder}")
            metrics = self.evaluate()
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            CONSOLE.log(f"4diffusion: metrics {json.dumps(metrics)}")
            return metrics
        finally:
            self.train()

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """CLIP-I, CLIP-C (when CLIP loads) and PSNR/SSIM/LPIPS against --pipeline.gt-views (when given)."""
        datamanager, config = self.datamanager, self.config
        size = datamanager.config.eval_resolution
        metrics: Dict[str, float] = {"instants": float(datamanager.config.num_frames)}
        clip = load_clip_or_skip(config.clip_model, self.device, "--pipeline.clip-model")
        if clip is not None:
            times = datamanager.frame_times
            view_videos = [
                self.render_frames(datamanager.view_cameras([azimuth], times, size)) for azimuth in ANCHOR_AZIMUTHS_DEG
            ]
            metrics["clip_c"] = clip_consistency(view_videos, clip)
            if datamanager.video is not None:
                renders = self.render_frames(datamanager.view_cameras([datamanager.config.input_azimuth], times, size))
                inputs = F.interpolate(datamanager.video.frames, size=(size, size), mode="area")
                metrics["clip_i"] = clip_similarity(renders, [to_frame(frame) for frame in inputs], clip)
            else:
                CONSOLE.log("CLIP-I skipped: the input video is read only when training")
        if config.gt_views is not None:
            metrics.update(self._gt_view_metrics(config.gt_views))
        return metrics

    def _gt_view_metrics(self, folder: Path) -> Dict[str, float]:
        size = self.datamanager.config.eval_resolution
        lpips = LazyLPIPS()
        scores: Dict[str, List[float]] = {}
        for view in read_gt_views(folder):
            cameras = orbit_cameras(
                view.elevation,
                torch.full((len(view.times),), view.azimuth),
                view.distance,
                view.fovy,
                size,
                torch.tensor(view.times),
            )
            for frame, path in zip(self.render_frames(cameras), view.frames):
                render = torch.from_numpy(frame).float() / 255.0
                for name, value in image_metrics(read_on_white(path, size), render, lpips).items():
                    scores.setdefault(name, []).append(value)
        return {f"gt_{name}": float(np.mean(values)) for name, values in scores.items()}

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def get_extra_state(self) -> Dict[str, Any]:
        state = self._checkpoint_state or {}
        return {
            "anchor": self.anchor if self.anchor is not None else state.get("anchor"),
            "anchor_key": self.anchor_key if self.anchor_key is not None else state.get("anchor_key"),
            "generated_video": (
                self.generated_video if self.generated_video is not None else state.get("generated_video")
            ),
        }

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self._checkpoint_state = state


def _check_config(config: FourDiffusionPipelineConfig) -> None:
    prompt = config.prompt.strip() or str(getattr(config.model, "prompt", "") or "").strip()
    if not prompt:
        raise InputError(
            '--pipeline.prompt is empty; expected a description of the object, e.g. --pipeline.prompt "a blue jay"'
        )
    if config.anchor_view not in range(len(ANCHOR_AZIMUTHS_DEG)):
        raise InputError(f"--pipeline.anchor-view {config.anchor_view}: expected 0, 1, 2 or 3")
    if not 0.0 <= config.matting_threshold < 1.0:
        raise InputError(f"--pipeline.matting-threshold {config.matting_threshold}: expected a probability in [0, 1)")
    for flag, value in (
        ("anchor-steps", config.anchor_steps),
        ("video-frames", config.video_frames),
        ("video-fps", config.video_fps),
    ):
        if value < 1:
            raise InputError(f"--pipeline.{flag} {value}: expected at least 1")
    if config.gt_views is not None:
        read_gt_views(config.gt_views)
