"""Differentiable Gaussian rasterization without CUDA: PyTorch, with the compositing compiled by numba on CPUs.

gsplat 1.4.0's ``rasterization`` needs its CUDA extension (even its ``_rasterization`` reference calls it for tile
intersection). This module assembles the same computation from gsplat's pure-PyTorch pieces in
``gsplat.cuda._torch_impl`` (covariances, projection, spherical harmonics) plus tile binning and front-to-back
compositing written here, following gsplat's CUDA kernels' conventions:

- tiles of ``tile_size`` pixels; a Gaussian touches the tiles its ``3 sigma`` square covers (``isect_tiles``);
- per tile, Gaussians in increasing camera depth; pixel centres at ``(j + 0.5, i + 0.5)``;
- ``alpha = min(0.999, opacity * exp(-sigma))``, skipped when ``sigma < 0`` or ``alpha < 1/255``;
- a pixel stops before the Gaussian that would take its transmittance to ``<= 1e-4`` (that one is excluded);
- ``render = sum_i alpha_i T_i c_i + T background``, ``render_alpha = 1 - T``.

Autograd gives the backward pass, except through the compositing, whose backward is written out. On CPU tensors the
compositing runs in numba kernels (:mod:`ns_4d_methods.models.compositing_compiled`) that stop each pixel where it
becomes opaque, as gsplat's CUDA kernels do; elsewhere (MPS) it runs as PyTorch tile batches
(:class:`_CompositeBatch`), whose memory is bounded: the per-pixel work is done on ``[tiles, tile pixels, Gaussians
in the tile]`` arrays, never ``[pixels, all Gaussians]``. Sample scene, 10,000 trained Gaussians, 128 px, 2 cores:
292 ms a training step with the PyTorch tile batches, 168 ms with the compiled compositing.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics
from torch import Tensor
from typing_extensions import Literal

from ns_4d_methods.models.compositing_compiled import composite_compiled

_MIN_ALPHA = 1.0 / 255.0
_MAX_ALPHA = 0.999
_MIN_TRANSMITTANCE = 1e-4


class _CompositeBatch(torch.autograd.Function):
    """Front-to-back compositing of a batch of B tiles of P pixels, each with its K Gaussians in depth order.

    Inputs are gathered per tile: ``mean`` [B, K, 2], ``conic`` [B, K, 3] (a, b, c of the inverse 2D covariance),
    ``opacity`` [B, K] (0 on padding slots), ``color`` [B, K, D], pixel centres ``px``/``py`` [B, P]. Returns the
    composited colours [B, P, D] and alphas [B, P, 1].

    The backward pass is written out rather than left to autograd, which kept about ten [B, P, K] intermediates
    alive and walked them all back. With ``w_k = alpha_k T_(k-1)`` (zero once the pixel has ended) and ``v_k`` the
    loss gradient of ``w_k`` (``dL/dC . c_k + dL/dA``), the gradient of ``alpha_k`` is
    ``w_k v_k / alpha_k - S_k / (1 - alpha_k)`` with ``S_k = sum_(m > k) w_m v_m``; through
    ``alpha = o exp(-sigma)`` it reaches the opacity (``alpha / o``) and ``sigma`` (``-alpha``), and through
    ``sigma = (a dx^2 + c dy^2) / 2 + b dx dy`` the conic and the centre. Clamped alphas (at 0.999, or dropped below
    1/255) pass no gradient, as in gsplat. ``absgrad`` (gsplat's ``means2d.absgrad``, AbsGS) receives the sum over
    pixels of ``|dL / d(mean - pixel)|`` per Gaussian, indexed by ``gaussian_ids``.
    """

    @staticmethod
    def forward(ctx, mean, conic, opacity, color, px, py, gaussian_ids, absgrad):
        dx = mean[:, None, :, 0] - px[:, :, None]  # [B, P, K]
        dy = mean[:, None, :, 1] - py[:, :, None]
        a, b, c = (conic[:, None, :, i] for i in range(3))
        sigma = dx * (0.5 * a * dx + b * dy) + 0.5 * c * dy * dy
        # sigma < 0 (not positive definite) is skipped; clamping first keeps exp finite
        alpha = torch.clamp_max(opacity[:, None, :] * torch.exp(-sigma.clamp_min(0.0)), _MAX_ALPHA)
        alpha = torch.where((sigma >= 0) & (alpha >= _MIN_ALPHA), alpha, 0.0)
        transmittance = torch.cumprod(1.0 - alpha, dim=-1)  # after each Gaussian
        before = torch.cat([torch.ones_like(transmittance[..., :1]), transmittance[..., :-1]], dim=-1)
        # The Gaussian that would end the pixel (T <= 1e-4 after it) and all behind it are left out.
        weights = torch.where(transmittance > _MIN_TRANSMITTANCE, alpha * before, 0.0)  # [B, P, K]
        ctx.save_for_backward(mean, conic, opacity, color, px, py, alpha, weights, gaussian_ids)
        ctx.absgrad = absgrad
        return torch.bmm(weights, color), weights.sum(-1, keepdim=True)

    @staticmethod
    def backward(ctx, grad_color: Tensor, grad_alpha: Tensor):
        mean, conic, opacity, color, px, py, alpha, weights, gaussian_ids = ctx.saved_tensors
        wv = weights * (torch.bmm(grad_color, color.transpose(1, 2)) + grad_alpha)  # w_k v_k
        behind = wv.sum(-1, keepdim=True) - wv.cumsum(-1)  # S_k
        # alpha_k dL/d alpha_k where alpha moves with opacity and sigma
        moving = (alpha > 0) & (alpha < _MAX_ALPHA)
        alpha_grad = torch.where(moving, wv - alpha * behind / (1.0 - alpha), 0.0)
        grad_opacity = alpha_grad.sum(1) / opacity.clamp_min(1e-12)
        dx = mean[:, None, :, 0] - px[:, :, None]
        dy = mean[:, None, :, 1] - py[:, :, None]
        a, b, c = (conic[:, None, :, i] for i in range(3))
        grad_sigma = -alpha_grad
        grad_dx = grad_sigma * (a * dx + b * dy)
        grad_dy = grad_sigma * (c * dy + b * dx)
        grad_mean = torch.stack([grad_dx.sum(1), grad_dy.sum(1)], dim=-1)
        grad_sigma_dx = grad_sigma * dx
        grad_conic = torch.stack(
            [0.5 * (grad_sigma_dx * dx).sum(1), (grad_sigma_dx * dy).sum(1), 0.5 * (grad_sigma * dy * dy).sum(1)],
            dim=-1,
        )
        grad_colors = torch.bmm(weights.transpose(1, 2), grad_color)
        if ctx.absgrad is not None:
            per_gaussian = torch.stack([grad_dx.abs().sum(1), grad_dy.abs().sum(1)], dim=-1)  # [B, K, 2]
            ctx.absgrad.index_add_(0, gaussian_ids.reshape(-1), per_gaussian.reshape(-1, 2))
        return grad_mean, grad_conic, grad_opacity, grad_colors, None, None, None, None


def _tile_intersections(
    means2d: Tensor,
    radii: Tensor,
    depths: Tensor,
    conics: Tensor,
    opacities: Tensor,
    tile_size: int,
    tile_width: int,
    tile_height: int,
) -> Tuple[Tensor, Tensor]:
    """(tile id, Gaussian id) pairs of one camera, grouped by tile and in increasing depth within a tile.

    Candidates are gsplat's ``isect_tiles`` ranges: floor/ceil of ``(mean2d -/+ radius) / tile_size``, clamped to
    the tile grid, Gaussians with ``radius == 0`` culled. A pair is then dropped when no pixel centre of the tile can
    reach ``alpha >= 1/255``: with ``lambda`` the smallest eigenvalue of the conic and ``d`` the distance from the
    mean to the tile's pixel centres, ``sigma >= lambda d^2 / 2``. Those pairs would be skipped pixel by pixel
    anyway, so the image is unchanged; dropping them early saves most of the per-pixel work.
    """
    visible = torch.nonzero(radii > 0).squeeze(-1)
    visible = visible[torch.argsort(depths[visible], stable=True)]  # depth order survives the stable tile sort below
    center = means2d[visible] / tile_size
    radius = (radii[visible] / tile_size)[:, None]
    grid = torch.tensor([tile_width, tile_height], device=means2d.device)
    lo = torch.minimum(torch.floor(center - radius).clamp_min(0).long(), grid)
    hi = torch.minimum(torch.ceil(center + radius).clamp_min(0).long(), grid)
    span = hi - lo  # [V, 2] tiles in x and y
    counts = span[:, 0] * span[:, 1]
    owner = torch.repeat_interleave(torch.arange(len(visible), device=means2d.device), counts)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(len(owner), device=means2d.device) - first[owner]
    tile_xy = torch.stack([lo[owner, 0] + local % span[owner, 0], lo[owner, 1] + local // span[owner, 0]], dim=-1)

    a, b, c = conics[visible].unbind(-1)
    lambda_min = (0.5 * (a + c) - torch.sqrt((0.5 * (a - c)) ** 2 + b**2)).clamp_min(0.0)
    pixel_lo = tile_xy * tile_size + 0.5
    gap = torch.maximum(pixel_lo - means2d[visible][owner], means2d[visible][owner] - (pixel_lo + tile_size - 1))
    dist2 = (gap.clamp_min(0.0) ** 2).sum(-1)
    reachable = 0.5 * lambda_min[owner] * dist2 <= torch.log(255.0 * opacities[visible][owner]) + 1e-4
    tile_xy, owner = tile_xy[reachable], owner[reachable]

    tile_ids = tile_xy[:, 1] * tile_width + tile_xy[:, 0]
    order = torch.argsort(tile_ids, stable=True)
    return tile_ids[order], visible[owner[order]]


def _composite_tiles(
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
    max_batch_elements: int,
) -> Tuple[Tensor, Tensor]:
    """Front-to-back compositing of one camera's tiles: ([n_tiles, tile_size^2, D] colours, [n_tiles, tile_size^2, 1]
    alphas), zero (fully transparent) on tiles no Gaussian touches."""
    device = means2d.device
    n_pix = tile_size * tile_size
    counts = torch.bincount(tile_ids, minlength=n_tiles)
    starts = torch.cumsum(counts, 0) - counts
    # Tiles sorted by load, and a batch only takes tiles with at least half the Gaussians of its busiest one: every
    # tile is padded to the batch's count, so this bounds the wasted work by 2x (unbounded, it was 4x on seeded scenes).
    busy = torch.argsort(counts, descending=True)
    busy = busy[counts[busy] > 0]
    busy_counts = counts[busy]
    # first position in ``busy`` whose count is below half of each position's count (counts descend)
    half_end = torch.searchsorted(-busy_counts, -((busy_counts + 1) // 2), right=True).tolist()
    busy, counts_list = busy.tolist(), counts.tolist()
    local_y, local_x = torch.meshgrid(
        torch.arange(tile_size, device=device), torch.arange(tile_size, device=device), indexing="ij"
    )
    local_x, local_y = local_x.reshape(-1), local_y.reshape(-1)

    # Empty slices of the inputs keep the outputs in the autograd graph when no Gaussian is visible (as gsplat's are).
    out_tiles = [tile_ids[:0]]
    out_colors = [colors[:0, None, :].expand(0, n_pix, colors.shape[-1])]
    out_alphas = [opacities[:0, None, None].expand(0, n_pix, 1)]
    i = 0
    while i < len(busy):
        k_max = counts_list[busy[i]]
        n_batch = max(1, min(half_end[i] - i, max_batch_elements // (n_pix * k_max)))
        tiles = torch.tensor(busy[i : i + n_batch], device=device)
        i += n_batch

        slot = torch.arange(k_max, device=device)
        valid = slot[None, :] < counts[tiles][:, None]  # [B, K]
        pair = (starts[tiles][:, None] + slot[None, :]).clamp_max(len(gaussian_ids) - 1)
        gid = torch.where(valid, gaussian_ids[pair], 0)  # [B, K]

        px = ((tiles % tile_width) * tile_size)[:, None] + local_x[None, :] + 0.5  # [B, P]
        py = ((tiles // tile_width) * tile_size)[:, None] + local_y[None, :] + 0.5
        opacity = torch.where(valid, opacities[gid], 0.0)  # padding slots: alpha 0, skipped
        rgb, alpha = _CompositeBatch.apply(means2d[gid], conics[gid], opacity, colors[gid], px, py, gid, absgrad)
        out_tiles.append(tiles)
        out_colors.append(rgb)
        out_alphas.append(alpha)

    index = (torch.cat(out_tiles),)
    render = colors.new_zeros(n_tiles, n_pix, colors.shape[-1]).index_put(index, torch.cat(out_colors))
    alphas = colors.new_zeros(n_tiles, n_pix, 1).index_put(index, torch.cat(out_alphas))
    return render, alphas


def _untile(tiles: Tensor, tile_size: int, tile_width: int, tile_height: int, width: int, height: int) -> Tensor:
    """[n_tiles, tile_size^2, D] -> [height, width, D]."""
    d = tiles.shape[-1]
    image = tiles.reshape(tile_height, tile_width, tile_size, tile_size, d).permute(0, 2, 1, 3, 4)
    return image.reshape(tile_height * tile_size, tile_width * tile_size, d)[:height, :width]


def rasterization_torch(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    packed: bool = False,
    tile_size: int = 8,
    backgrounds: Optional[Tensor] = None,
    render_mode: Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"] = "RGB",
    absgrad: bool = False,
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
    camera_model: Literal["pinhole", "ortho", "fisheye"] = "pinhole",
    max_batch_elements: int = 1 << 22,
    compiled: Optional[bool] = None,
) -> Tuple[Tensor, Tensor, Dict]:
    """``gsplat.rasterization`` (1.4.0) on any device, for the arguments that splatfacto uses.

    Arguments and outputs follow gsplat: means [N, 3], quats [N, 4] (wxyz, any norm), scales [N, 3], opacities [N],
    colors [(C,) N, D] post-activation or [(C,) N, K, 3] SH coefficients with ``sh_degree``, viewmats [C, 4, 4]
    (world to OpenCV camera), Ks [C, 3, 3], backgrounds [C, D]. Returns render_colors [C, H, W, D (+1 for depth
    modes)], render_alphas [C, H, W, 1] and an info dict in gsplat's unpacked layout (``packed=False``): ``means2d``
    [C, N, 2] (``retain_grad``-able; ``.absgrad`` set when ``absgrad``), ``radii`` [C, N], ``depths``, ``conics``,
    ``opacities``, ``width``, ``height``, ``n_cameras``, ``tile_*`` and ``gaussian_ids = camera_ids = None``, which is
    what gsplat's densification strategies read.

    ``max_batch_elements`` bounds the per-pixel work arrays (tile pixels x Gaussians per batch of tiles). The image
    does not depend on ``tile_size``; gsplat's CUDA kernels use 16, but here 8 px tiles do 2-5x less per-pixel work
    (measured on 2 CPU cores: 128 px seeded scene and 100 px random start 2x faster than 16, 400 px 1.25x).

    ``compiled`` (default: on CPU tensors) composites with the numba kernels of
    :mod:`ns_4d_methods.models.compositing_compiled`, which stop each pixel where it becomes opaque instead of
    evaluating every Gaussian of its tile; other devices (MPS) use the PyTorch tile batches.
    """
    assert not packed, "only gsplat's unpacked layout is implemented (pass packed=False)"
    assert render_mode in ("RGB", "D", "ED", "RGB+D", "RGB+ED"), render_mode
    n, c = means.shape[0], viewmats.shape[0]

    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False)
    radii, means2d, depths, conics, compensations = _fully_fused_projection(
        means,
        covars,
        viewmats,
        Ks,
        width,
        height,
        eps2d=eps2d,
        near_plane=near_plane,
        far_plane=far_plane,
        calc_compensations=rasterize_mode == "antialiased",
        camera_model=camera_model,
    )
    radii = torch.where(radii.float() <= radius_clip, 0, radii)
    opacities = opacities.expand(c, n)
    if compensations is not None:
        opacities = opacities * compensations

    if sh_degree is None:
        colors = colors.expand(c, *colors.shape[-2:])  # [C, N, D]
    else:
        campos = torch.inverse(viewmats)[:, :3, 3]
        dirs = means[None, :, :] - campos[:, None, :]
        shs = colors.expand(c, *colors.shape[-3:])  # [C, N, K, 3]
        # gsplat's offset and clamp, which match the Inria rasterizer
        colors = torch.clamp_min(_spherical_harmonics(sh_degree, dirs, shs) + 0.5, 0.0)
    if render_mode in ("RGB+D", "RGB+ED"):
        colors = torch.cat([colors, depths[..., None]], dim=-1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(c, 1)], dim=-1)
    elif render_mode in ("D", "ED"):
        colors = depths[..., None]
        if backgrounds is not None:
            backgrounds = backgrounds.new_zeros(c, 1)

    if compiled is None:
        compiled = means.device.type == "cpu"
    tile_width, tile_height = math.ceil(width / tile_size), math.ceil(height / tile_size)
    absgrads = means2d.new_zeros(c, n, 2) if absgrad else None
    render_colors, render_alphas = [], []
    for cam in range(c):
        tile_ids, gaussian_ids = _tile_intersections(
            means2d[cam].detach(),
            radii[cam],
            depths[cam].detach(),
            conics[cam].detach(),
            opacities[cam].detach(),
            tile_size,
            tile_width,
            tile_height,
        )
        inputs = (tile_ids, gaussian_ids, means2d[cam], conics[cam], opacities[cam], colors[cam], tile_size, tile_width)
        absgrad_cam = None if absgrads is None else absgrads[cam]
        if compiled:
            tiles_rgb, tiles_alpha = composite_compiled(*inputs, tile_width * tile_height, absgrad_cam)
        else:
            tiles_rgb, tiles_alpha = _composite_tiles(*inputs, tile_width * tile_height, absgrad_cam, max_batch_elements)
        rgb = _untile(tiles_rgb, tile_size, tile_width, tile_height, width, height)
        alpha = _untile(tiles_alpha, tile_size, tile_width, tile_height, width, height)
        if backgrounds is not None:
            rgb = rgb + (1.0 - alpha) * backgrounds[cam]
        render_colors.append(rgb)
        render_alphas.append(alpha)
    render_colors = torch.stack(render_colors)
    render_alphas = torch.stack(render_alphas)
    if render_mode in ("ED", "RGB+ED"):
        # expected depth: accumulated depth over accumulated weight
        render_colors = torch.cat(
            [render_colors[..., :-1], render_colors[..., -1:] / render_alphas.clamp(min=1e-10)], dim=-1
        )
    if absgrads is not None:
        means2d.absgrad = absgrads

    info = {
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": radii,
        "means2d": means2d,
        "depths": depths,
        "conics": conics,
        "opacities": opacities,
        "tile_width": tile_width,
        "tile_height": tile_height,
        "tile_size": tile_size,
        "width": width,
        "height": height,
        "n_cameras": c,
    }
    return render_colors, render_alphas, info
