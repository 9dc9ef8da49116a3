"""ns-4d-export on a real (tiny) splatfacto-4d run of the sample scene: each subcommand writes what it says, and bad
input (an unknown or non-4D run, a time outside [0, 1], an unwritable output) ends with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from plyfile import PlyData

from ns_4d_methods.cli.export import entrypoint
from ns_4d_methods.errors import InputError
from ns_4d_methods.export.splatv import read_splatv

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def run(args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """config.yml of a 10-step splatfacto-4d run on a 32 px sample scene, from its surface points."""
    root = tmp_path_factory.mktemp("export")
    scene = root / "scene"
    run([sys.executable, "-m", "ns_4d_methods.cli.sample_scene", str(scene), "--resolution", "32", "--num-train",
         "8", "--num-val", "1", "--num-test", "1", "--num-points", "2000"]).check_returncode()
    result = run([sys.executable, "-m", "nerfstudio.scripts.train", "splatfacto-4d", "--vis", "tensorboard",
                  "--output-dir", str(root / "out"), "--experiment-name", "exp", "--timestamp", "run",
                  "--max-num-iterations", "10", "--steps-per-save", "10", "--data", str(scene)])
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "out" / "exp" / "splatfacto-4d" / "run" / "config.yml"


def test_gaussians_writes_frames_and_index(trained, tmp_path):
    entrypoint(["gaussians", "--load-config", str(trained), "--output-dir", str(tmp_path), "--times", "0", "0.5",
                "1"])
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["num_frames"] == 3 and [f["time"] for f in index["frames"]] == [0.0, 0.5, 1.0]
    assert index["source"] == str(trained)
    vertex = PlyData.read(str(tmp_path / index["frames"][1]["file"]))["vertex"]
    assert len(vertex.data) > 1000 and np.isfinite(vertex["opacity"]).all()


def test_splatv_writes_one_file_or_refuses_past_the_threshold(trained, tmp_path, capsys):
    entrypoint(["splatv", "--load-config", str(trained), "--output-dir", str(tmp_path), "--num-samples", "32",
                "--max-cameras", "4"])
    assert "bake error: centres" in capsys.readouterr().out
    loaded = read_splatv(tmp_path / "scene.splatv")
    assert loaded.header["cameras"] and loaded.header["bake"]["psnr_min"] >= 35
    assert len(loaded.centres) % 8 == 0 and len(loaded.centres) > 1000  # 8 segments
    with pytest.raises(InputError, match="over the limits"):
        entrypoint(["splatv", "--load-config", str(trained), "--output-dir", str(tmp_path / "no"), "--segments", "1",
                    "--max-cameras", "2", "--min-psnr", "200"])
    assert not (tmp_path / "no" / "scene.splatv").exists()


def test_mesh_writes_meshes_and_an_animated_glb(trained, tmp_path):
    entrypoint(["mesh", "--load-config", str(trained), "--output-dir", str(tmp_path), "--num-frames", "2",
                "--resolution", "32", "--threshold", "0.05"])
    index = json.loads((tmp_path / "index.json").read_text())
    assert [f["time"] for f in index["frames"]] == [0.0, 1.0]
    assert index["animated"]["file"] == "animated.glb" and (tmp_path / "animated.glb").stat().st_size > 1000
    assert len(PlyData.read(str(tmp_path / "mesh_00000.ply"))["face"].data) > 100


def test_bad_input_is_one_line(trained, tmp_path):
    splatfacto = tmp_path / "splatfacto" / "config.yml"  # a run of nerfstudio's static splatfacto
    splatfacto.parent.mkdir()
    from nerfstudio.configs.method_configs import all_methods

    splatfacto.write_text(yaml.dump(all_methods["splatfacto"]))
    (tmp_path / "garbage.yml").write_text("{not: [a config")
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = {
        ("gaussians", "--load-config", str(tmp_path / "missing.yml")): "no such file",
        ("gaussians", "--load-config", str(tmp_path / "garbage.yml")): "not a nerfstudio run configuration",
        ("gaussians", "--load-config", str(splatfacto)): "splatfacto is not a 4D method",
        ("mesh", "--load-config", str(splatfacto)): "splatfacto is not a 4D method",
        ("gaussians", "--load-config", str(trained), "--times", "0.5", "1.2"): "--times 1.2: expected times in [0, 1]",
        ("splatv", "--load-config", str(trained), "--times", "-0.1"): "--times",
        ("mesh", "--load-config", str(trained), "--times", "-0.1"): "--times -0.1",
    }
    for args, message in cases.items():
        output = str(tmp_path / "out")
        with pytest.raises(InputError) as error:
            entrypoint([*args, "--output-dir", output])
        assert message in str(error.value) and "\n" not in str(error.value), (args, str(error.value))
    with pytest.raises(InputError, match="--output-dir .*cannot create it"):
        entrypoint(["gaussians", "--load-config", str(trained), "--output-dir", str(blocker / "out")])
    # as a command (the module behind the ns-4d-export script): exit status 1 and one line, no traceback
    result = run([sys.executable, "-m", "ns_4d_methods.cli.export", "gaussians", "--load-config", str(trained),
                  "--output-dir", str(blocker / "out")])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    # (torch's import-time FutureWarnings may come before it)
    assert result.stderr.strip().splitlines()[-1] == f"error: --output-dir {blocker / 'out'}: cannot create it " \
                                                     f"(Not a directory)"
