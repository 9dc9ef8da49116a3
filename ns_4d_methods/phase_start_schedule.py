"""Learning-rate schedules that start with their phase: the suite's rule for every method.

A parameter group that waits for a phase of training (a warm-up, a stage) starts its schedule (warm-up, then decay)
when it starts training, so its first steps run at its nominal initial rate. A schedule counted from step 0 would
have decayed already: 4Real's temporal deformation, trained from step 20,000 of 40,000 under Deformable-3DGS'
8e-4 -> 1.6e-6, would start at 3.6e-5, 22x below its rate.

How a method keeps the rule (``tests/test_phase_start_schedule.py`` checks it for every registered method):

- its pipeline config and/or model config has ``param_group_starts() -> Dict[str, int]``: the first training step of
  each group that waits (groups not named train from step 0; the pipeline's entries win over the model's);
- those groups use :class:`PhaseStartSchedulerConfig` with that ``start_step`` (or no decay at all);
- a group that breaks the rule on purpose is named, with the reason, in ``LR_RULE_EXEMPTIONS`` (group -> why) of its
  ``method_configs`` module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Type

from nerfstudio.engine.schedulers import ExponentialDecayScheduler, ExponentialDecaySchedulerConfig
from torch.optim import Optimizer, lr_scheduler


@dataclass
class PhaseStartSchedulerConfig(ExponentialDecaySchedulerConfig):
    """nerfstudio's exponential decay (with optional warm-up), counted from ``start_step`` instead of step 0."""

    _target: Type = field(default_factory=lambda: PhaseStartScheduler)
    start_step: int = 0
    """Training step at which the group starts training; before it the rate stays at the schedule's first value,
    and the warm-up and the decay over max_steps count from it."""


class PhaseStartScheduler(ExponentialDecayScheduler):
    """:class:`~nerfstudio.engine.schedulers.ExponentialDecayScheduler` shifted by ``start_step`` steps."""

    config: PhaseStartSchedulerConfig

    def get_scheduler(self, optimizer: Optimizer, lr_init: float) -> lr_scheduler.LRScheduler:
        decay = super().get_scheduler(optimizer, lr_init).lr_lambdas[0]  # type: ignore[attr-defined]
        start = self.config.start_step
        return lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda step: decay(max(step - start, 0)))
