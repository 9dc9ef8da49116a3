"""Start-up time of nerfstudio's commands: two patches that keep behaviour and cut seconds, applied when nerfstudio
loads the plugins (``method_configs/__init__.py``, imported by every ``ns-*`` command that lists the methods).

1. nerfstudio 1.1.5 builds 26 placeholder configs for external methods on every command; each one's ``__post_init__``
   calls ``inspect.stack()`` only to read its caller's name, and that resolves the source file of every frame on the
   stack through ``inspect.getmodule`` (a walk over ``sys.modules``): 4-5 s per command with ~5,900 modules loaded
   (measured: importing ``nerfstudio.configs.method_configs`` with the plugins 16.2 s, patched 11.1 s). The patch
   reads the same name from the frame and calls nerfstudio's own ``__post_init__`` when it is not that caller.
2. viser reads each button icon by opening its tarball of tabler icons and scanning it up to the icon (~150 ms per
   icon; nerfstudio's viewer adds 16 at start-up). The patch indexes the tarball once and reads icons by offset.

Each patch applies only where the patched function is found as expected (other nerfstudio or viser releases are left
alone).
"""

from __future__ import annotations

import functools
import sys
import tarfile
from pathlib import Path
from typing import Dict, Tuple

_CALLER = "get_external_methods"
"""The function in nerfstudio.configs.external_methods whose placeholders must not offer to install themselves."""


def _quiet_external_method_placeholders() -> None:
    try:
        from nerfstudio.configs import external_methods
    except ImportError:
        return
    placeholder = getattr(external_methods, "ExternalMethodDummyTrainerConfig", None)
    original = getattr(placeholder, "__post_init__", None)
    if original is None or getattr(original, "_ns4d_patched", False) or not hasattr(external_methods, _CALLER):
        return

    def __post_init__(self) -> None:
        # frame 0 is this function, 1 the dataclass __init__, 2 whoever built the placeholder: the frame nerfstudio's
        # inspect.stack()[2] names.
        if sys._getframe(2).f_code.co_name == _CALLER:
            return
        original(self)

    __post_init__._ns4d_patched = True  # type: ignore[attr-defined]
    placeholder.__post_init__ = __post_init__


@functools.lru_cache(maxsize=None)
def _icon_index(tarball: Path) -> Dict[str, Tuple[int, int]]:
    """{member name: (data offset, size)} of an uncompressed tarball, read in one pass."""
    with tarfile.open(tarball) as tar:
        return {member.name: (member.offset_data, member.size) for member in tar.getmembers() if member.isfile()}


def _index_viser_icons() -> None:
    try:
        from viser import _gui_api, _gui_handles, _icons
    except ImportError:
        return
    tarball = Path(getattr(_icons, "ICONS_DIR", "")) / "tabler-icons.tar"
    if not tarball.is_file():
        return

    def svg_from_icon(icon_name: str) -> str:
        """viser's ``svg_from_icon``: the icon's <svg /> text."""
        offset, size = _icon_index(tarball)[f"{icon_name}.svg"]
        with open(tarball, "rb") as file:
            file.seek(offset)
            return file.read(size).decode("utf-8")

    for module in (_icons, _gui_api, _gui_handles):
        if hasattr(module, "svg_from_icon"):
            module.svg_from_icon = svg_from_icon


def speed_up_startup() -> None:
    """Applies both patches (idempotent)."""
    _quiet_external_method_placeholders()
    _index_viser_icons()
