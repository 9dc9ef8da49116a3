"""nerfstudio's splatfacto for static scenes, rendered the way splatfacto-4d renders: ``gsplat.rasterization`` on
CUDA, the CPU rasterizer (:func:`rasterization_torch`) elsewhere, and an LPIPS that never downloads. It is
splatfacto-4d without the deformation network (its ``deformation_*`` settings are unused); splatfacto's Gaussians,
densification, losses and learning rates are unchanged. ``unified-edit-static`` fits edited views of a static scene with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple, Type
from unittest import mock

from nerfstudio.models.splatfacto import SplatfactoModel
from torch import Tensor
from torch.nn import Parameter

from ns_4d_methods.models.image_metrics import LazyLPIPS
from ns_4d_methods.models.splatfacto_4d import Splatfacto4DModel, Splatfacto4DModelConfig


@dataclass
class SplatfactoStaticModelConfig(Splatfacto4DModelConfig):
    """Static 3D Gaussians (nerfstudio's splatfacto) with splatfacto-4d's rasterizer choice."""

    _target: Type = field(default_factory=lambda: SplatfactoStaticModel)


class SplatfactoStaticModel(Splatfacto4DModel):
    """The canonical Gaussians at every time: no deformation network, no ``deformation`` parameter group."""

    config: SplatfactoStaticModelConfig

    def populate_modules(self) -> None:
        with mock.patch("torchmetrics.image.lpip.LearnedPerceptualImagePatchSimilarity", lambda **_: LazyLPIPS()):
            SplatfactoModel.populate_modules(self)

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        return SplatfactoModel.get_param_groups(self)

    def deform(self, time: float) -> Tuple[Tensor, Tensor, Tensor]:
        return self.means, self.quats, self.scales
