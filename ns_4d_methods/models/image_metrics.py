"""Image metrics and LPIPS: PSNR and SSIM always, LPIPS with a backbone loaded the way its users get it.

LPIPS's backbone (AlexNet for the metric, VGG16 for 4diffusion's anchor loss) is named by a torchvision weights enum
(``"AlexNet_Weights.IMAGENET1K_V1"``) or a local file holding its state dict, and loaded through
:func:`~ns_4d_methods.guidance.model_loading.load_torchvision_state_dict`: from the torch hub cache, downloaded into
it when the network is reachable, never when ``HF_HUB_OFFLINE`` is set (the suite's offline switch). LPIPS's own
linear layers ship with torchmetrics.

- :class:`LazyLPIPS` (the metric; nerfstudio's models would otherwise build torchmetrics' LPIPS in
  ``populate_modules``, which downloads AlexNet at construction): loads on first use; without the weights the metric
  is skipped with one line.
- :class:`LPIPSLoss` (a training loss): :meth:`LPIPSLoss.load` raises
  :class:`~ns_4d_methods.guidance.model_loading.WeightsUnavailableError` (one line naming the field, with a hint).

Both keep the network outside the module tree, so its weights never enter a checkpoint.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional

import torch
from huggingface_hub import constants as hub_constants
from torch import nn

from ns_4d_methods.guidance.model_loading import (
    WeightsUnavailableError,
    load_torchvision_state_dict,
    torchvision_cache_path,
    torchvision_weights,
)

ALEXNET = "AlexNet_Weights.IMAGENET1K_V1"
"""LPIPS's default backbone for the metric (the LPIPS paper's and torchmetrics')."""
VGG16 = "VGG16_Weights.IMAGENET1K_V1"
"""LPIPS's VGG backbone (4Diffusion's anchor loss)."""


def _backbone_type(state_dict: Dict[str, torch.Tensor], source: str, field_name: str, hint: str) -> str:
    """"vgg" or "alex", told apart by the last convolution of ``features`` (index 28 in VGG16, 10 in AlexNet)."""
    if "features.28.weight" in state_dict:
        return "vgg"
    if "features.10.weight" in state_dict:
        return "alex"
    raise WeightsUnavailableError(field_name, source, "not the state dict of a VGG16 or an AlexNet", hint)


def load_lpips(weights: str, field_name: str, hint: str = "") -> nn.Module:
    """torchmetrics' LPIPS network (frozen, eval mode) on the backbone ``weights`` (enum name or local file).

    Raises :class:`WeightsUnavailableError` when the backbone cannot be loaded.
    """
    from torchmetrics.functional.image.lpips import _LPIPS

    if hub_constants.HF_HUB_OFFLINE and torchvision_weights(weights) is not None:
        if not torchvision_cache_path(weights).is_file():
            reason = f"HF_HUB_OFFLINE is set and it is not in the torch hub cache {torchvision_cache_path(weights)}"
            raise WeightsUnavailableError(field_name, weights, reason, hint)
    state_dict = load_torchvision_state_dict(weights, field_name, hint)
    # a random backbone (pnet_rand: nothing downloaded here) with LPIPS's linear layers, then the backbone's weights
    network = _LPIPS(pretrained=True, net=_backbone_type(state_dict, weights, field_name, hint), pnet_rand=True)
    for stage in network.net.children():  # slice1..slice5: the backbone's `features` layers, by their index
        for index, layer in stage.named_children():
            prefix = f"features.{index}."
            params = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if params or list(layer.parameters()):
                try:
                    layer.load_state_dict(params)
                except RuntimeError as error:  # missing or misshapen tensors
                    reason = f"not the state dict of a torchvision {network.pnet_type} backbone ({prefix}*)"
                    raise WeightsUnavailableError(field_name, weights, reason, hint) from error
    return network.eval().requires_grad_(False)


class LazyLPIPS(nn.Module):
    """LPIPS as an evaluation metric, built on first use; skipped with one warning when the backbone is unavailable.

    Args:
        weights: the backbone, a torchvision weights enum name or a local state-dict file (default AlexNet).
        field_name: what names ``weights`` in messages.
    """

    _warned: set = set()

    def __init__(self, weights: str = ALEXNET, field_name: str = "LPIPS backbone") -> None:
        super().__init__()
        self.weights, self.field_name = weights, field_name
        object.__setattr__(self, "_network", None)  # outside the module tree: never in a checkpoint
        self._checked = False

    @property
    def available(self) -> bool:
        if not self._checked:
            self._checked = True
            try:
                object.__setattr__(self, "_network", load_lpips(self.weights, self.field_name))
            except WeightsUnavailableError as error:
                if self.weights not in LazyLPIPS._warned:
                    LazyLPIPS._warned.add(self.weights)
                    warnings.warn(f"LPIPS skipped: {error}")
        return self._network is not None

    def forward(self, gt: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS of two [B, 3, H, W] images in [0, 1]; call only when ``available``."""
        assert self._network is not None, "LPIPS weights are not available"
        network = self._network.to(gt.device)
        return network(gt.float(), pred.float(), normalize=True).mean()


class LPIPSLoss(nn.Module):
    """LPIPS as a differentiable training loss; :meth:`load` it before the first call.

    Args:
        weights: the backbone, a torchvision weights enum name or a local state-dict file.
        field_name, hint: name the config field and say how to go on without the term, in the one-line error.
        rescale_input: map [0, 1] images to [-1, 1], the range LPIPS was trained on. False feeds them as they are,
            as 4Diffusion's official anchor loss does (its weights were tuned with that input).
    """

    def __init__(self, weights: str = VGG16, field_name: str = "", hint: str = "", rescale_input: bool = True) -> None:
        super().__init__()
        self.weights, self.field_name, self.hint, self.rescale_input = weights, field_name, hint, rescale_input
        object.__setattr__(self, "_network", None)  # outside the module tree: never in a checkpoint

    @property
    def loaded(self) -> bool:
        return self._network is not None

    def load(self) -> None:
        """Loads the network (once); raises :class:`WeightsUnavailableError` without its backbone."""
        if self._network is None:
            object.__setattr__(self, "_network", load_lpips(self.weights, self.field_name, self.hint))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS of [B, 3, H, W] images in [0, 1]."""
        self.load()
        network = self._network.to(pred.device)
        return network(pred.float(), target.float(), normalize=self.rescale_input).mean()


def image_metrics(gt_rgb: torch.Tensor, predicted_rgb: torch.Tensor, lpips: Optional[LazyLPIPS]) -> Dict[str, float]:
    """PSNR, SSIM (and LPIPS when available) of two [H, W, 3] images in [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure  # ~1.5 s: imported when used

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
