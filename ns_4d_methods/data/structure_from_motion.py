"""Cameras of a video by structure from motion (pycolmap), as a nerfstudio dataset: 4Real's freeze-time cameras.

4Real poses the frames of its freeze-time video by SfM and starts the Gaussians from the SfM points. This runs
COLMAP's incremental pipeline through pycolmap 4.2.1 (4REAL.md section 4) on a folder of frames:

- SIFT features with **one shared** ``SIMPLE_PINHOLE`` camera (a generated video has one unknown focal length and
  no lens distortion; ``PINHOLE`` drifts on short arcs), **sequential matching** (frames of a video, in order),
  incremental mapping with initialisation thresholds lowered for the short baselines between video frames;
- the largest reconstruction is kept; frames without a pose are dropped with one warning that lists them; fewer
  registered frames than ``min_registered_fraction`` of the video stop the run with one line;
- the result is written by nerfstudio's own ``colmap_to_json`` (what ``ns-process-data`` writes): ``transforms.json``
  with OpenGL camera-to-world matrices in nerfstudio's z-up world (its ``applied_transform``) and ``sparse_pc.ply``
  with the coloured SfM points in the same world; each frame also records its ``frame_index`` in the video.

Layout of a dataset folder ``D``: ``D/images/*`` (the frames, in video order by name), ``D/colmap/`` (database and
COLMAP models), ``D/transforms.json``, ``D/sparse_pc.ply``. The SfM scale is arbitrary (nerfstudio's parsers rescale).
"""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List

import numpy as np
import pycolmap
from nerfstudio.process_data.colmap_utils import colmap_to_json

from ns_4d_methods.data.video_io import list_images
from ns_4d_methods.errors import InputError

TRANSFORMS = "transforms.json"
POINTS = "sparse_pc.ply"


@dataclass
class StructureFromMotionConfig:
    """Structure from motion on the freeze-time video (pycolmap)."""

    max_image_size: int = 1024
    """Longest image side that features are extracted at (larger frames are downscaled for SIFT only)."""
    sequential_overlap: int = 10
    """Each frame is matched with this many following frames (and with quadratically spaced ones further on)."""
    init_min_tri_angle: float = 4.0
    """Smallest triangulation angle (degrees) of the initial pair; COLMAP's 16 suits photo collections, not video."""
    init_min_num_inliers: int = 50
    """Fewest verified matches of the initial pair (COLMAP: 100)."""
    min_registered_fraction: float = 0.5
    """Fewest frames that must get a pose, as a fraction of the video (and at least 3)."""
    num_threads: int = -1
    """CPU threads of extraction, matching and mapping; -1: all."""
    seed: int = 0
    """Seed of COLMAP's RANSAC and mapper."""


@dataclass
class SfMResult:
    """Posed frames of a video, in nerfstudio's conventions (as in the ``transforms.json`` it was read from)."""

    frame_indices: np.ndarray
    """[N] indices, in the input video, of the frames that got a pose (ascending)."""
    camera_to_worlds: np.ndarray
    """[N, 4, 4] OpenGL camera-to-world matrices (x right, y up, z back) in nerfstudio's z-up world."""
    focal: float
    """Focal length in pixels of the shared SIMPLE_PINHOLE camera."""
    cx: float
    """Principal point x in pixels."""
    cy: float
    """Principal point y in pixels."""
    width: int
    """Frame width in pixels."""
    height: int
    """Frame height in pixels."""
    points: np.ndarray
    """[P, 3] float32 SfM points in the same world."""
    colors: np.ndarray
    """[P, 3] uint8 RGB colours of the points."""
    num_frames: int
    """Frames in the input video."""
    dataset_dir: Path
    """The nerfstudio dataset folder: ``images/``, ``transforms.json``, ``sparse_pc.ply``."""

    @property
    def dropped(self) -> List[int]:
        """Indices of the input frames without a pose."""
        return sorted(set(range(self.num_frames)) - set(self.frame_indices.tolist()))

    def pose_of(self, frame_index: int) -> np.ndarray:
        """The 4x4 camera-to-world of input frame ``frame_index``, with a one-line error when it has no pose."""
        found = np.flatnonzero(self.frame_indices == frame_index)
        if len(found) == 0:
            raise InputError(
                f"{self.dataset_dir / TRANSFORMS}: frame {frame_index} got no pose from structure from motion "
                f"(the canonical frame needs one); generate a longer or smoother camera arc"
            )
        return self.camera_to_worlds[found[0]]


@contextmanager
def _quiet_colmap() -> Iterator[None]:
    """COLMAP logs every image and bundle adjustment (INFO) and a failed reconstruction (ERROR), which the caller
    reports in one line itself: keep only fatal messages."""
    previous = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = 3
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = previous


def _reconstruct(dataset_dir: Path, names: List[str], config: StructureFromMotionConfig) -> Path:
    """Runs extraction, sequential matching and incremental mapping; returns the largest model's folder (or the
    empty models folder when nothing was reconstructed)."""
    colmap_dir = dataset_dir / "colmap"
    if colmap_dir.exists():
        shutil.rmtree(colmap_dir)  # a killed earlier attempt; the database must start empty
    models_dir = colmap_dir / "sparse"
    models_dir.mkdir(parents=True)
    database = colmap_dir / "database.db"
    images_dir = dataset_dir / "images"

    extraction = pycolmap.FeatureExtractionOptions()
    extraction.max_image_size = config.max_image_size
    extraction.num_threads = config.num_threads
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = config.num_threads
    pairing = pycolmap.SequentialPairingOptions()
    pairing.overlap = config.sequential_overlap
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = config.seed
    mapping = pycolmap.IncrementalPipelineOptions()
    mapping.num_threads = config.num_threads
    mapping.random_seed = config.seed
    mapping.min_model_size = 3
    mapping.mapper.init_min_tri_angle = config.init_min_tri_angle
    mapping.mapper.init_min_num_inliers = config.init_min_num_inliers

    with _quiet_colmap():
        pycolmap.extract_features(
            database, images_dir, image_names=names, camera_mode=pycolmap.CameraMode.SINGLE,
            reader_options=pycolmap.ImageReaderOptions(camera_model="SIMPLE_PINHOLE"), extraction_options=extraction,
        )  # fmt: skip
        pycolmap.match_sequential(
            database, matching_options=matching, pairing_options=pairing, verification_options=verification
        )
        models = pycolmap.incremental_mapping(database, images_dir, models_dir, options=mapping)
    if not models:
        return models_dir
    largest = max(models, key=lambda index: models[index].num_reg_images())
    return models_dir / str(largest)


def run_structure_from_motion(
    dataset_dir: Path, config: StructureFromMotionConfig | None = None, required_index: int | None = None
) -> SfMResult:
    """Poses the frames in ``dataset_dir/images`` (video order = name order) and writes ``transforms.json`` and
    ``sparse_pc.ply`` next to them. Raises a one-line :class:`InputError`, having written neither (so that a rerun,
    e.g. with another ``--pipeline.sfm.seed``, starts afresh), when too few frames get a pose or frame
    ``required_index`` gets none."""
    dataset_dir, config = Path(dataset_dir), config or StructureFromMotionConfig()
    names = [path.name for path in list_images(dataset_dir / "images")]
    model_dir = _reconstruct(dataset_dir, names, config)
    registered = set()
    if (model_dir / "images.bin").is_file():
        registered = {image.name for image in pycolmap.Reconstruction(model_dir).images.values() if image.has_pose}
    needed = max(3, int(np.ceil(config.min_registered_fraction * len(names))))
    if len(registered) < needed:
        raise InputError(
            f"{dataset_dir / 'images'}: structure from motion registered {len(registered)} of {len(names)} frames "
            f"(at least {needed} needed); the camera moves too little or the frames disagree: generate a longer "
            f"camera arc (more freeze-time frames) or give a freeze-time video"
        )
    if required_index is not None and names[required_index] not in registered:
        raise InputError(
            f"{dataset_dir / 'images'}: frame {required_index} got no pose from structure from motion (the canonical "
            f"frame needs one); rerun with another --pipeline.sfm.seed, or generate a longer or smoother camera arc "
            f"(--pipeline.freeze-time-frames)"
        )
    dropped = [name for name in names if name not in registered]
    if dropped:
        warnings.warn(f"structure from motion found no pose for {len(dropped)} of {len(names)} frames, dropped: "
                      f"{', '.join(dropped)}", stacklevel=2)  # fmt: skip

    written = dataset_dir / "colmap" / "nerfstudio"  # moved into place once complete
    written.mkdir(exist_ok=True)
    colmap_to_json(model_dir, written)
    # keep the posed frames in video order, each with its index in the video
    transforms_path = written / TRANSFORMS
    transforms = json.loads(transforms_path.read_text())
    index_of = {name: index for index, name in enumerate(names)}
    frames = [frame for frame in transforms["frames"] if Path(frame["file_path"]).name in registered]
    for frame in frames:
        frame["frame_index"] = index_of[Path(frame["file_path"]).name]
    transforms["frames"] = sorted(frames, key=lambda frame: frame["frame_index"])
    transforms["num_video_frames"] = len(names)
    transforms_path.write_text(json.dumps(transforms, indent=4))
    (written / POINTS).replace(dataset_dir / POINTS)
    transforms_path.replace(dataset_dir / TRANSFORMS)  # last: its presence marks a finished stage
    return load_sfm_result(dataset_dir)


def load_sfm_result(dataset_dir: Path) -> SfMResult:
    """Reads back what :func:`run_structure_from_motion` wrote in ``dataset_dir``."""
    dataset_dir = Path(dataset_dir)
    transforms = json.loads((dataset_dir / TRANSFORMS).read_text())
    frames = transforms["frames"]
    with open(dataset_dir / POINTS, encoding="utf-8") as file:
        header = 0
        for header, line in enumerate(file, start=1):
            if line.strip() == "end_header":
                break
    table = np.loadtxt(dataset_dir / POINTS, skiprows=header, ndmin=2).reshape(-1, 6)
    return SfMResult(
        frame_indices=np.array([frame["frame_index"] for frame in frames], dtype=np.int64),
        camera_to_worlds=np.array([frame["transform_matrix"] for frame in frames], dtype=np.float64),
        focal=float(transforms["fl_x"]),
        cx=float(transforms["cx"]),
        cy=float(transforms["cy"]),
        width=int(transforms["w"]),
        height=int(transforms["h"]),
        points=table[:, :3].astype(np.float32),
        colors=table[:, 3:].astype(np.uint8),
        num_frames=int(transforms["num_video_frames"]),
        dataset_dir=dataset_dir,
    )


def cameras_stage(
    frames_dir: Path,
    run_dir: Path,
    config: StructureFromMotionConfig | None = None,
    canonical_index: int | None = None,
) -> SfMResult:
    """Stage 3: the freeze-time video's cameras, as the nerfstudio dataset ``<run_dir>/cameras/`` (frames copied to
    ``images/``, ``transforms.json``, ``sparse_pc.ply``).

    ``frames_dir`` is the freeze-time stage's folder (frames in its ``frames/``) or any folder of frames in video
    order. With ``canonical_index`` the canonical frame must get a pose (one-line error otherwise): the reference
    video's static camera is ``result.pose_of(canonical_index)``. When ``transforms.json`` exists (a resumed run) it
    is read back and SfM does not run again.
    """
    dataset_dir = Path(run_dir) / "cameras"
    if (dataset_dir / TRANSFORMS).is_file():
        result = load_sfm_result(dataset_dir)
    else:
        source = Path(frames_dir) / "frames" if (Path(frames_dir) / "frames").is_dir() else Path(frames_dir)
        images_dir = dataset_dir / "images"
        if images_dir.exists():
            shutil.rmtree(images_dir)
        images_dir.mkdir(parents=True)
        for index, path in enumerate(list_images(source)):
            shutil.copyfile(path, images_dir / f"{index:05d}{path.suffix.lower()}")
        result = run_structure_from_motion(dataset_dir, config, canonical_index)
    if canonical_index is not None:
        result.pose_of(canonical_index)
    return result
