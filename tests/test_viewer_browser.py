"""The browser viewer, in a real headless Chromium, against a live ``ns-train`` process.

The page must load from the training process, its canvas must show the scene (not a blank page) within 60 s of
``ns-train``'s start on the sample scene (its points start the Gaussians on the spheres), the Time slider must be
there, and moving it must change what the canvas shows.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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


def canvas_image(page) -> np.ndarray:
    path = page.context.tmp_dir / f"shot_{time.time_ns()}.png"
    page.screenshot(path=str(path))
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float32)


def scene_fraction(img: np.ndarray) -> float:
    """Fraction of the 3D canvas (below the header, left of the control panel) that differs from its background."""
    region = img[60:690, :660]
    background = np.median(region.reshape(-1, 3), axis=0)
    return float((np.abs(region - background).max(-1) > 40).mean())


def changed_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of the 3D canvas whose colour differs by more than 5 levels between two screenshots."""
    return float((np.abs(a - b)[60:690, :660].max(-1) > 5).mean())


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
    cmd = [
        sys.executable, "-m", "nerfstudio.scripts.train", "splatfacto-4d",
        "--output-dir", str(tmp_path / "out"), "--max-num-iterations", "150",
        "--viewer.websocket-port", str(port), "--viewer.quit-on-train-completion", "False",
        "--data", str(scene),
    ]
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(url, proc, log)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1000, "height": 700})
            context.tmp_dir = tmp_path
            page = context.new_page()
            page.goto(url)
            page.wait_for_selector("canvas", timeout=60_000)
            # viser's default view starts inside the scene's unit box: zoom out with the mouse wheel, as a user would.
            page.mouse.move(300, 350)
            for _ in range(8):
                page.mouse.wheel(0, 400)
                page.wait_for_timeout(200)
            # The scene shows while training runs, within a minute of the command's start.
            fraction = 0.0
            while fraction <= 0.01 and time.time() - started < 60:
                page.wait_for_timeout(1000)
                fraction = scene_fraction(canvas_image(page))
            shown_after = time.time() - started
            assert fraction > 0.01, f"no scene on the canvas 60 s after ns-train started ({fraction:.4%} differs)"
            print(f"scene on the canvas {shown_after:.0f} s after ns-train started")
            # Wait for training to finish and a render of the trained scene to reach the canvas.
            deadline = time.time() + 300
            while time.time() < deadline and "Training Finished" not in log.read_text():
                time.sleep(2)
            page.mouse.wheel(0, 1)  # a camera move asks the viewer for a fresh render
            page.wait_for_timeout(10_000)
            before = canvas_image(page)
            Image.fromarray(before.astype(np.uint8)).save(tmp_path / "viewer_before.png")
            fraction = scene_fraction(before)
            assert fraction > 0.01, f"canvas shows no scene ({fraction:.4%} of it differs from the background)"

            # Control: with nothing touched the canvas stays as it is.
            page.wait_for_timeout(3000)
            unchanged = changed_fraction(before, canvas_image(page))

            assert page.get_by_text("Time", exact=True).first.is_visible()
            time_input = page.locator("xpath=//*[text()='Time']/ancestor::div[.//input][1]//input").last
            time_input.fill("0.5")
            time_input.press("Enter")
            page.wait_for_timeout(10_000)
            after = canvas_image(page)
            Image.fromarray(np.concatenate([before, after], 1).astype(np.uint8)).save(tmp_path / "viewer.png")
            changed = changed_fraction(before, after)
            assert changed > 0.002 and changed > 10 * unchanged, (
                f"moving the Time slider changed {changed:.4%} of the canvas (untouched: {unchanged:.4%})"
            )
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
