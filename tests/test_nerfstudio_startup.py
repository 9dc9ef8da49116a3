"""The start-up patches keep nerfstudio's and viser's behaviour (ns_4d_methods/nerfstudio_startup.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import method_configs  # noqa: F401  (applies the patches, as nerfstudio's plugin discovery does)
from ns_4d_methods.nerfstudio_startup import speed_up_startup

ROOT = Path(__file__).resolve().parents[1]


def test_placeholders_stay_quiet_when_listed_and_offer_install_when_chosen(monkeypatch):
    from nerfstudio.configs import external_methods as em

    patched = em.ExternalMethodDummyTrainerConfig.__post_init__
    assert getattr(patched, "_ns4d_patched", False)
    speed_up_startup()  # idempotent: not wrapped twice
    assert em.ExternalMethodDummyTrainerConfig.__post_init__ is patched
    method = em.ExternalMethod("instructions for the test", [("x", "y")], pip_package=None)
    printed = []
    monkeypatch.setattr(em.CONSOLE, "print", lambda *args, **kwargs: printed.append(args))

    def get_external_methods():  # the caller name nerfstudio checks
        return em.ExternalMethodDummyTrainerConfig(method_name="x", method=method)

    get_external_methods()
    assert printed == []

    # built anywhere else (tyro instantiating the chosen method), nerfstudio's own __post_init__ runs: it prints the
    # instructions and exits
    with pytest.raises(SystemExit) as exit_info:
        em.ExternalMethodDummyTrainerConfig(method_name="x", method=method)
    assert exit_info.value.code == 0
    assert printed == [("instructions for the test",)]


def test_viser_icons_read_by_index_equal_the_tarball_members():
    from viser import _gui_api, _gui_handles, _icons

    assert _gui_api.svg_from_icon is _icons.svg_from_icon is _gui_handles.svg_from_icon
    tarball = _icons.ICONS_DIR / "tabler-icons.tar"
    with tarfile.open(tarball) as tar:
        names = [member.name for member in tar.getmembers()[:2000:400]] + ["player-play.svg", "x.svg"]
        for name in names:
            expected = tar.extractfile(name).read().decode("utf-8")
            assert _icons.svg_from_icon(name[: -len(".svg")]) == expected
    with pytest.raises(KeyError):
        _icons.svg_from_icon("no-such-icon")


def test_listing_the_methods_imports_no_diffusion_or_metric_library():
    # every ns-* command lists the methods; diffusers, transformers' models and torchmetrics are imported where they
    # are used (2.5 s of 8.4 s CPU measured for importing ns-train on 2 loaded cores)
    code = ("import sys, nerfstudio.configs.method_configs as m; "
            "print(sorted(m.all_methods)); "
            "print([k for k in sys.modules if k.split('.')[0] in ('diffusers', 'torchmetrics') "
            "or k.startswith('transformers.models')])")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
    assert result.returncode == 0, result.stderr[-2000:]
    methods, heavy = result.stdout.strip().splitlines()[-2:]
    assert all(f"'{name}'" in methods for name in ("nerfacto-4d", "splatfacto-4d", "instruct4d", "unified-edit", "4real",
                                                   "4diffusion"))
    assert heavy == "[]"
