"""nerfacto-4d: nerfacto with time-aware fields (a 3D hash grid plus a 4D hash grid, summed), for dynamic scenes.

Everything but the fields is nerfacto's: proposal sampling, renderers, interlevel/distortion/normal losses, camera
optimiser. The model reads ``ray_bundle.times`` (in [0, 1]; rays without times are rendered at time 0) and hands the
same times to the proposal density fields. An optional LPIPS loss on square patches of rays (``lpips_loss_weight``,
for a datamanager that samples patches) is what instruct4d trains with, as the official NeRFPlayer-nerfacto.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Type
from unittest import mock

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.scene_box import OrientedBox
from nerfstudio.models import nerfacto
from nerfstudio.models.nerfacto import NerfactoModel, NerfactoModelConfig
from nerfstudio.utils import colormaps

from ns_4d_methods.fields.nerfacto_4d_field import Nerfacto4DField, TimeHashMLPDensityField, kplanes_time_resolution
from ns_4d_methods.models.image_metrics import ALEXNET, LazyLPIPS, LPIPSLoss, image_metrics


@dataclass
class Nerfacto4DModelConfig(NerfactoModelConfig):
    """Nerfacto with a 4D hash grid summed onto its 3D grid.

    nerfacto's grid fields (num_levels, base_res, max_res, log2_hashmap_size, features_per_level) size the 3D grid;
    the 4D grid shares its levels, base resolution and features per level. Each proposal network gets a 4D grid of
    its own 3D grid's size.
    """

    _target: Type = field(default_factory=lambda: Nerfacto4DModel)
    max_res_4d: int = 2048
    """Finest resolution of the 4D (x, y, z, t) hash grid along space."""
    log2_hashmap_size_4d: int = 19
    """Size of the 4D hash grid's table per level is 2^log2_hashmap_size_4d."""
    time_resolution: int = -1
    """Cells along time of the 4D grids' finest level (the field's and the proposal networks'); -1: K-Planes' rule,
    half the number of training images (:func:`kplanes_time_resolution`: one image per instant, as in D-NeRF and
    monocular videos; set it for multi-camera captures); 0: max_res_4d, as along space (before: 2048 cells, most of
    them holding no training instant, so that held-out times fell in cells no training frame touched)."""
    time_smoothness_mult: float = 0.1
    """Weight of K-Planes' time-smoothness loss on the field's 4D grid (K-Planes on D-NeRF: 0.1; its proposal
    networks' 0.001 is not applied); 0 turns it off."""
    time_smoothness_samples: int = 4096
    """Points per step at which the time-smoothness loss compares the 4D grid one time cell apart."""
    lpips_loss_weight: float = 0.0
    """Weight of an LPIPS loss between the rendered and the target patches of a training batch (0: none). The batch's
    rays must be square patches of ``lpips_patch_size`` pixels, row by row (nerfstudio's patch sampler:
    ``--pipeline.datamanager.patch-size``); instruct4d sets 1, as the official NeRFPlayer-nerfacto."""
    lpips_patch_size: int = 32
    """Side of the patches the LPIPS loss reshapes a batch into (the official 32; equal to the datamanager's)."""
    lpips_weights: str = ALEXNET
    """Backbone of the LPIPS loss: a torchvision weights enum name (downloaded into the torch hub cache when absent)
    or a local state-dict file; AlexNet as the official (torchmetrics' LPIPS with its default net)."""


class Nerfacto4DModel(NerfactoModel):
    """Nerfacto whose field and proposal density fields take (x, y, z, t)."""

    config: Nerfacto4DModelConfig

    def populate_modules(self):
        time_resolution = self.config.time_resolution
        if time_resolution < 0:
            time_resolution = kplanes_time_resolution(self.num_train_data)
        field_4d = functools.partial(
            Nerfacto4DField,
            max_res_4d=self.config.max_res_4d,
            log2_hashmap_size_4d=self.config.log2_hashmap_size_4d,
            time_resolution=time_resolution,
        )
        density_4d = functools.partial(TimeHashMLPDensityField, time_resolution=time_resolution)
        # NerfactoModel.populate_modules builds its fields and torchmetrics' LPIPS (whose constructor downloads
        # AlexNet weights) by name: have it build the 4D fields and a lazy, never-downloading LPIPS instead, so the
        # proposal wiring stays nerfacto's own. (torchmetrics is imported here: ~1.5 s that method listing skips.)
        import torchmetrics.image.lpip

        with mock.patch.object(nerfacto, "NerfactoField", field_4d), mock.patch.object(
            nerfacto, "HashMLPDensityField", density_4d
        ), mock.patch.object(torchmetrics.image.lpip, "LearnedPerceptualImagePatchSimilarity", lambda **_: LazyLPIPS()):
            super().populate_modules()
        self.untimed_density_fns = self.density_fns
        # the LPIPS loss's network stays out of checkpoints; loaded by load_lpips_loss
        self.patch_lpips = LPIPSLoss(
            self.config.lpips_weights,
            field_name="--pipeline.model.lpips-weights",
            hint="--pipeline.model.lpips-loss-weight 0 trains without the LPIPS term",
        )

    def load_lpips_loss(self) -> None:
        """Loads the LPIPS loss's network when its term has weight; raises
        :class:`~ns_4d_methods.guidance.model_loading.WeightsUnavailableError` (one line) without the weights."""
        if self.config.lpips_loss_weight > 0:
            self.patch_lpips.load()

    def get_outputs(self, ray_bundle: RayBundle):
        if ray_bundle.times is None:
            ray_bundle.times = torch.zeros_like(ray_bundle.origins[..., :1])
        # nerfstudio's proposal sampler calls density_fns(positions) without times: bind this batch's ray times
        # ([rays, 1, 1], broadcast over each ray's samples). The viewer renders under the trainer's lock, so two
        # batches never share these.
        times = ray_bundle.times[..., None, :]
        self.density_fns = [functools.partial(fn, times=times) for fn in self.untimed_density_fns]
        return super().get_outputs(ray_bundle)

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        """nerfacto's losses, plus K-Planes' time smoothness of the field's 4D grid while training."""
        loss_dict = super().get_loss_dict(outputs, batch, metrics_dict)
        if self.training and self.config.time_smoothness_mult > 0 and isinstance(self.field, Nerfacto4DField):
            smoothness = self.field.mlp_base[0].time_smoothness(self.config.time_smoothness_samples)
            loss_dict["time_smoothness"] = self.config.time_smoothness_mult * smoothness
        if self.training and self.config.lpips_loss_weight > 0:
            loss_dict["lpips_loss"] = self.config.lpips_loss_weight * self.patch_lpips_loss(outputs, batch)
        return loss_dict

    def patch_lpips_loss(self, outputs, batch) -> torch.Tensor:
        """LPIPS of the rendered and target patches (on the same background as the RGB loss), inputs mapped to
        [-1, 1] as the official code does."""
        size = self.config.lpips_patch_size
        pred, target = self.renderer_rgb.blend_background_for_loss_computation(
            pred_image=outputs["rgb"], pred_accumulation=outputs["accumulation"],
            gt_image=batch["image"].to(self.device),
        )
        if pred.shape[0] % (size * size):
            raise ValueError(f"{pred.shape[0]} rays are not whole {size}x{size} patches: sample patches of that size")

        def patches(rgb: torch.Tensor) -> torch.Tensor:
            return rgb.reshape(-1, size, size, 3).permute(0, 3, 1, 2)

        return self.patch_lpips(patches(pred), patches(target))

    @torch.no_grad()
    def get_outputs_for_camera(self, camera: Cameras, obb_box: Optional[OrientedBox] = None) -> Dict[str, torch.Tensor]:
        # camera paths without times (ns-render interpolate) are placed in time along the dataset cameras
        if hasattr(self, "time_from_pose"):
            camera = self.time_from_pose.fill(camera)
        return super().get_outputs_for_camera(camera, obb_box=obb_box)

    def get_image_metrics_and_images(
        self, outputs: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
        gt_rgb = self.renderer_rgb.blend_background(batch["image"].to(self.device))
        predicted_rgb = outputs["rgb"]
        metrics_dict = image_metrics(gt_rgb, predicted_rgb, self.lpips)
        images_dict = {
            "img": torch.cat([gt_rgb, predicted_rgb], dim=1),
            "accumulation": colormaps.apply_colormap(outputs["accumulation"]),
            "depth": colormaps.apply_depth_colormap(outputs["depth"], accumulation=outputs["accumulation"]),
        }
        for i in range(self.config.num_proposal_iterations):
            images_dict[f"prop_depth_{i}"] = colormaps.apply_depth_colormap(
                outputs[f"prop_depth_{i}"], accumulation=outputs["accumulation"]
            )
        return metrics_dict, images_dict
