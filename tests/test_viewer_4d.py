"""The 4D viewer's parts without a browser: the export commands, the first view's camera and the step label's pace
(tests/test_viewer_browser.py checks them in Chromium against a live ns-train)."""

from __future__ import annotations

import contextlib
import math
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import viser
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.models.nerfacto import NerfactoModel
from nerfstudio.models.splatfacto import SplatfactoModel
from nerfstudio.viewer import viewer as nerfstudio_viewer

from ns_4d_methods import viewer_4d
from ns_4d_methods.viewer_4d import Viewer4DControl, export_command, exports_for


def test_export_commands_name_the_run_the_time_and_quote_paths():
    assert export_command("gaussians", Path("/runs/a/config.yml"), "exports/gaussians/", 0.30000000000000004) == (
        "ns-4d-export gaussians --load-config /runs/a/config.yml --output-dir exports/gaussians/ --times 0.3"
    )
    assert export_command("splatv", Path("/my runs/config.yml"), "out dir") == (
        "ns-4d-export splatv --load-config '/my runs/config.yml' --output-dir 'out dir'"
    )
    gaussians, nerf = SplatfactoModel.__new__(SplatfactoModel), NerfactoModel.__new__(NerfactoModel)
    assert [(kind, timed) for kind, _, _, timed in exports_for(gaussians)] == [("gaussians", True), ("splatv", False)]
    assert [(kind, timed) for kind, _, _, timed in exports_for(nerf)] == [("mesh", True)]


def test_export_tab_of_a_4d_run_lists_the_4d_exports_and_other_runs_keep_nerfstudios(monkeypatch):
    calls = []
    monkeypatch.setattr(nerfstudio_viewer, "populate_export_tab", lambda *args: calls.append(("nerfstudio", args[3])))
    monkeypatch.setattr(viewer_4d, "populate_4d_export_tab", lambda *args: calls.append(("4d", args[3])))
    viewer_4d.install_export_tab()
    viewer_4d.install_export_tab()  # once only
    nerfstudio_viewer.populate_export_tab(None, SimpleNamespace(_time_enabled=True), Path("config.yml"), "4d model")
    nerfstudio_viewer.populate_export_tab(None, SimpleNamespace(_time_enabled=False), Path("config.yml"), "static")
    assert calls == [("4d", "4d model"), ("nerfstudio", "static")]


def test_export_tab_builds_with_viser():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = viser.ViserServer(host="127.0.0.1", port=port, verbose=False)
    try:
        for model in (NerfactoModel.__new__(NerfactoModel), SplatfactoModel.__new__(SplatfactoModel)):
            viewer_4d.populate_4d_export_tab(server, SimpleNamespace(time=0.5), Path("config.yml"), model)
    finally:
        server.stop()


class FakeCamera:
    """What viser's CameraHandle keeps: the setters' last values."""

    position = look_at = up_direction = None
    fov = None


def viewer_with_cameras(c2ws, times, height=64, focal=80.0):
    n = len(c2ws)
    cameras = Cameras(
        camera_to_worlds=torch.tensor(np.asarray(c2ws), dtype=torch.float32),
        fx=focal, fy=focal, cx=32.0, cy=height / 2, width=64, height=height,
        times=torch.tensor(times, dtype=torch.float32).reshape(n, 1),
    )
    box = SceneBox(aabb=torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
    return SimpleNamespace(
        include_time=True, step=0, control_panel=SimpleNamespace(time=0.0),
        pipeline=SimpleNamespace(model=SimpleNamespace(scene_box=box),
                                 datamanager=SimpleNamespace(train_dataset=SimpleNamespace(cameras=cameras))),
    )


def look_from(position):
    """OpenGL camera-to-world [3, 4] at ``position`` looking at the origin, +z up."""
    forward = -np.asarray(position, float) / np.linalg.norm(position)
    right = np.cross(forward, [0, 0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return np.stack([right, up, -forward, np.asarray(position, float)], 1)


def test_first_view_is_the_first_training_camera_at_its_time():
    c2ws = [look_from([3.0, 1.0, 1.5]), look_from([-2.0, 2.0, 1.0]), look_from([0.5, -3.0, 2.0])]
    control = Viewer4DControl()
    control.viewer = viewer_with_cameras(c2ws, [0.25, 0.5, 0.75])
    client = SimpleNamespace(camera=FakeCamera(), atomic=contextlib.nullcontext)
    control.open_at_first_camera(client)
    camera = client.camera
    np.testing.assert_allclose(camera.position, np.array([3.0, 1.0, 1.5]) * 10, atol=1e-5)
    np.testing.assert_allclose(camera.look_at, [0, 0, 0], atol=1e-5)  # the axis passes through the box centre
    assert math.isclose(camera.fov, 2 * math.atan(32 / 80.0), rel_tol=1e-6)
    assert np.dot(camera.up_direction, [0, 0, 1]) > 0.9 and math.isclose(np.linalg.norm(camera.up_direction), 1)
    assert control.viewer.control_panel.time == 0.25


def test_step_label_follows_training_at_most_once_a_second_and_always_at_the_end(monkeypatch):
    shown = []
    control = Viewer4DControl()
    control.show_step(step=0)  # no viewer (--vis tensorboard): nothing to do
    control.viewer = SimpleNamespace(update_step=shown.append, step=7)
    clock = iter([100.0, 100.2, 100.5, 101.1, 101.2])
    monkeypatch.setattr(viewer_4d.time, "monotonic", lambda: next(clock))
    for step in range(4):
        control.show_step(step=step)
    control.show_step(step=4, force=True)
    assert shown == [0, 3, 4]
    control.viewer.include_time = False
    control.on_connect(SimpleNamespace())  # a browser that connects sees the latest step
    assert shown == [0, 3, 4, 7]
