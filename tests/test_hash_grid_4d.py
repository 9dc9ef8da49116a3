"""The N-D hash encoding against nerfstudio's 3D one, and its hashing, interpolation and gradients in 4D."""

from __future__ import annotations

import functools
import itertools
import operator

import pytest
import torch
from nerfstudio.field_components.encodings import HashEncoding

from ns_4d_methods.fields.hash_grid_4d import HASH_PRIMES, HashEncodingND


def _encoding(in_dim: int, **kwargs) -> HashEncodingND:
    torch.manual_seed(0)
    encoding = HashEncodingND(in_dim, implementation="torch", **kwargs)
    with torch.no_grad():
        encoding.hash_table.normal_()  # features well above rounding noise
    return encoding


def _vertex_feature(encoding: HashEncodingND, level: int, vertex: tuple) -> torch.Tensor:
    """The table row instant-ngp's hash assigns to an integer grid vertex at one level."""
    hashed = functools.reduce(operator.xor, (k * p for k, p in zip(vertex, HASH_PRIMES)))
    row = hashed % encoding.hash_table_size + level * encoding.hash_table_size
    return encoding.hash_table[row]


def test_3d_matches_nerfstudio_hash_encoding():
    sizes = dict(num_levels=6, min_res=4, max_res=128, log2_hashmap_size=10, features_per_level=2)
    ours = _encoding(3, **sizes)
    theirs = HashEncoding(**sizes, implementation="torch")
    with torch.no_grad():
        theirs.hash_table.copy_(ours.hash_table)
    x = torch.rand(500, 3)
    x[:50] = torch.randint(0, 5, (50, 3)) / 4.0  # on vertices of the coarsest level, where ceil == floor
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    assert ours.get_out_dim() == theirs.get_out_dim() == 12


def test_4d_vertex_returns_its_feature():
    # two levels at resolutions 8 and 32 (growth factor 4): a point on a level's vertex is exact in float32
    encoding = _encoding(4, num_levels=2, min_res=8, max_res=32, log2_hashmap_size=8, features_per_level=3)
    assert encoding.scalings.tolist() == [8.0, 32.0]
    for level, res in enumerate([8, 32]):
        vertex = (3, 0, 5, res - 1)
        x = torch.tensor([vertex], dtype=torch.float32) / res
        out = encoding(x).view(2, 3)[level]
        torch.testing.assert_close(out, _vertex_feature(encoding, level, vertex), rtol=0, atol=1e-6)


@pytest.mark.parametrize("axis", range(4))
def test_4d_interpolation_is_linear_along_each_axis(axis):
    res = 16
    encoding = _encoding(4, num_levels=1, min_res=res, max_res=res, log2_hashmap_size=8, features_per_level=2)
    start = (torch.tensor([5.3, 2.0, 9.75, 0.6]) / res)[None]
    start[0, axis] = 7 / res  # the cell's lower face along this axis
    s = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])[:, None]
    points = start.repeat(len(s), 1)
    points[:, axis] += s[:, 0] / res  # across the cell to its upper face
    out = encoding(points)
    assert not torch.allclose(out[0], out[-1], atol=1e-2)
    torch.testing.assert_close(out, out[:1] + s * (out[-1:] - out[:1]), rtol=1e-5, atol=1e-6)


def test_4d_is_the_multilinear_blend_of_its_cell_vertices():
    res = 8
    encoding = _encoding(4, num_levels=1, min_res=res, max_res=res, log2_hashmap_size=6, features_per_level=2)
    x = torch.tensor([0.37, 0.81, 0.05, 0.66])
    lower = torch.floor(x * res)
    frac = x * res - lower
    expected = torch.zeros(2)
    for corner in itertools.product((0, 1), repeat=4):
        weight = torch.prod(torch.where(torch.tensor(corner) == 1, frac, 1 - frac))
        vertex = tuple(int(v) + c for v, c in zip(lower, corner))
        expected += weight * _vertex_feature(encoding, 0, vertex)
    torch.testing.assert_close(encoding(x[None])[0], expected, rtol=1e-5, atol=1e-6)


def test_4d_gradient_reaches_the_table_and_the_input():
    encoding = _encoding(4, num_levels=3, min_res=4, max_res=64, log2_hashmap_size=12, features_per_level=2)
    x = torch.tensor([[0.31, 0.52, 0.77, 0.13]], requires_grad=True)
    encoding(x).sum().backward()
    grad = encoding.hash_table.grad
    assert grad is not None
    # each level's 2^4 corner weights sum to one, per feature
    torch.testing.assert_close(grad.sum(), torch.tensor(3 * 2 * 1.0))
    assert 0 < int((grad.abs().sum(-1) > 0).sum()) <= 3 * 16
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_rejects_more_dimensions_than_primes():
    with pytest.raises(ValueError, match="input dimensions"):
        HashEncodingND(len(HASH_PRIMES) + 1, implementation="torch")


def test_level_sizes_are_buffers_that_move_with_the_module_and_stay_out_of_checkpoints():
    encoding = _encoding(4, num_levels=3, min_res=4, max_res=64, log2_hashmap_size=10)
    buffers = dict(encoding.named_buffers())
    assert {"scalings", "hash_offset", "primes"} <= set(buffers)
    assert torch.equal(buffers["scalings"], torch.tensor([4.0, 16.0, 64.0]))
    assert torch.equal(buffers["hash_offset"], torch.arange(3) * 1024)
    assert set(encoding.state_dict()) == {"hash_table"}  # checkpoints from before load unchanged


@pytest.mark.cuda
def test_torch_path_on_cuda_matches_the_cpu():
    encoding = _encoding(4, num_levels=4, min_res=4, max_res=128, log2_hashmap_size=12)
    x = torch.rand(1000, 4, generator=torch.Generator().manual_seed(1))
    expected = encoding(x)
    encoding.cuda()
    assert encoding.scalings.is_cuda and encoding.hash_offset.is_cuda
    torch.testing.assert_close(encoding(x.cuda()).cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_tcnn_4d_grid_fits_a_function_on_cuda():
    pytest.importorskip("tinycudann", reason="tiny-cuda-nn is not installed (nerfstudio then uses the PyTorch grids)")
    torch.manual_seed(0)
    encoding = HashEncodingND(4, num_levels=8, min_res=4, max_res=64, log2_hashmap_size=14).cuda()
    assert encoding.tcnn_encoding is not None and encoding.hash_table is None
    head = torch.nn.Linear(encoding.get_out_dim(), 1).cuda()
    optimizer = torch.optim.Adam([*encoding.parameters(), *head.parameters()], lr=1e-2)
    x = torch.rand(4096, 4, device="cuda")
    target = torch.sin(6.0 * x).sum(-1, keepdim=True)
    losses = []
    for _ in range(100):
        loss = ((head(encoding(x).float()) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.2 * losses[0], losses[::20]
