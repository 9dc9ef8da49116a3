"""The pipeline shared by the 4D reconstructions: nerfstudio's vanilla pipeline plus time for time-less cameras."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from ns_4d_methods.render.time_from_pose import TimeFromPose


@dataclass
class DynamicPipelineConfig(VanillaPipelineConfig):
    """Vanilla pipeline whose model can place camera paths without times (``ns-render interpolate``) in time."""

    _target: Type = field(default_factory=lambda: DynamicPipeline)


def cameras_to_float32(cameras: Cameras) -> None:
    """Casts float64 camera tensors to float32 in place (nerfstudio's dnerf-data makes float64 focal lengths, which
    break ``ns-render spiral``'s path construction)."""
    for name in ("camera_to_worlds", "fx", "fy", "cx", "cy", "distortion_params", "times"):
        value = getattr(cameras, name)
        if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
            setattr(cameras, name, value.float())


class DynamicPipeline(VanillaPipeline):
    """Hands the model a :class:`TimeFromPose` built from the dataset cameras (recomputed, never checkpointed)."""

    def __init__(self, config: DynamicPipelineConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        holders = [self.datamanager, *vars(self.datamanager).values()]
        for holder in holders:
            for value in list(getattr(holder, "__dict__", {}).values()):
                if isinstance(value, Cameras):
                    cameras_to_float32(value)
        datasets = [self.datamanager.train_dataset, getattr(self.datamanager, "eval_dataset", None)]
        self.model.time_from_pose = TimeFromPose([d.cameras for d in datasets if d is not None])
