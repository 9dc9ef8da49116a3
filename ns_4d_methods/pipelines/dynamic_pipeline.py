"""The pipeline shared by the 4D reconstructions: nerfstudio's vanilla pipeline plus time for time-less cameras."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Type

from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from ns_4d_methods.render.time_from_pose import TimeFromPose


@dataclass
class DynamicPipelineConfig(VanillaPipelineConfig):
    """Vanilla pipeline whose model can place camera paths without times (``ns-render interpolate``) in time."""

    _target: Type = field(default_factory=lambda: DynamicPipeline)


class DynamicPipeline(VanillaPipeline):
    """Hands the model a :class:`TimeFromPose` built from the dataset cameras (recomputed, never checkpointed)."""

    def __init__(self, config: DynamicPipelineConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        datasets = [self.datamanager.train_dataset, getattr(self.datamanager, "eval_dataset", None)]
        self.model.time_from_pose = TimeFromPose([d.cameras for d in datasets if d is not None])
