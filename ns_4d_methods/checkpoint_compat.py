"""Lets nerfstudio 1.1.5 checkpoints load under torch >= 2.6, whose ``torch.load`` defaults to ``weights_only=True``.

nerfstudio's learning-rate schedulers compute with numpy, so every checkpoint's scheduler state holds numpy
scalars, which the weights-only unpickler refuses: ``ns-render``, ``ns-eval`` and ``--load-dir`` then fail on any
checkpoint. Rather than turning the safe loader off, the numpy scalar and dtype types are added to its allow-list
(they carry data, not code). nerfstudio imports this package through its plugin entry points before it loads a
checkpoint, so registering here covers every command.
"""

from __future__ import annotations

import numpy as np
import torch


def _numpy_scalar_types() -> list:
    core = getattr(np, "_core", None) or np.core
    multiarray = getattr(core, "multiarray", None) or np.core.multiarray
    dtypes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)]
    return [multiarray.scalar, np.dtype, *dtypes]


def allow_numpy_scalars_in_checkpoints() -> None:
    torch.serialization.add_safe_globals(_numpy_scalar_types())
