"""Optical flow between frames: RAFT (torchvision's architecture and weights, or original checkpoints) and OpenCV DIS.

Both backends share one call, ``estimate_flow(img1, img2)``: images are float tensors in [0, 1], ``[H, W, 3]`` or
``[B, H, W, 3]``; the result is the flow from ``img1`` to ``img2``, ``[H, W, 2]`` or ``[B, H, W, 2]`` float32 on the
images' device, in pixels, with ``flow[y, x] = (dx, dy)`` such that ``img1[y, x]`` is seen at
``img2[y + dy, x + dx]``.

- :class:`RaftFlow`: torchvision's ``raft_small``/``raft_large`` with weights found the way users get them
  (:func:`~ns_4d_methods.guidance.model_loading.load_torchvision_state_dict`): a torchvision weights enum name
  (default ``Raft_Large_Weights.C_T_V1``, torchvision's port of the original ``raft-things.pth``, read from the torch
  hub cache or downloaded into it) or a local file, either torchvision's layout or an original princeton-vl checkpoint
  (``raft-small.pth``, ``raft-things.pth``, saved through ``DataParallel``: keys start with ``module.``).
  torchvision has the same architecture under other parameter names; :func:`raft_key_to_torchvision` is the explicit
  mapping and :func:`convert_raft_state_dict` checks that every tensor finds its place with the right shape.
  Flow is computed at a bounded size (``max_size`` on the long side) and scaled back: RAFT's all-pairs correlation
  holds ``(H W / 64)^2`` floats, about 29 GB in fp32 for a 2704x2028 N3DV frame, 1.8 GB at 1352x1014.
- :class:`DisFlow`: OpenCV's dense inverse search ("medium" preset), weight-free and fast on the CPU.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.optical_flow import RAFT, raft_large, raft_small

from ns_4d_methods.guidance.model_loading import WeightsUnavailableError, load_torchvision_state_dict

FlowBackend = Literal["raft", "dis"]
RAFT_WEIGHTS = "Raft_Large_Weights.C_T_V1"  # torchvision's port of the original raft-things.pth
MAX_FLOW_SIZE = 1352  # long side: the official N3DV training resolution (1352x1014), a 1.8 GB correlation volume
DIS_HINT = "or --pipeline.flow-backend dis for OpenCV's weight-free flow"
MIN_RAFT_SIZE = 128  # torchvision RAFT: feature maps (1/8 resolution) must be at least 16 px for 4 pyramid levels


class FlowEstimator(Protocol):
    def estimate_flow(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        """Flow from ``img1`` to ``img2`` (see the module docstring for shapes and convention)."""
        ...


# ---- checkpoint key mapping: princeton-vl RAFT -> torchvision RAFT -------------------------------------------------
# Encoders (fnet = feature encoder, cnet = context encoder). torchvision wraps each conv and its norm in a
# Conv2dNormActivation: conv at index 0, norm at index 1.
_ENCODERS = {"fnet": "feature_encoder", "cnet": "context_encoder"}
_ENCODER_STEM = {"conv1": "convnormrelu.0", "norm1": "convnormrelu.1", "conv2": "conv"}
# Update block. The small model has one ConvGRU (convz/convr/convq); the large one a separable GRU whose horizontal
# (1x5) convolutions are convz1/convr1/convq1 and vertical (5x1) ones convz2/convr2/convq2.
_UPDATE_BLOCK = {
    "encoder.convc1": "motion_encoder.convcorr1.0",
    "encoder.convc2": "motion_encoder.convcorr2.0",
    "encoder.convf1": "motion_encoder.convflow1.0",
    "encoder.convf2": "motion_encoder.convflow2.0",
    "encoder.conv": "motion_encoder.conv.0",
    "gru.convz": "recurrent_block.convgru1.convz",
    "gru.convr": "recurrent_block.convgru1.convr",
    "gru.convq": "recurrent_block.convgru1.convq",
    "gru.convz1": "recurrent_block.convgru1.convz",
    "gru.convr1": "recurrent_block.convgru1.convr",
    "gru.convq1": "recurrent_block.convgru1.convq",
    "gru.convz2": "recurrent_block.convgru2.convz",
    "gru.convr2": "recurrent_block.convgru2.convr",
    "gru.convq2": "recurrent_block.convgru2.convq",
    "flow_head.conv1": "flow_head.conv1",
    "flow_head.conv2": "flow_head.conv2",
}
# The large model's convex-upsampling mask head is update_block.mask (conv, ReLU, conv); torchvision's is top level.
_MASK_HEAD = {"update_block.mask.0": "mask_predictor.convrelu.0", "update_block.mask.2": "mask_predictor.conv"}
_BLOCK_PART = re.compile(r"^(layer\d\.\d)\.(conv|norm)(\d)$")


def raft_key_to_torchvision(key: str, small: bool) -> str:
    """Map one original RAFT state-dict key (``module.`` prefix allowed) to torchvision's parameter name.

    In the residual blocks (raft-things) the downsampling branch's norm is ``norm3`` and in the bottleneck blocks
    (raft-small) ``norm4``; the original registers it twice, as ``normN`` and as ``downsample.1``, and both map to
    torchvision's ``downsample.1``. Raises ``KeyError`` for a key that is not part of RAFT.
    """
    name = key.removeprefix("module.")
    module, _, tensor = name.rpartition(".")
    top, _, rest = module.partition(".")
    if module in _MASK_HEAD:
        return f"{_MASK_HEAD[module]}.{tensor}"
    if top == "update_block" and rest in _UPDATE_BLOCK:
        return f"update_block.{_UPDATE_BLOCK[rest]}.{tensor}"
    if top in _ENCODERS:
        if rest in _ENCODER_STEM:
            return f"{_ENCODERS[top]}.{_ENCODER_STEM[rest]}.{tensor}"
        if re.fullmatch(r"layer\d\.\d\.downsample\.[01]", rest):
            return f"{_ENCODERS[top]}.{rest}.{tensor}"
        part = _BLOCK_PART.match(rest)
        if part:
            block, kind, index = part.groups()
            if kind == "norm" and int(index) == (4 if small else 3):
                return f"{_ENCODERS[top]}.{block}.downsample.1.{tensor}"
            return f"{_ENCODERS[top]}.{block}.convnormrelu{index}.{0 if kind == 'conv' else 1}.{tensor}"
    raise KeyError(f"'{key}' is not a RAFT parameter")


def is_small_raft_checkpoint(state_dict: dict[str, torch.Tensor]) -> bool:
    """RAFT-small has a plain ConvGRU (``update_block.gru.convz``); RAFT (large) a separable one."""
    return any(key.removeprefix("module.").startswith("update_block.gru.convz.") for key in state_dict)


def convert_raft_state_dict(state_dict: dict[str, torch.Tensor], model: RAFT, small: bool) -> dict[str, torch.Tensor]:
    """Rename an original RAFT state dict for ``model``, checking that the two match tensor for tensor.

    Every source tensor must map to a parameter or buffer of ``model`` with the same shape, aliases must hold equal
    values, and every tensor of ``model`` must receive one. Raises ``ValueError`` naming what does not match.
    """
    target = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, tensor in state_dict.items():
        try:
            name = raft_key_to_torchvision(key, small)
        except KeyError:
            problems.append(f"unknown key {key}")
            continue
        if name not in target or target[name].shape != tensor.shape:
            problems.append(f"{key} -> {name} has no place of shape {tuple(tensor.shape)}")
        elif name in converted and not torch.equal(converted[name], tensor):
            problems.append(f"{key} differs from its alias {name}")
        else:
            converted[name] = tensor
    problems += [f"nothing for {name}" for name in target if name not in converted]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(f"checkpoint does not match torchvision's {'raft_small' if small else 'raft_large'}: {shown}")
    return converted


def is_original_raft_checkpoint(state_dict: dict[str, torch.Tensor]) -> bool:
    """princeton-vl's checkpoints name the encoders ``fnet``/``cnet`` (after a ``module.`` prefix), torchvision not."""
    return any(key.removeprefix("module.").startswith(("fnet.", "cnet.")) for key in state_dict)


def load_raft(
    weights: str | Path = RAFT_WEIGHTS, field_name: str = "raft_weights", hint: str = DIS_HINT
) -> tuple[RAFT, bool]:
    """Build torchvision RAFT from a weights enum name or a file (torchvision's or an original checkpoint); returns
    the frozen model (CPU) and whether it is RAFT-small. Unusable weights raise a one-line
    :class:`~ns_4d_methods.guidance.model_loading.WeightsUnavailableError` naming ``field_name``, with ``hint``."""
    state_dict = load_torchvision_state_dict(weights, field_name, hint)
    if is_original_raft_checkpoint(state_dict):
        small = is_small_raft_checkpoint(state_dict)
    else:  # torchvision's layout: only RAFT (large) has a second, vertical GRU
        small = not any(key.startswith("update_block.recurrent_block.convgru2.") for key in state_dict)
    model = raft_small(weights=None) if small else raft_large(weights=None)
    try:
        if is_original_raft_checkpoint(state_dict):
            state_dict = convert_raft_state_dict(state_dict, model, small)
        model.load_state_dict(state_dict)
    except (ValueError, RuntimeError) as error:
        cause = str(error).strip().splitlines()[0]
        raise WeightsUnavailableError(field_name, str(weights), cause, hint) from error
    model.requires_grad_(False)
    return model.eval(), small


def bounded_size(height: int, width: int, max_size: int) -> tuple[int, int]:
    """(height, width) scaled so that the long side is at most ``max_size`` (never enlarged)."""
    scale = min(1.0, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _as_batch(image: torch.Tensor) -> torch.Tensor:
    if image.ndim == 3:
        return image[None]
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"images must be [H, W, 3] or [B, H, W, 3], got {tuple(image.shape)}")
    return image


class RaftFlow:
    """RAFT optical flow on torchvision's architecture.

    Args:
        weights: a torchvision weights enum name (``Raft_Large_Weights.C_T_V1``, ``Raft_Small_Weights.C_T_V2``, ...)
            or a file: torchvision's state dict, or the original ``raft-things.pth`` / ``raft-small.pth`` (the
            variant is read from the keys).
        field_name: config field holding ``weights``, named in the error when they cannot be loaded.
        iterations: recurrent refinement steps; if None, 20 for RAFT (Instruct 4D-to-4D's setting), 12 for RAFT-small.
        max_size: long side, in pixels, that flow is computed at; larger frames are downscaled for RAFT and the flow
            scaled back to their size (see the module docstring for the memory).
        device: where the network runs.
    """

    def __init__(
        self,
        weights: str | Path = RAFT_WEIGHTS,
        *,
        field_name: str = "raft_weights",
        iterations: int | None = None,
        max_size: int = MAX_FLOW_SIZE,
        device: torch.device | str = "cpu",
    ) -> None:
        model, self.small = load_raft(weights, field_name)
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.iterations = iterations or (12 if self.small else 20)
        self.max_size = max_size

    @torch.no_grad()
    def estimate_flow(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        batch1, batch2 = _as_batch(img1), _as_batch(img2)
        full_height, full_width = batch1.shape[1:3]
        height, width = bounded_size(full_height, full_width, self.max_size)
        # RAFT works at 1/8 resolution: replicate-pad both sides to a multiple of 8, as the original demo does, and
        # to at least 128 px, below which torchvision's correlation pyramid cannot downsample
        pad_h, pad_w = max(-height % 8, MIN_RAFT_SIZE - height), max(-width % 8, MIN_RAFT_SIZE - width)
        padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)

        def prepare(batch: torch.Tensor) -> torch.Tensor:
            pixels = batch.to(self.device, torch.float32).permute(0, 3, 1, 2) * 2.0 - 1.0  # RAFT reads [-1, 1]
            if (height, width) != (full_height, full_width):
                pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True)
            return F.pad(pixels, padding, mode="replicate")

        flow = self.model(prepare(batch1), prepare(batch2), num_flow_updates=self.iterations)[-1]
        flow = flow[:, :, padding[2] : padding[2] + height, padding[0] : padding[0] + width]
        if (height, width) != (full_height, full_width):  # back to the frames' grid, in their pixels
            flow = F.interpolate(flow, size=(full_height, full_width), mode="bilinear", align_corners=False)
            scale = torch.tensor([full_width / width, full_height / height], device=flow.device)
            flow = flow * scale[None, :, None, None]
        flow = flow.permute(0, 2, 3, 1).to(img1.device)
        return flow[0] if img1.ndim == 3 else flow


class DisFlow:
    """OpenCV dense inverse search optical flow (weight-free; runs on the CPU).

    Args:
        preset: OpenCV's speed/quality preset, "ultrafast", "fast" or "medium".
    """

    PRESETS = {
        "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
        "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
        "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
    }

    def __init__(self, preset: Literal["ultrafast", "fast", "medium"] = "medium") -> None:
        self.dis = cv2.DISOpticalFlow_create(self.PRESETS[preset])

    @staticmethod
    def _gray(image: torch.Tensor) -> np.ndarray:
        rgb = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)

    def estimate_flow(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        batch1, batch2 = _as_batch(img1), _as_batch(img2)
        flows = [self.dis.calc(self._gray(a), self._gray(b), None) for a, b in zip(batch1, batch2)]
        flow = torch.from_numpy(np.stack(flows)).to(img1.device)
        return flow[0] if img1.ndim == 3 else flow


def build_flow_estimator(
    backend: FlowBackend,
    *,
    raft_weights: str | Path = RAFT_WEIGHTS,
    field_name: str = "raft_weights",
    iterations: int | None = None,
    max_size: int = MAX_FLOW_SIZE,
    device: torch.device | str = "cpu",
) -> FlowEstimator:
    """The estimator a config asks for: ``"raft"`` (with ``raft_weights``, see :class:`RaftFlow`) or ``"dis"``."""
    if backend == "dis":
        return DisFlow()
    if backend == "raft":
        return RaftFlow(raft_weights, field_name=field_name, iterations=iterations, max_size=max_size, device=device)
    raise ValueError(f"unknown optical-flow backend '{backend}' (expected 'raft' or 'dis')")
