"""Evaluation metrics that never download: PSNR and SSIM always, LPIPS only when its backbone weights are on disk.

nerfstudio's own models build torchmetrics' LPIPS in ``populate_modules``, which fetches AlexNet weights from the
internet. Our models build :class:`LazyLPIPS` instead: it looks for the weights in the torch hub cache the first time
it is called, warns once if they are absent, and from then on reports itself unavailable.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure


def _alexnet_weights_path() -> Path:
    from torchvision.models import AlexNet_Weights

    url = AlexNet_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


class LazyLPIPS(nn.Module):
    """LPIPS (AlexNet) built on first use, only from weights already in the torch hub cache."""

    _warned = False

    def __init__(self) -> None:
        super().__init__()
        # Kept outside the module tree so the metric's weights never enter a checkpoint.
        object.__setattr__(self, "_metric", None)
        self._checked = False

    @property
    def available(self) -> bool:
        if not self._checked:
            self._checked = True
            if _alexnet_weights_path().exists():
                from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

                object.__setattr__(self, "_metric", LearnedPerceptualImagePatchSimilarity(normalize=True))
            elif not LazyLPIPS._warned:
                LazyLPIPS._warned = True
                warnings.warn(
                    f"LPIPS skipped: AlexNet weights not found at {_alexnet_weights_path()} (nothing is downloaded)."
                )
        return self._metric is not None

    def forward(self, gt: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """LPIPS of two [B, 3, H, W] images in [0, 1]; call only when ``available``."""
        assert self._metric is not None, "LPIPS weights are not available"
        return self._metric.to(gt.device)(gt, pred)


def image_metrics(gt_rgb: torch.Tensor, predicted_rgb: torch.Tensor, lpips: Optional[LazyLPIPS]) -> Dict[str, float]:
    """PSNR, SSIM (and LPIPS when available) of two [H, W, 3] images in [0, 1]."""
    gt = torch.moveaxis(gt_rgb.clamp(0, 1), -1, 0)[None]
    pred = torch.moveaxis(predicted_rgb.clamp(0, 1), -1, 0)[None]
    mse = torch.mean((gt - pred) ** 2)
    metrics = {
        "psnr": float(-10.0 * torch.log10(mse.clamp_min(1e-10))),
        "ssim": float(structural_similarity_index_measure(pred, gt, data_range=1.0)),
    }
    if lpips is not None and lpips.available:
        metrics["lpips"] = float(lpips(gt, pred))
    return metrics
