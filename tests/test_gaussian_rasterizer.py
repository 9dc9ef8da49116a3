"""The CPU Gaussian rasterizer: analytic single-Gaussian images, compositing order, gradients, shapes, the same result
for every tile size and batching, the compiled (numba) compositing equal to the PyTorch one, and agreement with
gsplat's CUDA rasterizer when a GPU is present."""

from __future__ import annotations

import threading

import pytest
import torch

from ns_4d_methods.models.gaussian_rasterizer_torch import _CompositeBatch, rasterization_torch

W, H = 64, 48
FX, FY, CX, CY = 80.0, 70.0, 32.0, 24.0


def _camera(c: int = 1):
    viewmats = torch.eye(4).repeat(c, 1, 1)  # OpenCV camera at the origin looking down +z
    Ks = torch.tensor([[FX, 0.0, CX], [0.0, FY, CY], [0.0, 0.0, 1.0]]).repeat(c, 1, 1)
    return viewmats, Ks


def _identity_quats(n: int) -> torch.Tensor:
    return torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1)


def _random_gaussians(n: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * torch.tensor([0.8, 0.6, 0.5]) + torch.tensor([0.0, 0.0, 3.0])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.08 + 0.01
    opacities = torch.rand(n, generator=g)
    sh = torch.randn(n, 4, 3, generator=g) * 0.4
    return [t.to(device) for t in (means, quats, scales, opacities, sh)]


BOTH = pytest.mark.parametrize("compiled", [False, True], ids=["pytorch", "compiled"])


@BOTH
def test_single_gaussian_peak_and_analytic_falloff(compiled):
    # Centre projects to the pixel centre (42.5, 17.5): column 42, row 17.
    z = 2.0
    x, y = (42.5 - CX) * z / FX, (17.5 - CY) * z / FY
    s, opacity, color = 0.05, 0.3, torch.tensor([0.2, 0.5, 0.9])
    viewmats, Ks = _camera()
    rgb, alpha, info = rasterization_torch(
        torch.tensor([[x, y, z]]),
        _identity_quats(1),
        torch.full((1, 3), s),
        torch.tensor([opacity]),
        color[None],
        viewmats,
        Ks,
        W,
        H,
        compiled=compiled,
    )
    alpha = alpha[0, ..., 0]
    row, col = divmod(int(alpha.argmax()), W)
    assert (row, col) == (17, 42)
    assert torch.allclose(info["means2d"][0, 0], torch.tensor([42.5, 17.5]), atol=1e-4)
    assert alpha[row, col] == pytest.approx(opacity, rel=1e-5)

    # EWA: covariance s^2 J J^T of the perspective Jacobian J plus gsplat's 0.3 px^2 blur.
    J = torch.tensor([[FX / z, 0.0, -FX * x / z**2], [0.0, FY / z, -FY * y / z**2]])
    cov2d = s**2 * J @ J.T + 0.3 * torch.eye(2)
    rows, cols = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    d = torch.stack([cols - 42.5, rows - 17.5], dim=-1)
    expected = opacity * torch.exp(-0.5 * torch.einsum("hwi,ij,hwj->hw", d, torch.linalg.inv(cov2d), d))
    # opacity 0.3 puts the 1/255 cut-off inside the 3-sigma footprint, so no tile boundary shows
    expected = torch.where(expected >= 1 / 255, expected, 0.0)
    assert torch.allclose(alpha, expected, atol=1e-6)
    assert torch.allclose(rgb[0], expected[..., None] * color, atol=1e-6)


@BOTH
def test_two_gaussians_composite_front_to_back(compiled):
    viewmats, Ks = _camera()
    centre = [(40.5 - CX) / FX, (20.5 - CY) / FY]  # at z = 1; scaled per depth below
    red, green = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])

    def render(z_red: float, z_green: float):
        # listed back-to-front on purpose: the rasterizer must sort by depth
        zs = [max(z_red, z_green), min(z_red, z_green)]
        colors = torch.stack([red, green] if z_red > z_green else [green, red])
        opacities = torch.tensor([0.6, 0.7] if z_red > z_green else [0.7, 0.6])
        means = torch.tensor([[centre[0] * z, centre[1] * z, z] for z in zs])
        scales = torch.tensor([[0.3 * z] * 3 for z in zs])  # same footprint on screen
        rgb, alpha, _ = rasterization_torch(
            means, _identity_quats(2), scales, opacities, colors, viewmats, Ks, W, H, backgrounds=torch.ones(1, 3),
            compiled=compiled,
        )
        return rgb[0, 20, 40], alpha[0, 20, 40, 0]

    # at the shared centre each alpha is its opacity; the white background shows through T = (1 - a1)(1 - a2)
    rgb, alpha = render(z_red=2.0, z_green=4.0)  # red (opacity 0.6) in front
    t = 0.4 * 0.3
    assert torch.allclose(rgb, torch.tensor([0.6 + t, 0.4 * 0.7 + t, t]), atol=1e-5)
    assert alpha == pytest.approx(1 - t, abs=1e-6)
    rgb, alpha = render(z_red=4.0, z_green=2.0)  # green (opacity 0.7) in front
    t = 0.3 * 0.4
    assert torch.allclose(rgb, torch.tensor([0.3 * 0.6 + t, 0.7 + t, t]), atol=1e-5)


@BOTH
def test_transmittance_cutoff_excludes_the_gaussian_that_ends_the_pixel(compiled):
    # gsplat stops before a Gaussian whose alpha would take T to <= 1e-4: behind an alpha-0.999 splat
    # (T = 1e-3), a second 0.999 splat (T would be 1e-6) is skipped entirely.
    viewmats, Ks = _camera()
    means = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    scales = torch.tensor([[0.5] * 3, [0.75] * 3])
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    rgb, alpha, _ = rasterization_torch(
        means, _identity_quats(2), scales, torch.ones(2), colors, viewmats, Ks, W, H, compiled=compiled
    )
    assert torch.allclose(rgb[0, 23, 31], torch.tensor([0.999, 0.0, 0.0]), atol=1e-5)
    assert alpha[0, 23, 31, 0] == pytest.approx(0.999, abs=1e-6)


def test_gradients_reach_every_input_and_absgrad_bounds_grad():
    params = _random_gaussians(300)
    for p in params:
        p.requires_grad_(True)
    means, quats, scales, opacities, sh = params
    viewmats, Ks = _camera()
    rgb, alpha, info = rasterization_torch(
        means, quats, scales, opacities, sh, viewmats, Ks, W, H, sh_degree=1, absgrad=True
    )
    info["means2d"].retain_grad()
    target = torch.rand_like(rgb, generator=torch.Generator().manual_seed(1))
    ((rgb - target) ** 2).sum().add(alpha.sum()).backward()
    for name, p in zip(["means", "quats", "scales", "opacities", "colors"], params):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    grad, absgrad = info["means2d"].grad, info["means2d"].absgrad
    assert absgrad.shape == grad.shape == (1, 300, 2)
    assert (absgrad >= grad.abs() - 1e-4).all() and absgrad.sum() > grad.abs().sum()


def test_output_shapes_depth_and_bounded_batches():
    means, quats, scales, opacities, sh = _random_gaussians(200)
    viewmats, Ks = _camera(2)
    viewmats[1, 0, 3] = 0.2  # second camera shifted sideways
    kwargs = dict(sh_degree=1, backgrounds=torch.zeros(2, 3), render_mode="RGB+ED")
    rgb, alpha, info = rasterization_torch(means, quats, scales, opacities, sh, viewmats, Ks, W, H, **kwargs)
    assert rgb.shape == (2, H, W, 4) and alpha.shape == (2, H, W, 1)
    assert info["means2d"].shape == (2, 200, 2) and info["radii"].shape == (2, 200)
    assert info["gaussian_ids"] is None and (info["width"], info["height"], info["n_cameras"]) == (W, H, 2)
    assert not torch.equal(rgb[0], rgb[1])
    covered = alpha[..., 0] > 0.5
    depth = rgb[..., 3][covered]
    assert ((depth > 1.0) & (depth < 5.0)).all()  # expected depth lies among the Gaussians' depths
    # tiny batches (one tile at a time) give the same image as the default batching
    small = rasterization_torch(
        means, quats, scales, opacities, sh, viewmats, Ks, W, H, max_batch_elements=1, **kwargs
    )
    assert torch.allclose(small[0], rgb, atol=1e-6) and torch.allclose(small[1], alpha, atol=1e-6)


def _composite_autograd(mean, conic, opacity, color, px, py):
    """The compositing of ``_CompositeBatch`` written with autograd operations only."""
    dx = mean[:, None, :, 0] - px[:, :, None]
    dy = mean[:, None, :, 1] - py[:, :, None]
    sigma = 0.5 * (conic[:, None, :, 0] * dx**2 + conic[:, None, :, 2] * dy**2) + conic[:, None, :, 1] * dx * dy
    alpha = torch.clamp_max(opacity[:, None, :] * torch.exp(-sigma.clamp_min(0.0)), 0.999)
    alpha = torch.where((sigma >= 0) & (alpha >= 1 / 255), alpha, 0.0)
    transmittance = torch.cumprod(1 - alpha, -1)
    before = torch.cat([torch.ones_like(transmittance[..., :1]), transmittance[..., :-1]], -1)
    weights = torch.where(transmittance.detach() > 1e-4, alpha * before, 0.0)
    return weights @ color, weights.sum(-1, keepdim=True), dx, dy


def test_compositing_backward_matches_autograd():
    g = torch.Generator().manual_seed(4)
    b, p, k = 3, 16, 30
    mean = (torch.rand(b, k, 2, generator=g) * 6 - 1).double()  # around the 4x4 tile's pixels
    conic = torch.stack([torch.rand(b, k, generator=g) + 0.2, torch.rand(b, k, generator=g) * 0.2 - 0.1,
                         torch.rand(b, k, generator=g) + 0.2], -1).double()
    opacity = torch.rand(b, k, generator=g).double()
    opacity[:, :4] = 1.0  # clamped at 0.999: pixels end early
    opacity[:, -3:] = 0.0  # padding slots
    color = torch.rand(b, k, 4, generator=g).double()
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    px, py = (xs.reshape(1, -1) + 0.5).repeat(b, 1).double(), (ys.reshape(1, -1) + 0.5).repeat(b, 1).double()
    ids = torch.arange(b * k).reshape(b, k)
    inputs = [t.clone().requires_grad_() for t in (mean, conic, opacity, color)]
    absgrad = torch.zeros(b * k, 2, dtype=torch.float64)
    rgb, alpha = _CompositeBatch.apply(*inputs, px, py, ids, absgrad)
    grad_rgb, grad_alpha = torch.randn(b, p, 4, generator=g).double(), torch.randn(b, p, 1, generator=g).double()
    torch.autograd.backward([rgb, alpha], [grad_rgb, grad_alpha])

    reference = [t.clone().requires_grad_() for t in (mean, conic, opacity, color)]
    rgb_ref, alpha_ref, dx, dy = _composite_autograd(*reference, px, py)
    dx.retain_grad(), dy.retain_grad()
    torch.autograd.backward([rgb_ref, alpha_ref], [grad_rgb, grad_alpha])
    assert (alpha_ref > 0.999).any() and (alpha_ref < 0.99).any()  # some pixels ended early, some did not
    assert torch.allclose(rgb, rgb_ref) and torch.allclose(alpha, alpha_ref)
    for name, mine, theirs in zip(["mean", "conic", "opacity", "color"], inputs, reference):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-10, rtol=1e-8), name
    absgrad_ref = torch.stack([dx.grad.abs().sum(1), dy.grad.abs().sum(1)], -1).reshape(-1, 2)
    assert torch.allclose(absgrad, absgrad_ref, atol=1e-10) and absgrad.sum() > 0
    assert torch.autograd.gradcheck(lambda *x: _CompositeBatch.apply(*x, px, py, ids, None), reference)


def test_tile_size_and_batching_change_neither_image_nor_gradients():
    # 8 px tiles (the default) and load-grouped batches do less work than gsplat's 16 px tiles; the result is the same
    results = {}
    for tile_size, max_batch_elements, compiled in (
        (16, 1 << 22, False), (8, 1 << 22, False), (4, 1 << 22, False), (8, 5000, False), (16, 0, True), (8, 0, True)
    ):
        params = [p.requires_grad_(True) for p in _random_gaussians(400, seed=5)]
        means, quats, scales, opacities, sh = params
        viewmats, Ks = _camera()
        rgb, alpha, _ = rasterization_torch(
            means, quats, scales, opacities, sh, viewmats, Ks, W, H, sh_degree=1, tile_size=tile_size,
            max_batch_elements=max_batch_elements, compiled=compiled,
        )
        (rgb.square().sum() + alpha.sum()).backward()
        results[tile_size, max_batch_elements, compiled] = [rgb, alpha] + [p.grad for p in params]
    reference = results[16, 1 << 22, False]
    for key, outputs in results.items():
        for name, a, b in zip(["rgb", "alpha", "means", "quats", "scales", "opacities", "sh"], outputs, reference):
            # float32 sums in another order: errors scale with the largest term (means' gradients reach ~160, and
            # differ by 4.9e-5 on some CPUs); a wrong tile or batch would differ by the gradients' own size
            atol = 1e-5 + 1e-6 * float(b.abs().max())
            assert torch.allclose(a, b, atol=atol, rtol=1e-4), (key, name, float((a - b).abs().max()))


def _render_with_gradients(compiled: bool, n: int = 600, seed: int = 7, **kwargs):
    params = [p.requires_grad_(True) for p in _random_gaussians(n, seed=seed)]
    means, quats, scales, opacities, sh = params
    viewmats, Ks = _camera(2)
    viewmats[1, 1, 3] = -0.3  # second camera shifted up
    rgb, alpha, info = rasterization_torch(
        means, quats, scales, opacities, sh, viewmats, Ks, W, H, sh_degree=1, absgrad=True, render_mode="RGB+ED",
        backgrounds=torch.full((2, 3), 0.2), compiled=compiled, **kwargs
    )
    info["means2d"].retain_grad()
    target = torch.rand_like(rgb, generator=torch.Generator().manual_seed(seed))
    ((rgb - target) ** 2).sum().add(alpha.sum()).backward()
    grads = [p.grad for p in params] + [info["means2d"].grad, info["means2d"].absgrad]
    return [rgb.detach(), alpha.detach()] + grads


def test_compiled_compositing_equals_pytorch_images_and_gradients():
    # Opaque Gaussians (opacity near 1) end pixels early, where the compiled kernels stop and PyTorch masks.
    torch_out, compiled_out = _render_with_gradients(False), _render_with_gradients(True)
    names = ["rgb", "alpha", "means", "quats", "scales", "opacities", "sh", "means2d", "absgrad"]
    for name, a, b in zip(names, torch_out, compiled_out):
        scale = float(a.abs().max())
        assert scale > 0, name
        # float32 sums in a different order: 5e-5 of the largest entry (measured up to 1.1e-5)
        assert torch.allclose(a, b, atol=5e-5 * scale, rtol=0), (name, float((a - b).abs().max()) / scale)
    assert (torch_out[1] > 0.999).any()  # some pixels did end early


def test_compiled_compositing_splits_pixels_between_threads_without_changing_results():
    # each numba thread takes every n-th pixel of every tile and keeps its own per-pair gradients: images are the
    # same bit for bit, gradients up to the order of the final sums
    import numba

    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _render_with_gradients(True)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = _render_with_gradients(True)
    finally:
        numba.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    for a, b in zip(one[2:], many[2:]):
        assert torch.allclose(a, b, atol=1e-6 * float(a.abs().max()), rtol=0)


def test_compiled_compositing_with_nothing_in_view_and_from_two_threads():
    means, quats, scales, opacities, sh = _random_gaussians(50)
    means = (means * torch.tensor([1.0, 1.0, -1.0])).requires_grad_(True)  # all behind the camera
    viewmats, Ks = _camera()
    rgb, alpha, _ = rasterization_torch(
        means, quats, scales, opacities, sh, viewmats, Ks, W, H, sh_degree=1, backgrounds=torch.ones(1, 3)
    )
    assert torch.equal(rgb, torch.ones_like(rgb)) and torch.equal(alpha, torch.zeros_like(alpha))
    rgb.sum().backward()  # still in the graph, as gsplat's outputs are
    assert torch.equal(means.grad, torch.zeros_like(means))

    # The viewer renders from its own thread while training renders: concurrent calls must neither crash nor mix.
    expected = _render_with_gradients(True, n=300)
    results = [None] * 4

    def worker(i):
        results[i] = _render_with_gradients(True, n=300)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for result in results:
        assert all(torch.equal(a, b) for a, b in zip(result, expected))


@pytest.mark.cuda
def test_matches_gsplat_cuda_rasterization_forward_and_backward():
    from gsplat import rasterization

    device = "cuda"
    viewmats, Ks = (t.to(device) for t in _camera())
    kwargs = dict(sh_degree=1, backgrounds=torch.full((1, 3), 0.3, device=device), packed=False)
    results = {}
    for name, rasterize in (("torch", rasterization_torch), ("gsplat", rasterization)):
        params = [p.requires_grad_(True) for p in _random_gaussians(2000, seed=3, device=device)]
        rgb, alpha, _ = rasterize(*params, viewmats, Ks, W, H, **kwargs)
        target = torch.rand(rgb.shape, generator=torch.Generator().manual_seed(5)).to(device)
        ((rgb - target) ** 2).sum().add(alpha.sum()).backward()
        results[name] = (rgb.detach(), alpha.detach(), [p.grad for p in params])
    (rgb_t, alpha_t, grads_t), (rgb_g, alpha_g, grads_g) = results["torch"], results["gsplat"]
    d_rgb, d_alpha = (rgb_t - rgb_g).abs(), (alpha_t - alpha_g).abs()
    print(
        f"torch vs gsplat: colours max {d_rgb.max():.2e} mean {d_rgb.mean():.2e}; "
        f"alphas max {d_alpha.max():.2e} mean {d_alpha.mean():.2e}"
    )
    assert d_rgb.mean() < 1e-3 and d_alpha.mean() < 1e-3
    assert d_rgb.max() < 5e-2
    # gradients of every parameter agree in direction and size (a few Gaussians at the cut-offs may differ)
    for name, g_t, g_g in zip(("means", "quats", "scales", "opacities", "colors"), grads_t, grads_g):
        cosine = torch.nn.functional.cosine_similarity(g_t.flatten(), g_g.flatten(), dim=0)
        ratio = g_t.norm() / g_g.norm()
        print(f"{name} gradient: cosine {cosine:.4f}, norm ratio {ratio:.4f}")
        assert cosine > 0.98 and 0.95 < ratio < 1.05, name
