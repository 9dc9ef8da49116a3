"""The one place where pretrained networks are loaded: diffusers pipelines, diffusers/transformers models, and
torchvision networks (RAFT, LPIPS backbones).

Every pretrained model in the suite is named by a config field whose value is a Hugging Face hub id (the papers'
defaults) or a local directory written by ``save_pretrained``; torchvision networks are named by a torchvision
weights enum (``"Raft_Large_Weights.C_T_V2"``) or a local file. Either is fetched into its usual cache (the hub
cache, the torch hub cache) when the network is reachable and read from that cache afterwards. Loading goes through
:func:`from_pretrained_or_fail` or :func:`load_torchvision_state_dict` so that an unreachable model ends the command
with one line that names the field and the value, e.g.::

    pipeline.ip2p_model_id: cannot load 'timbrooks/instruct-pix2pix' (not a local directory and not reachable on
    the Hugging Face hub)

Keeping frozen models out of nerfstudio checkpoints (the holder pattern): a nerfstudio checkpoint is the
``state_dict()`` of the pipeline, and ``torch.nn.Module.__setattr__`` registers every module assigned to a module
attribute. Attach a loaded model with :func:`hold_frozen` instead; it stores the model as a plain instance attribute
(``object.__setattr__``), so it is readable as ``self.unet`` but not part of ``state_dict()``, ``parameters()``,
``.to()`` or ``.train()``. The owner therefore moves it itself (the loaders below already place it on ``device``).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any, TypeVar

import torch
from huggingface_hub import constants as hub_constants

from ns_4d_methods.errors import InputError

T = TypeVar("T")

# What from_pretrained raises for a missing, unreachable or invalid name: OSError covers diffusers' and transformers'
# "not found / not cached" errors and the hub's HTTP/connection errors (HfHubHTTPError derives from OSError);
# ValueError covers an invalid repo id (HFValidationError), e.g. a path that does not exist.
_LOAD_ERRORS = (OSError, ValueError)

HUB_UNREACHABLE = "not a local directory and not reachable on the Hugging Face hub"


class WeightsUnavailableError(InputError):
    """Pretrained weights named by a config field could not be loaded; the message is one line naming both."""

    def __init__(self, field_name: str, name_or_path: str, reason: str = HUB_UNREACHABLE, hint: str = "") -> None:
        # ``hint`` says how to go on without the weights, e.g. the flag that turns the loss term off
        super().__init__(f"{field_name}: cannot load '{name_or_path}' ({reason})" + (f"; {hint}" if hint else ""))
        self.field_name = field_name
        self.name_or_path = name_or_path


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on CUDA (how the papers run the diffusion models), fp32 elsewhere (CPU kernels lack fast fp16)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def from_pretrained_or_fail(cls: type[T], name_or_path: str | Path, field_name: str, **kwargs: Any) -> T:
    """``cls.from_pretrained(name_or_path, **kwargs)`` that raises :class:`WeightsUnavailableError` on failure.

    A local directory is loaded without touching the network. Anything else is treated as a hub id: with
    ``HF_HUB_OFFLINE`` set only the local hub cache is tried; otherwise the hub first and then, after a failed
    attempt (no network), the cache. Works for diffusers pipelines, models and schedulers and for transformers
    models and tokenizers.
    """
    source = str(name_or_path)
    local_dir = Path(source).expanduser()
    if local_dir.is_dir():
        try:
            return cls.from_pretrained(str(local_dir), local_files_only=True, **kwargs)  # type: ignore[attr-defined]
        except _LOAD_ERRORS as error:
            # keep the cause's first line: a broken local directory needs a different fix than a missing one
            cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            reason = f"a local directory, but not a loadable {cls.__name__}: {cause}"
            raise WeightsUnavailableError(field_name, source, reason) from error

    attempts = [True] if hub_constants.HF_HUB_OFFLINE else [False, True]
    last_error: BaseException | None = None
    for local_files_only in attempts:
        try:
            loader = cls.from_pretrained  # type: ignore[attr-defined]
            return loader(source, local_files_only=local_files_only, **kwargs)
        except _LOAD_ERRORS as error:
            last_error = error
    raise WeightsUnavailableError(field_name, source) from last_error


def _from_pretrained_in_dtype(
    cls: type[T], name_or_path: str | Path, field_name: str, dtype: torch.dtype, kwargs: dict[str, Any]
) -> T:
    """Load with the dtype applied by ``from_pretrained`` itself, which keeps a model's fp32-only modules in fp32
    (casting afterwards with ``.to`` would not)."""
    with warnings.catch_warnings():
        # diffusers 0.42 renamed the pipeline argument to `dtype`; `torch_dtype` is what every supported diffusers
        # and transformers version understands
        warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
        return from_pretrained_or_fail(cls, name_or_path, field_name, torch_dtype=dtype, **kwargs)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Put a pretrained module in inference mode with no trainable parameters."""
    module.requires_grad_(False)
    module.eval()
    return module


def load_diffusion_pipeline(
    pipeline_cls: type[T],
    name_or_path: str | Path,
    field_name: str,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> T:
    """Load a diffusers pipeline onto ``device`` in ``dtype`` (default: :func:`default_dtype`), all parts frozen.

    ``kwargs`` go to ``from_pretrained`` (e.g. ``safety_checker=None``, ``variant="fp16"``).
    """
    pipeline = _from_pretrained_in_dtype(pipeline_cls, name_or_path, field_name, dtype or default_dtype(device), kwargs)
    pipeline.to(torch.device(device))  # type: ignore[attr-defined]
    for component in pipeline.components.values():  # type: ignore[attr-defined]
        if isinstance(component, torch.nn.Module):
            freeze(component)
    return pipeline


def load_pretrained_model(
    model_cls: type[T],
    name_or_path: str | Path,
    field_name: str,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> T:
    """Load one diffusers or transformers model (e.g. ``subfolder="unet"``) onto ``device`` in ``dtype``, frozen."""
    model = _from_pretrained_in_dtype(model_cls, name_or_path, field_name, dtype or default_dtype(device), kwargs)
    return freeze(model.to(torch.device(device)))  # type: ignore[attr-defined]


def hold_frozen(owner: object, name: str, value: object) -> None:
    """Attach ``value`` to ``owner`` as a plain attribute that ``torch.nn.Module`` does not register.

    Use it for frozen pretrained models inside a nerfstudio model or pipeline: they stay out of its checkpoint,
    its parameter groups and its ``.to()``/``.train()`` calls.
    """
    object.__setattr__(owner, name, value)


TORCH_HUB_UNREACHABLE = "not a local file, not in the torch hub cache and not downloadable"


def torchvision_weights(name: str) -> Any:
    """The torchvision weights enum member called ``name`` (e.g. ``"VGG16_Weights.IMAGENET1K_V1"``), or None."""
    from torchvision.models import get_weight

    try:
        return get_weight(name)
    except (ValueError, KeyError, AttributeError):
        return None


def torchvision_cache_path(name: str) -> Path:
    """Where torch's hub cache keeps the file of torchvision weights ``name`` (``$TORCH_HOME/hub/checkpoints``)."""
    weights = torchvision_weights(name)
    if weights is None:
        raise ValueError(f"'{name}' is not a torchvision weights enum name")
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]


def load_torchvision_state_dict(name_or_path: str | Path, field_name: str, hint: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a torchvision network's pretrained weights, the way its users get them.

    ``name_or_path`` is a local file (read with ``torch.load``) or a torchvision weights enum name, whose file is read
    from the torch hub cache or, when absent there, downloaded into it by torchvision's own ``get_state_dict``.
    Anything else (a missing file, an unknown name, no network and nothing cached) raises
    :class:`WeightsUnavailableError` naming ``field_name``, with ``hint`` appended.
    """
    source = str(name_or_path)
    path = Path(source).expanduser()
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
            cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise WeightsUnavailableError(field_name, source, f"a local file, but not loadable: {cause}", hint) from error
    weights = torchvision_weights(source)
    if weights is None:
        reason = "no such file, and not a torchvision weights enum name such as 'VGG16_Weights.IMAGENET1K_V1'"
        raise WeightsUnavailableError(field_name, source, reason, hint)
    try:
        # reads the cached file when present; otherwise downloads it there (no network: URLError, an OSError)
        return weights.get_state_dict(progress=False)
    except (OSError, RuntimeError) as error:
        raise WeightsUnavailableError(field_name, source, TORCH_HUB_UNREACHABLE, hint) from error
