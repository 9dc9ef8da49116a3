"""4Diffusion's dynamic NeRF: nerfacto-4d's summed 3D + 4D hash grids under threestudio's implicit-volume heads,
with the regularisers and the anchor loss of the official system.

- **Field** (:class:`FourDiffusionField`): the 3D grid on (x, y, z) and the 4D grid on (x, y, z, t) (16 levels,
  2^19 entries, 2 features, resolution 16 -> 4096 each) are summed; a 64-wide one-hidden-layer MLP gives the density,
  another one the colour (sigmoid, view-independent). The density is ``softplus(raw + b(x))`` with threestudio's
  "blob_magic3d" bias ``b(x) = 10 (1 - |x| / 0.5)`` that starts the optimisation from a ball at the origin. Normals
  are the analytic ``-grad(density)`` (kept in the graph, so the orientation loss trains the field).
- **Sampling**: nerfacto-4d's time-aware proposal networks inside the scene box (256 + 96 proposal samples, 48
  field samples per ray, nerfacto's interlevel loss), the default on CUDA and on the CPU; white background. A kept
  deviation: the official code marches 256 samples per ray through a nerfacc occupancy grid, which has no CPU
  implementation; one sampler for both keeps the CPU-tested path the one that runs on the GPU.
- **Rendering many views with gradient** (:meth:`FourDiffusionModel.render_views`): rays are rendered in chunks of
  ``render_chunk_rays``, each under activation checkpointing, so the 32 SDS views hold only their pixels until the
  backward pass recomputes one chunk at a time.
- **Regularisers** (official config): orientation ``sum(sg(w) relu(n . d)^2) / #rays with opacity > 0`` on 4 views
  at one instant, weight 10 -> 1000 over steps 0-5000; sparsity ``mean(sqrt(opacity^2 + 0.01))``, weight 100;
  opacity entropy ``BCE(o, o)``, weight 0 -> 100 at step 10000; nerfacto's interlevel loss trains the proposals.
- **Anchor loss**: ``200 LPIPS(VGG) + 100 (1 - SSIM)`` between a render and an anchor frame (the official code adds
  its 100 / 50 weighted terms twice), LPIPS fed the [0, 1] images as the official code does. LPIPS's VGG16 backbone
  is loaded by ``anchor_lpips_weights`` (torchvision enum, downloaded into the torch hub cache, or a local file);
  without it training stops with one line naming the weights and ``--pipeline.model.anchor-lpips-weight 0``, which
  trains without the term.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple, Type
from unittest import mock

import torch
import torch.nn.functional as F
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.cameras.rays import RayBundle, RaySamples
from nerfstudio.field_components.field_heads import FieldHeadNames
from nerfstudio.field_components.mlp import MLP
from nerfstudio.fields.base_field import Field
from nerfstudio.model_components.losses import interlevel_loss
from nerfstudio.model_components.scene_colliders import AABBBoxCollider
from torch import Tensor, nn
from torch.nn import Parameter
from torch.utils.checkpoint import checkpoint

from ns_4d_methods.fields.nerfacto_4d_field import SpaceTimeFieldMixin, SpaceTimeHashEncoding
from ns_4d_methods.guidance.sds_schedule import ramp
from ns_4d_methods.models import nerfacto_4d
from ns_4d_methods.models.image_metrics import VGG16, LPIPSLoss
from ns_4d_methods.models.nerfacto_4d import Nerfacto4DModel, Nerfacto4DModelConfig


class FourDiffusionField(SpaceTimeFieldMixin, Field):
    """Summed 3D + 4D hash grids, a density MLP with the blob bias and a view-independent colour MLP."""

    def __init__(
        self,
        aabb: Tensor,
        num_levels: int = 16,
        base_res: int = 16,
        max_res: int = 4096,
        log2_hashmap_size: int = 19,
        features_per_level: int = 2,
        max_res_4d: int = 4096,
        log2_hashmap_size_4d: int = 19,
        hidden_dim: int = 64,
        num_layers: int = 2,
        density_blob_scale: float = 10.0,
        density_blob_std: float = 0.5,
        time_resolution: int = 0,
        implementation: Literal["tcnn", "torch"] = "tcnn",
    ) -> None:
        super().__init__()
        self.register_buffer("aabb", aabb)
        self.spatial_distortion = None
        # the 4D grid's levels share one resolution on all axes; scaling time gives its finest level
        # `time_resolution` cells along time (e.g. one per gap between the fitted instants)
        self.time_scale = time_resolution / max_res_4d if time_resolution > 0 else 1.0
        self.density_blob_scale = density_blob_scale
        self.density_blob_std = density_blob_std
        self.grids = SpaceTimeHashEncoding(
            num_levels,
            base_res,
            max_res,
            log2_hashmap_size,
            features_per_level,
            max_res_4d,
            log2_hashmap_size_4d,
            implementation=implementation,
        )

        # the heads are PyTorch MLPs whatever `implementation` says: the orientation loss differentiates the normals
        # (-grad density) again, and tiny-cuda-nn's fully fused MLPs have no double backward (only its grid encoding
        # has one); the official code also puts PyTorch MLPs on the tcnn encoding
        def head(out_dim: int, activation: Optional[nn.Module]) -> MLP:
            return MLP(
                in_dim=self.grids.get_out_dim(),
                num_layers=num_layers,
                layer_width=hidden_dim,
                out_dim=out_dim,
                activation=nn.ReLU(),
                out_activation=activation,
                implementation="torch",
            )

        self.density_mlp = head(1, None)
        self.colour_mlp = head(3, nn.Sigmoid())
        self._track_positions = False

    def get_density(self, ray_samples: RaySamples) -> Tuple[Tensor, Tensor]:
        world = ray_samples.frustums.get_positions()
        if self._track_positions:
            world = world.detach().requires_grad_(True)
            self._sample_locations = world
        positions = (world - self.aabb[0]) / (self.aabb[1] - self.aabb[0])
        inside = ((positions > 0.0) & (positions < 1.0)).all(dim=-1)
        positions = positions * inside[..., None]  # hash grids take inputs in [0, 1] only
        if ray_samples.times is None:
            times = torch.zeros_like(positions[..., :1])
        else:
            times = ray_samples.times.clamp(0.0, 1.0).expand(*positions.shape[:-1], 1)
        times = times * self.time_scale
        encoding = self.grids(torch.cat([positions, times], dim=-1).view(-1, 4)).view(*positions.shape[:-1], -1)
        raw = self.density_mlp(encoding.view(-1, encoding.shape[-1])).view(*positions.shape[:-1], 1)
        blob = self.density_blob_scale * (1.0 - world.norm(dim=-1, keepdim=True) / self.density_blob_std)
        density = F.softplus((raw + blob).float()) * inside[..., None]
        self._density_before_activation = density  # what get_normals differentiates (threestudio: the density)
        return density, encoding

    def get_outputs(self, ray_samples: RaySamples, density_embedding: Optional[Tensor] = None) -> Dict:
        assert density_embedding is not None
        rgb = self.colour_mlp(density_embedding.view(-1, density_embedding.shape[-1]))
        return {FieldHeadNames.RGB: rgb.view(*density_embedding.shape[:-1], 3).to(density_embedding)}

    def forward(self, ray_samples: RaySamples, compute_normals: bool = False) -> Dict:
        self._track_positions = compute_normals
        try:
            return super().forward(ray_samples, compute_normals=compute_normals)
        finally:
            self._track_positions = False

    def get_normals(self) -> Tensor:
        """Analytic normals ``-grad(density)``, differentiable (the orientation loss trains through them)."""
        assert self._sample_locations is not None and self._density_before_activation is not None
        gradient = torch.autograd.grad(
            self._density_before_activation,
            self._sample_locations,
            grad_outputs=torch.ones_like(self._density_before_activation),
            create_graph=True,
        )[0]
        return -F.normalize(gradient, dim=-1)


@dataclass
class FourDiffusionModelConfig(Nerfacto4DModelConfig):
    """The dynamic NeRF of 4Diffusion (grids, heads, regularisers, anchor loss). Sampling is nerfacto-4d's proposal
    sampler on CUDA and on the CPU (the official occupancy grid, nerfacc's, has no CPU implementation; see the
    module docstring)."""

    _target: Type = field(default_factory=lambda: FourDiffusionModel)
    max_res: int = 4096
    """Finest resolution of the 3D hash grid (16 levels from base_res 16)."""
    max_res_4d: int = 4096
    """Finest resolution of the 4D hash grid."""
    hidden_dim: int = 64
    """Width of the density and colour MLPs."""
    num_layers: int = 2
    """Linear layers of the density and colour MLPs (2: one hidden layer)."""
    density_blob_scale: float = 10.0
    """Height of the density bias ball at the origin (threestudio's blob_magic3d)."""
    density_blob_std: float = 0.5
    """Radius at which the density bias crosses zero."""
    time_resolution: int = 0
    """Cells of the 4D grid's finest level along time; 0: as many as along space (the official grid). The scene is
    only supervised at the fitted instants: with one cell per gap between them (instants - 1, e.g. 7) time is
    interpolated linearly between the instants, while the official grid leaves the times in between unconstrained."""
    background_color: Literal["random", "last_sample", "black", "white"] = "white"
    """Background colour (4Diffusion: white)."""
    disable_scene_contraction: bool = True
    """The object lives in the scene box: no contraction."""
    near_plane: float = 0.05
    """Nearest sample distance; rays are clipped to the scene box."""
    proposal_initial_sampler: Literal["piecewise", "uniform"] = "uniform"
    """Initial proposal samples spread uniformly inside the box."""
    use_appearance_embedding: bool = False
    """No per-image appearance codes (the cameras are invented)."""
    distortion_loss_mult: float = 0.0
    """Not in 4Diffusion."""
    orientation_weight: Tuple[float, float, float, float] = (0, 10.0, 1000.0, 5000)
    """Orientation loss weight: (start_step, start_value, end_value, end_step)."""
    sparsity_weight: float = 100.0
    """Weight of the sparsity loss mean(sqrt(opacity^2 + 0.01))."""
    opaque_weight: Tuple[float, float, float, float] = (10000, 0.0, 100.0, 10001)
    """Weight of the opacity entropy BCE(o, o): (start_step, start_value, end_value, end_step)."""
    anchor_lpips_weight: float = 200.0
    """Weight of LPIPS(VGG) in the anchor loss (0: no LPIPS term, no VGG weights needed). The official weight: its
    config's 100, added twice. Like the official code, LPIPS is fed the images in [0, 1] as they are (the network
    was trained on [-1, 1]); the weight 200 was tuned with that input."""
    anchor_lpips_weights: str = VGG16
    """Backbone of the anchor loss's LPIPS: a torchvision weights enum name (downloaded into the torch hub cache
    when absent) or a local state-dict file (the official: VGG16's ImageNet weights)."""
    anchor_ssim_weight: float = 100.0
    """Weight of 1 - SSIM in the anchor loss."""
    render_chunk_rays: int = 1 << 15
    """Rays per chunk when rendering training views with gradient."""
    checkpoint_chunks: bool = True
    """Recompute each chunk in the backward pass instead of keeping its activations (less memory, more time)."""


class FourDiffusionModel(Nerfacto4DModel):
    """nerfacto-4d's sampling with :class:`FourDiffusionField`, chunked differentiable renders and the losses."""

    config: FourDiffusionModelConfig

    def populate_modules(self) -> None:
        config = self.config

        def field_factory(aabb: Tensor, **kwargs) -> FourDiffusionField:
            # nerfacto's field arguments (colour head, appearance codes, normals MLP) do not apply to this field
            return FourDiffusionField(
                aabb,
                num_levels=config.num_levels,
                base_res=config.base_res,
                max_res=config.max_res,
                log2_hashmap_size=config.log2_hashmap_size,
                features_per_level=config.features_per_level,
                max_res_4d=config.max_res_4d,
                log2_hashmap_size_4d=config.log2_hashmap_size_4d,
                hidden_dim=config.hidden_dim,
                num_layers=config.num_layers,
                density_blob_scale=config.density_blob_scale,
                density_blob_std=config.density_blob_std,
                time_resolution=config.time_resolution,
                implementation=config.implementation,
            )

        with mock.patch.object(nerfacto_4d, "Nerfacto4DField", field_factory):
            super().populate_modules()
        self.collider = AABBBoxCollider(self.scene_box, near_plane=config.near_plane)
        # LPIPS(VGG) for the anchor loss (its network stays out of checkpoints); loaded by load_anchor_lpips
        self.anchor_lpips = LPIPSLoss(
            config.anchor_lpips_weights,
            field_name="--pipeline.model.anchor-lpips-weights",
            hint="--pipeline.model.anchor-lpips-weight 0 trains without the LPIPS term",
            rescale_input=False,
        )

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        field_ = self.field
        assert isinstance(field_, FourDiffusionField)
        return {
            "proposal_networks": list(self.proposal_networks.parameters()),
            "grids": list(field_.grids.parameters()),
            "mlps": [*field_.density_mlp.parameters(), *field_.colour_mlp.parameters()],
        }

    # ---- rendering -------------------------------------------------------------------------------------------------
    def _bind_times(self, ray_bundle: RayBundle) -> None:
        if ray_bundle.times is None:
            ray_bundle.times = torch.zeros_like(ray_bundle.origins[..., :1])
        times = ray_bundle.times[..., None, :]
        self.density_fns = [functools.partial(fn, times=times) for fn in self.untimed_density_fns]

    def _render_rays(self, ray_bundle: RayBundle, with_normals: bool) -> Dict[str, Tensor]:
        """rgb, accumulation, the interlevel loss (mean over the rays) and, with normals, the orientation terms."""
        self._bind_times(ray_bundle)
        ray_samples, weights_list, ray_samples_list = self.proposal_sampler(ray_bundle, density_fns=self.density_fns)
        field_outputs = self.field.forward(ray_samples, compute_normals=with_normals)
        weights = ray_samples.get_weights(field_outputs[FieldHeadNames.DENSITY])
        weights_list.append(weights)
        ray_samples_list.append(ray_samples)
        outputs = {
            "rgb": self.renderer_rgb(rgb=field_outputs[FieldHeadNames.RGB], weights=weights),
            "accumulation": self.renderer_accumulation(weights=weights),
            "interlevel": interlevel_loss(weights_list, ray_samples_list),
        }
        if with_normals:
            facing = (field_outputs[FieldHeadNames.NORMALS] * ray_bundle.directions[..., None, :]).sum(-1, keepdim=True)
            outputs["orientation_sum"] = (weights.detach() * facing.clamp_min(0.0) ** 2).sum(dim=(-2, -1))
        return outputs

    def render_views(self, cameras: Cameras, with_normals: bool = False) -> Dict[str, Tensor]:
        """Renders ``cameras`` [N] (equal sizes) with gradient, in checkpointed chunks of rays.

        Returns ``rgb`` [N, 3, H, W], ``accumulation`` [N, 1, H, W], ``interlevel`` (scalar) and, with normals,
        ``orientation`` (threestudio's orientation loss over these views).
        """
        cameras = cameras.to(self.device)
        count, height, width = len(cameras), int(cameras.height[0]), int(cameras.width[0])
        rays = cameras.generate_rays(camera_indices=torch.arange(count, device=self.device)[:, None])
        rays = rays.flatten()  # [H * W * N], camera fastest
        if self.collider is not None:
            rays = self.collider(rays)
        sampler = self.proposal_sampler
        # nerfacto's proposal sampler decides per call whether its networks get gradients and then resets its
        # counter: every chunk (and its recomputation) must see the counter this step started with
        counter = sampler._steps_since_update  # pylint: disable=protected-access

        def chunk_outputs(chunk: RayBundle) -> Dict[str, Tensor]:
            sampler._steps_since_update = counter  # pylint: disable=protected-access
            return self._render_rays(chunk, with_normals)

        chunks = []
        for start in range(0, len(rays), self.config.render_chunk_rays):
            chunk = rays[start : start + self.config.render_chunk_rays]
            if self.config.checkpoint_chunks and torch.is_grad_enabled():
                chunks.append(checkpoint(chunk_outputs, chunk, use_reentrant=False))
            else:
                chunks.append(chunk_outputs(chunk))
        sizes = torch.tensor([len(c["rgb"]) for c in chunks], dtype=torch.float32, device=self.device)

        def image(name: str, channels: int) -> Tensor:
            flat = torch.cat([c[name] for c in chunks])
            return flat.view(height, width, count, channels).permute(2, 3, 0, 1)

        outputs = {
            "rgb": image("rgb", 3),
            "accumulation": image("accumulation", 1),
            "interlevel": (torch.stack([c["interlevel"] for c in chunks]) * sizes).sum() / sizes.sum(),
        }
        if with_normals:
            covered = (outputs["accumulation"] > 0).sum().clamp_min(1)
            outputs["orientation"] = torch.cat([c["orientation_sum"] for c in chunks]).sum() / covered
        return outputs

    # ---- losses ----------------------------------------------------------------------------------------------------
    def regularisers(
        self, views: Dict[str, Tensor], normal_views: Optional[Dict[str, Tensor]], step: int
    ) -> Dict[str, Tensor]:
        """Weighted regularisers of the SDS views' outputs (and of the normal views' orientation term) at ``step``."""
        config = self.config
        opacity = views["accumulation"]
        losses = {"interlevel": config.interlevel_loss_mult * views["interlevel"]}
        if config.sparsity_weight > 0:
            losses["sparsity"] = config.sparsity_weight * (opacity**2 + 0.01).sqrt().mean()
        opaque = ramp(config.opaque_weight, step)
        if opaque > 0:
            clamped = opacity.clamp(1.0e-3, 1.0 - 1.0e-3)
            losses["opaque"] = opaque * F.binary_cross_entropy(clamped, clamped)
        orientation = ramp(config.orientation_weight, step)
        if normal_views is not None and orientation > 0:
            losses["orientation"] = orientation * normal_views["orientation"]
            losses["interlevel"] = losses["interlevel"] + config.interlevel_loss_mult * normal_views["interlevel"]
        return losses

    @property
    def orientation_active(self) -> bool:
        """Whether the orientation loss has any weight at some step (else its normal renders are skipped)."""
        weights = self.config.orientation_weight
        return max(weights[1], weights[2]) > 0

    def load_anchor_lpips(self) -> None:
        """Loads the anchor loss's LPIPS when its term has weight; raises
        :class:`~ns_4d_methods.guidance.model_loading.WeightsUnavailableError` (one line) without the weights."""
        if self.config.anchor_lpips_weight > 0:
            self.anchor_lpips.load()

    def anchor_loss(self, render: Tensor, anchor: Tensor) -> Dict[str, Tensor]:
        """``lpips_weight LPIPS + ssim_weight (1 - SSIM)`` of a render and an anchor frame, both [N, 3, H, W] in
        [0, 1]."""
        config = self.config
        losses = {}
        if config.anchor_ssim_weight > 0:
            from torchmetrics.functional.image import structural_similarity_index_measure  # imported when used

            ssim = structural_similarity_index_measure(render.float(), anchor.float(), data_range=1.0)
            losses["anchor_ssim"] = config.anchor_ssim_weight * (1.0 - ssim)
        if config.anchor_lpips_weight > 0:
            losses["anchor_lpips"] = config.anchor_lpips_weight * self.anchor_lpips(render, anchor)
        return losses
