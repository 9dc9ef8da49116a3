"""Backward warping by optical flow and the forward-backward consistency (occlusion) mask.

Conventions follow :mod:`ns_4d_methods.editing.optical_flow`: images ``[H, W, C]`` or ``[B, H, W, C]``, flows
``[H, W, 2]`` or ``[B, H, W, 2]`` holding ``(dx, dy)`` in pixels.

Instruct 4D-to-4D warps the *edited* previous frame into the current frame with the flow current -> previous
(``flow_bwd``), and keeps the current image where the forward-backward check fails (occluded, disoccluded or out of
view).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _batched(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.ndim == 4 else tensor[None]


def _sample_positions(flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates ``x + dx``, ``y + dy`` that a flow [B, H, W, 2] points to."""
    height, width = flow.shape[1:3]
    ys, xs = torch.meshgrid(
        torch.arange(height, device=flow.device, dtype=flow.dtype),
        torch.arange(width, device=flow.device, dtype=flow.dtype),
        indexing="ij",
    )
    return xs + flow[..., 0], ys + flow[..., 1]


def backward_warp(image: torch.Tensor, flow: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """``out[y, x] = image[y + dy, x + dx]`` with ``(dx, dy) = flow[y, x]``, bilinear.

    To bring frame ``a`` into frame ``b``'s pixel grid, pass the flow from ``b`` to ``a``. Points outside ``image``
    take the border value (``padding_mode`` as in ``torch.nn.functional.grid_sample``).
    """
    images, flows = _batched(image), _batched(flow).to(image.dtype)
    height, width = images.shape[1:3]
    x, y = _sample_positions(flows)
    # align_corners=True: -1 and 1 are the centres of the first and last pixels
    grid = torch.stack([2.0 * x / max(width - 1, 1) - 1.0, 2.0 * y / max(height - 1, 1) - 1.0], dim=-1)
    warped = F.grid_sample(
        images.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode=padding_mode, align_corners=True
    ).permute(0, 2, 3, 1)
    return warped if image.ndim == 4 else warped[0]


def flow_in_bounds(flow: torch.Tensor) -> torch.Tensor:
    """Where a flow points inside the image it maps to (a pixel whose match is out of view has no source)."""
    flows = _batched(flow)
    height, width = flows.shape[1:3]
    x, y = _sample_positions(flows)
    inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    return inside if flow.ndim == 4 else inside[0]


def forward_backward_valid_mask(
    flow_fwd: torch.Tensor, flow_bwd: torch.Tensor, alpha: float = 0.5, beta: float = 0.5
) -> torch.Tensor:
    """Pixels of the current frame where the flow to the previous frame is trustworthy (not occluded).

    ``flow_fwd`` is previous -> current (on the previous frame's grid), ``flow_bwd`` current -> previous (on the
    current frame's grid). A pixel is valid where going back and forth returns close to where it started, the
    criterion of the Instruct 4D-to-4D code, with ``w = warp(flow_fwd, flow_bwd)``::

        |flow_bwd + w| < alpha (|flow_bwd| + |w|) + beta

    and where ``flow_bwd`` points inside the previous frame. Returns a bool mask [H, W] (or [B, H, W]).
    """
    fwd_at_match = backward_warp(flow_fwd, flow_bwd)
    round_trip = torch.linalg.vector_norm(flow_bwd + fwd_at_match, dim=-1)
    magnitude = torch.linalg.vector_norm(flow_bwd, dim=-1) + torch.linalg.vector_norm(fwd_at_match, dim=-1)
    return (round_trip < alpha * magnitude + beta) & flow_in_bounds(flow_bwd)
