"""What the examples share: each step is one of the suite's command lines, printed before it runs, so an example
reads as the commands a user would type (``ns-train``, ``ns-render``, ``ns-4d-export``, ...)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Sequence

import numpy as np

EXAMPLES = Path(__file__).resolve().parent
CAMERA_PATH = EXAMPLES / "camera_path.json"
"""An orbit around the sample scene, in the scene's own (dataset) coordinates, with render_time per keyframe."""


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The arguments every example takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("examples_output") / name, help="where everything goes")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the method's own schedule)")
    p.add_argument("--resolution", type=int, default=128, help="size of the generated data in pixels")
    p.add_argument("--num-train", type=int, default=100, help="training views of the sample scene")
    p.add_argument("--train-args", type=shlex.split, default=[],
                   help='further ns-train flags in one string, e.g. "--pipeline.model.num-levels 8"')
    p.add_argument("--export-args", type=shlex.split, default=[],
                   help='further ns-4d-export flags in one string, e.g. "--resolution 64"')
    return p


# ns-* commands as modules of the running Python, so that an example works from a checkout as from an install
COMMANDS = {
    "ns-train": "nerfstudio.scripts.train",
    "ns-render": "nerfstudio.scripts.render",
    "ns-4d-export": "ns_4d_methods.cli.export",
    "ns-4d-sample-scene": "ns_4d_methods.cli.sample_scene",
}


def run(command: str, *args) -> None:
    """Runs ``command`` (an ns-* name) with ``args``; prints it first and its wall and CPU time after; stops the
    example when it fails."""
    args = [str(a) for a in args]
    print("$", command, " ".join(shlex.quote(a) for a in args), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")]))
    start, cpu = time.perf_counter(), _children_cpu()
    result = subprocess.run([sys.executable, "-m", COMMANDS[command], *args], env=env)
    print(f"({command}: {time.perf_counter() - start:.1f} s, {_children_cpu() - cpu:.1f} s CPU)", flush=True)
    if result.returncode != 0:
        sys.exit(f"error: {command} failed (exit status {result.returncode})")


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished commands so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train(method: str, workdir: Path, steps, *args) -> Path:
    """``ns-train METHOD`` into ``workdir/runs``; returns the run's config.yml."""
    step_args = ["--max-num-iterations", steps] if steps else []
    run("ns-train", method, "--output-dir", workdir / "runs", "--experiment-name", "example", "--timestamp", method,
        "--vis", "tensorboard", *step_args, *args)
    return workdir / "runs" / "example" / method / method / "config.yml"


def sample_scene(args: argparse.Namespace) -> Path:
    """``ns-4d-sample-scene`` into ``workdir/scene`` at ``--resolution``, unless an earlier run made it."""
    scene = args.workdir / "scene"
    if not scene.exists():
        run("ns-4d-sample-scene", scene, "--resolution", args.resolution, "--num-train", args.num_train)
    return scene


def render_sample_scene_video(config: Path, args: argparse.Namespace) -> None:
    """``workdir/video.mp4``: the run rendered along :data:`CAMERA_PATH` (moved into its coordinates)."""
    render(config, sample_scene_path(config, args.workdir / "camera_path.json", args.resolution),
           args.workdir / "video.mp4")


def sample_scene_path(config: Path, output: Path, size: int = 128) -> Path:
    """``camera_path.json`` moved into the run's world coordinates (its ``dataparser_transforms.json``)."""
    transforms = json.loads((config.parent / "dataparser_transforms.json").read_text())
    transform = np.concatenate([np.array(transforms["transform"]), [[0, 0, 0, 1]]])
    path = json.loads(CAMERA_PATH.read_text())
    for keyframe in path["camera_path"]:
        c2w = transform @ np.array(keyframe["camera_to_world"]).reshape(4, 4)
        c2w[:3, 3] *= transforms["scale"]
        keyframe["camera_to_world"] = c2w.reshape(-1).tolist()
    path["render_width"] = path["render_height"] = size
    output.write_text(json.dumps(path, indent=2))
    return output


def render(config: Path, camera_path: Path, output: Path) -> None:
    """``ns-render camera-path``: a video with the camera and the time moving."""
    run("ns-render", "camera-path", "--load-config", config, "--camera-path-filename", camera_path,
        "--output-path", output)


def orbit_path(c2ws: Sequence[np.ndarray], fov: float, size: int, output: Path) -> Path:
    """A camera path through ``c2ws`` [4, 4] with render_time from 0 to 1."""
    times: List[float] = np.linspace(0.0, 1.0, len(c2ws)).tolist()
    path = {"camera_type": "perspective", "render_height": size, "render_width": size, "seconds": 2.0,
            "fps": len(c2ws) / 2.0, "camera_path": [{"camera_to_world": np.asarray(c).reshape(-1).tolist(),
                                                     "fov": fov, "aspect": 1.0, "render_time": t}
                                                    for c, t in zip(c2ws, times)]}
    output.write_text(json.dumps(path, indent=2))
    return output
