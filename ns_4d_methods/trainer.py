"""The suite's trainer: nerfstudio's, with resume as users expect. Also the AdamW optimizer config nerfstudio lacks.

- ``--max-num-iterations`` is the run's total: a run resumed from its own checkpoint stops where the uninterrupted run
  would have (nerfstudio runs that many steps *more*; ``--more-steps-after-load`` keeps that). A checkpoint of another
  method (instruct4d from a nerfacto-4d reconstruction) starts a new run, counted from the loaded step.
- Checkpoints are written to a hidden temporary name in the same folder and renamed when complete; older ones are
  deleted only then. ``--load-dir`` skips a newest checkpoint it cannot read (what a kill during a write leaves) with
  one warning line and loads the newest readable one; bad paths and no readable checkpoint are one-line errors.
- Checkpoints carry the random and sampling state (:mod:`ns_4d_methods.resume_state`), put back once the pipeline has
  set up its training (after ``get_training_callbacks``), so that on the CPU a killed and resumed run ends with the same
  parameters as one that never stopped, bit for bit at the same thread count. On CUDA only nearly: gsplat's
  rasterization backward and tiny-cuda-nn's hash-grid backward add gradients with atomics, in no fixed order.
- The first Ctrl-C ends training after the current step and saves a checkpoint of it; a second exits at once.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Type

import torch
from nerfstudio.configs.base_config import MachineConfig
from nerfstudio.engine.optimizers import OptimizerConfig
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils import writer
from nerfstudio.utils.decorators import check_main_thread
from nerfstudio.utils.rich_utils import CONSOLE

from ns_4d_methods import resume_state
from ns_4d_methods.errors import InputError


def checkpoint_step(path: Path) -> Optional[int]:
    """The step in a checkpoint's name ``step-000000400.ckpt``; None for other names."""
    match = re.fullmatch(r"step-(\d+)\.ckpt", path.name)
    return int(match.group(1)) if match else None


def checkpoints_of(load_dir: Path) -> List[Path]:
    """The ``step-*.ckpt`` files in ``load_dir``, oldest step first."""
    found = [path for path in load_dir.glob("step-*.ckpt") if checkpoint_step(path) is not None]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(load_dir: Path, field_name: str = "--load-dir") -> Path:
    """The newest ``step-*.ckpt`` in ``load_dir`` by name; an :class:`InputError` naming the field if there is none."""
    if not load_dir.is_dir():
        raise InputError(f"{field_name} {load_dir}: directory does not exist (expected a run's nerfstudio_models/)")
    checkpoints = checkpoints_of(load_dir)
    if not checkpoints:
        raise InputError(
            f"{field_name} {load_dir}: no step-*.ckpt checkpoint found (expected a run's nerfstudio_models/)"
        )
    return checkpoints[-1]


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """A checkpoint's contents, loaded the way nerfstudio loads them (onto the CPU)."""
    state = torch.load(path, map_location="cpu")
    if not isinstance(state, dict) or "step" not in state or "pipeline" not in state:
        raise ValueError("not a nerfstudio checkpoint (no step and pipeline entries)")
    return state


def _reason(error: BaseException) -> str:
    """The first sentence of an error's message (torch's zip errors go on for lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[0].split(". ")[0].rstrip(".")[:160]


def warn(message: str) -> None:
    """One warning line on stderr (not through rich, which would wrap it at the console width)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def newest_readable_checkpoint(load_dir: Path, load_step: Optional[int]) -> Tuple[Path, Dict[str, Any]]:
    """``--load-dir``'s checkpoint and its contents: ``--load-step``'s if given, else the newest that can be read."""
    latest_checkpoint(load_dir)  # the one-line error for a missing or empty directory
    candidates = list(reversed(checkpoints_of(load_dir)))
    if load_step is not None:
        candidates = [path for path in candidates if checkpoint_step(path) == load_step]
        if not candidates:
            raise InputError(f"--load-step {load_step}: no such checkpoint in {load_dir}")
    for path in candidates:
        try:
            return path, read_checkpoint(path)
        except Exception as error:  # any unreadable file (truncated zip, bad pickle) is skipped alike
            if load_step is not None:
                raise InputError(f"--load-step {load_step}: {path} cannot be read ({_reason(error)})") from None
            if path != candidates[-1]:
                warn(f"skipping checkpoint {path}: it cannot be read ({_reason(error)}); loading an older one")
                continue
            raise InputError(
                f"--load-dir {load_dir}: none of its {len(candidates)} step-*.ckpt checkpoints can be read "
                f"({path.name}: {_reason(error)})"
            ) from None
    raise AssertionError("unreachable")


def method_of(checkpoint: Path, state: Dict[str, Any]) -> Optional[str]:
    """The method that wrote a checkpoint: recorded in it, else read from its run's ``config.yml``."""
    if "method_name" in state:
        return state["method_name"]
    config = checkpoint.parent.parent / "config.yml"
    match = re.search(r"^method_name: (\S+)$", config.read_text(), re.MULTILINE) if config.is_file() else None
    return match.group(1) if match else None


@dataclass
class Trainer4DConfig(TrainerConfig):
    """nerfstudio's TrainerConfig, with resume as users expect (see the module) and a device that exists."""

    _target: Type = field(default_factory=lambda: Trainer4D)
    machine: MachineConfig = field(
        default_factory=lambda: MachineConfig(device_type="cuda" if torch.cuda.is_available() else "cpu")
    )
    """Machine configuration; the device defaults to CUDA when present and the CPU otherwise."""
    more_steps_after_load: bool = False
    """Train ``--max-num-iterations`` steps more after the loaded checkpoint (nerfstudio's behaviour) instead of
    stopping at the run's total: for going on with a finished run. A checkpoint of another method always starts a new
    count (instruct4d on a nerfacto-4d reconstruction runs ``--max-num-iterations`` edit steps)."""


class Trainer4D(Trainer):
    """nerfstudio's Trainer with the run's total step count, atomic checkpoints, readable-newest loading, random states
    in checkpoints and a checkpoint on Ctrl-C."""

    config: Trainer4DConfig

    def __init__(self, config: Trainer4DConfig, local_rank: int = 0, world_size: int = 1) -> None:
        super().__init__(config, local_rank, world_size)
        self.run_start = 0
        """The step at which this run's count began: 0, or the step after another method's checkpoint."""
        self._resume_state: Optional[Dict[str, Any]] = None
        self._last_done = -1
        self._interrupted = False
        self._previous_handler: Any = None

    # ---- loading ---------------------------------------------------------------------------------------------------
    def _load_checkpoint(self) -> None:
        config = self.config
        if config.load_dir is not None:
            path, state = newest_readable_checkpoint(config.load_dir, config.load_step)
        elif config.load_checkpoint is not None:
            if not config.load_checkpoint.is_file():
                raise InputError(f"--load-checkpoint {config.load_checkpoint}: file does not exist")
            path = config.load_checkpoint
            try:
                state = read_checkpoint(path)
            except Exception as error:
                raise InputError(f"--load-checkpoint {path}: it cannot be read ({_reason(error)})") from None
        else:
            CONSOLE.print("No Nerfstudio checkpoint to load, so training from scratch.")
            return
        step = state["step"]
        self.pipeline.load_pipeline(state["pipeline"], step)
        # splatfacto's load_state_dict replaces the Gaussians' Parameters (resized to the checkpoint's count): the
        # optimizers built before would step the old ones and the loaded Gaussians would never train again.
        self.optimizers = self.setup_optimizers()
        self.optimizers.load_optimizers(state["optimizers"])
        if "schedulers" in state and config.load_scheduler:
            self.optimizers.load_schedulers(state["schedulers"])
        self.grad_scaler.load_state_dict(state["scalers"])
        self._start_step, self._last_done = step + 1, step
        if method_of(path, state) in (None, config.method_name):
            self._resume_state = state.get("resume")
            self.run_start = self._start_step if config.more_steps_after_load else state.get("run_start", 0)
        else:
            self.run_start = self._start_step
        end = self.run_start + config.max_num_iterations
        CONSOLE.print(f"Done loading Nerfstudio checkpoint from {path}: steps {self._start_step}-{end - 1} to go")

    def setup(self, test_mode: Literal["test", "val", "inference"] = "val") -> None:
        super().setup(test_mode)
        # Put back after the pipeline's training set-up, which may draw numbers of its own on a fresh start.
        if self._resume_state is not None:
            resume_state.restore(self.pipeline, self._resume_state)
            self._resume_state = None

    # ---- saving ----------------------------------------------------------------------------------------------------
    @check_main_thread
    def save_checkpoint(self, step: int) -> None:
        """nerfstudio's checkpoint, plus this run's start, its method and the random state, written atomically."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        pipeline = self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline
        state = {
            "step": step,
            "pipeline": pipeline.state_dict(),
            "optimizers": {k: v.state_dict() for (k, v) in self.optimizers.optimizers.items()},
            "schedulers": {k: v.state_dict() for (k, v) in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
            "method_name": self.config.method_name,
            "run_start": self.run_start,
            "resume": resume_state.capture(self.pipeline),
        }
        partial = path.with_name(f".{path.name}.partial")  # hidden from step-*.ckpt and from nerfstudio's loader
        with open(partial, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
        for stale in self.checkpoint_dir.glob(".*.ckpt.partial"):  # left by a kill during a write
            stale.unlink()
        if self.config.save_only_latest_checkpoint:
            for old in self.checkpoint_dir.glob("*.ckpt"):
                if old != path:
                    old.unlink()

    # ---- training --------------------------------------------------------------------------------------------------
    def train(self) -> None:
        """nerfstudio's loop (``range(start, start + max_num_iterations)``), given the steps left to the run's end."""
        planned = self.config.max_num_iterations
        if self._start_step >= self.run_start + planned:
            # nerfstudio's loop and writer fail without a step; the checkpoint loaded is this run's end already.
            CONSOLE.print(f"Nothing left to train: the run's total is {planned} steps (--max-num-iterations)")
            self._train_complete_viewer()
            return
        self.config.max_num_iterations = self.run_start + planned - self._start_step
        self._catch_interrupts()
        try:
            super().train()
        finally:
            self.config.max_num_iterations = planned
            self._release_interrupts()

    def train_iteration(self, step: int):
        result = super().train_iteration(step)
        self._last_done = step
        return result

    def _catch_interrupts(self) -> None:
        """Makes the first Ctrl-C stop training after the current step (nerfstudio's ``stop_training``); only in the
        main thread, where signals can be caught."""
        if threading.current_thread() is not threading.main_thread():
            return

        def stop(signum, frame) -> None:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C raises KeyboardInterrupt
            self._interrupted = self.stop_training = True
            print("Ctrl-C: saving a checkpoint after this step (Ctrl-C again to exit at once)", file=sys.stderr,
                  flush=True)

        self._previous_handler = signal.signal(signal.SIGINT, stop)

    def _release_interrupts(self) -> None:
        """Gives Ctrl-C back to the handler before training (nerfstudio's viewer waits for it after training)."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def _after_train(self) -> None:
        self._release_interrupts()
        if not self._interrupted:
            super()._after_train()
            return
        # nerfstudio's loop stops at the top of the step after the one interrupted: that step was not trained.
        self.step = self._last_done
        if self._last_done >= 0:
            self.save_checkpoint(self._last_done)
            print(f"interrupted: checkpoint of step {self._last_done} saved in {self.checkpoint_dir}; resume with "
                  f"--load-dir {self.checkpoint_dir}", file=sys.stderr, flush=True)
        writer.write_out_storage()
        self.shutdown()
        raise SystemExit(130)  # the status of a process ended by Ctrl-C


@dataclass
class AdamWOptimizerConfig(OptimizerConfig):
    """torch's AdamW (decoupled weight decay), as threestudio-based methods train."""

    _target: Type = torch.optim.AdamW
    betas: Tuple[float, float] = (0.9, 0.999)
    """Coefficients of the running averages of the gradient and its square."""
    weight_decay: float = 0.01
    """Decoupled weight decay (torch's default)."""
