"""Front-to-back compositing of sorted tile lists, compiled with numba for CPUs.

The same computation as :class:`ns_4d_methods.models.gaussian_rasterizer_torch._CompositeBatch` (the rules are listed
there and in that module's docstring), done pixel by pixel the way gsplat's CUDA kernels do it: a pixel stops at the
Gaussian that would take its transmittance to ``<= 1e-4``, so Gaussians hidden behind opaque ones cost nothing. The
PyTorch version evaluates every Gaussian of a tile at every pixel of it; on opaque scenes most of that work is hidden.

Work is split by pixel, not by tile: numba thread ``c`` of ``C`` takes the pixels ``p = c mod C`` of every tile, since
a scene's Gaussians often sit in a few tiles (on the trained sample scene 78 of 256 tiles hold all pairs, and
splitting by tile left one of two threads idle). The forward pass keeps, per pixel, its final transmittance and where
it stopped; the backward pass walks each pixel back to front from there, recovering the transmittance before each
Gaussian by division (gsplat's CUDA backward does the same), with the sum ``S_k`` of the weighted gradients behind.
Each thread accumulates gradients per pair (tile, Gaussian) in its own slice, so there are no races; the slices and
then the pairs of each Gaussian are summed afterwards (``index_add_``).

A Gaussian's ``exp`` is skipped at pixels where ``sigma`` rules out ``alpha >= 1/255`` with a margin
(``_skip_sigma``): most pairs of a tile do not reach most of its pixels. Measured on a captured training step of the
sample scene (10,000 Gaussians, 128 px, 2 cores): forward 24 -> 16 ms, backward 34 -> 21 ms.

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
def _alpha(mean, conic, opacity, skip, g, px, py):
    """(alpha, dx, dy) of Gaussian ``g`` at pixel centre (px, py); alpha 0 when the Gaussian is skipped there."""
    dx = mean[g, 0] - px
    dy = mean[g, 1] - py
    a, b, c = conic[g, 0], conic[g, 1], conic[g, 2]
    sigma = dx * (_HALF * a * dx + b * dy) + _HALF * c * dy * dy
    if sigma < 0 or sigma > skip[g]:
        return np.float32(0.0), dx, dy
    alpha = min(_MAX_ALPHA, opacity[g] * np.exp(-sigma))
    if alpha < _MIN_ALPHA:
        return np.float32(0.0), dx, dy
    return alpha, dx, dy


def _skip_sigma(opacity: np.ndarray) -> np.ndarray:
    """Per Gaussian, the ``sigma`` beyond which ``opacity * exp(-sigma) < 1/255`` holds with a margin of 0.1 % of
    alpha (far above float32 rounding), so the ``exp`` can be skipped without changing any decision: most pairs of a
    tile do not reach most of its pixels (84 % on the trained sample scene)."""
    with np.errstate(divide="ignore"):
        return np.log(np.float32(255.0) * opacity) + np.float32(1e-3)


@numba.njit(parallel=True, cache=True)
def _forward(mean, conic, opacity, skip, color, gaussian_ids, tile_starts, tile_size, tile_width, n_chunks, render,
             transmittances, stops):
    """Fills ``render`` [T, P, D], the final ``transmittances`` [T, P] and ``stops`` [T, P]: the pair index where each
    pixel stopped (its tile's end when it never turned opaque). Chunk ``c`` of ``n_chunks`` does the pixels
    ``p = c mod n_chunks`` of every tile: a scene's work sits in few tiles, so splitting by tile left threads idle."""
    n_tiles = len(tile_starts) - 1
    n_pix = tile_size * tile_size
    depth = color.shape[1]
    for chunk in numba.prange(n_chunks):
        for tile in range(n_tiles):
            start, end = tile_starts[tile], tile_starts[tile + 1]
            x0 = (tile % tile_width) * tile_size
            y0 = (tile // tile_width) * tile_size
            for p in range(chunk, n_pix, n_chunks):
                px = np.float32(x0 + p % tile_size) + _HALF
                py = np.float32(y0 + p // tile_size) + _HALF
                transmittance = _ONE
                stop = end
                for k in range(start, end):
                    g = gaussian_ids[k]
                    alpha, _, _ = _alpha(mean, conic, opacity, skip, g, px, py)
                    if alpha == 0:
                        continue
                    after = transmittance * (_ONE - alpha)
                    if after <= _MIN_TRANSMITTANCE:
                        stop = k
                        break
                    weight = alpha * transmittance
                    for d in range(depth):
                        render[tile, p, d] += weight * color[g, d]
                    transmittance = after
                transmittances[tile, p] = transmittance
                stops[tile, p] = stop


@numba.njit(parallel=True, cache=True)
def _backward(
    mean, conic, opacity, skip, color, gaussian_ids, tile_starts, tile_size, tile_width, transmittances, stops,
    grad_render, grad_alphas, grad_mean, grad_conic, grad_opacity, grad_color, abs_grad_mean,
):
    """Fills the per-pair gradients ``grad_*`` [C, M, ...] of the C pixel chunks (``_forward``'s split; each chunk
    writes its own slice, so no two threads touch one entry), and ``abs_grad_mean``: sum over pixels of
    |dL/d mean|. Each pixel is walked back to front from where the forward pass stopped, its transmittance before
    each Gaussian recovered by division (as gsplat's CUDA backward does; alpha <= 0.999 bounds the division)."""
    n_tiles = len(tile_starts) - 1
    n_pix = tile_size * tile_size
    depth = color.shape[1]
    n_chunks = grad_mean.shape[0]
    for chunk in numba.prange(n_chunks):
        for tile in range(n_tiles):
            start = tile_starts[tile]
            x0 = (tile % tile_width) * tile_size
            y0 = (tile // tile_width) * tile_size
            for p in range(chunk, n_pix, n_chunks):
                px = np.float32(x0 + p % tile_size) + _HALF
                py = np.float32(y0 + p // tile_size) + _HALF
                transmittance = transmittances[tile, p]  # after the Gaussian being visited
                behind = np.float32(0.0)  # S_k: sum of w_m v_m over the Gaussians m behind k
                for k in range(stops[tile, p] - 1, start - 1, -1):
                    g = gaussian_ids[k]
                    alpha, dx, dy = _alpha(mean, conic, opacity, skip, g, px, py)
                    if alpha == 0:
                        continue
                    transmittance = transmittance / (_ONE - alpha)
                    weight = alpha * transmittance
                    v = grad_alphas[tile, p]
                    for d in range(depth):
                        v += grad_render[tile, p, d] * color[g, d]
                        grad_color[chunk, k, d] += weight * grad_render[tile, p, d]
                    if alpha < _MAX_ALPHA:  # a clamped alpha passes no gradient
                        alpha_grad = weight * v - alpha * behind / (_ONE - alpha)  # alpha dL/d alpha
                        a, b, c = conic[g, 0], conic[g, 1], conic[g, 2]
                        grad_opacity[chunk, k] += alpha_grad / max(opacity[g], _TINY)
                        grad_sigma = -alpha_grad
                        grad_dx = grad_sigma * (a * dx + b * dy)
                        grad_dy = grad_sigma * (c * dy + b * dx)
                        grad_mean[chunk, k, 0] += grad_dx
                        grad_mean[chunk, k, 1] += grad_dy
                        grad_conic[chunk, k, 0] += _HALF * grad_sigma * dx * dx
                        grad_conic[chunk, k, 1] += grad_sigma * dx * dy
                        grad_conic[chunk, k, 2] += _HALF * grad_sigma * dy * dy
                        abs_grad_mean[chunk, k, 0] += abs(grad_dx)
                        abs_grad_mean[chunk, k, 1] += abs(grad_dy)
                    behind += weight * v


def _chunks(n_pix: int) -> int:
    """Pixel chunks to split a camera into: one per numba thread."""
    return max(1, min(numba.get_num_threads(), n_pix))


def load_kernels() -> None:
    """Compiles the kernels, or loads them from numba's cache (about 0.4 s), by running them on an empty image, so
    that the cost does not land on the first training step (where it inflates the first ETA nerfstudio prints)."""
    f32, ids = (lambda *shape: np.zeros(shape, np.float32)), np.zeros(1, np.int64)
    stops = np.zeros((0, 64), np.int64)
    _forward(f32(0, 2), f32(0, 3), f32(0), f32(0), f32(0, 3), ids[:0], ids, 8, 1, 1, f32(0, 64, 3), f32(0, 64), stops)
    _backward(
        f32(0, 2), f32(0, 3), f32(0), f32(0), f32(0, 3), ids[:0], ids, 8, 1, f32(0, 64), stops, f32(0, 64, 3),
        f32(0, 64), f32(1, 0, 2), f32(1, 0, 3), f32(1, 0), f32(1, 0, 3), f32(1, 0, 2),
    )


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
        transmittances = np.empty((n_tiles, n_pix), dtype=np.float32)
        stops = np.empty((n_tiles, n_pix), dtype=np.int64)
        opacity = _numpy(opacities)
        with _KERNEL_LOCK:
            _forward(
                _numpy(means2d), _numpy(conics), opacity, _skip_sigma(opacity), _numpy(colors), _numpy(gaussian_ids),
                _numpy(tile_starts), tile_size, tile_width, _chunks(n_pix), render, transmittances, stops,
            )
        transmittances, stops = torch.from_numpy(transmittances), torch.from_numpy(stops)
        ctx.save_for_backward(means2d, conics, opacities, colors, gaussian_ids, tile_starts, transmittances, stops)
        ctx.geometry = (tile_size, tile_width)
        ctx.absgrad = absgrad
        return torch.from_numpy(render), (1.0 - transmittances)[..., None]

    @staticmethod
    def backward(ctx, grad_render: Tensor, grad_alphas: Tensor):
        means2d, conics, opacities, colors, gaussian_ids, tile_starts, transmittances, stops = ctx.saved_tensors
        m, d, chunks = len(gaussian_ids), colors.shape[-1], _chunks(ctx.geometry[0] ** 2)
        pair = {name: np.zeros((chunks, m, *shape), dtype=np.float32) for name, shape in
                (("mean", (2,)), ("conic", (3,)), ("opacity", ()), ("color", (d,)), ("abs", (2,)))}
        opacity = _numpy(opacities)
        with _KERNEL_LOCK:
            _backward(
                _numpy(means2d), _numpy(conics), opacity, _skip_sigma(opacity), _numpy(colors), _numpy(gaussian_ids),
                _numpy(tile_starts), *ctx.geometry, transmittances.numpy(), stops.numpy(), _numpy(grad_render.float()),
                _numpy(grad_alphas[..., 0].float()),
                pair["mean"], pair["conic"], pair["opacity"], pair["color"], pair["abs"],
            )

        def per_pair(name: str) -> Tensor:
            return torch.from_numpy(pair[name].sum(0) if chunks > 1 else pair[name][0])

        def per_gaussian(name: str, like: Tensor) -> Tensor:
            return torch.zeros_like(like).index_add_(0, gaussian_ids, per_pair(name).to(like.dtype))

        if ctx.absgrad is not None:
            ctx.absgrad.index_add_(0, gaussian_ids, per_pair("abs").to(ctx.absgrad.dtype))
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
