"""splatfacto-4d: deformable 3D Gaussians (canonical Gaussians + a deformation MLP over (x, t)).

nerfstudio's splatfacto supplies the canonical Gaussians, their densification (gsplat's DefaultStrategy, or
3DGS-MCMC's capped relocation with ``strategy="mcmc"``, or ``"auto"`` when there are seed points), losses and schedules; this model moves the Gaussians to the
camera's time with :class:`DeformationField` before rasterizing, with ``gsplat.rasterization`` on CUDA and
:func:`rasterization_torch` elsewhere. Seed points from the dataparser (``points3D_xyz``/``points3D_rgb``) place the
canonical Gaussians, with their colours, on any device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple, Type, Union
from unittest import mock

import torch
import torch.nn.functional as F
from gsplat import rendering
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.scene_box import OrientedBox
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes
from nerfstudio.model_components.lib_bilagrid import color_correct
from nerfstudio.models.splatfacto import RGB2SH, SplatfactoModel, SplatfactoModelConfig
from torch import Tensor
from torch.nn import Parameter

from ns_4d_methods.fields.deformation_field import DeformationField
from ns_4d_methods.models.compositing_compiled import load_kernels
from ns_4d_methods.models.gaussian_rasterizer_torch import rasterization_torch
from ns_4d_methods.models.gsplat_backend import require_gsplat_backend
from ns_4d_methods.models.image_metrics import LazyLPIPS, image_metrics
from ns_4d_methods.models.mcmc_densification import MCMCStrategyAnyDevice


@dataclass
class Splatfacto4DModelConfig(SplatfactoModelConfig):
    """Splatfacto with a time-conditioned deformation of the Gaussians (Deformable-3DGS)."""

    _target: Type = field(default_factory=lambda: Splatfacto4DModel)
    rasterizer: Literal["auto", "gsplat", "torch"] = "auto"
    """Rasterizer: "gsplat" (CUDA only), "torch" (pure PyTorch, any device) or "auto" (gsplat on CUDA, else torch).
    gsplat's CUDA kernels are checked for when the model is built (one-line error if gsplat has none and no toolkit
    to compile them); "torch" runs on CUDA too, meanwhile."""
    deformation_num_layers: int = 8
    """Hidden layers of the deformation MLP."""
    deformation_layer_width: int = 256
    """Width of the deformation MLP."""
    position_frequencies: int = 10
    """Positional-encoding frequencies of the canonical Gaussian centre."""
    time_frequencies: int = 6
    """Positional-encoding frequencies of time (Deformable-3DGS: 6 for synthetic scenes, 10 for real ones)."""
    time_network_width: int = 0
    """Width of the time network between the time encoding and the deformation MLP (Linear, ReLU, Linear); 0 for
    none. Deformable-3DGS uses one of width 256 with 30 outputs on synthetic (D-NeRF) scenes and none on real ones
    (splatfacto-4d: 256; 4Real: none)."""
    time_network_outputs: int = 30
    """Outputs of the time network (Deformable-3DGS: 30)."""
    deformation_zero_init: bool = True
    """Whether the deformation's output layer starts at zero, so that the Gaussians start undeformed. Deformable-3DGS
    keeps PyTorch's default initialisation (splatfacto-4d: False, as the official); 4Real's temporal stage starts
    from trained canonical Gaussians and keeps them in place (True)."""
    scale_offset: Literal["log", "linear"] = "log"
    """Where the deformation's scale offsets apply: "linear" adds them to the scales after the exponential as
    Deformable-3DGS does (``get_scaling + d_scaling``; the sign drops out of the covariance, so the magnitude is
    rendered), "log" to the log-scales (4Real). splatfacto-4d: "linear"."""
    densify_by_camera_extent: bool = False
    """Whether the densification's world-space sizes (densify_size_thresh, cull_scale_thresh) are fractions of the
    cameras' extent (3DGS: 1.1 x the largest distance of a camera centre from their mean, about 4.4 on D-NeRF)
    instead of a unit scene, as 3DGS and Deformable-3DGS scale them (splatfacto-4d: True; strategy "default")."""
    deformation_warmup: int = 3000
    """Steps during which the Gaussians stay static and only the canonical scene is fitted (Deformable-3DGS: 3000)."""
    deformation_warmup_with_points: bool = True
    """Whether deformation_warmup also applies when the Gaussians start from the dataset's points. The warm-up keeps
    an untrained deformation from throwing a random start out of view; Gaussians seeded on the surfaces do not need
    it, and without it every step costs the same from the first, so nerfstudio's ETA (the mean of the last 20 steps
    times the steps left) is right from the start (compact preset: False)."""
    strategy: Literal["default", "mcmc", "auto"] = "default"
    """Densification. "default": splatfacto's (gsplat's DefaultStrategy: clone, split and prune by screen-space
    gradients; no cap, so the step time grows with the count). "mcmc": 3DGS-MCMC (gsplat's MCMCStrategy: dead
    Gaussians relocated onto live ones, 5 % added per refinement up to max_gs_num, position noise), on both
    rasterizers. "auto": "mcmc" when the dataset gives seed points, "default" when the Gaussians start random: from a
    random start in a box the object fills little of (D-NeRF), most Gaussians die together, relocation splits the
    few live ones n ways and their opacity 1 - (1 - o)^(1/n) falls under the threshold too (jumpingjacks: all 7,751
    dead by step 226). All use warmup_length, stop_split_at and refine_every."""
    refine_pause_ratio: float = 1.0
    """Scale of splatfacto's pause in densification after each opacity reset and at the start (one pass over the
    training images + refine_every steps); compressed schedules scale it with the rest. Uncompressed in a 800-step
    run, the first densification came at step 250 and pruned 4,765 of 5,000 random Gaussians still under
    cull_alpha_thresh (jumpingjacks: 15.9 dB, an empty render)."""
    mcmc_min_opacity: float = 0.005
    """Opacity below which strategy "mcmc" relocates a Gaussian (3DGS-MCMC: 0.005)."""
    max_gs_num: int = 1_000_000
    """Cap on the number of Gaussians with strategy "mcmc" (MCMCStrategy's cap_max)."""
    noise_lr: float = 5e5
    """Position noise of strategy "mcmc", times the current learning rate of the means (MCMCStrategy's noise_lr)."""
    mcmc_opacity_reg: float = 0.01
    """Weight of the mean-opacity loss with strategy "mcmc" (3DGS-MCMC: 0.01)."""
    mcmc_scale_reg: float = 0.01
    """Weight of the mean-scale loss with strategy "mcmc" (3DGS-MCMC: 0.01)."""

    def param_group_starts(self) -> Dict[str, int]:
        """First training step of the groups that wait for a phase (the suite's learning-rate rule,
        :mod:`ns_4d_methods.phase_start_schedule`): the deformation after its static warm-up."""
        return {"deformation": self.deformation_warmup}


def camera_extent(camera_to_worlds: Tensor) -> float:
    """3DGS' scene extent: 1.1 x the largest distance of a camera centre from the centres' mean."""
    centres = camera_to_worlds[:, :3, 3]
    return 1.1 * float((centres - centres.mean(dim=0)).norm(dim=-1).max())


def _world_to_camera(camera_to_world: Tensor) -> Tensor:
    """[C, 3, 4] nerfstudio (OpenGL) camera-to-world -> [C, 4, 4] gsplat (OpenCV) world-to-camera.

    splatfacto's ``get_viewmat`` computes the same under ``torch.compile``, which takes about 20 s to build on a CPU.
    """
    rotation = camera_to_world[:, :3, :3] * camera_to_world.new_tensor([1.0, -1.0, -1.0])  # flip y and z axes
    rotation_inv = rotation.transpose(1, 2)
    viewmat = torch.eye(4, device=camera_to_world.device, dtype=camera_to_world.dtype).repeat(len(rotation), 1, 1)
    viewmat[:, :3, :3] = rotation_inv
    viewmat[:, :3, 3:4] = -rotation_inv @ camera_to_world[:, :3, 3:4]
    return viewmat


class Splatfacto4DModel(SplatfactoModel):
    """Canonical 3D Gaussians deformed to each camera's time (``camera.times`` in [0, 1]) before rasterization."""

    config: Splatfacto4DModelConfig

    def populate_modules(self) -> None:
        # splatfacto moves seed colours to CUDA unconditionally: it gets the seed points without colours (it then
        # starts from random colours) and the colours are set here, as splatfacto would set them.
        seed_points = self.seed_points
        seed_colors = None
        if self.starts_from_points and len(seed_points[1]) > 0:
            seed_colors = seed_points[1].float() / 255.0
            self.seed_points = (seed_points[0], seed_points[1][:0])
        # splatfacto builds torchmetrics' LPIPS here, which downloads AlexNet weights at construction; LazyLPIPS takes
        # its place and loads only weights already on disk. splatfacto imports the class inside the method, so it is
        # swapped where it is imported from, for the duration of the call.
        with mock.patch("torchmetrics.image.lpip.LearnedPerceptualImagePatchSimilarity", lambda **_: LazyLPIPS()):
            super().populate_modules()
        self.seed_points = seed_points
        if seed_colors is not None:
            with torch.no_grad():
                if self.config.sh_degree > 0:
                    self.features_dc.copy_(RGB2SH(seed_colors))
                else:
                    self.features_dc.copy_(torch.logit(seed_colors, eps=1e-10))
        if not self.uses_mcmc:
            # splatfacto pauses densification for one pass over the training images (+ refine_every) after each
            # opacity reset, and at the start; a compressed schedule compresses that pause too
            self.strategy.pause_refine_after_reset = round(
                self.strategy.pause_refine_after_reset * self.config.refine_pause_ratio
            )
        else:
            self.strategy = MCMCStrategyAnyDevice(
                cap_max=self.config.max_gs_num,
                noise_lr=self.config.noise_lr,
                refine_start_iter=self.config.warmup_length,
                refine_stop_iter=self.config.stop_split_at,
                refine_every=self.config.refine_every,
                min_opacity=self.config.mcmc_min_opacity,
            )
            self.strategy_state = self.strategy.initialize_state()
        time_network = self.config.time_network_width, self.config.time_network_outputs
        self.deformation_field = DeformationField(
            num_layers=self.config.deformation_num_layers,
            layer_width=self.config.deformation_layer_width,
            position_frequencies=self.config.position_frequencies,
            time_frequencies=self.config.time_frequencies,
            time_network=time_network if self.config.time_network_width > 0 else None,
            zero_init=self.config.deformation_zero_init,
        )
        # the rasterizer's kernels are loaded (or found missing) now rather than in the first step
        if self._uses_gsplat(on_cuda=torch.cuda.is_available()):
            require_gsplat_backend()
        else:
            load_kernels()  # the CPU rasterizer's compiled compositing

    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> List[TrainingCallback]:
        """splatfacto's callbacks; first, the densification's scene scale from the training cameras."""
        if self.config.densify_by_camera_extent and not self.uses_mcmc:
            cameras = training_callback_attributes.pipeline.datamanager.train_dataset.cameras
            self.strategy_state["scene_scale"] = camera_extent(cameras.camera_to_worlds)
        return super().get_training_callbacks(training_callback_attributes)

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        groups = super().get_param_groups()
        groups["deformation"] = list(self.deformation_field.parameters())
        return groups

    @property
    def starts_from_points(self) -> bool:
        """Whether the Gaussians were initialised from the dataset's points (not random)."""
        return self.seed_points is not None and not self.config.random_init and len(self.seed_points[0]) > 0

    @property
    def uses_mcmc(self) -> bool:
        """Whether densification is 3DGS-MCMC's (``strategy``, with "auto" resolved by the seed points)."""
        if self.config.strategy == "auto":
            return self.starts_from_points
        return self.config.strategy == "mcmc"

    @property
    def deformation_warmup(self) -> int:
        """Steps of static warm-up in force (``deformation_warmup``, or 0 per ``deformation_warmup_with_points``)."""
        if self.starts_from_points and not self.config.deformation_warmup_with_points:
            return 0
        return self.config.deformation_warmup

    def step_post_backward(self, step: int) -> None:
        if not self.uses_mcmc:
            super().step_post_backward(step)
            return
        assert step == self.step
        self.strategy.step_post_backward(
            params=self.gauss_params,
            optimizers=self.optimizers,
            state=self.strategy_state,
            step=step,
            info=self.info,
            lr=self.optimizers["means"].param_groups[0]["lr"],
        )

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        """splatfacto's losses, plus 3DGS-MCMC's opacity and scale regularisers under strategy "mcmc"."""
        losses = super().get_loss_dict(outputs, batch, metrics_dict)
        if self.uses_mcmc and self.training:
            losses["mcmc_opacity_reg"] = self.config.mcmc_opacity_reg * torch.sigmoid(self.opacities).mean()
            losses["mcmc_scale_reg"] = self.config.mcmc_scale_reg * torch.exp(self.scales).mean()
        return losses

    def deform(self, time: float) -> Tuple[Tensor, Tensor, Tensor]:
        """Centres [N, 3], quaternions [N, 4] and log-scales [N, 3] of all Gaussians at ``time`` (scale offsets per
        ``scale_offset``)."""
        means, quats, log_scales = self.means, self.quats, self.scales
        if self.step < self.deformation_warmup:
            return means, quats, log_scales
        # As in Deformable-3DGS the network reads the canonical centres as fixed inputs: position gradients reach the
        # canonical centres through the additive offset only.
        times = torch.full((len(means), 1), float(time), device=means.device)
        d_means, d_quats, d_scales = self.deformation_field(means.detach(), times)
        if self.config.scale_offset == "linear":
            log_scales = torch.log(torch.abs(torch.exp(log_scales) + d_scales) + 1e-12)
        else:
            log_scales = log_scales + d_scales
        return means + d_means, F.normalize(quats, dim=-1) + d_quats, log_scales

    def opacities_at(self, time: float) -> Tensor:
        """Opacity logits [N, 1] at ``time``: the canonical ones (the deformation leaves opacity alone). A model whose
        deformation changes opacity overrides this; rendering and the exports (:mod:`ns_4d_methods.export`) read it."""
        return self.opacities

    def _uses_gsplat(self, on_cuda: bool) -> bool:
        """Whether rendering goes through gsplat's CUDA rasterizer (``rasterizer``, "auto" resolved by the device)."""
        return self.config.rasterizer == "gsplat" or (self.config.rasterizer == "auto" and on_cuda)

    def _rasterize(self, **kwargs):
        use_gsplat = self._uses_gsplat(on_cuda=kwargs["means"].device.type == "cuda")
        return (rendering.rasterization if use_gsplat else rasterization_torch)(**kwargs)

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[Tensor, List]]:
        """Renders one camera at its time (time 0 when it has none); splatfacto's outputs."""
        assert camera.shape[0] == 1, "Only one camera at a time"
        if self.training:
            camera_to_world = self.camera_optimizer.apply_to_camera(camera)
        else:
            camera_to_world = camera.camera_to_worlds
        time = 0.0 if camera.times is None else float(camera.times.reshape(-1)[0])
        means, quats, log_scales = self.deform(time)
        opacities = self.opacities_at(time)
        colors = torch.cat([self.features_dc[:, None, :], self.features_rest], dim=1)

        if self.crop_box is not None and not self.training:
            crop_ids = self.crop_box.within(means).squeeze()
            if crop_ids.sum() == 0:
                return self.get_empty_outputs(
                    int(camera.width.item()), int(camera.height.item()), self.background_color
                )
            means, quats, log_scales = means[crop_ids], quats[crop_ids], log_scales[crop_ids]
            opacities, colors = opacities[crop_ids], colors[crop_ids]

        downscale = self._get_downscale_factor()
        camera.rescale_output_resolution(1 / downscale)
        K = camera.get_intrinsics_matrices().to(self.device)
        W, H = int(camera.width.item()), int(camera.height.item())
        camera.rescale_output_resolution(downscale)

        render_mode = "RGB+ED" if self.config.output_depth_during_training or not self.training else "RGB"
        if self.config.sh_degree > 0:
            sh_degree = min(self.step // self.config.sh_degree_interval, self.config.sh_degree)
        else:
            colors, sh_degree = torch.sigmoid(colors).squeeze(1), None

        render, alpha, self.info = self._rasterize(
            means=means,
            quats=quats,
            scales=torch.exp(log_scales),
            opacities=torch.sigmoid(opacities).squeeze(-1),
            colors=colors,
            viewmats=_world_to_camera(camera_to_world),
            Ks=K,
            width=W,
            height=H,
            packed=False,
            near_plane=0.01,
            far_plane=1e10,
            render_mode=render_mode,
            sh_degree=sh_degree,
            absgrad=self.strategy.absgrad,
            rasterize_mode=self.config.rasterize_mode,
        )
        if self.training:
            self.strategy.step_pre_backward(
                self.gauss_params, self.optimizers, self.strategy_state, self.step, self.info
            )

        background = self._get_background_color()
        rgb = torch.clamp(render[..., :3] + (1 - alpha) * background, 0.0, 1.0)
        if self.config.use_bilateral_grid and self.training:
            if camera.metadata is not None and "cam_idx" in camera.metadata:
                rgb = self._apply_bilateral_grid(rgb, camera.metadata["cam_idx"], H, W)
        depth = None
        if render_mode == "RGB+ED":
            depth = render[..., 3:4]
            depth = torch.where(alpha > 0, depth, depth.detach().max()).squeeze(0)
        if not self.training:
            background = background.expand(H, W, 3)
        return {"rgb": rgb.squeeze(0), "depth": depth, "accumulation": alpha.squeeze(0), "background": background}

    @torch.no_grad()
    def get_outputs_for_camera(self, camera: Cameras, obb_box: Optional[OrientedBox] = None) -> Dict[str, Tensor]:
        """Renders a camera; one without times (``ns-render interpolate`` paths) is first placed in time from the
        training cameras when the pipeline provided ``time_from_pose``."""
        time_from_pose = getattr(self, "time_from_pose", None)
        if camera.times is None and time_from_pose is not None:
            camera = time_from_pose.fill(camera)
        return super().get_outputs_for_camera(camera, obb_box)

    def get_image_metrics_and_images(
        self, outputs: Dict[str, Tensor], batch: Dict[str, Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, Tensor]]:
        """PSNR, SSIM (and LPIPS when its weights are on disk) and the ground truth beside the render."""
        gt_rgb = self.composite_with_background(self.get_gt_img(batch["image"]), outputs["background"])
        predicted_rgb = outputs["rgb"]
        metrics = image_metrics(gt_rgb, predicted_rgb, self.lpips)
        if self.config.color_corrected_metrics:
            corrected = image_metrics(gt_rgb, color_correct(predicted_rgb, gt_rgb), self.lpips)
            metrics.update({f"cc_{name}": value for name, value in corrected.items()})
        return metrics, {"img": torch.cat([gt_rgb, predicted_rgb], dim=1)}
