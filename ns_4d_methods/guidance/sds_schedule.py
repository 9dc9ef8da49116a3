"""Score-distillation helpers every SDS method shares: weight ramps, timestep annealing, the forward diffusion and the
one-step estimate of the clean latent.

- :func:`ramp` is threestudio's ``C(value)``: a constant, or ``(start_step, start_value, end_value, end_step)``
  interpolated linearly in the step (used for loss weights and timestep bounds alike).
- Timestep annealing, chosen by config:

  * :class:`LinearWideningConfig` (4Diffusion, via threestudio's ``min/max_step_percent``): t drawn uniformly from
    ``[ramp(min_percent), ramp(max_percent)] * T``; 4Diffusion starts at the fixed t = 980 and widens to
    U[20, 250] over the first 5000 steps.
  * :class:`SqrtAnnealingConfig` (HiFA, arXiv 2305.18766): a deterministic ``t = t_max - (t_max - t_min)
    sqrt(step / max_steps)``, optionally jittered.

- :func:`add_noise` / :func:`predict_start_from_noise`: ``z_t = sqrt(abar) z + sqrt(1 - abar) eps`` and its
  inversion ``x0 = (z_t - sqrt(1 - abar) eps) / sqrt(abar)`` for an epsilon-predicting model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

Ramp = Union[float, Tuple[float, float, float, float]]
"""A constant, or (start_step, start_value, end_value, end_step) interpolated linearly between the two steps."""


def ramp(value: Union[Ramp, Sequence[float]], step: int) -> float:
    """The value of a :data:`Ramp` at ``step`` (held constant before start_step and after end_step)."""
    if isinstance(value, (int, float)):
        return float(value)
    start_step, start_value, end_value, end_step = (float(v) for v in value)
    if end_step <= start_step:
        return start_value if step < start_step else end_value
    fraction = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    return start_value + fraction * (end_value - start_value)


@dataclass
class LinearWideningConfig:
    """Timesteps drawn uniformly between two bounds that ramp linearly with the step (4Diffusion's schedule)."""

    min_percent: Tuple[float, float, float, float] = (0, 0.98, 0.02, 5000)
    """Lower bound as a fraction of the training timesteps: (start_step, start_value, end_value, end_step)."""
    max_percent: Tuple[float, float, float, float] = (0, 0.98, 0.25, 5000)
    """Upper bound as a fraction of the training timesteps: (start_step, start_value, end_value, end_step)."""

    def bounds(self, step: int, num_train_timesteps: int = 1000) -> Tuple[int, int]:
        """Smallest and largest timestep that ``step`` may draw (inclusive)."""
        low = int(num_train_timesteps * ramp(self.min_percent, step))
        high = int(num_train_timesteps * ramp(self.max_percent, step))
        return min(low, high), max(low, high)

    def sample(self, step: int, num_train_timesteps: int = 1000, generator: Optional[torch.Generator] = None) -> int:
        """One timestep for ``step``."""
        low, high = self.bounds(step, num_train_timesteps)
        return int(torch.randint(low, high + 1, (1,), generator=generator))


@dataclass
class SqrtAnnealingConfig:
    """HiFA's square-root timestep annealing: large timesteps early, small ones late, without randomness."""

    t_max: float = 0.98
    """Timestep at step 0, as a fraction of the training timesteps."""
    t_min: float = 0.02
    """Timestep at ``max_steps``, as a fraction of the training timesteps."""
    max_steps: int = 10000
    """Step at which the annealing reaches ``t_min`` (held afterwards)."""
    jitter: float = 0.0
    """Half-width of a uniform jitter around the annealed timestep, as a fraction of the training timesteps."""

    def bounds(self, step: int, num_train_timesteps: int = 1000) -> Tuple[int, int]:
        fraction = min(max(step / max(self.max_steps, 1), 0.0), 1.0)
        centre = self.t_max - (self.t_max - self.t_min) * math.sqrt(fraction)
        low = max(int(num_train_timesteps * (centre - self.jitter)), 0)
        high = min(int(num_train_timesteps * (centre + self.jitter)), num_train_timesteps - 1)
        return low, high

    def sample(self, step: int, num_train_timesteps: int = 1000, generator: Optional[torch.Generator] = None) -> int:
        low, high = self.bounds(step, num_train_timesteps)
        return int(torch.randint(low, high + 1, (1,), generator=generator))


def add_noise(latents: Tensor, noise: Tensor, alpha_bar: Union[float, Tensor]) -> Tensor:
    """The forward diffusion ``z_t = sqrt(abar) z + sqrt(1 - abar) eps`` at cumulative alpha ``alpha_bar``."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=latents.dtype, device=latents.device)
    return alpha_bar.sqrt() * latents + (1.0 - alpha_bar).sqrt() * noise


def predict_start_from_noise(noisy: Tensor, eps: Tensor, alpha_bar: Union[float, Tensor]) -> Tensor:
    """The clean-latent estimate ``x0 = (z_t - sqrt(1 - abar) eps) / sqrt(abar)`` of an epsilon prediction."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=noisy.dtype, device=noisy.device)
    return (noisy - (1.0 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
