"""The ``unified-edit`` methods: edit a scene's training views with disentangled self-attention injection (one
reference view's appearance, every view's own structure), then fit the scene to them.

- ``unified-edit``: deformable Gaussians (splatfacto-4d) on time-aware data (D-NeRF by default).
- ``unified-edit-nerfacto``: the hash-grid 4D NeRF (nerfacto-4d) on time-aware data.
- ``unified-edit-static``: nerfstudio's splatfacto on a static scene (``nerfstudio-data`` by default), rendered
  by splatfacto-4d's rasterizers so that it runs on CPUs too.

Each trains from scratch on the edited views, or from a reconstruction of the same scene and model with
``--load-dir`` (fewer steps then suffice).
"""

from __future__ import annotations

import copy

from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.plugins.types import MethodSpecification

from method_configs.nerfacto_4d import nerfacto_4d
from method_configs.splatfacto_4d import LR_RULE_EXEMPTIONS as SPLATFACTO_4D_LR_RULE_EXEMPTIONS
from method_configs.splatfacto_4d import splatfacto_4d
from ns_4d_methods.data.edited_dataset import EditedFrameDataset
from ns_4d_methods.models.splatfacto_static import SplatfactoStaticModelConfig
from ns_4d_methods.pipelines.unified_edit_pipeline import UnifiedEditPipelineConfig

LR_RULE_EXEMPTIONS = SPLATFACTO_4D_LR_RULE_EXEMPTIONS
"""splatfacto-4d's: unified-edit trains its model with its schedules (:mod:`ns_4d_methods.phase_start_schedule`)."""

_DESCRIPTION = (
    "Unified editing by disentangled self-attention injection: every training view DDIM-inverted and edited by "
    "--pipeline.prompt with Stable Diffusion, keeping its own structure (ResNet features, Q/K) and taking the "
    "reference view's appearance (K/V); then the scene is fitted to the edited views"
)


def _editing(reconstruction, method_name: str, datamanager_type, model=None):
    """The reconstruction's trainer config with the unified-edit pipeline over its data and model."""
    config = copy.deepcopy(reconstruction)
    config.method_name = method_name
    datamanager = copy.deepcopy(config.pipeline.datamanager)
    datamanager._target = datamanager_type[EditedFrameDataset]
    config.pipeline = UnifiedEditPipelineConfig(
        datamanager=datamanager, model=model or copy.deepcopy(config.pipeline.model)
    )
    return config


unified_edit = MethodSpecification(
    config=_editing(splatfacto_4d.config, "unified-edit", FullImageDatamanager),
    description=f"{_DESCRIPTION} as deformable Gaussians (splatfacto-4d; time-aware data).",
)

unified_edit_nerfacto = MethodSpecification(
    config=_editing(nerfacto_4d.config, "unified-edit-nerfacto", VanillaDataManager),
    description=f"{_DESCRIPTION} as a hash-grid 4D NeRF (nerfacto-4d; time-aware data).",
)

# nerfstudio's splatfacto (its model defaults; splatfacto-4d's learning rates are splatfacto's except for the
# deformation network), rendered with splatfacto-4d's rasterizer choice so that it also runs without CUDA
_static = _editing(splatfacto_4d.config, "unified-edit-static", FullImageDatamanager, SplatfactoStaticModelConfig())
_static.pipeline.datamanager.dataparser = NerfstudioDataParserConfig()
_static.optimizers.pop("deformation")
unified_edit_static = MethodSpecification(
    config=_static, description=f"{_DESCRIPTION} as nerfstudio's splatfacto (static scenes)."
)
