"""Set-up check of gsplat's CUDA kernels, run before training rather than failing in the first step.

gsplat 1.4.0 from the package registry is a pure-Python wheel: its kernels (``gsplat.cuda._backend._C``) come from a
prebuilt ``gsplat.csrc`` (gsplat's own wheels, built per torch/CUDA pair) or are compiled with ``nvcc`` on first
import (minutes, once; then cached). With neither, ``_C`` stays None and the first rasterization fails with an
``AttributeError`` deep inside gsplat.
"""

from __future__ import annotations

import importlib

import gsplat
import torch

from ns_4d_methods.errors import InputError


def require_gsplat_backend() -> None:
    """Loads gsplat's CUDA kernels (compiling them when only a CUDA toolkit is there); a one-line
    :class:`InputError` naming what is missing and the ways out when they cannot be had."""
    backend = importlib.import_module("gsplat.cuda._backend")  # the import compiles, or finds none to load
    if backend._C is not None:
        return
    cuda = torch.version.cuda or "none"
    wheel_tag = f"pt{''.join(torch.__version__.split('+')[0].split('.')[:2])}cu{cuda.replace('.', '')}"
    raise InputError(
        f"gsplat {gsplat.__version__} has no compiled CUDA kernels (no prebuilt gsplat.csrc, and no CUDA toolkit "
        f"with nvcc to build them): install gsplat's prebuilt wheel for torch {torch.__version__} and CUDA {cuda} "
        f"where https://docs.gsplat.studio/whl lists one (pip install gsplat=={gsplat.__version__} --index-url "
        f"https://docs.gsplat.studio/whl/{wheel_tag}), or a CUDA {cuda} toolkit (nvcc on PATH or under CUDA_HOME; "
        "the first run then compiles the kernels for a few minutes), or meanwhile train with the PyTorch "
        "rasterizer: --pipeline.model.rasterizer torch"
    )
