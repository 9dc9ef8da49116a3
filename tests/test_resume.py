"""Resume as users expect (ns_4d_methods/trainer.py), through the real ``ns-train`` on the CPU with the package's
sample scene at 32 px: a run killed with SIGKILL after a checkpoint and resumed with the same flags ends at the planned
total step with the same parameters, bit for bit, as the run that never stopped (splatfacto-4d and nerfacto-4d); a
truncated newest checkpoint is skipped with one warning; none readable is one error line; Ctrl-C saves a checkpoint.

Every run has one thread (``OMP_NUM_THREADS=1``): the comparisons are bit for bit at the same thread count.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import test_four_real_method as four_real
from ns_4d_methods.trainer import Trainer4D

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
STEPS, SAVE_EVERY = 20, 5
four_real_inputs = pytest.fixture(scope="module", name="four_real_inputs")(four_real.inputs.__wrapped__)
SPLATFACTO = ["splatfacto-4d", "--pipeline.model.num-random", "500", "--pipeline.model.deformation-warmup", "0"]
NERFACTO = [
    "nerfacto-4d", "--pipeline.model.num-levels", "4", "--pipeline.model.max-res", "32",
    "--pipeline.model.log2-hashmap-size", "10", "--pipeline.model.max-res-4d", "32",
    "--pipeline.model.log2-hashmap-size-4d", "10", "--pipeline.model.num-nerf-samples-per-ray", "8",
    "--pipeline.model.num-proposal-samples-per-ray", "16", "8",
    "--pipeline.datamanager.train-num-rays-per-batch", "128", "--pipeline.datamanager.eval-num-rays-per-batch", "128",
]  # fmt: skip


def train_args(method: list, scene: Path, out: Path, name: str, steps: int = STEPS, *extra: str) -> list:
    return [
        sys.executable, "-m", "nerfstudio.scripts.train", *method, "--vis", "tensorboard", "--output-dir", str(out),
        "--experiment-name", "exp", "--timestamp", name, "--max-num-iterations", str(steps),
        "--steps-per-save", str(SAVE_EVERY), "--machine.device-type", "cpu", *extra, "--data", str(scene),
    ]  # fmt: skip


def run(args: list) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=ENV)


def start(args: list) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)


def checkpoints(run_dir: Path) -> list:
    return sorted((run_dir / "nerfstudio_models").glob("step-*.ckpt"))


def wait_for_checkpoint(process: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + 300
    while not checkpoints(run_dir):
        assert process.poll() is None, f"the run ended before its first checkpoint: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.005)


def killed_run(method: list, scene: Path, out: Path, name: str) -> Path:
    """The run with STEPS planned, killed with SIGKILL as soon as its first checkpoint is there."""
    run_dir = out / "exp" / method[0] / name
    process = start(train_args(method, scene, out, name))
    wait_for_checkpoint(process, run_dir)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    checkpoint = checkpoints(run_dir)[-1]  # the one written last (a kill between rename and clean-up leaves two)
    assert int(checkpoint.stem.split("-")[1]) < STEPS - 1, "the run finished before it was killed"
    return run_dir


def step_and_parameters(run_dir: Path) -> tuple:
    state = torch.load(checkpoints(run_dir)[-1], map_location="cpu", weights_only=False)
    return state["step"], state["pipeline"]


def assert_same_parameters(resumed: dict, uninterrupted: dict) -> None:
    assert resumed.keys() == uninterrupted.keys()
    def same(a, b) -> bool:  # tensors, and the pipelines' extra state (stage positions)
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    differing = [key for key, value in resumed.items() if not same(value, uninterrupted[key])]
    assert not differing, f"differ from the uninterrupted run: {differing}"


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    scene = tmp_path_factory.mktemp("resume") / "scene"
    subprocess.run([sys.executable, "-m", "ns_4d_methods.cli.sample_scene", str(scene), "--resolution", "32",
                    "--num-train", "12", "--num-val", "2", "--num-test", "2"], check=True, env=ENV)
    return scene


@pytest.fixture(scope="module")
def splatfacto_runs(scene, tmp_path_factory) -> SimpleNamespace:
    """splatfacto-4d: STEPS uninterrupted, and killed after its first checkpoint then resumed with the same flags."""
    out = tmp_path_factory.mktemp("splatfacto")
    full = run(train_args(SPLATFACTO, scene, out, "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = killed_run(SPLATFACTO, scene, out, "killed")
    resumed = run(train_args(SPLATFACTO, scene, out, "resumed", STEPS, "--load-dir", str(killed / "nerfstudio_models")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return SimpleNamespace(run_dir=lambda name: out / "exp" / SPLATFACTO[0] / name)


def test_killed_splatfacto_4d_resumes_to_the_planned_total_and_equals_the_uninterrupted_run(splatfacto_runs):
    step, parameters = step_and_parameters(splatfacto_runs.run_dir("resumed"))
    assert step == STEPS - 1  # nerfstudio would have gone on for STEPS more steps after the loaded one
    full_step, full_parameters = step_and_parameters(splatfacto_runs.run_dir("full"))
    assert full_step == STEPS - 1
    assert_same_parameters(parameters, full_parameters)


def test_nerfacto_4d_killed_and_resumed_equals_the_uninterrupted_run(scene, tmp_path):
    full = run(train_args(NERFACTO, scene, tmp_path, "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = killed_run(NERFACTO, scene, tmp_path, "killed")
    load_dir = str(killed / "nerfstudio_models")
    resumed = run(train_args(NERFACTO, scene, tmp_path, "resumed", STEPS, "--load-dir", load_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step, parameters = step_and_parameters(tmp_path / "exp" / "nerfacto-4d" / "resumed")
    full_step, full_parameters = step_and_parameters(tmp_path / "exp" / "nerfacto-4d" / "full")
    assert step == full_step == STEPS - 1
    assert_same_parameters(parameters, full_parameters)


def test_truncated_newest_checkpoint_is_skipped_with_one_warning(splatfacto_runs, scene, tmp_path):
    (good,) = checkpoints(splatfacto_runs.run_dir("full"))
    load_dir = tmp_path / "nerfstudio_models"
    load_dir.mkdir()
    shutil.copy(good, load_dir / good.name)
    truncated = load_dir / f"step-{STEPS + 5:09d}.ckpt"  # what a kill during torch.save leaves
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    result = run(train_args(SPLATFACTO, scene, tmp_path / "out", "run", STEPS, "--load-dir", str(load_dir)))
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and str(truncated) in warnings[0], result.stderr[-3000:]
    log = " ".join(result.stdout.split())
    assert f"Done loading Nerfstudio checkpoint from {load_dir / good.name}" in log
    assert f"Nothing left to train: the run's total is {STEPS} steps" in log  # the loaded step is the last

    (load_dir / good.name).write_bytes(b"")  # nothing readable left
    result = run(train_args(SPLATFACTO, scene, tmp_path / "out", "none", STEPS, "--load-dir", str(load_dir)))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --load-dir {load_dir}: none of its 2 step-*.ckpt checkpoints can be read"), last


def test_ctrl_c_saves_a_checkpoint_of_the_last_step(scene, tmp_path):
    run_dir = tmp_path / "exp" / "splatfacto-4d" / "run"
    process = start(train_args(SPLATFACTO, scene, tmp_path, "run", 100000))
    wait_for_checkpoint(process, run_dir)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    (checkpoint,) = checkpoints(run_dir)
    step, _ = step_and_parameters(run_dir)
    assert f"interrupted: checkpoint of step {step} saved in {run_dir / 'nerfstudio_models'}" in stderr
    assert checkpoint.name == f"step-{step:09d}.ckpt" and step >= SAVE_EVERY


def test_second_ctrl_c_exits_at_once():
    trainer = Trainer4D.__new__(Trainer4D)  # only the flags the handler sets
    trainer._interrupted = trainer.stop_training = False
    previous = signal.getsignal(signal.SIGINT)
    trainer._catch_interrupts()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert trainer.stop_training and trainer._interrupted
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_after_training_is_the_handler_before_it():
    """nerfstudio's viewer keeps the process alive after training until Ctrl-C: one press must end it."""
    trainer = Trainer4D.__new__(Trainer4D)
    trainer._interrupted = trainer.stop_training = False
    previous = signal.getsignal(signal.SIGINT)
    trainer._catch_interrupts()
    assert signal.getsignal(signal.SIGINT) is not previous
    trainer._release_interrupts()
    assert signal.getsignal(signal.SIGINT) is previous



def test_four_real_stopped_in_stage_four_and_resumed_through_stage_five_equals_the_uninterrupted_run(four_real_inputs):
    """4real with tiny models: CUT steps into stage 4 (of STAGE_STEPS), then resumed across the boundary to the end
    of stage 5, against 2 * STAGE_STEPS uninterrupted steps. Both use the stage 1-3 artefacts of the uninterrupted
    run (``--pipeline.run-dir``), so that every run starts training from the same state."""
    inputs, full = four_real_inputs, four_real.run_dir(four_real_inputs, "full")
    steps = 2 * four_real.STAGE_STEPS
    result = four_real.run(four_real.train_args(inputs, "full", steps, *four_real.user_video_args(inputs)))
    assert result.returncode == 0, result.stderr[-3000:]
    artefacts = ["--pipeline.run-dir", str(full), *four_real.user_video_args(inputs)]
    result = four_real.run(four_real.train_args(inputs, "cut", four_real.CUT, *artefacts))
    assert result.returncode == 0, result.stderr[-3000:]
    cut = four_real.run_dir(inputs, "cut") / "nerfstudio_models"
    result = four_real.run(four_real.train_args(inputs, "resumed", steps, "--load-dir", str(cut), *artefacts))
    assert result.returncode == 0, result.stderr[-3000:]
    log = four_real.console_text(result.stdout)
    assert "stage 5/5 temporal deformation" in log
    step, parameters = step_and_parameters(four_real.run_dir(inputs, "resumed"))
    full_step, full_parameters = step_and_parameters(full)
    assert step == full_step == steps - 1
    assert_same_parameters(parameters, full_parameters)
