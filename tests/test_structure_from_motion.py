"""Structure from motion (pycolmap) on a real handheld capture with known poses, and its failure modes.

The instant-ngp fox (``../shared/data/ingp_fox``): 50 frames circling a mounted fox head, with COLMAP poses in
instant-ngp's ``transforms.json`` (OpenGL camera-to-world, in a world that instant-ngp rotated, re-centred and
scaled). Ours come out in nerfstudio's world, so they are compared after a similarity (Umeyama) alignment of the
camera centres; rotations are compared after the same alignment's rotation.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from ns_4d_methods.data import structure_from_motion
from ns_4d_methods.data.structure_from_motion import cameras_stage, run_structure_from_motion
from ns_4d_methods.errors import InputError

FOX = Path(__file__).resolve().parents[2] / "shared" / "data" / "ingp_fox"


def write_fox_images(folder: Path, every: int = 1) -> list:
    """Every ``every``-th fox image at 1/4 size (270 x 480; JPEG's DCT downscaling while decoding) as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for path in sorted((FOX / "images").glob("*.jpg"))[::every]:
        cv2.imwrite(str(folder / f"{path.stem}.png"), cv2.imread(str(path), cv2.IMREAD_REDUCED_COLOR_4))
        names.append(path.stem)
    return names


def umeyama(source: np.ndarray, target: np.ndarray):
    """Scale, rotation, translation minimising ||s R source + t - target||^2 (Umeyama 1991)."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    covariance = (target - target_mean).T @ (source - source_mean) / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.diag([1.0, 1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(singular) @ sign) / ((source - source_mean) ** 2).sum(1).mean()
    return scale, rotation, target_mean - scale * rotation @ source_mean


def test_fox_cameras_match_the_known_poses(tmp_path: Path) -> None:
    names = write_fox_images(tmp_path / "images")
    result = run_structure_from_motion(tmp_path)
    assert len(result.frame_indices) >= 0.8 * len(names)

    known = {Path(frame["file_path"]).stem: np.array(frame["transform_matrix"])
             for frame in json.loads((FOX / "transforms.json").read_text())["frames"]}  # fmt: skip
    truth = np.stack([known[names[index]] for index in result.frame_indices])
    scale, rotation, translation = umeyama(result.camera_to_worlds[:, :3, 3], truth[:, :3, 3])
    centres = (scale * (rotation @ result.camera_to_worlds[:, :3, 3].T)).T + translation
    true_centres = truth[:, :3, 3]
    extent = np.linalg.norm(true_centres[:, None] - true_centres[None], axis=-1).max()  # widest camera distance
    centre_errors = np.linalg.norm(centres - true_centres, axis=1) / extent
    assert centre_errors.max() < 0.02

    assert np.allclose(truth[:, :3, :3].transpose(0, 2, 1) @ truth[:, :3, :3], np.eye(3), atol=1e-4)  # rotations
    relative = truth[:, :3, :3].transpose(0, 2, 1) @ (rotation @ result.camera_to_worlds[:, :3, :3])
    angles = np.degrees(np.arccos(np.clip((np.trace(relative, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert angles.max() < 2.0
    print(f"fox: {len(result.frame_indices)}/{len(names)} registered, centre error max {100 * centre_errors.max():.3f} "
          f"% / median {100 * np.median(centre_errors):.3f} % of the extent, rotation error max {angles.max():.3f} / "
          f"median {np.median(angles):.3f} deg, focal {4 * result.focal:.1f} px at full size")  # fmt: skip

    # the dataset nerfstudio writes: frames in video order with their index, points with colours
    transforms = json.loads((tmp_path / "transforms.json").read_text())
    assert [frame["frame_index"] for frame in transforms["frames"]] == result.frame_indices.tolist()
    assert transforms["camera_model"] == "OPENCV" and transforms["k1"] == 0.0  # SIMPLE_PINHOLE, shared
    assert len(result.points) > 1000 and result.colors.dtype == np.uint8


def test_cameras_stage_drops_frames_without_a_pose_and_resumes(tmp_path: Path, monkeypatch) -> None:
    frames = tmp_path / "freeze_time" / "frames"
    write_fox_images(frames, every=4)  # 13 frames
    noise = np.random.default_rng(0).integers(0, 256, (480, 270, 3), dtype=np.uint8)
    for name in ("0005b", "0025b"):  # two unrelated frames inside the sequence
        cv2.imwrite(str(frames / f"{name}.png"), noise[:, ::-1] if name == "0025b" else noise)
    order = sorted(path.stem for path in frames.iterdir())
    unrelated = [order.index("0005b"), order.index("0025b")]  # video order is name order
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cameras_stage(tmp_path / "freeze_time", tmp_path / "run", canonical_index=0)
    messages = [str(warning.message) for warning in caught if "structure from motion" in str(warning.message)]
    assert messages == [
        (f"structure from motion found no pose for 2 of 15 frames, dropped: {unrelated[0]:05d}.png, "
         f"{unrelated[1]:05d}.png")
    ]
    assert result.dropped == unrelated and result.num_frames == 15
    assert result.pose_of(0).shape == (4, 4)
    with pytest.raises(InputError, match=f"frame {unrelated[1]} got no pose from structure from motion"):
        result.pose_of(unrelated[1])
    dataset = tmp_path / "run" / "cameras"
    assert sorted(path.name for path in (dataset / "images").iterdir())[:3] == ["00000.png", "00001.png", "00002.png"]

    # a canonical frame without a pose fails in one line and writes no result, so a rerun starts afresh
    with pytest.raises(InputError, match=f"frame {unrelated[1]} got no pose .* another --pipeline.sfm.seed"):
        cameras_stage(tmp_path / "freeze_time", tmp_path / "failed", canonical_index=unrelated[1])
    assert not (tmp_path / "failed" / "cameras" / "transforms.json").exists()
    assert not (tmp_path / "failed" / "cameras" / "sparse_pc.ply").exists()

    def no_rerun(*args, **kwargs):
        raise AssertionError("structure from motion ran again")

    monkeypatch.setattr(structure_from_motion, "run_structure_from_motion", no_rerun)
    resumed = cameras_stage(tmp_path / "freeze_time", tmp_path / "run", canonical_index=0)
    assert np.array_equal(resumed.camera_to_worlds, result.camera_to_worlds)
    assert np.array_equal(resumed.frame_indices, result.frame_indices)


def test_too_few_registered_frames_fail_in_one_line(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    image = cv2.imread(str(FOX / "images" / "0001.jpg"), cv2.IMREAD_REDUCED_COLOR_8)
    for index in range(6):  # the same view six times: no baseline, nothing to triangulate
        cv2.imwrite(str(frames / f"{index}.png"), image)
    with pytest.raises(InputError) as error:
        cameras_stage(frames, tmp_path / "run")
    assert str(error.value) == (
        f"{tmp_path / 'run' / 'cameras' / 'images'}: structure from motion registered 0 of 6 frames (at least 3 "
        "needed); the camera moves too little or the frames disagree: generate a longer camera arc (more "
        "freeze-time frames) or give a freeze-time video"
    )
    assert not (tmp_path / "run" / "cameras" / "transforms.json").exists()
