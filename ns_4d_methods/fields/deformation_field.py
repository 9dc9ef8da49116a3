"""Deformation network of deformable 3D Gaussians (Deformable-3DGS design).

An MLP over positional encodings of a canonical Gaussian centre x and a time t returns offsets for the centre, the
rotation quaternion and the scales. Defaults are the paper's: 8 ReLU layers of width 256, the encoded input fed
again after the 4th layer, 10 frequencies for x and 6 for t. For synthetic (D-NeRF) scenes the official code first
passes the time encoding through a small time network (``time_network=(256, 30)``: Linear 13 -> 256, ReLU,
Linear 256 -> 30), and its output layer has PyTorch's default initialisation (``zero_init=False``); with
``zero_init`` the output layer starts at zero, so the deformation is the identity until it is trained.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from nerfstudio.field_components.encodings import NeRFEncoding
from nerfstudio.field_components.mlp import MLP
from torch import Tensor, nn


def _encoding(in_dim: int, num_frequencies: int) -> NeRFEncoding:
    """sin/cos at angular frequencies 2^0 .. 2^(L-1) plus the input itself, as Deformable-3DGS encodes.

    nerfstudio's NeRFEncoding multiplies its input by 2 pi first, so its frequency exponents are shifted by
    log2(2 pi) to land on the same frequencies.
    """
    shift = math.log2(2 * math.pi)
    return NeRFEncoding(
        in_dim=in_dim,
        num_frequencies=num_frequencies,
        min_freq_exp=-shift,
        max_freq_exp=num_frequencies - 1 - shift,
        include_input=True,
    )


class DeformationField(nn.Module):
    """(x, t) -> (d_means [N, 3], d_quats [N, 4], d_scales [N, 3]); the model decides whether the scale offsets
    apply to the scales or the log-scales.

    Args:
        num_layers: hidden layers of the MLP.
        layer_width: width of the hidden layers.
        position_frequencies: encoding frequencies for x.
        time_frequencies: encoding frequencies for t.
        time_network: (width, outputs) of the time network applied to the time encoding, None for none.
        zero_init: whether the output layer starts at zero (identity deformation) instead of PyTorch's default.
    """

    def __init__(
        self,
        num_layers: int = 8,
        layer_width: int = 256,
        position_frequencies: int = 10,
        time_frequencies: int = 6,
        time_network: Optional[Tuple[int, int]] = None,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.position_encoding = _encoding(3, position_frequencies)
        self.time_encoding = _encoding(1, time_frequencies)
        time_dim = self.time_encoding.get_out_dim()
        self.time_network = None
        if time_network is not None:
            width, time_dim = time_network
            self.time_network = nn.Sequential(
                nn.Linear(self.time_encoding.get_out_dim(), width), nn.ReLU(), nn.Linear(width, time_dim)
            )
        in_dim = self.position_encoding.get_out_dim() + time_dim
        # Deformable-3DGS concatenates the input to the output of layer num_layers // 2 (0-based), i.e. it enters
        # nerfstudio's MLP at layer num_layers // 2 + 1; that must be a hidden layer (shallow test networks have none).
        skip = num_layers // 2 + 1
        self.mlp = MLP(
            in_dim=in_dim,
            num_layers=num_layers,
            layer_width=layer_width,
            skip_connections=(skip,) if skip < num_layers - 1 else None,
            activation=nn.ReLU(),
            out_activation=nn.ReLU(),
        )
        self.head = nn.Linear(layer_width, 3 + 4 + 3)
        if zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, means: Tensor, times: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Offsets for canonical centres ``means`` [N, 3] at ``times`` [N, 1] (or anything broadcastable to it)."""
        # encode (and run the time network on) each given time once: a render passes one time for all Gaussians
        time_features = self.time_encoding(times.reshape(-1, 1).to(means))
        if self.time_network is not None:
            time_features = self.time_network(time_features)
        time_features = time_features.expand(means.shape[0], -1)
        features = torch.cat([self.position_encoding(means), time_features], dim=-1)
        d_means, d_quats, d_scales = self.head(self.mlp(features)).split([3, 4, 3], dim=-1)
        return d_means, d_quats, d_scales
