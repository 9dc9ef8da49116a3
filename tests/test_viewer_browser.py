"""The browser viewer, in a real headless Chromium, against a live ``ns-train`` process.

The page must load from the training process, its canvas must show the scene (not a blank page) within 60 s of
``ns-train``'s start on the sample scene (its points start the Gaussians on the spheres), the first view must frame
the scene as the first training camera does, the "Step" label must reach the last step, the Time slider must be
there and moving it must change what the canvas shows, and the Export tab must give the ns-4d-export command for the
run at the slider's time.

Pictures are compared only once the canvas has settled: nerfstudio renders a view at a low resolution first and
refines it, which on a CPU takes seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.slow

# Flags for a closed network and no GPU: software WebGL, no background connections.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--enable-unsafe-swiftshader",
    "--use-angle=swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ns-train exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(1.0)
    raise AssertionError(f"viewer never answered at {url}:\n{log.read_text()[-3000:]}")


SETTLE_INTERVAL_MS = 1500
"""Time between the screenshots compared to decide whether the canvas has settled."""
SETTLED_FRACTION = 0.0005
"""At most this fraction of the canvas may change between two settled screenshots."""
MAX_RES = 512
"""nerfstudio's default "Max res": the longer side of the viewer's full-resolution render."""


CANVAS_ON_TOP = """() => {
    const onTop = [...document.querySelectorAll("canvas")].filter(c => {
        const r = c.getBoundingClientRect();
        return document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2) === c;
    });
    if (!onTop.length) return null;
    const r = onTop[0].getBoundingClientRect();
    return [Math.round(r.top), Math.round(r.bottom), Math.round(r.left), Math.round(r.right)];
}"""
"""(top, bottom, left, right) of the canvas element that is on top at its own centre, or null."""
UNSCROLL = "() => { for (const e of document.querySelectorAll('*')) if (e.scrollLeft) e.scrollLeft = 0; }"
"""Undoes sideways scrolling inside the page. Playwright's click scrolls its target into view, and once in 12 page
loads clicking "Hide Train Cams" scrolled the viewer's layout 48 px to the left (the canvas at columns -48 to 632,
33 px of the first view's square off the screenshot's edge); a user's page does not scroll sideways."""


def canvas_box(page, timeout: float = 60.0) -> tuple:
    """(top, bottom, left, right) of the 3D canvas in screenshot pixels: the canvas element that is on top at its own
    centre (viser's page holds a second, full-width canvas under it and the control panel), once the page has laid it
    out and any sideways scroll is undone (:data:`UNSCROLL`): inside the window, at least 100 px each way, the same in
    three reads 500 ms apart. Read from the page, not fixed: a fixed guess 10 px off put the first view's square 10 px
    to the side of the camera's (IoU 0.71 against the model's own render of the first camera; 0.95 in the page's box,
    which is rows 51-700, columns 0-680 here)."""
    width, height = page.viewport_size["width"], page.viewport_size["height"]
    reads, box = [], None
    deadline = time.time() + timeout
    while time.time() < deadline:
        page.evaluate(UNSCROLL)
        box = page.evaluate(CANVAS_ON_TOP)
        laid_out = box and box[0] >= 0 and box[2] >= 0 and box[1] <= height and box[3] <= width
        reads = reads[-2:] + [box if laid_out and box[1] - box[0] >= 100 and box[3] - box[2] >= 100 else None]
        if len(reads) == 3 and reads[0] is not None and reads.count(reads[0]) == 3:
            return tuple(box)
        page.wait_for_timeout(500)
    raise AssertionError(f"the 3D canvas was not laid out {timeout:.0f} s after the page loaded (last box: {box})")


def canvas_image(page) -> np.ndarray:
    """A screenshot of the 3D canvas alone (sideways scrolling undone first, as when its box was read)."""
    top, bottom, left, right = page.context.canvas_box
    page.evaluate(UNSCROLL)
    path = page.context.tmp_dir / f"shot_{time.time_ns()}.png"
    page.screenshot(path=str(path))
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float32)[top:bottom, left:right]


def scene_mask(region: np.ndarray) -> np.ndarray:
    """Pixels that differ from the region's background (its median colour) by more than 40 levels."""
    background = np.median(region.reshape(-1, 3), axis=0)
    return np.abs(region - background).max(-1) > 40


def scene_fraction(img: np.ndarray) -> float:
    """Fraction of the 3D canvas that differs from its background."""
    return float(scene_mask(img).mean())


def changed_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of the 3D canvas whose colour differs by more than 5 levels between two screenshots."""
    return float((np.abs(a - b).max(-1) > 5).mean())


def stats(page) -> tuple:
    """(step, longer side of the last render) from the viewer's "Step: N / Resolution: W x H px" label."""
    text = page.locator("xpath=//*[starts-with(normalize-space(text()), 'Step:')]/..").first.inner_text()
    step = re.search(r"Step:\s*(\d+)", text)
    resolution = re.search(r"Resolution:\s*(\d+)\D+(\d+)", text)
    return (int(step.group(1)) if step else None, max(map(int, resolution.groups())) if resolution else 0)


def settled_canvas(page, what: str, timeout: float = 180.0, replacing: Optional[np.ndarray] = None) -> np.ndarray:
    """The canvas once the viewer shows its full-resolution render and two screenshots in a row agree. With
    ``replacing`` (the canvas before an action that asks for a render), only pictures after a new render count: the
    viewer first sends a low-resolution render, so a quiet canvas before that is the old one."""
    previous, difference, resolution = canvas_image(page), 1.0, 0
    fresh = replacing is None
    deadline = time.time() + timeout
    while time.time() < deadline:
        page.wait_for_timeout(SETTLE_INTERVAL_MS)
        current = canvas_image(page)
        difference, resolution = changed_fraction(previous, current), stats(page)[1]
        fresh = fresh or resolution != MAX_RES or changed_fraction(replacing, current) > SETTLED_FRACTION
        if fresh and difference <= SETTLED_FRACTION and resolution == MAX_RES:
            return current
        previous = current
    raise AssertionError(
        f"the canvas never settled {what}: after {timeout:.0f} s two screenshots {SETTLE_INTERVAL_MS} ms apart "
        f"still differed on {difference:.4%} of it (allowed {SETTLED_FRACTION:.4%}), last render {resolution} px "
        f"on its longer side (full resolution: {MAX_RES})"
    )


def first_camera_view(canvas: np.ndarray) -> Image.Image:
    """The part of the canvas that the first training camera's image covers: the canvas's vertical field of view is
    the camera's, so it is the centred square of the canvas's height."""
    height, width = canvas.shape[:2]
    left = (width - height) // 2
    return Image.fromarray(canvas[:, left:left + height].astype(np.uint8))


def model_render_of_first_camera(config: Path, size: int) -> Image.Image:
    """The trained model's own render of the first training camera at its time, ``size`` px high, from the checkpoint
    ``ns-train`` wrote at its last step (what the viewer shows once training has finished)."""
    import torch
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, _ = eval_setup(config, test_mode="inference")
    camera = pipeline.datamanager.train_dataset.cameras[0:1]
    camera.rescale_output_resolution(size / float(camera.height[0]))
    with torch.no_grad():
        rgb = pipeline.model.get_outputs_for_camera(camera.to(pipeline.device))["rgb"]
    return Image.fromarray((rgb.clamp(0, 1) * 255).round().byte().numpy())


def coarse_scene_mask(picture: Image.Image, size: int = 64) -> np.ndarray:
    """The scene in ``picture`` box-filtered to ``size`` px first: after 150 steps the splats are speckled, and a
    per-pixel mask of the same picture at two resolutions overlaps by only about 0.7."""
    return scene_mask(np.asarray(picture.convert("RGB").resize((size, size), Image.BOX)).astype(np.float32))


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two masks."""
    return float((a & b).sum() / max((a | b).sum(), 1))


def extent(mask: np.ndarray) -> tuple:
    """(top, bottom, left, right) of a mask, for failure messages."""
    rows, cols = np.nonzero(mask)
    return tuple(int(v) for v in (rows.min(), rows.max(), cols.min(), cols.max())) if len(rows) else ()


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="Debian's chromium is not installed")
def test_viewer_shows_scene_and_time_slider_changes_it(tmp_path):
    assert CHROMIUM is not None, "CI must install chromium (./setup.sh --dev as root)"
    from playwright.sync_api import sync_playwright

    scene = tmp_path / "scene"
    subprocess.run(
        [sys.executable, "-m", "ns_4d_methods.cli.sample_scene", str(scene), "--resolution", "64",
         "--num-train", "24", "--num-val", "2", "--num-test", "2"],
        check=True,
    )
    port = free_port()
    log = tmp_path / "train.log"
    iterations = 150
    cmd = [
        sys.executable, "-m", "nerfstudio.scripts.train", "splatfacto-4d",
        "--output-dir", str(tmp_path / "out"), "--max-num-iterations", str(iterations),
        "--viewer.websocket-port", str(port), "--viewer.quit-on-train-completion", "False",
        "--data", str(scene),
    ]
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        with sync_playwright() as pw:
            # The browser starts while ns-train does, as a user's browser is open already.
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1000, "height": 700})
            context.tmp_dir = tmp_path
            page = context.new_page()
            wait_for_http(url, proc, log)
            viewer_up = time.time() - started
            page.goto(url)
            page.wait_for_selector("canvas", timeout=60_000)
            # The training cameras' frustums would count as scene on the canvas: hide them, as a user can.
            page.get_by_text("Hide Train Cams").click()
            context.canvas_box = canvas_box(page)
            # The scene shows while training runs, within a minute of the command's start, without moving the camera.
            fraction, shown_after = 0.0, 0.0
            while fraction <= 0.01 and shown_after < 60:
                page.wait_for_timeout(250)
                shown_after = time.time() - started  # when the screenshot was taken
                fraction = scene_fraction(canvas_image(page))
            assert fraction > 0.01 and shown_after <= 60, (
                f"no scene on the canvas 60 s after ns-train started ({fraction:.4%} differs at {shown_after:.1f} s; "
                f"the viewer answered after {viewer_up:.0f} s; load average {os.getloadavg()[0]:.1f})"
            )
            print(f"scene on the canvas {shown_after:.1f} s after ns-train started (viewer up after {viewer_up:.0f} s)")

            # Training ends, and the label shows its last step.
            deadline = time.time() + 300
            while time.time() < deadline and "Training Finished" not in log.read_text():
                time.sleep(2)
            assert "Training Finished" in log.read_text(), f"training did not finish:\n{log.read_text()[-3000:]}"
            deadline, step = time.time() + 30, None
            while time.time() < deadline and step != iterations - 1:
                page.wait_for_timeout(500)
                step = stats(page)[0]
            assert step == iterations - 1, f"the Step label shows {step} after training (last step {iterations - 1})"

            # nerfstudio's render of the last steps may reach the canvas seconds after training ends (a quiet canvas
            # then is not yet the trained scene: 4.3-5.0 % of it changed later in 3 of 8 runs): move the Time slider
            # away and back, each time waiting for the new render, so that every picture below is of the trained scene.
            assert page.get_by_text("Time", exact=True).first.is_visible()
            time_input = page.locator("xpath=//*[text()='Time']/ancestor::div[.//input][1]//input").last
            first_time = time_input.input_value()
            shown = canvas_image(page)
            for value in ("0.5", first_time):
                time_input.fill(value)
                time_input.press("Enter")
                shown = settled_canvas(page, f"after setting the time to {value}", replacing=shown)
            # A quiet canvas can still be replaced once more seconds later (a render of the same view and time that
            # differs on ~5 % of the canvas, seen in 1 of 3 quiet runs even after the round trip; cause not found):
            # take the settled canvas again after 5 s.
            page.wait_for_timeout(5000)
            # The first view, never moved: the first training camera's, at its time, framing the scene as its image.
            before = settled_canvas(page, "after training")
            Image.fromarray(before.astype(np.uint8)).save(tmp_path / "viewer_before.png")
            fraction = scene_fraction(before)
            assert fraction > 0.01, f"canvas shows no scene ({fraction:.4%} of it differs from the background)"
            # Against the trained model's own render of that camera, so that how well 150 steps fit the image does not
            # count: CI's run, compared with the image, gave 0.41 where this machine gives 0.71 (seed 7: 0.69). The
            # render matches at 0.92-0.94 here (seeds 0 and 7); the same picture 10 px (1.5 %) to the side gives 0.77,
            # 10 % nearer or farther 0.72-0.74.
            view = coarse_scene_mask(first_camera_view(before))
            config = next((tmp_path / "out").rglob("config.yml"))
            render = coarse_scene_mask(model_render_of_first_camera(config, before.shape[0]))
            framing = overlap(view, render)
            rgba = Image.open(scene / "train" / "r_000.png").resize(view.shape[::-1], Image.BOX)
            fit = overlap(view, np.asarray(rgba)[..., 3] > 127)
            print(f"first view against the model's render of the first camera: scene overlap (IoU) {framing:.3f}; "
                  f"against the first training image's alpha: {fit:.3f}")
            assert framing > 0.85, (
                f"the first view does not frame the scene as the first camera does (IoU {framing:.3f} against the "
                f"model's own render of it; canvas box {context.canvas_box}; scene box in 64 px, view "
                f"{extent(view)}, render {extent(render)})"
            )

            # Control: with nothing touched the settled canvas stays as it is.
            page.wait_for_timeout(3000)
            unchanged = changed_fraction(before, settled_canvas(page, "with nothing touched"))
            print(f"settled canvas, nothing touched: {unchanged:.4%} changed")

            time_input.fill("0.5")
            time_input.press("Enter")
            after = settled_canvas(page, "after moving the Time slider", replacing=before)
            Image.fromarray(np.concatenate([before, after], 1).astype(np.uint8)).save(tmp_path / "viewer.png")
            changed = changed_fraction(before, after)
            print(f"settled canvas, Time slider 0 -> 0.5: {changed:.4%} changed")
            assert changed > 0.002 and changed > 10 * unchanged, (
                f"moving the Time slider changed {changed:.4%} of the canvas (untouched: {unchanged:.4%})"
            )

            # The Export tab gives the command that exports this run at the slider's time.
            page.get_by_text("Export", exact=True).first.click()
            page.get_by_role("button", name="Generate Command").first.click()
            dialog = page.get_by_role("dialog")
            dialog.wait_for(timeout=10_000)
            expected = f"ns-4d-export gaussians --load-config {config} --output-dir exports/gaussians/ --times 0.5"
            assert expected in dialog.inner_text(), dialog.inner_text()
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
