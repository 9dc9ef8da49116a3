"""The pipeline shared by the 4D methods: nerfstudio's vanilla pipeline plus time for time-less cameras, and the 4D
viewer's first view, step label and Export tab (:mod:`ns_4d_methods.viewer_4d`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from ns_4d_methods.render.time_from_pose import TimeFromPose
from ns_4d_methods.viewer_4d import Viewer4DControl, install_export_tab


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
    """Hands the model a :class:`TimeFromPose` built from the dataset cameras (recomputed, never checkpointed), and
    nerfstudio's viewer a :class:`Viewer4DControl` (it sets up every ``ViewerControl`` it finds on the pipeline)."""

    def __init__(self, config: DynamicPipelineConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        holders = [self.datamanager, *vars(self.datamanager).values()]
        for holder in holders:
            for value in list(getattr(holder, "__dict__", {}).values()):
                if isinstance(value, Cameras):
                    cameras_to_float32(value)
        datasets = [self.datamanager.train_dataset, getattr(self.datamanager, "eval_dataset", None)]
        self.model.time_from_pose = TimeFromPose([d.cameras for d in datasets if d is not None])
        self.viewer_4d = Viewer4DControl()
        install_export_tab()  # before the trainer builds the viewer

    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> List[TrainingCallback]:
        callbacks = super().get_training_callbacks(training_callback_attributes)
        return [
            *callbacks,
            TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], self.viewer_4d.show_step),
            TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN], self.viewer_4d.show_step, kwargs={"force": True}),
        ]
