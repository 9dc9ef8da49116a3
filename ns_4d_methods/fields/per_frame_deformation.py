"""Per-frame deformation (4Real): small per-frame offsets of the canonical Gaussians that absorb the freeze-time
video's inconsistencies, so that the canonical Gaussians need not.

Each frame k of the freeze-time video has a learned code c_k (an ``nn.Embedding`` row); a small MLP over the
positional encoding of a canonical centre and c_k returns offsets for the centre, the rotation quaternion and the
log-scales. The canonical frame (the one the freeze-time video was conditioned on, which the reference video shares)
has no code and no deformation: its offsets are exactly zero, so the canonical Gaussians are that frame's scene.
The output layer starts at zero, so every frame starts undeformed.
"""

from __future__ import annotations

from typing import Tuple

import torch
from nerfstudio.field_components.mlp import MLP
from torch import Tensor, nn

from ns_4d_methods.fields.deformation_field import _encoding


class PerFrameDeformation(nn.Module):
    """(x, frame k) -> (d_means [N, 3], d_quats [N, 4], d_log_scales [N, 3]), zero for ``canonical_frame``.

    Args:
        num_frames: frames of the freeze-time video.
        canonical_frame: index of the canonical frame (no deformation).
        code_dim: size of each frame's code.
        num_layers: hidden layers of the MLP.
        layer_width: width of the hidden layers.
        position_frequencies: encoding frequencies of x.
    """

    def __init__(
        self,
        num_frames: int,
        canonical_frame: int,
        code_dim: int = 32,
        num_layers: int = 3,
        layer_width: int = 128,
        position_frequencies: int = 6,
    ) -> None:
        super().__init__()
        if not 0 <= canonical_frame < num_frames:
            raise ValueError(f"canonical frame {canonical_frame} is not one of {num_frames} frames")
        self.num_frames = num_frames
        self.canonical_frame = canonical_frame
        self.codes = nn.Embedding(num_frames, code_dim)
        nn.init.normal_(self.codes.weight, std=0.1)
        self.position_encoding = _encoding(3, position_frequencies)
        self.mlp = MLP(
            in_dim=self.position_encoding.get_out_dim() + code_dim,
            num_layers=num_layers,
            layer_width=layer_width,
            activation=nn.ReLU(),
            out_activation=nn.ReLU(),
        )
        self.head = nn.Linear(layer_width, 3 + 4 + 3)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, means: Tensor, frame: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Offsets of the canonical centres ``means`` [N, 3] in freeze-time frame ``frame``."""
        count = means.shape[0]
        if frame == self.canonical_frame:
            zeros = means.new_zeros(count, 10)
            return zeros[:, :3], zeros[:, 3:7], zeros[:, 7:]
        code = self.codes.weight[frame].expand(count, -1)
        features = torch.cat([self.position_encoding(means), code], dim=-1)
        d_means, d_quats, d_log_scales = self.head(self.mlp(features)).split([3, 4, 3], dim=-1)
        return d_means, d_quats, d_log_scales
