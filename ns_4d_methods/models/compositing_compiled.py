"""Front-to-back compositing of sorted tile lists, compiled with numba for CPUs.

The same computation as :class:`ns_4d_methods.models.gaussian_rasterizer_torch._CompositeBatch` (the rules are listed
there and in that module's docstring), done pixel by pixel the way gsplat's CUDA kernels do it: a pixel stops at the
Gaussian that would take its transmittance to ``<= 1e-4``, so Gaussians hidden behind opaque ones cost nothing. The
PyTorch version evaluates every Gaussian of a tile at every pixel of it; on opaque scenes most of that work is hidden.

Tiles run in parallel (numba ``prange``); each tile's pairs (tile, Gaussian) are written by one thread only, so the
backward pass accumulates gradients per pair without races and sums them per Gaussian afterwards (``index_add_``).
The backward pass recomputes each pixel's alphas front to back into a small scratch array, then walks them back to
front with the sum ``S_k`` of the weighted gradients behind; nothing per pixel and Gaussian is kept between passes.

Arithmetic is float32 with float32 constants, as in the PyTorch version, so both make the same skip and stop
decisions except where ``exp`` rounds differently by an ulp at a threshold.
"""

from __future__ import annotations

import os
import threading
from typing import Optional, Tuple

import numba
import numpy as np
import torch
from torch import Tensor

_MIN_ALPHA = np.float32(1.0 / 255.0)
_MAX_ALPHA = np.float32(0.999)
_MIN_TRANSMITTANCE = np.float32(1e-4)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_TINY = np.float32(1e-12)
# numba's own thread pool ("workqueue"): it is fork-safe (GNU OpenMP's is not) and needs nothing installed; the
# default search tries TBB first and warns on every run where an old TBB is installed. Unless the user chose a layer.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
# The workqueue aborts the process when two threads launch parallel kernels at once (the viewer renders from its own
# thread while training runs): one kernel at a time.
_KERNEL_LOCK = threading.Lock()


@numba.njit(inline="always")
def _alpha(mean, conic, opacity, g, px, py):
    """(alpha, dx, dy) of Gaussian ``g`` at pixel centre (px, py); alpha 0 when the Gaussian is skipped there."""
    dx = mean[g, 0] - px
    dy = mean[g, 1] - py
    a, b, c = conic[g, 0], conic[g, 1], conic[g, 2]
    sigma = dx * (_HALF * a * dx + b * dy) + _HALF * c * dy * dy
    if sigma < 0:
        return np.float32(0.0), dx, dy
    alpha = min(_MAX_ALPHA, opacity[g] * np.exp(-sigma))
    if alpha < _MIN_ALPHA:
        return np.float32(0.0), dx, dy
    return alpha, dx, dy


@numba.njit(parallel=True, cache=True)
def _forward(mean, conic, opacity, color, gaussian_ids, tile_starts, tile_size, tile_width, render, alphas):
    """Fills ``render`` [T, P, D] and ``alphas`` [T, P]."""
    n_tiles = len(tile_starts) - 1
    n_pix = tile_size * tile_size
    depth = color.shape[1]
    for tile in numba.prange(n_tiles):
        start, end = tile_starts[tile], tile_starts[tile + 1]
        x0 = (tile % tile_width) * tile_size
        y0 = (tile // tile_width) * tile_size
        for p in range(n_pix):
            px = np.float32(x0 + p % tile_size) + _HALF
            py = np.float32(y0 + p // tile_size) + _HALF
            transmittance = _ONE
            for k in range(start, end):
                g = gaussian_ids[k]
                alpha, _, _ = _alpha(mean, conic, opacity, g, px, py)
                if alpha == 0:
                    continue
                after = transmittance * (_ONE - alpha)
                if after <= _MIN_TRANSMITTANCE:
                    break
                weight = alpha * transmittance
                for d in range(depth):
                    render[tile, p, d] += weight * color[g, d]
                transmittance = after
            alphas[tile, p] = _ONE - transmittance


@numba.njit(parallel=True, cache=True)
def _backward(
    mean, conic, opacity, color, gaussian_ids, tile_starts, tile_size, tile_width, grad_render, grad_alphas,
    grad_mean, grad_conic, grad_opacity, grad_color, abs_grad_mean,
):
    """Fills the per-pair gradients ``grad_*`` [M, ...] (and ``abs_grad_mean``: sum over pixels of |dL/d mean|)."""
    n_tiles = len(tile_starts) - 1
    n_pix = tile_size * tile_size
    depth = color.shape[1]
    for tile in numba.prange(n_tiles):
        start, end = tile_starts[tile], tile_starts[tile + 1]
        if end == start:
            continue
        x0 = (tile % tile_width) * tile_size
        y0 = (tile // tile_width) * tile_size
        alpha_k = np.empty(end - start, dtype=np.float32)
        before_k = np.empty(end - start, dtype=np.float32)
        for p in range(n_pix):
            px = np.float32(x0 + p % tile_size) + _HALF
            py = np.float32(y0 + p // tile_size) + _HALF
            transmittance = _ONE
            stop = end
            for k in range(start, end):
                alpha, _, _ = _alpha(mean, conic, opacity, gaussian_ids[k], px, py)
                alpha_k[k - start] = alpha
                before_k[k - start] = transmittance
                if alpha == 0:
                    continue
                after = transmittance * (_ONE - alpha)
                if after <= _MIN_TRANSMITTANCE:
                    stop = k
                    break
                transmittance = after
            behind = np.float32(0.0)  # S_k: sum of w_m v_m over the Gaussians m behind k
            for k in range(stop - 1, start - 1, -1):
                alpha = alpha_k[k - start]
                if alpha == 0:
                    continue
                g = gaussian_ids[k]
                weight = alpha * before_k[k - start]
                v = grad_alphas[tile, p]
                for d in range(depth):
                    v += grad_render[tile, p, d] * color[g, d]
                    grad_color[k, d] += weight * grad_render[tile, p, d]
                if alpha < _MAX_ALPHA:  # a clamped alpha passes no gradient
                    alpha_grad = weight * v - alpha * behind / (_ONE - alpha)  # alpha dL/d alpha
                    dx, dy = mean[g, 0] - px, mean[g, 1] - py  # alpha is known: no second exp
                    a, b, c = conic[g, 0], conic[g, 1], conic[g, 2]
                    grad_opacity[k] += alpha_grad / max(opacity[g], _TINY)
                    grad_sigma = -alpha_grad
                    grad_dx = grad_sigma * (a * dx + b * dy)
                    grad_dy = grad_sigma * (c * dy + b * dx)
                    grad_mean[k, 0] += grad_dx
                    grad_mean[k, 1] += grad_dy
                    grad_conic[k, 0] += _HALF * grad_sigma * dx * dx
                    grad_conic[k, 1] += grad_sigma * dx * dy
                    grad_conic[k, 2] += _HALF * grad_sigma * dy * dy
                    abs_grad_mean[k, 0] += abs(grad_dx)
                    abs_grad_mean[k, 1] += abs(grad_dy)
                behind += weight * v


def load_kernels() -> None:
    """Compiles the kernels, or loads them from numba's cache (about 0.4 s), by running them on an empty image, so
    that the cost does not land on the first training step (where it inflates the first ETA nerfstudio prints)."""
    empty = np.zeros((0, 2), np.float32)
    _forward(empty, np.zeros((0, 3), np.float32), np.zeros(0, np.float32), np.zeros((0, 3), np.float32),
             np.zeros(0, np.int64), np.zeros(1, np.int64), 8, 1, np.zeros((0, 64, 3), np.float32),
             np.zeros((0, 64), np.float32))
    _backward(empty, np.zeros((0, 3), np.float32), np.zeros(0, np.float32), np.zeros((0, 3), np.float32),
              np.zeros(0, np.int64), np.zeros(1, np.int64), 8, 1, np.zeros((0, 64, 3), np.float32),
              np.zeros((0, 64), np.float32), empty, np.zeros((0, 3), np.float32), np.zeros(0, np.float32),
              np.zeros((0, 3), np.float32), empty)


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class CompiledComposite(torch.autograd.Function):
    """Composites one camera's tiles: ``means2d`` [N, 2], ``conics`` [N, 3], ``opacities`` [N], ``colors`` [N, D]
    and the tile lists (``gaussian_ids`` [M] grouped by tile in depth order, ``tile_starts`` [T + 1] offsets into
    them). Returns colours [T, P, D] and alphas [T, P, 1] with P = tile_size^2. ``absgrad`` [N, 2], when given,
    receives the sum over pixels of ``|dL / d means2d|`` (gsplat's ``means2d.absgrad``)."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, gaussian_ids, tile_starts, tile_size, tile_width, absgrad):
        n_tiles, n_pix = len(tile_starts) - 1, tile_size * tile_size
        render = np.zeros((n_tiles, n_pix, colors.shape[-1]), dtype=np.float32)
        alphas = np.zeros((n_tiles, n_pix), dtype=np.float32)
        with _KERNEL_LOCK:
            _forward(
                _numpy(means2d), _numpy(conics), _numpy(opacities), _numpy(colors), _numpy(gaussian_ids),
                _numpy(tile_starts), tile_size, tile_width, render, alphas,
            )
        ctx.save_for_backward(means2d, conics, opacities, colors, gaussian_ids, tile_starts)
        ctx.geometry = (tile_size, tile_width)
        ctx.absgrad = absgrad
        return torch.from_numpy(render), torch.from_numpy(alphas)[..., None]

    @staticmethod
    def backward(ctx, grad_render: Tensor, grad_alphas: Tensor):
        means2d, conics, opacities, colors, gaussian_ids, tile_starts = ctx.saved_tensors
        m, d = len(gaussian_ids), colors.shape[-1]
        pair = {name: np.zeros(shape, dtype=np.float32) for name, shape in
                (("mean", (m, 2)), ("conic", (m, 3)), ("opacity", (m,)), ("color", (m, d)), ("abs", (m, 2)))}
        with _KERNEL_LOCK:
            _backward(
                _numpy(means2d), _numpy(conics), _numpy(opacities), _numpy(colors), _numpy(gaussian_ids),
                _numpy(tile_starts), *ctx.geometry, _numpy(grad_render.float()), _numpy(grad_alphas[..., 0].float()),
                pair["mean"], pair["conic"], pair["opacity"], pair["color"], pair["abs"],
            )

        def per_gaussian(name: str, like: Tensor) -> Tensor:
            return torch.zeros_like(like).index_add_(0, gaussian_ids, torch.from_numpy(pair[name]).to(like.dtype))

        if ctx.absgrad is not None:
            ctx.absgrad.index_add_(0, gaussian_ids, torch.from_numpy(pair["abs"]).to(ctx.absgrad.dtype))
        return (
            per_gaussian("mean", means2d), per_gaussian("conic", conics), per_gaussian("opacity", opacities),
            per_gaussian("color", colors), None, None, None, None, None,
        )


def composite_compiled(
    tile_ids: Tensor,
    gaussian_ids: Tensor,
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    colors: Tensor,
    tile_size: int,
    tile_width: int,
    n_tiles: int,
    absgrad: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """``_composite_tiles``'s contract on CPU float32 tensors: ([n_tiles, tile_size^2, D], [n_tiles, tile_size^2, 1])."""
    counts = torch.bincount(tile_ids, minlength=n_tiles)
    tile_starts = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return CompiledComposite.apply(
        means2d.float(), conics.float(), opacities.float(), colors.float(), gaussian_ids, tile_starts, tile_size,
        tile_width, absgrad,
    )
