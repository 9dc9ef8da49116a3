"""``ns-4d-export``: take a trained 4D run elsewhere (library: :mod:`ns_4d_methods.export`).

- ``ns-4d-export gaussians --load-config RUN/config.yml --output-dir DIR [--times T ...] [--num-frames N]``: the
  deformed Gaussians at each time as standard 3DGS ``.ply`` files plus ``index.json`` (splatfacto-4d, 4real,
  unified-edit).
- ``ns-4d-export splatv --load-config RUN/config.yml --output-dir DIR``: one ``.splatv`` file for splaTV's web viewer
  (the deformation baked into per-Gaussian polynomials), refused when the bake's error passes the thresholds.
- ``ns-4d-export mesh --load-config RUN/config.yml --output-dir DIR [--times T ...]``: one mesh per time (marching
  cubes on the density, vertex colours from the field), and for the Gaussian methods an animated ``.glb`` with one
  topology; the NeRF methods (nerfacto-4d, 4diffusion, instruct4d) cannot follow points over time (see
  :mod:`ns_4d_methods.export.mesh`).

nerfstudio's ``ns-export`` subcommands are a fixed union in nerfstudio's own script, with no plugin entry point, so
these are a script of their own, like the other ``ns-4d-*`` commands.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
import tyro
import yaml
from typing_extensions import Annotated

from ns_4d_methods.errors import InputError
from ns_4d_methods.models.nerfacto_4d import Nerfacto4DModel
from ns_4d_methods.models.splatfacto_4d import Splatfacto4DModel

GAUSSIAN_METHODS = "splatfacto-4d, 4real, unified-edit"
NERF_METHODS = "nerfacto-4d, 4diffusion, instruct4d"


def check_times(times: Optional[Sequence[float]], num_frames: Optional[int], default_frames: int) -> List[float]:
    """``--times`` as given (each in [0, 1]), else ``--num-frames`` (or ``default_frames``) times spread over [0, 1]."""
    if times:
        outside = [t for t in times if not 0.0 <= t <= 1.0]
        if outside:
            raise InputError(f"--times {outside[0]:g}: expected times in [0, 1]")
        return [float(t) for t in times]
    count = default_frames if num_frames is None else num_frames
    if count < 1:
        raise InputError(f"--num-frames {count}: expected at least 1")
    return np.linspace(0.0, 1.0, count).tolist() if count > 1 else [0.0]


def check_output_dir(output_dir: Path) -> Path:
    """Creates ``output_dir``; one line if it cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"--output-dir {output_dir}: cannot create it ({error.strerror})") from None
    if not output_dir.is_dir() or not os.access(output_dir, os.W_OK):
        raise InputError(f"--output-dir {output_dir}: not a writable directory")
    return output_dir


def load_run(config_path: Path, model_types: Tuple[Type, ...], methods: str):
    """The trained pipeline of the run whose ``config.yml`` is ``config_path``, in eval mode, after checking that its
    model is one of ``model_types`` (named ``methods`` in the error) and that it has a checkpoint."""
    from nerfstudio.configs.method_configs import all_methods
    from nerfstudio.engine.trainer import TrainerConfig
    from nerfstudio.utils.eval_utils import eval_setup

    flag = f"--load-config {config_path}"
    if not config_path.is_file():
        raise InputError(f"{flag}: no such file (expected a run's config.yml)")
    try:
        config = yaml.load(config_path.read_text(), Loader=yaml.Loader)
    except Exception as error:  # yaml's errors for unknown classes and bad syntax
        raise InputError(f"{flag}: not a nerfstudio run configuration ({type(error).__name__})") from None
    if not isinstance(config, TrainerConfig) or config.method_name not in all_methods:
        name = getattr(config, "method_name", None)
        raise InputError(f"{flag}: not a run of a known method ({name!r}; expected one of {methods})")
    model_type = getattr(config.pipeline.model, "_target", None)
    if not (isinstance(model_type, type) and issubclass(model_type, model_types)):
        raise InputError(f"{flag}: {config.method_name} is not a 4D method this export handles (expected {methods})")
    checkpoints = config_path.parent / "nerfstudio_models"
    if not list(checkpoints.glob("step-*.ckpt")):
        raise InputError(f"{flag}: no checkpoint in {checkpoints} (expected step-*.ckpt beside config.yml)")

    def beside_config(loaded):
        loaded.relative_model_dir = checkpoints.resolve()  # an absolute path wins over output_dir/.../timestamp
        return loaded

    _, pipeline, _, _ = eval_setup(config_path, test_mode="test", update_config_callback=beside_config)
    return pipeline


def train_cameras(pipeline):
    """The training cameras (with their times), or None when the datamanager has no dataset of images."""
    dataset = getattr(pipeline.datamanager, "train_dataset", None)
    return None if dataset is None else dataset.cameras


@dataclass(kw_only=True)
class ExportBase:
    load_config: Path
    """The run's config.yml (its checkpoints are read from nerfstudio_models/ beside it)."""
    output_dir: Path
    """Directory to write to (created)."""
    times: Optional[Tuple[float, ...]] = None
    """Times in [0, 1] to export (default: --num-frames times spread evenly over [0, 1])."""
    num_frames: Optional[int] = None
    """Number of evenly spread times when --times is not given (default: 24 for Gaussians, 3 for meshes)."""

    def frame_times(self, default_frames: int) -> List[float]:
        return check_times(self.times, self.num_frames, default_frames)


@dataclass(kw_only=True)
class ExportGaussians(ExportBase):
    """Per-frame 3DGS .ply files of a deformable-Gaussian run (splatfacto-4d, 4real, unified-edit)."""

    def main(self) -> None:
        from ns_4d_methods.export.gaussians_ply import INDEX_NAME, export_gaussian_frames

        times = self.frame_times(24)
        output_dir = check_output_dir(self.output_dir)
        pipeline = load_run(self.load_config, (Splatfacto4DModel,), GAUSSIAN_METHODS)
        paths = export_gaussian_frames(pipeline.model, times, output_dir, str(self.load_config))
        print(f"Wrote {len(paths)} frames of {pipeline.model.num_points} Gaussians and {INDEX_NAME} to {output_dir}")


@dataclass(kw_only=True)
class ExportSplatv(ExportBase):
    """One .splatv file (splaTV's web viewer, Spacetime Gaussians' format) of a deformable-Gaussian run."""

    num_samples: int = 64
    """Times in [0, 1] at which the deformation is sampled for the least-squares bake."""
    segments: int = 8
    """Copies of each Gaussian, each with its own cubic over part of [0, 1] (1: the smallest file, one cubic for all
    of time; see ns_4d_methods.export.splatv for the measured effect)."""
    overlap: float = 0.7
    """Temporal scale of each copy's fade, in spacings between the copies' time centres."""
    max_position_error: float = 0.01
    """Refuse when the RMS distance between baked and MLP centres exceeds this fraction of the scene size."""
    min_psnr: float = 35.0
    """Refuse when a baked render is further than this PSNR (dB) from the MLP render at a training camera."""
    max_cameras: int = 16
    """Training cameras (evenly picked, at their times) rendered for the PSNR check and named in the header."""

    def main(self) -> None:
        from ns_4d_methods.export.splatv import bake, bake_report, sample_deformation, write_splatv

        if self.times or self.num_frames:
            raise InputError("--times/--num-frames: splatv bakes all of [0, 1]; use --num-samples instead")
        output_dir = check_output_dir(self.output_dir)
        pipeline = load_run(self.load_config, (Splatfacto4DModel,), GAUSSIAN_METHODS)
        if self.segments < 1 or self.overlap <= 0:
            raise InputError(f"--segments {self.segments} --overlap {self.overlap:g}: expected at least 1 and > 0")
        samples = sample_deformation(pipeline.model, self.num_samples)  # for the bake and its report
        baked = bake(pipeline.model, samples, self.segments, self.overlap)
        cameras = train_cameras(pipeline)
        if cameras is not None:
            picked = np.unique(np.linspace(0, len(cameras) - 1, min(self.max_cameras, len(cameras))).round())
            cameras = cameras[torch.from_numpy(picked).long()]
        report = bake_report(pipeline.model, baked, [] if cameras is None else cameras, samples)
        line = (f"bake error: centres {report.position_rms:.4g} RMS ({100 * report.position_rms_relative:.3g} % of "
                f"the scene), renders {report.psnr_min:.2f} dB lowest, {report.psnr_mean:.2f} dB mean")
        print(line if cameras is not None else line + " (no training cameras: PSNR not measured)")
        if report.position_rms_relative > self.max_position_error or report.psnr_min < self.min_psnr:
            raise InputError(f"{line}: over the limits (--max-position-error {self.max_position_error:g}, "
                             f"--min-psnr {self.min_psnr:g}); nothing written")
        baked.header = {"source": str(self.load_config), "bake": vars(report)}
        path = output_dir / "scene.splatv"
        write_splatv(baked, path, splatv_cameras(cameras) if cameras is not None else ())
        print(f"Wrote {len(baked.centres)} Gaussians ({self.segments} per Gaussian of the run) to {path}")


def splatv_cameras(cameras) -> List[dict]:
    """splaTV's camera records (INRIA's cameras.json: camera-to-world rotation and position, OpenCV axes)."""
    records = []
    for k in range(len(cameras)):
        c2w = cameras.camera_to_worlds[k].double().cpu().numpy()
        rotation = c2w[:3, :3] * np.array([1.0, -1.0, -1.0])  # OpenGL -> OpenCV camera axes
        records.append({"id": k, "img_name": f"{k:05d}", "width": int(cameras.width[k]),
                        "height": int(cameras.height[k]), "position": c2w[:3, 3].tolist(),
                        "rotation": rotation.tolist(), "fx": float(cameras.fx[k]), "fy": float(cameras.fy[k])})
    return records


@dataclass(kw_only=True)
class ExportMesh(ExportBase):
    """Meshes at chosen times (and an animated .glb for Gaussian runs) by marching cubes on the density."""

    resolution: int = 128
    """Grid points per side of the marching-cubes grid."""
    threshold: Optional[float] = None
    """Density level of the surface (default: 10 for NeRFs, in their density units, as instant-ngp's mesh export;
    0.5 for Gaussians, half of one opaque Gaussian's peak)."""
    threshold_quantile: Optional[float] = None
    """Instead of --threshold, the level at this quantile of the densities on the grid (e.g. 0.9 for an object that
    fills about a tenth of the box)."""
    box: Optional[Tuple[float, float, float, float, float, float]] = None
    """Box to mesh: min x y z, max x y z (default: the scene box)."""
    seconds: float = 2.0
    """Duration of the animated mesh's animation (Gaussian runs)."""

    def main(self) -> None:
        from ns_4d_methods.export import mesh

        times = self.frame_times(3)
        if self.resolution < 8:
            raise InputError(f"--resolution {self.resolution}: expected at least 8")
        if self.threshold_quantile is not None and not 0 < self.threshold_quantile < 1:
            raise InputError(f"--threshold-quantile {self.threshold_quantile:g}: expected a number in (0, 1)")
        output_dir = check_output_dir(self.output_dir)
        pipeline = load_run(self.load_config, (Splatfacto4DModel, Nerfacto4DModel),
                            f"{GAUSSIAN_METHODS}, {NERF_METHODS}")
        model = pipeline.model
        box = torch.tensor(self.box).reshape(2, 3) if self.box else model.scene_box.aabb.detach().float().cpu()
        index = {"source": str(self.load_config), "frames": []}
        try:
            if isinstance(model, Splatfacto4DModel):
                self.gaussian_meshes(model, box, times, index)
            else:
                threshold = 10.0 if self.threshold is None else self.threshold
                for k, time in enumerate(times):
                    surface = mesh.extract_mesh(mesh.nerf_density_fn(model, time), mesh.nerf_colour_fn(model, time),
                                                box, self.resolution, threshold, self.threshold_quantile)
                    self.write_frame(surface, k, time, index)
                index["animated"] = None
                index["note"] = ("NeRF meshes are per time: the 4D hash grid has no correspondence between times, "
                                 "so vertices cannot be followed and each mesh has its own topology")
        except ValueError as error:  # the density never reaches the threshold
            raise InputError(f"--threshold: {error} (expected a level inside the density's range)") from None
        (output_dir / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        print(f"Wrote {len(times)} meshes{' and animated.glb' if index['animated'] else ''} to {output_dir}")

    def write_frame(self, surface, k: int, time: float, index: dict) -> None:
        from ns_4d_methods.export.mesh import write_mesh_ply

        name = f"mesh_{k:05d}.ply"
        write_mesh_ply(surface, self.output_dir / name)
        index["frames"].append({"file": name, "time": time, "vertices": len(surface.vertices),
                                "faces": len(surface.faces)})

    def gaussian_meshes(self, model: Splatfacto4DModel, box: torch.Tensor, times: List[float], index: dict) -> None:
        from ns_4d_methods.export import mesh
        from ns_4d_methods.export.deformed_gaussians import gaussians_at

        threshold = 0.5 if self.threshold is None else self.threshold
        voxel = float((box[1] - box[0]).max()) / (self.resolution - 1)
        for k, time in enumerate(times):
            gaussians = gaussians_at(model, time)
            surface = mesh.extract_mesh(mesh.gaussian_density_fn(gaussians, voxel),
                                        mesh.gaussian_colour_fn(model, gaussians), box, self.resolution, threshold,
                                        self.threshold_quantile)
            self.write_frame(surface, k, time, index)
            if k == 0:
                reference = surface
        frames = mesh.follow_gaussians(model, reference.vertices, times[0], times)
        mesh.write_animated_glb(reference, frames, times, self.output_dir / "animated.glb", self.seconds)
        index["animated"] = {"file": "animated.glb", "times": times, "vertices": len(reference.vertices),
                             "note": "the mesh at the first time moved by the Gaussians' deformation, one morph "
                                     "target per time"}


Command = Union[
    Annotated[ExportGaussians, tyro.conf.subcommand("gaussians")],
    Annotated[ExportSplatv, tyro.conf.subcommand("splatv")],
    Annotated[ExportMesh, tyro.conf.subcommand("mesh")],
]


def entrypoint(args: Optional[Sequence[str]] = None) -> None:
    """``ns-4d-export``; ``args`` replaces the command line (for tests)."""
    tyro.cli(Command, args=args).main()


if __name__ == "__main__":
    entrypoint()
