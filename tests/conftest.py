"""The ``cuda`` marker: tests that need a GPU carry it, are skipped without one, and run together with
``python -m pytest -m cuda``. On a GPU machine, a test without the marker that allocates GPU memory fails, so that
CPU runs of the suite cover everything but the marked tests (``test_cuda_marker.py`` checks the tests' source too)."""

from __future__ import annotations

import urllib.error

import pytest
import torch

NO_CUDA = pytest.mark.skip(
    reason="needs a CUDA GPU (torch.cuda.is_available() is False); on one: python -m pytest -m cuda"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(NO_CUDA)


def _cuda_allocations() -> int:
    """GPU allocations made so far in this process (0 before CUDA is initialised; initialising it allocates none)."""
    if not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.memory_stats().get("allocation.all.allocated", 0))


@pytest.fixture(autouse=True)
def _cuda_only_under_the_marker(request: pytest.FixtureRequest):
    if not torch.cuda.is_available() or request.node.get_closest_marker("cuda") is not None:
        yield
        return
    before = _cuda_allocations()
    yield
    allocated = _cuda_allocations() - before
    if allocated > 0:
        pytest.fail(f"{request.node.nodeid} made {allocated} GPU allocations without @pytest.mark.cuda", pytrace=False)


@pytest.fixture()
def torch_home(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """An empty torch hub cache, and no network: a download attempt fails as it does offline. Tests write random
    weights into it (``torchvision_cache_path``) to exercise the weights rule's loading code."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network for {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch_home"
