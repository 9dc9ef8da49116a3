"""What a checkpoint needs besides parameters, optimizers and schedulers for a resumed run to take the same next steps
as the run that never stopped: the random states and the few counters that decide what the next steps sample.

- the global random states: torch (CPU and every CUDA device), numpy's legacy global state, Python's ``random``
  (nerfstudio's pixel samplers draw from torch's, its full-image datamanager's eval camera from Python's);
- every generator that the pipeline, its datamanager and their modules own as an attribute (``torch.Generator``,
  ``numpy.random.Generator``/``RandomState``, ``random.Random``): found by walking them, so that a new generator in a
  method is saved without a change here;
- the sampling state that nerfstudio keeps outside ``state_dict``, by attribute name (:data:`SAMPLING_ATTRIBUTES`).

Everything is stored as tensors, numbers, strings, lists, tuples and dicts, so that ``torch.load``'s weights-only
unpickler (torch >= 2.6's default, which nerfstudio's loader uses) reads it.
"""

from __future__ import annotations

import copy
import random
from typing import Any, Dict, Iterator, Tuple

import numpy as np
import torch
from torch import nn

SAMPLING_ATTRIBUTES = (
    "train_unseen_cameras",  # full-image datamanager: the training cameras left in this epoch, in order
    "eval_unseen_cameras",  # full-image datamanager: the eval cameras left
    "strategy_state",  # splatfacto's gsplat densification statistics (gradients and counts since the last refine)
    "_steps_since_update",  # nerfacto's proposal sampler: when the proposal networks are next updated with gradients
)
"""Attributes (of the pipeline, its datamanager or any module in them) saved and restored as they are."""


def _owners(pipeline: nn.Module) -> Iterator[Tuple[str, Any]]:
    """The pipeline and every module in it (the datamanager and the model are modules), by their dotted names."""
    yield from pipeline.named_modules()
    datamanager = getattr(pipeline, "datamanager", None)
    if datamanager is not None and not isinstance(datamanager, nn.Module):
        yield "datamanager", datamanager


def _generator_state(value: Any) -> Any:
    if isinstance(value, torch.Generator):
        return value.get_state()
    if isinstance(value, np.random.Generator):
        return copy.deepcopy(value.bit_generator.state)
    if isinstance(value, np.random.RandomState):
        return _numpy_legacy_state(value.get_state())
    if isinstance(value, random.Random):
        return value.getstate()
    return None


def _set_generator_state(value: Any, state: Any) -> None:
    if isinstance(value, torch.Generator):
        value.set_state(state)
    elif isinstance(value, np.random.Generator):
        value.bit_generator.state = state
    elif isinstance(value, np.random.RandomState):
        value.set_state(_numpy_legacy_tuple(state))
    elif isinstance(value, random.Random):
        value.setstate(state)


def _numpy_legacy_state(state: tuple) -> Dict[str, Any]:
    """numpy's MT19937 tuple with its key as a tensor (the weights-only unpickler refuses numpy arrays)."""
    name, keys, position, has_gauss, cached_gaussian = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _numpy_legacy_tuple(state: Dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["name"], keys, state["position"], state["has_gauss"], state["cached_gaussian"]


def capture(pipeline: nn.Module) -> Dict[str, Any]:
    """The random and sampling state of the process and of ``pipeline``, for a checkpoint."""
    owned: Dict[str, Any] = {}
    sampling: Dict[str, Any] = {}
    for name, owner in _owners(pipeline):
        for attribute, value in vars(owner).items():
            state = _generator_state(value)
            if state is not None:
                owned[f"{name}:{attribute}"] = state
        for attribute in SAMPLING_ATTRIBUTES:
            if attribute in vars(owner):
                sampling[f"{name}:{attribute}"] = copy.deepcopy(vars(owner)[attribute])
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": _numpy_legacy_state(np.random.get_state()),
        "python": random.getstate(),
        "generators": owned,
        "sampling": sampling,
    }


def restore(pipeline: nn.Module, state: Dict[str, Any]) -> None:
    """Puts back what :func:`capture` saved; entries of attributes this pipeline lacks are ignored (the state of
    another configuration of the same method), and attributes it has that the state lacks keep their value."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(_numpy_legacy_tuple(state["numpy"]))
    random.setstate(state["python"])
    device = next(pipeline.parameters(), torch.empty(0)).device
    for name, owner in _owners(pipeline):
        attributes = vars(owner)
        for attribute, value in attributes.items():
            if f"{name}:{attribute}" in state["generators"]:
                _set_generator_state(value, state["generators"][f"{name}:{attribute}"])
        for attribute in SAMPLING_ATTRIBUTES:
            if attribute in attributes and f"{name}:{attribute}" in state["sampling"]:
                attributes[attribute] = _to_device(state["sampling"][f"{name}:{attribute}"], device)


def _to_device(value: Any, device: torch.device) -> Any:
    """Checkpoints load onto the CPU: tensors of the sampling state go back to the pipeline's device."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value
