"""The suite's learning-rate rule (:mod:`ns_4d_methods.phase_start_schedule`) over every registered method's default
config: each optimizer group trains first at its nominal initial rate (within 1 %), at the step its parameters first
receive gradient (after its warm-up, when it has one), unless its ``method_configs`` module names it in
``LR_RULE_EXEMPTIONS`` with a reason."""

from __future__ import annotations

import copy
import importlib
from importlib.metadata import entry_points
from typing import Dict, List

import pytest
import torch
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig

from ns_4d_methods.phase_start_schedule import PhaseStartSchedulerConfig

METHODS = sorted(entry_points(group="nerfstudio.method_configs"), key=lambda entry: entry.name)


def learning_rate_at(group: Dict, step: int) -> float:
    """The learning rate of an optimizer group's settings ({"optimizer", "scheduler"}) at training ``step``, from
    the scheduler nerfstudio builds (stepped once per training step, as the trainer does)."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = group["optimizer"].setup(params=[parameter])
    if group["scheduler"] is None:
        return optimizer.param_groups[0]["lr"]
    scheduler = group["scheduler"].setup().get_scheduler(optimizer=optimizer, lr_init=group["optimizer"].lr)
    return group["optimizer"].lr * scheduler.lr_lambdas[0](step)


def group_starts(config) -> Dict[str, int]:
    """First training step of each group that waits for a phase, as the method's pipeline and model configs declare
    it (``param_group_starts``; the pipeline's entries win)."""
    starts: Dict[str, int] = {}
    for part in (config.pipeline.model, config.pipeline):
        if hasattr(part, "param_group_starts"):
            starts.update(part.param_group_starts())
    return starts


def rule_breaches(config, exemptions: Dict[str, str]) -> List[str]:
    """The groups of a trainer ``config`` that break the rule, each with its rate where it first trains."""
    starts, breaches = group_starts(config), []
    for name, group in config.optimizers.items():
        first = starts.get(name, 0) + getattr(group["scheduler"], "warmup_steps", 0)
        rate, nominal = learning_rate_at(group, first), group["optimizer"].lr
        if abs(rate - nominal) > 0.01 * nominal and name not in exemptions:
            breaches.append(f"{name}: {rate:.3g} at step {first}, nominal {nominal:.3g}")
    return breaches


@pytest.mark.parametrize("method", METHODS, ids=[entry.name for entry in METHODS])
def test_every_group_starts_at_its_nominal_rate(method) -> None:
    module = importlib.import_module(method.module)
    exemptions = getattr(module, "LR_RULE_EXEMPTIONS", {})
    config = method.load().config
    assert all(len(why) > 40 for why in exemptions.values()), exemptions  # a reason, not a bare name
    assert rule_breaches(config, exemptions) == []


def test_four_real_with_one_schedule_from_step_zero_breaks_the_rule() -> None:
    """The check catches 4real's former schedules (every group decaying over all 40,000 steps from step 0): the
    temporal deformation would start at 3.6e-5 instead of 8e-4."""
    from method_configs.four_real import four_real

    config = copy.deepcopy(four_real.config)
    for group in config.optimizers.values():
        if isinstance(group["scheduler"], PhaseStartSchedulerConfig):
            group["scheduler"] = ExponentialDecaySchedulerConfig(lr_final=group["scheduler"].lr_final, max_steps=40000)
    breaches = rule_breaches(config, {})
    assert len(breaches) == 1 and breaches[0].startswith("deformation: 3.58e-05 at step 20000"), breaches


def test_phase_start_schedule_is_the_plain_decay_shifted() -> None:
    optimizer = AdamOptimizerConfig(lr=8e-4)
    plain = {"optimizer": optimizer, "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=1000,
                                                                                   warmup_steps=10)}
    shifted = {"optimizer": optimizer, "scheduler": PhaseStartSchedulerConfig(lr_final=1.6e-6, max_steps=1000,
                                                                              warmup_steps=10, start_step=300)}
    for step in (0, 5, 10, 400, 1000, 2000):
        assert learning_rate_at(shifted, step + 300) == pytest.approx(learning_rate_at(plain, step), rel=1e-9)
    assert learning_rate_at(shifted, 0) == learning_rate_at(shifted, 300)


def test_four_real_schedules_follow_the_stage_lengths_given_on_the_command_line() -> None:
    from method_configs.four_real import four_real
    from ns_4d_methods.pipelines.four_real_pipeline import fit_schedules_to_stages

    config = copy.deepcopy(four_real.config)
    config.pipeline.canonical_steps, config.pipeline.temporal_steps = 300, 100  # as --pipeline.*-steps set them
    fit_schedules_to_stages(config)
    assert rule_breaches(config, {}) == []
    deformation, per_frame = config.optimizers["deformation"], config.optimizers["per_frame_deformation"]
    assert learning_rate_at(deformation, 300) == pytest.approx(8e-4) == learning_rate_at(deformation, 0)
    assert learning_rate_at(deformation, 400) == pytest.approx(1.6e-6)
    assert learning_rate_at(per_frame, 300) == pytest.approx(1.6e-6)
    assert learning_rate_at(config.optimizers["means"], 400) == pytest.approx(1.6e-6)
