"""3D Gaussian Splatting as Markov Chain Monte Carlo (Kheradmand et al. 2024), on any device.

gsplat 1.4.0's ``MCMCStrategy`` holds the number of Gaussians under a hard cap (``cap_max``): every
``refine_every`` steps it relocates the dead Gaussians (opacity <= ``min_opacity``) onto live ones sampled by
opacity, adds 5 % more the same way until the cap is reached, and after every step nudges each Gaussian's centre
by noise shaped by its covariance, stronger the more transparent it is. Two of the kernels its ops call
(``gsplat.strategy.ops``) are CUDA only: ``compute_relocation`` (the paper's eq. 9, the opacity and scale that keep
the rendered image unchanged when a Gaussian is split into ``n``) and ``quat_scale_to_covar_preci`` (for the
noise). :class:`MCMCStrategyAnyDevice` runs gsplat's strategy unchanged and, off CUDA, binds those two names to
the PyTorch versions below for the duration of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple, Union
from unittest import mock

import torch
from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci
from gsplat.strategy import MCMCStrategy, ops
from torch import Tensor


def compute_relocation_torch(opacities: Tensor, scales: Tensor, ratios: Tensor, binoms: Tensor) -> Tuple[Tensor, Tensor]:
    """``gsplat.relocation.compute_relocation`` in PyTorch: a Gaussian of opacity ``o`` and scales ``s`` that is to
    be rendered ``n = ratios`` times gets opacity ``o' = 1 - (1 - o)^(1/n)`` and scales ``s o / D`` with

        D = sum_{i=1..n} sum_{k=0..i-1} C(i-1, k) (-1)^k o'^(k+1) / sqrt(k+1)

    (eq. 9), C read from ``binoms`` [n_max, n_max]; ``n`` is clamped to [1, n_max] as gsplat does. Opacities may be
    [N] or [N, 1] (the result has the same shape); computed in float64, since the sum alternates in sign.
    """
    n_max = binoms.shape[0]
    n = ratios.clamp(1, n_max).long()
    o = opacities.reshape(-1).double()
    new_o = 1.0 - (1.0 - o) ** (1.0 / n.double())
    # sum over i <= n of C(i-1, k) is row n-1 of the binomials' running sum over their first index
    coefficients = binoms.double().cumsum(0)[n - 1]  # [N, n_max], zero where k >= n
    k = torch.arange(n_max, device=o.device, dtype=torch.float64)
    terms = coefficients * (-1.0) ** k / torch.sqrt(k + 1.0) * new_o[:, None] ** (k + 1.0)
    denominator = terms.sum(-1)
    new_scales = scales * (o / denominator).to(scales.dtype)[:, None]
    return new_o.to(opacities.dtype).reshape(opacities.shape), new_scales


def _quat_scale_to_covar_preci_torch(quats: Tensor, scales: Tensor, compute_covar=True, compute_preci=True, triu=False):
    return _quat_scale_to_covar_preci(quats, scales, compute_covar, compute_preci, triu)


@dataclass
class MCMCStrategyAnyDevice(MCMCStrategy):
    """gsplat's :class:`MCMCStrategy`; off CUDA its two CUDA kernels are replaced by their PyTorch equivalents."""

    absgrad: bool = False
    """Whether the rasterizer should accumulate absolute screen-space gradients (the strategy does not read them)."""

    def step_post_backward(
        self,
        params: Union[Dict[str, torch.nn.Parameter], torch.nn.ParameterDict],
        optimizers: Dict[str, torch.optim.Optimizer],
        state: Dict[str, Any],
        step: int,
        info: Dict[str, Any],
        lr: float,
    ) -> None:
        if step < self.refine_stop_iter and step > self.refine_start_iter and step % self.refine_every == 0:
            alive = (torch.sigmoid(params["opacities"].detach()) > self.min_opacity).sum()
            if alive == 0:  # relocation samples live Gaussians by opacity: torch would fail with a cryptic message
                raise RuntimeError(
                    f"3DGS-MCMC: all {len(params['opacities'])} Gaussians fell below opacity {self.min_opacity} by step "
                    f"{step}, none left to relocate onto; start from points or use --pipeline.model.strategy default"
                )
        if params["means"].is_cuda:
            super().step_post_backward(params, optimizers, state, step, info, lr)
            return
        with mock.patch.multiple(
            ops, compute_relocation=compute_relocation_torch, quat_scale_to_covar_preci=_quat_scale_to_covar_preci_torch
        ):
            super().step_post_backward(params, optimizers, state, step, info, lr)
