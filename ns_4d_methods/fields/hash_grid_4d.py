"""Multiresolution hash encoding of N-dimensional inputs, e.g. (x, y, z, t) for the 4D grid of a dynamic NeRF.

nerfstudio's :class:`HashEncoding` hard-wires three input dimensions in both of its paths. :class:`HashEncodingND`
keeps its level layout (resolutions from the growth factor, one table slice per level, the same initialisation and
tcnn config) and generalises the rest: tiny-cuda-nn with ``n_input_dims=N`` when importable, otherwise a PyTorch path
that hashes each of the 2^N cell corners with instant-ngp's per-dimension primes and interpolates multilinearly.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float
from nerfstudio.field_components.encodings import HashEncoding
from nerfstudio.utils.external import TCNN_EXISTS, tcnn
from nerfstudio.utils.printing import print_tcnn_speed_warning
from torch import Tensor

# instant-ngp's spatial hash primes, one per input dimension (the first three are the ones nerfstudio uses).
HASH_PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)


class HashEncodingND(HashEncoding):
    """Hash encoding of ``in_dim``-dimensional inputs in [0, 1]; arguments as nerfstudio's :class:`HashEncoding`.

    Args:
        in_dim: Number of input dimensions (at most 7).
        num_levels: Number of feature grids.
        min_res: Resolution of smallest feature grid.
        max_res: Resolution of largest feature grid.
        log2_hashmap_size: Size of hash map is 2^log2_hashmap_size.
        features_per_level: Number of features per level.
        hash_init_scale: Value to initialize hash grid.
        implementation: tcnn when importable, torch otherwise.
    """

    def __init__(
        self,
        in_dim: int = 4,
        num_levels: int = 16,
        min_res: int = 16,
        max_res: int = 1024,
        log2_hashmap_size: int = 19,
        features_per_level: int = 2,
        hash_init_scale: float = 0.001,
        implementation: Literal["tcnn", "torch"] = "tcnn",
    ) -> None:
        if not 1 <= in_dim <= len(HASH_PRIMES):
            raise ValueError(f"HashEncodingND takes 1 to {len(HASH_PRIMES)} input dimensions, got {in_dim}")
        # HashEncoding's tcnn branch is fixed to three inputs: it builds the torch table, replaced below under tcnn.
        super().__init__(
            num_levels=num_levels,
            min_res=min_res,
            max_res=max_res,
            log2_hashmap_size=log2_hashmap_size,
            features_per_level=features_per_level,
            hash_init_scale=hash_init_scale,
            implementation="torch",
        )
        self.set_in_dim(in_dim)
        self.register_buffer("primes", torch.tensor(HASH_PRIMES[:in_dim], dtype=torch.int64), persistent=False)
        # HashEncoding keeps these as plain tensors, copied to the input's device on every call: as buffers they
        # move with the module once (not part of the checkpoint, so older checkpoints load unchanged)
        for name in ("scalings", "hash_offset"):
            value = getattr(self, name)
            delattr(self, name)
            self.register_buffer(name, value, persistent=False)
        if implementation == "tcnn" and TCNN_EXISTS:
            self.hash_table = None  # the tcnn grid holds the parameters
            self.tcnn_encoding = tcnn.Encoding(
                n_input_dims=in_dim,
                encoding_config=self.get_tcnn_encoding_config(
                    num_levels=self.num_levels,
                    features_per_level=self.features_per_level,
                    log2_hashmap_size=self.log2_hashmap_size,
                    min_res=self.min_res,
                    growth_factor=self.growth_factor,
                ),
            )
        elif implementation == "tcnn":
            print_tcnn_speed_warning("HashEncodingND")

    def pytorch_fwd(self, in_tensor: Float[Tensor, "*bs input_dim"]) -> Float[Tensor, "*bs output_dim"]:
        """Multilinear interpolation of the hashed corner features of every level's enclosing cell."""
        assert in_tensor.shape[-1] == self.in_dim
        scaled = in_tensor[..., None, :] * self.scalings.view(-1, 1)  # [..., L, N]
        lower = torch.floor(scaled)
        upper = torch.ceil(scaled)
        offset = scaled - lower
        lower_hash = lower.long() * self.primes
        upper_hash = upper.long() * self.primes

        # The hash XORs one term per axis, so the 2^N corners (and their weights) are built one axis at a time
        # without materialising an [..., L, 2^N, N] tensor of corner coordinates.
        corner_hash = torch.zeros_like(lower_hash[..., :1])
        corner_weight = torch.ones_like(offset[..., :1])
        for d in range(self.in_dim):
            lo, hi, w = lower_hash[..., d : d + 1], upper_hash[..., d : d + 1], offset[..., d : d + 1]
            corner_hash = torch.cat([corner_hash ^ lo, corner_hash ^ hi], dim=-1)
            corner_weight = torch.cat([corner_weight * (1 - w), corner_weight * w], dim=-1)
        index = corner_hash % self.hash_table_size + self.hash_offset[:, None]  # [..., L, 2^N]

        # index_select gathers (and scatters gradients) about twice as fast on the CPU as advanced indexing
        features = self.hash_table.index_select(0, index.flatten()).view(*index.shape, -1)  # [..., L, 2^N, F]
        encoded = torch.einsum("...c,...cf->...f", corner_weight, features)  # [..., L, F]
        return encoded.flatten(start_dim=-2)
