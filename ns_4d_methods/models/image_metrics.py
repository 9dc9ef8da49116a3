"""Evaluation metrics that never download: PSNR and SSIM always, LPIPS only when its backbone weights are on disk.

nerfstudio's own models build torchmetrics' LPIPS in ``populate_modules``, which fetches AlexNet weights from the
internet. Our models build :class:`LazyLPIPS` instead: it looks for the weights in the torch hub cache the first time
it is called, warns once if they are absent, and from then on reports itself unavailable. :class:`LPIPSLoss` is the
same idea for LPIPS as a differentiable training loss, on VGG or AlexNet features.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure


def _alexnet_weights_path() -> Path:
    return backbone_weights_path("alex")


def backbone_weights_path(net: str) -> Path:
    """Where torchvision keeps the ImageNet weights of LPIPS's backbone ``net`` ("alex" or "vgg")."""
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    url = {"alex": AlexNet_Weights, "vgg": VGG16_Weights}[net].IMAGENET1K_V1.url
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


class LPIPSLoss(nn.Module):
    """LPIPS as a differentiable loss, built on first use from backbone weights already in the torch hub cache.

    Without them ``available`` is False after one warning (per backbone), and callers leave the term out. The network
    is kept outside the module tree, so it never enters a checkpoint.
    """

    _warned: set = set()

    def __init__(self, net: str = "vgg") -> None:
        super().__init__()
        self.net = net
        object.__setattr__(self, "_network", None)
        self._checked = False

    @property
    def available(self) -> bool:
        if not self._checked:
            self._checked = True
            path = backbone_weights_path(self.net)
            if path.exists():
                from torchmetrics.functional.image.lpips import _LPIPS

                object.__setattr__(self, "_network", _LPIPS(pretrained=True, net=self.net).eval().requires_grad_(False))
            elif self.net not in LPIPSLoss._warned:
                LPIPSLoss._warned.add(self.net)
                warnings.warn(f"LPIPS({self.net}) loss skipped: weights not found at {path} (nothing is downloaded).")
        return self._network is not None

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS of [B, 3, H, W] images in [0, 1]; call only when ``available``."""
        assert self._network is not None, "LPIPS weights are not available"
        network = self._network.to(pred.device)
        return network(pred.float(), target.float(), normalize=True).mean()


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
