"""4Real's deformable Gaussians: splatfacto-4d's canonical Gaussians and temporal deformation MLP, plus a per-frame
deformation for the freeze-time video.

A camera is rendered in one of three ways, chosen by what it carries:

- ``metadata["freeze_frame"] = k``: freeze-time frame k, the canonical Gaussians moved by the per-frame deformation
  of frame k (:class:`~ns_4d_methods.fields.per_frame_deformation.PerFrameDeformation`; zero at the canonical frame);
- a time, once the temporal stage has begun (``temporal = True``, the default outside training): the canonical
  Gaussians moved to that time by splatfacto-4d's :class:`~ns_4d_methods.fields.deformation_field.DeformationField`,
  pinned to zero at the canonical time: D(x, t) - D(x, t_c), so that stage 5 cannot move the canonical scene;
- otherwise: the canonical Gaussians as they are (the canonical stage's viewer and multi-view SDS renders).

Losses follow the frame. Every frame: splatfacto's L1 + 0.2 D-SSIM (3DGS). A freeze-time frame (stage 4, and still
in stage 5): plus the small-motion loss of its per-frame deformation. A reference frame (stage 5): plus L_norm,
L_diff, L_rigid and L_rot (:mod:`ns_4d_methods.models.gaussian_regularisers`, neighbours on the canonical centres)
between the frame's time and the previous frame's. :meth:`render_path` renders a video SDS camera path over one
background colour (a random background per frame would flicker across the clip the video model scores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ns_4d_methods.fields.per_frame_deformation import PerFrameDeformation
from ns_4d_methods.models.gaussian_regularisers import (
    Neighbours,
    difference_loss,
    nearest_neighbours,
    rigidity_loss,
    rotation_loss,
    small_motion_loss,
)
from ns_4d_methods.models.splatfacto_4d import Splatfacto4DModel, Splatfacto4DModelConfig

Offsets = Tuple[Tensor, Tensor, Tensor]


@dataclass
class FourRealModelConfig(Splatfacto4DModelConfig):
    """Deformable Gaussians with a per-frame deformation for the freeze-time video (4Real). The temporal deformation
    starts with stage 5 (the pipeline's ``temporal_steps``), so splatfacto-4d's ``deformation_warmup`` is not used.

    Scale offsets: 4real adds them to the log-scales through splatfacto-4d's shared deformation application (the
    official Deformable-3DGS adds them after the exponential); it follows splatfacto-4d there, so that both methods
    change together."""

    _target: Type = field(default_factory=lambda: FourRealModel)
    per_frame_code_dim: int = 32
    """Size of each freeze-time frame's deformation code (not stated by the paper)."""
    per_frame_num_layers: int = 3
    """Hidden layers of the per-frame deformation MLP."""
    per_frame_layer_width: int = 128
    """Width of the per-frame deformation MLP."""
    small_motion_weight: float = 1.0
    """Weight of the small-motion (L1) loss on the per-frame deformations."""
    norm_weight: float = 0.01
    """Weight of L_norm, the L1 of the temporal deformation (4Real: 0.01)."""
    diff_weight: float = 0.01
    """Weight of L_diff, the change of the centre offsets between neighbouring times (4Real: 0.01)."""
    rigid_weight: float = 0.01
    """Weight of L_rigid, local rigidity between neighbouring times (4Real: 0.01)."""
    rotation_weight: float = 0.01
    """Weight of L_rot, neighbours' rotations agreeing (4Real: 0.01)."""
    num_neighbours: int = 20
    """Nearest canonical neighbours per Gaussian for L_rigid and L_rot (Dynamic 3D Gaussians: 20)."""
    neighbour_weight_lambda: float = 2000.0
    """lambda of the neighbour weights exp(-lambda d^2), d in metres (Dynamic 3D Gaussians: 2000)."""
    metres_per_unit: float = 2.0
    """Metres per scene unit for those weights: structure from motion has no scale, and the scene is normalised so
    that the reference camera is one unit from what it looks at; 2: it stands two metres away."""


class FourRealModel(Splatfacto4DModel):
    """splatfacto-4d with 4Real's per-frame deformation, stage-dependent losses and video SDS path renders.

    ``metadata`` (from the datamanager's train dataset) gives ``freeze_frames`` (frames of the freeze-time video) and
    ``canonical_freeze_frame`` (its canonical frame).
    """

    config: FourRealModelConfig

    def populate_modules(self) -> None:
        super().populate_modules()
        config = self.config
        self.per_frame_deformation = PerFrameDeformation(
            num_frames=int(self.kwargs["metadata"]["freeze_frames"]),
            canonical_frame=int(self.kwargs["metadata"]["canonical_freeze_frame"]),
            code_dim=config.per_frame_code_dim,
            num_layers=config.per_frame_num_layers,
            layer_width=config.per_frame_layer_width,
            position_frequencies=config.position_frequencies,
        )
        self.temporal = True
        """Whether times deform the Gaussians (the pipeline turns it off for the canonical stage)."""
        self.canonical_time = float(self.kwargs["metadata"].get("canonical_time", 0.0))
        """Time of the canonical frame, where the temporal deformation is zero."""
        self._freeze_frame: Optional[int] = None
        self._path_offsets: Optional[Dict[float, Offsets]] = None  # while a video SDS path renders
        self._path_background: Optional[Tensor] = None  # one background for all of a path's renders
        self._offsets: Optional[Offsets] = None
        self._neighbours: Optional[Neighbours] = None

    def get_param_groups(self):
        groups = super().get_param_groups()
        groups["per_frame_deformation"] = list(self.per_frame_deformation.parameters())
        return groups

    # ---- deformation -------------------------------------------------------------------------------------------------
    def offsets_at(self, time: float) -> Offsets:
        """The temporal deformation's offsets of every Gaussian at ``time``: D(x, time) - D(x, t_c), exactly zero at
        the canonical time."""
        canonical = self._raw_offsets(self.canonical_time)
        return tuple(a - b for a, b in zip(self._raw_offsets(time), canonical))  # type: ignore[return-value]

    def _raw_offsets(self, time: float) -> Offsets:
        """The deformation network's output for every Gaussian at ``time`` (canonical centres as fixed inputs).

        While a video SDS path renders, each time is evaluated once (a multi-view path's 16 renders share one) and
        checkpointed: the MLP's activations are recomputed in the backward pass instead of being kept for every
        render (16 x 8 layers x 256 values per Gaussian otherwise)."""
        times = torch.full((self.num_points, 1), float(time), device=self.means.device)
        if self._path_offsets is None:
            return self.deformation_field(self.means.detach(), times)
        if time not in self._path_offsets:
            means = self.means.detach()
            self._path_offsets[time] = checkpoint(self.deformation_field, means, times, use_reentrant=False)
        return self._path_offsets[time]

    def deform(self, time: float) -> Tuple[Tensor, Tensor, Tensor]:
        means, quats, log_scales = self.means, self.quats, self.scales
        if self._freeze_frame is not None:
            offsets = self.per_frame_deformation(means.detach(), self._freeze_frame)
        elif self.temporal:
            offsets = self.offsets_at(time)
        else:
            self._offsets = None
            return means, quats, log_scales
        self._offsets = offsets
        return means + offsets[0], F.normalize(quats, dim=-1) + offsets[1], log_scales + offsets[2]

    def get_outputs(self, camera: Cameras):
        metadata = camera.metadata or {}
        frame = metadata.get("freeze_frame")
        self._freeze_frame = None if frame is None else int(torch.as_tensor(frame).reshape(-1)[0])
        try:
            return super().get_outputs(camera)
        finally:
            self._freeze_frame = None

    def _get_background_color(self) -> Tensor:
        return self._path_background if self._path_background is not None else super()._get_background_color()

    def _get_downscale_factor(self) -> int:
        return 1 if self._path_offsets is not None else super()._get_downscale_factor()

    def render_path(self, path: Cameras) -> Tensor:
        """Renders [F, 3, H, W] of a video SDS path's cameras 1.. (camera 0 saw the real conditioning frame), at the
        path's full resolution whatever splatfacto's coarse-to-fine schedule says (the prior takes that size)."""
        self._path_offsets = {}
        self._path_background = super()._get_background_color()  # "random": one draw for the whole path
        try:
            frames = [self.get_outputs(path[k : k + 1].to(self.device))["rgb"] for k in range(1, len(path))]
        finally:
            self._path_offsets = self._path_background = None
        return torch.stack(frames).permute(0, 3, 1, 2)

    # ---- losses ------------------------------------------------------------------------------------------------------
    def neighbours(self) -> Neighbours:
        """Nearest canonical neighbours, found again whenever densification changed the Gaussians."""
        if self._neighbours is None or self._neighbours.indices.shape[0] != self.num_points:
            config = self.config
            self._neighbours = nearest_neighbours(
                self.means, config.num_neighbours, config.neighbour_weight_lambda, config.metres_per_unit
            )
        return self._neighbours

    def temporal_regularisers(self, offsets: Offsets, previous_time: float) -> Dict[str, Tensor]:
        """L_norm, L_diff, L_rigid and L_rot (weighted) between the ``offsets`` just rendered and ``previous_time``."""
        config = self.config
        previous = self.offsets_at(previous_time)
        means, quats = self.means, F.normalize(self.quats, dim=-1)
        neighbours = self.neighbours()
        current_means, current_quats = means + offsets[0], quats + offsets[1]
        previous_means, previous_quats = means + previous[0], quats + previous[1]
        return {
            "norm_loss": config.norm_weight * small_motion_loss(*offsets),
            "diff_loss": config.diff_weight * difference_loss(offsets[0], previous[0]),
            "rigid_loss": config.rigid_weight
            * rigidity_loss(current_means, current_quats, previous_means, previous_quats, neighbours),
            "rotation_loss": config.rotation_weight * rotation_loss(current_quats, previous_quats, neighbours),
        }

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        """L1 + 0.2 D-SSIM, plus the small-motion loss (a freeze-time frame) or the motion regularisers (a reference
        frame with ``previous_time``)."""
        losses = super().get_loss_dict(outputs, batch, metrics_dict)
        offsets = self._offsets
        if "freeze_frame" in batch:
            if offsets is not None:
                losses["small_motion_loss"] = self.config.small_motion_weight * small_motion_loss(*offsets)
        elif "previous_time" in batch and offsets is not None:
            losses.update(self.temporal_regularisers(offsets, float(batch["previous_time"])))
        return losses
