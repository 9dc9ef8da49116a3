"""Nerfacto's fields made time-aware: a 3D hash grid on (x, y, z) summed with a 4D hash grid on (x, y, z, t).

4Diffusion's dynamic NeRF sums the features of a static grid and a spatio-temporal grid before the density MLP: the
static grid carries what stays put, the 4D grid what moves. The same sum feeds nerfacto's colour head (SH view
direction encoding, appearance embedding) and, with smaller grids, the proposal density fields, so that proposal
sampling follows the moving geometry too.
"""

from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch
from jaxtyping import Float, Shaped
from nerfstudio.cameras.rays import Frustums, RaySamples
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.field_components.activations import trunc_exp
from nerfstudio.field_components.encodings import Encoding
from nerfstudio.field_components.mlp import MLP
from nerfstudio.field_components.spatial_distortions import SpatialDistortion
from nerfstudio.fields.density_fields import HashMLPDensityField
from nerfstudio.fields.nerfacto_field import NerfactoField
from torch import Tensor, nn

from ns_4d_methods.fields.hash_grid_4d import HashEncodingND


def kplanes_time_resolution(num_instants: int) -> int:
    """Cells along time of a 4D grid's finest level for a scene seen at ``num_instants`` instants: half of them
    (K-Planes on D-NeRF: 25 for Lego's 50 frames, 100 for Jumping Jacks' 200), so that every cell holds about two
    training instants and a held-out time between them lands in a cell they constrain."""
    return max(1, round(num_instants / 2))


class SpaceTimeHashEncoding(Encoding):
    """Sum of a 3D hash encoding of (x, y, z) and a 4D hash encoding of (x, y, z, t); input [..., 4] in [0, 1].

    Both grids have the same levels, base resolution and features per level (so their features add); the 4D grid
    has its own finest resolution and table size. Both are :class:`HashEncodingND`, whose PyTorch path is also the
    faster one for three dimensions on the CPU. The 4D grid's levels have one resolution on all axes: time is
    scaled by ``time_resolution / max_res_4d`` first, so that its finest level has ``time_resolution`` cells along
    time (0: ``max_res_4d``, as along space; at most ``max_res_4d``).
    """

    def __init__(
        self,
        num_levels: int,
        base_res: int,
        max_res: int,
        log2_hashmap_size: int,
        features_per_level: int,
        max_res_4d: int,
        log2_hashmap_size_4d: int,
        implementation: Literal["tcnn", "torch"] = "tcnn",
        time_resolution: int = 0,
    ) -> None:
        super().__init__(in_dim=4)
        # at most max_res_4d, so that scaled times stay in [0, 1] (tiny-cuda-nn's grids take nothing else)
        self.time_resolution = min(time_resolution, max_res_4d) if time_resolution > 0 else max_res_4d
        self.time_scale = self.time_resolution / max_res_4d
        self.grid_3d = HashEncodingND(
            3, num_levels, base_res, max_res, log2_hashmap_size, features_per_level, implementation=implementation
        )
        self.grid_4d = HashEncodingND(
            4, num_levels, base_res, max_res_4d, log2_hashmap_size_4d, features_per_level, implementation=implementation
        )

    def get_out_dim(self) -> int:
        return self.grid_4d.get_out_dim()

    def _space_time(self, positions: Tensor, times: Tensor) -> Tensor:
        return self.grid_4d(torch.cat([positions, times * self.time_scale], dim=-1))

    def forward(self, in_tensor: Float[Tensor, "*bs 4"]) -> Float[Tensor, "*bs output_dim"]:
        return self.grid_3d(in_tensor[..., :3]) + self._space_time(in_tensor[..., :3], in_tensor[..., 3:])

    def time_smoothness(self, num_samples: int) -> Tensor:
        """K-Planes' time-smoothness regulariser for a hash grid: the mean squared second difference along time of
        the 4D grid's features, one finest time cell apart, at ``num_samples`` points uniform in space and time
        (K-Planes sums it over every cell of its time planes; uniform samples weigh every cell alike)."""
        device = self.grid_4d.primes.device
        positions = torch.rand(num_samples, 3, device=device)
        step = 1.0 / self.time_resolution
        times = step + torch.rand(num_samples, 1, device=device) * max(1.0 - 2 * step, 0.0)
        before, now, after = (self._space_time(positions, times + shift) for shift in (-step, 0.0, step))
        return ((after - 2 * now + before) ** 2).mean()


class SpaceTimeFieldMixin:
    """Space-time inputs for a field with ``aabb`` and ``spatial_distortion``, and a ``density_fn`` that keeps time."""

    aabb: Tensor
    spatial_distortion: Optional[SpatialDistortion]

    def space_time_inputs(self, ray_samples: RaySamples) -> Tuple[Tensor, Tensor, Tensor]:
        """Sample positions in [0, 1]^3 (zeroed outside the scene), their times [..., 1] and the inside mask."""
        if self.spatial_distortion is not None:
            positions = (self.spatial_distortion(ray_samples.frustums.get_positions()) + 2.0) / 4.0
        else:
            positions = SceneBox.get_normalized_positions(ray_samples.frustums.get_positions(), self.aabb)
        # Hash grids (tcnn in particular) take inputs in [0, 1] only.
        selector = ((positions > 0.0) & (positions < 1.0)).all(dim=-1)
        positions = positions * selector[..., None]
        if ray_samples.times is None:
            times = torch.zeros_like(positions[..., :1])
        else:
            times = ray_samples.times.clamp(0.0, 1.0).expand(*positions.shape[:-1], 1)
        return positions, times, selector

    def density_fn(
        self, positions: Shaped[Tensor, "*bs 3"], times: Optional[Shaped[Tensor, "*bs 1"]] = None
    ) -> Shaped[Tensor, "*bs 1"]:
        """Density at ``positions`` and ``times`` (broadcastable; None -> time 0), e.g. for proposal sampling."""
        ray_samples = RaySamples(
            frustums=Frustums(
                origins=positions,
                directions=torch.ones_like(positions),
                starts=torch.zeros_like(positions[..., :1]),
                ends=torch.zeros_like(positions[..., :1]),
                pixel_area=torch.ones_like(positions[..., :1]),
            ),
            times=times,
        )
        density, _ = self.get_density(ray_samples)  # type: ignore[attr-defined]
        return density


class Nerfacto4DField(SpaceTimeFieldMixin, NerfactoField):
    """Nerfacto's field whose density and geometry features come from the summed 3D and 4D hash grids.

    Takes NerfactoField's arguments (the 3D grid's sizes, the MLPs, embeddings, normals) plus the 4D grid's table
    size, finest resolution and cells along time (:class:`SpaceTimeHashEncoding`); the 4D grid shares the 3D
    grid's levels, base resolution and features per level so that the two can be summed.
    """

    def __init__(
        self,
        aabb: Tensor,
        num_images: int,
        num_layers: int = 2,
        hidden_dim: int = 64,
        geo_feat_dim: int = 15,
        num_levels: int = 16,
        base_res: int = 16,
        max_res: int = 2048,
        log2_hashmap_size: int = 19,
        features_per_level: int = 2,
        max_res_4d: int = 2048,
        log2_hashmap_size_4d: int = 19,
        time_resolution: int = 0,
        implementation: Literal["tcnn", "torch"] = "tcnn",
        **nerfacto_kwargs,
    ) -> None:
        super().__init__(
            aabb,
            num_images,
            num_layers=num_layers,
            hidden_dim=hidden_dim,
            geo_feat_dim=geo_feat_dim,
            num_levels=num_levels,
            base_res=base_res,
            max_res=max_res,
            log2_hashmap_size=log2_hashmap_size,
            features_per_level=features_per_level,
            implementation=implementation,
            **nerfacto_kwargs,
        )
        grids = SpaceTimeHashEncoding(
            num_levels,
            base_res,
            max_res,
            log2_hashmap_size,
            features_per_level,
            max_res_4d,
            log2_hashmap_size_4d,
            implementation=implementation,
            time_resolution=time_resolution,
        )
        # Replaces NerfactoField's fused 3D hash MLP: the grids must be summed before the MLP, which tcnn's fused
        # network cannot do.
        self.mlp_base = nn.Sequential(
            grids,
            MLP(
                in_dim=grids.get_out_dim(),
                num_layers=num_layers,
                layer_width=hidden_dim,
                out_dim=1 + geo_feat_dim,
                activation=nn.ReLU(),
                out_activation=None,
                implementation=implementation,
            ),
        )

    def get_density(self, ray_samples: RaySamples) -> Tuple[Tensor, Tensor]:
        positions, times, selector = self.space_time_inputs(ray_samples)
        # NerfactoField.get_normals differentiates the density with respect to these positions.
        self._sample_locations = positions
        if not self._sample_locations.requires_grad:
            self._sample_locations.requires_grad = True
        h = self.mlp_base(torch.cat([positions, times], dim=-1).view(-1, 4)).view(*ray_samples.frustums.shape, -1)
        density_before_activation, base_mlp_out = torch.split(h, [1, self.geo_feat_dim], dim=-1)
        self._density_before_activation = density_before_activation
        # exp rectification as in nerfacto (stable with half-precision grids)
        density = self.average_init_density * trunc_exp(density_before_activation.to(positions))
        return density * selector[..., None], base_mlp_out


class TimeHashMLPDensityField(SpaceTimeFieldMixin, HashMLPDensityField):
    """Nerfacto's proposal density field with a 4D grid (same sizes, ``time_resolution`` cells along time) added to
    its 3D grid."""

    def __init__(
        self,
        aabb: Tensor,
        num_layers: int = 2,
        hidden_dim: int = 64,
        spatial_distortion: Optional[SpatialDistortion] = None,
        use_linear: bool = False,
        num_levels: int = 8,
        max_res: int = 1024,
        base_res: int = 16,
        log2_hashmap_size: int = 18,
        features_per_level: int = 2,
        average_init_density: float = 1.0,
        implementation: Literal["tcnn", "torch"] = "tcnn",
        time_resolution: int = 0,
    ) -> None:
        super().__init__(
            aabb,
            num_layers=num_layers,
            hidden_dim=hidden_dim,
            spatial_distortion=spatial_distortion,
            use_linear=use_linear,
            num_levels=num_levels,
            max_res=max_res,
            base_res=base_res,
            log2_hashmap_size=log2_hashmap_size,
            features_per_level=features_per_level,
            average_init_density=average_init_density,
            implementation=implementation,
        )
        # replaces the 3D encoding HashMLPDensityField built (the MLP or linear head after it is kept)
        self.encoding = SpaceTimeHashEncoding(
            num_levels,
            base_res,
            max_res,
            log2_hashmap_size,
            features_per_level,
            max_res_4d=max_res,
            log2_hashmap_size_4d=log2_hashmap_size,
            implementation=implementation,
            time_resolution=time_resolution,
        )
        if not use_linear:
            self.mlp_base = nn.Sequential(self.encoding, self.mlp_base[1])

    def get_density(self, ray_samples: RaySamples) -> Tuple[Tensor, None]:
        positions, times, selector = self.space_time_inputs(ray_samples)
        inputs = torch.cat([positions, times], dim=-1).view(-1, 4)
        if self.use_linear:
            density_before_activation = self.linear(self.encoding(inputs).to(positions))
        else:
            density_before_activation = self.mlp_base(inputs).to(positions)
        density_before_activation = density_before_activation.view(*ray_samples.frustums.shape, -1)
        density = self.average_init_density * trunc_exp(density_before_activation)
        return density * selector[..., None], None
