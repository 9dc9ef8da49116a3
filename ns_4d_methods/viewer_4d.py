"""The browser viewer of a 4D run: nerfstudio's viewer, with three changes made through its own hooks (a
``ViewerControl`` that the viewer finds on the pipeline and sets up, and the function that fills the Export tab).

- First view: each browser that connects opens at the first training camera (pose and vertical field of view), and
  the Time slider moves to that camera's time. viser's default camera sits near the world origin, which in a 4D scene
  is inside the objects: a new user saw big blurred blobs fill the view.
- Step label: nerfstudio rewrites "Step: N" only when it re-renders for a connected client, at a rate it sets from
  render and train speeds (on a CPU that can be every few hundred steps), so the label lags training and a browser that
  connects after training shows a stale number. Here it follows training (at most once a second, and the last step
  always) and is refreshed for each browser that connects (``ns-viewer`` included).
- Export tab: the ``ns-4d-export`` commands for this run at the Time slider's time (gaussians and splatv for Gaussian
  models, mesh for NeRFs), shown the way nerfstudio shows ``ns-export`` for static splats. nerfstudio's own exports
  ignore time (its gaussian-splat export writes the undeformed Gaussians), so a 4D run's tab lists only these.
"""

from __future__ import annotations

import functools
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

import numpy as np
import viser
from nerfstudio.models.base_model import Model
from nerfstudio.models.splatfacto import SplatfactoModel
from nerfstudio.viewer import export_panel
from nerfstudio.viewer import viewer as nerfstudio_viewer
from nerfstudio.viewer.control_panel import ControlPanel
from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO
from nerfstudio.viewer.viewer_elements import ViewerControl

if TYPE_CHECKING:
    from nerfstudio.viewer.viewer import Viewer

STEP_LABEL_PERIOD_S = 1.0
"""Shortest time between two updates of the "Step" label while training (each one is a message to every browser)."""


def export_command(kind: str, config_path: Path, output_dir: str, render_time: Optional[float] = None) -> str:
    """The shell command that exports a run with ``ns-4d-export`` (at ``render_time`` when given)."""
    words = ["ns-4d-export", kind, "--load-config", str(config_path), "--output-dir", output_dir]
    if render_time is not None:
        words += ["--times", f"{render_time:g}"]
    return " ".join(shlex.quote(word) for word in words)


def exports_for(model: Model) -> List[Tuple[str, str, str, bool]]:
    """(ns-4d-export subcommand, what nerfstudio's command modal calls it, default output folder, at the slider's
    time) for each export a 4D model has: Gaussians export per-time splats and one splaTV file, NeRFs meshes."""
    if isinstance(model, SplatfactoModel):
        return [("gaussians", "splat", "exports/gaussians/", True), ("splatv", "4D splat", "exports/splatv/", False)]
    return [("mesh", "mesh", "exports/mesh/", True)]


def populate_4d_export_tab(
    server: viser.ViserServer, control_panel: ControlPanel, config_path: Path, model: Model
) -> None:
    """The Export tab of a 4D run: one folder per export, each with its output folder and a command button."""
    server.gui.add_markdown("<small>Export this 4D run with ns-4d-export (at the Time slider's time)</small>")
    for kind, what, output_dir, timed in exports_for(model):
        with server.gui.add_folder(f"4D {kind}"):
            directory = server.gui.add_text("Output Directory", initial_value=output_dir)
            button = server.gui.add_button("Generate Command", icon=viser.Icon.TERMINAL_2)

            def show(event: viser.GuiEvent, kind=kind, what=what, directory=directory, timed=timed) -> None:
                assert event.client is not None
                render_time = control_panel.time if timed else None
                command = export_command(kind, config_path, directory.value, render_time)
                export_panel.show_command_modal(event.client, what, command)

            button.on_click(show)


def install_export_tab() -> None:
    """Makes nerfstudio's viewer fill the Export tab of 4D runs (whose Time slider is on) with
    :func:`populate_4d_export_tab`; other runs keep nerfstudio's tab. Idempotent."""
    original: Callable = nerfstudio_viewer.populate_export_tab
    if getattr(original, "_ns4d_export_tab", False):
        return

    @functools.wraps(original)
    def populate_export_tab(server, control_panel, config_path, viewer_model) -> None:
        # ControlPanel keeps nerfstudio's "the data has time" flag (it shows the Time slider) only privately.
        if getattr(control_panel, "_time_enabled", False):
            populate_4d_export_tab(server, control_panel, config_path, viewer_model)
        else:
            original(server, control_panel, config_path, viewer_model)

    populate_export_tab._ns4d_export_tab = True  # type: ignore[attr-defined]
    nerfstudio_viewer.populate_export_tab = populate_export_tab


class Viewer4DControl(ViewerControl):
    """The first view and the step label of a 4D run's viewer; nerfstudio calls :meth:`_setup` once its viewer is
    built, and the pipeline calls :meth:`show_step` after each training step."""

    def __init__(self) -> None:
        self.viewer: Optional[Viewer] = None
        self.label_shown_at = 0.0

    def _setup(self, viewer: Viewer) -> None:
        super()._setup(viewer)
        viewer.viser_server.on_client_connect(self.on_connect)

    def on_connect(self, client: viser.ClientHandle) -> None:
        assert self.viewer is not None
        self.viewer.update_step(self.viewer.step)
        if self.viewer.include_time:
            self.open_at_first_camera(client)

    def open_at_first_camera(self, client: viser.ClientHandle) -> None:
        """Moves the browser's camera to the first training camera and the Time slider to its time. The orbit
        controls turn about the training cameras' mean up direction and around the point of the view axis nearest
        the scene box's centre."""
        assert self.viewer is not None
        dataset = getattr(self.viewer.pipeline.datamanager, "train_dataset", None)
        if dataset is None or len(dataset.cameras) == 0:
            return
        cameras = dataset.cameras
        c2w = cameras.camera_to_worlds[0].numpy(force=True).astype(np.float64)
        position, forward = c2w[:, 3], -c2w[:, 2]  # OpenGL cameras look down -z
        centre = self.viewer.pipeline.model.scene_box.get_center().numpy(force=True)
        distance = float((centre - position) @ forward)
        if distance <= 0:
            distance = float(np.linalg.norm(centre - position))
        up = cameras.camera_to_worlds[:, :, 1].mean(0).numpy(force=True).astype(np.float64)
        fov = 2 * np.arctan(float(cameras.height[0]) / (2 * float(cameras.fy[0])))
        with client.atomic():
            client.camera.up_direction = up / np.linalg.norm(up)
            client.camera.fov = float(fov)
            client.camera.position = position * VISER_NERFSTUDIO_SCALE_RATIO
            client.camera.look_at = (position + distance * forward) * VISER_NERFSTUDIO_SCALE_RATIO
        if cameras.times is not None:
            self.viewer.control_panel.time = float(cameras.times[0])

    def show_step(self, step: int, force: bool = False) -> None:
        """Writes ``step`` into the viewer's "Step" label, at most once per :data:`STEP_LABEL_PERIOD_S` unless
        ``force`` (the last step)."""
        if self.viewer is None:  # no viewer (--vis tensorboard, say)
            return
        now = time.monotonic()
        if force or now - self.label_shown_at >= STEP_LABEL_PERIOD_S:
            self.viewer.update_step(step)
            self.label_shown_at = now
