"""nerfstudio's trainer with checked checkpoint paths: a bad ``--load-dir`` is a one-line error, not a traceback.
Also the AdamW optimizer config that nerfstudio lacks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Tuple, Type

import torch
from nerfstudio.configs.base_config import MachineConfig
from nerfstudio.engine.optimizers import OptimizerConfig
from nerfstudio.engine.trainer import Trainer, TrainerConfig

from ns_4d_methods.errors import InputError


def latest_checkpoint(load_dir: Path, field_name: str = "--load-dir") -> Path:
    """The newest ``step-*.ckpt`` in ``load_dir``; an :class:`InputError` naming the field if there is none."""
    if not load_dir.is_dir():
        raise InputError(f"{field_name} {load_dir}: directory does not exist (expected a run's nerfstudio_models/)")
    checkpoints = sorted(load_dir.glob("step-*.ckpt"))
    if not checkpoints:
        raise InputError(f"{field_name} {load_dir}: no step-*.ckpt checkpoint found (expected a run's nerfstudio_models/)")
    return checkpoints[-1]


@dataclass
class Trainer4DConfig(TrainerConfig):
    """nerfstudio's TrainerConfig, with checkpoint paths checked before loading and a device that exists."""

    _target: Type = field(default_factory=lambda: Trainer4D)
    machine: MachineConfig = field(
        default_factory=lambda: MachineConfig(device_type="cuda" if torch.cuda.is_available() else "cpu")
    )
    """Machine configuration; the device defaults to CUDA when present and the CPU otherwise."""


class Trainer4D(Trainer):
    """Checks ``--load-dir``/``--load-step``/``--load-checkpoint`` and fails with one line when they are wrong."""

    def _load_checkpoint(self) -> None:
        config = self.config
        if config.load_dir is not None:
            latest = latest_checkpoint(config.load_dir)
            if config.load_step is not None and not (config.load_dir / f"step-{config.load_step:09d}.ckpt").exists():
                raise InputError(f"--load-step {config.load_step}: no such checkpoint in {config.load_dir}")
            if config.load_step is None:
                config.load_step = int(latest.stem.split("-")[1])
        elif config.load_checkpoint is not None and not config.load_checkpoint.is_file():
            raise InputError(f"--load-checkpoint {config.load_checkpoint}: file does not exist")
        super()._load_checkpoint()


@dataclass
class AdamWOptimizerConfig(OptimizerConfig):
    """torch's AdamW (decoupled weight decay), as threestudio-based methods train."""

    _target: Type = torch.optim.AdamW
    betas: Tuple[float, float] = (0.9, 0.999)
    """Coefficients of the running averages of the gradient and its square."""
    weight_decay: float = 0.01
    """Decoupled weight decay (torch's default)."""
