"""n3dv-data: a tiny N3DV-layout capture (videos or frame folders), splits, times, on-demand frames after
downscaling, nerfstudio's datamanager on top, and a one-line error for each kind of bad input."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.datasets.base_dataset import InputDataset

from ns_4d_methods.data.n3dv_dataparser import N3DVDataParserConfig, N3DVFrameDataset
from ns_4d_methods.errors import InputError
from tree_digest import tree_digest

W, H, FOCAL = 32, 24, 30.0


def frame_bgr(cam: int, frame: int) -> np.ndarray:
    """Red encodes the camera, green the frame; blue is dark on the left half and bright on the right."""
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 2] = 30 + 40 * cam
    image[..., 1] = 30 + 40 * frame
    image[:, : W // 2, 0], image[:, W // 2 :, 0] = 40, 210
    return image


def gl_pose(cam: int) -> np.ndarray:
    """OpenGL camera-to-world [3, 4]: cameras on a line along x, turned slightly, looking down -z."""
    angle = 0.1 * cam
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    return np.concatenate([rotation, [[0.3 * cam], [0.1], [0.0]]], axis=1)


def write_poses_bounds(scene: Path, cams: int) -> None:
    rows = []
    for cam in range(cams):
        pose = gl_pose(cam)
        # OpenGL [right, up, back] columns back to LLFF's [down, right, back].
        llff = np.stack([-pose[:, 1], pose[:, 0], pose[:, 2], pose[:, 3], [H, W, FOCAL]], axis=1)
        rows.append(np.concatenate([llff.reshape(-1), [1.0, 20.0]]))
    np.save(scene / "poses_bounds.npy", np.array(rows))


def make_capture(root: Path, layout: str, cams: int = 3, frames: int = 5, fps=None) -> Path:
    """A capture with ``cams`` cameras of ``frames`` frames, as camXX.mp4 videos or camXX/ PNG folders
    (the last camera uses camXX/images/). ``fps`` gives per-camera frame rates for videos."""
    root.mkdir(parents=True, exist_ok=True)
    for cam in range(cams):
        if layout == "video":
            rate = fps[cam] if fps else 30.0
            writer = cv2.VideoWriter(str(root / f"cam{cam:02d}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), rate, (W, H))
            for frame in range(frames):
                writer.write(frame_bgr(cam, frame))
            writer.release()
        else:
            folder = root / f"cam{cam:02d}" / ("images" if cam == cams - 1 else "")
            folder.mkdir(parents=True)
            for frame in range(frames):
                cv2.imwrite(str(folder / f"{frame:04d}.png"), frame_bgr(cam, frame))
    write_poses_bounds(root, cams)
    return root


def outputs(scene: Path, split: str = "train", **kwargs):
    return N3DVDataParserConfig(data=scene, **kwargs).setup().get_dataparser_outputs(split)


def expected_rgb(cam: int, frame: int, downscale: int) -> np.ndarray:
    bgr = frame_bgr(cam, frame)[::downscale, ::downscale]  # blocks are uniform, so area averaging changes nothing
    return bgr[..., ::-1].astype(np.float32)


@pytest.fixture(scope="module")
def video_scene(tmp_path_factory):
    return make_capture(tmp_path_factory.mktemp("n3dv") / "videos", "video")


def test_video_capture_splits_times_and_frames(video_scene):
    before = tree_digest(video_scene)
    train = outputs(video_scene, "train", downscale=2)
    test = outputs(video_scene, "test", downscale=2)
    assert len(train.cameras) == 10 and len(test.cameras) == 5
    assert set(train.metadata["camera_names"]) == {"cam01", "cam02"}
    assert set(test.metadata["camera_names"]) == {"cam00"}
    assert all(path.name == "cam00.mp4" for path in test.image_filenames)
    assert test.cameras.times.squeeze(-1).tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert int(train.cameras.width[0]) == W // 2 and int(train.cameras.height[0]) == H // 2
    assert float(train.cameras.fx[0]) == pytest.approx(FOCAL / 2)
    assert float(train.cameras.cx[0]) == pytest.approx(W / 4)

    dataset = N3DVFrameDataset(train)
    # Out of order, so the capture has to seek; sources are (video, frame index).
    for idx in (7, 2, 3, 9, 0):
        cam, frame = int(train.metadata["camera_names"][idx][3:]), train.metadata["frame_sources"][idx][1]
        assert (cam, frame) == (1 + idx // 5, idx % 5)
        image = dataset.get_image_uint8(idx).numpy().astype(np.float32)
        assert image.shape == (H // 2, W // 2, 3)
        assert np.abs(image - expected_rgb(cam, frame, 2)).max() <= 10  # mp4v is lossy; levels are 40 apart
    assert dataset.get_image_float32(4).dtype == torch.float32
    assert tree_digest(video_scene) == before


def test_frame_folders_with_num_frames_and_stride(tmp_path):
    scene = make_capture(tmp_path / "frames", "frames", cams=4, frames=6)
    train = outputs(scene, "train", downscale=2, num_frames=4, frame_stride=2, held_out_cameras=(0, 2))
    test = outputs(scene, "test", downscale=2, num_frames=4, frame_stride=2, held_out_cameras=(0, 2))
    assert train.metadata["camera_names"] == ["cam01", "cam01", "cam03", "cam03"]
    assert test.metadata["camera_names"] == ["cam00", "cam00", "cam02", "cam02"]
    # Frames 0 and 2 of a 4-frame clip keep their place on its timeline.
    assert train.cameras.times.squeeze(-1).tolist() == pytest.approx([0.0, 2 / 3, 0.0, 2 / 3])
    assert train.image_filenames[3] == scene / "cam03" / "images" / "0002.png"

    dataset = N3DVFrameDataset(train)
    for idx, (cam, frame) in enumerate([(1, 0), (1, 2), (3, 0), (3, 2)]):
        image = dataset.get_image_uint8(idx).numpy().astype(np.float32)
        assert np.array_equal(image, expected_rgb(cam, frame, 2))
    # The datamanager's own scale factor composes with the parser's downscale.
    half = N3DVFrameDataset(train, scale_factor=0.5)
    assert tuple(half.get_image_uint8(0).shape) == (H // 4, W // 4, 3)


def test_poses_are_llff_converted_to_opengl(tmp_path):
    scene = make_capture(tmp_path / "frames", "frames", cams=3, frames=2)
    out = outputs(
        scene, "train", held_out_cameras=(), orientation_method="none", center_method="none", auto_scale_poses=False
    )
    for cam in range(3):
        assert np.allclose(out.cameras.camera_to_worlds[2 * cam].numpy(), gl_pose(cam), atol=1e-6)
    oriented = outputs(scene, "train", held_out_cameras=())
    assert float(oriented.cameras.camera_to_worlds[:, :3, 3].abs().max()) == pytest.approx(1.0)


def test_dataset_pickles_without_its_open_captures(video_scene):
    dataset = N3DVFrameDataset(outputs(video_scene, "train"))
    first = dataset.get_image_uint8(6)
    clone = pickle.loads(pickle.dumps(dataset))  # what nerfstudio's parallel datamanager does when it spawns
    assert torch.equal(clone.get_image_uint8(6), first)


def test_vanilla_datamanager_gives_timed_ray_bundles(video_scene):
    config = VanillaDataManagerConfig(
        _target=VanillaDataManager[N3DVFrameDataset],
        dataparser=N3DVDataParserConfig(data=video_scene, downscale=2),
        train_num_rays_per_batch=64,
        eval_num_rays_per_batch=64,
    )
    manager = config.setup(device="cpu", test_mode="val")
    assert isinstance(manager.train_dataset, N3DVFrameDataset) and manager.includes_time
    bundle, batch = manager.next_train(0)
    assert bundle.times is not None and bundle.times.shape == (64, 1)
    assert batch["image"].shape == (64, 3)
    # Each sampled ray's time is its image's frame time.
    assert torch.allclose(bundle.times[:, 0], (batch["indices"][:, 0] % 5).float() / 4)
    eval_bundle, _ = manager.next_eval(0)
    assert eval_bundle.times is not None


def bad_fps(root):
    make_capture(root, "video", fps=[30.0, 25.0, 30.0])


def bad_count(root):
    make_capture(root, "frames")
    (root / "cam01" / "0004.png").unlink()


def bad_rows(root):
    make_capture(root, "frames")
    np.save(root / "poses_bounds.npy", np.load(root / "poses_bounds.npy")[:2])


def no_poses(root):
    make_capture(root, "frames")
    (root / "poses_bounds.npy").unlink()


def unreadable_video(root):
    make_capture(root, "video")
    (root / "cam01.mp4").write_bytes(b"not a video at all" * 20)


def empty_folder(root):
    make_capture(root, "frames")
    for frame in (root / "cam01").iterdir():
        frame.unlink()


BAD_CASES = {
    "missing_poses_bounds": (no_poses, r"poses_bounds.npy: file not found"),
    "row_count": (bad_rows, r"poses_bounds.npy: 2 rows but 3 cameras were found"),
    "unequal_frame_counts": (bad_count, r"cam01: camera cam01 has 4 frames but the other cameras have 5"),
    "unsynchronised_fps": (bad_fps, r"cam01.mp4: camera cam01 has 25 fps but the other cameras have 30"),
    "unreadable_video": (unreadable_video, r"cam01.mp4: unreadable video"),
    "empty_frame_folder": (empty_folder, r"cam01: empty frame folder"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_a_one_line_error_and_dataset_untouched(tmp_path, case):
    build, pattern = BAD_CASES[case]
    scene = tmp_path / "scene"
    build(scene)
    before = tree_digest(scene)
    with pytest.raises(InputError, match=pattern) as err:
        outputs(scene)
    assert "\n" not in str(err.value)
    assert tree_digest(scene) == before


@pytest.mark.parametrize(
    "field, value, pattern",
    [
        ("num_frames", 9, r"num_frames is 9; expected 1 to 5"),
        ("downscale", 0, r"downscale is 0; expected an integer >= 1"),
        ("held_out_cameras", (7,), r"held_out_cameras names camera 7"),
        ("held_out_cameras", (0, 1, 2), r"held_out_cameras holds out all 3 cameras"),
    ],
)
def test_bad_fields_name_the_field(tmp_path, field, value, pattern):
    scene = make_capture(tmp_path / "frames", "frames")
    with pytest.raises(InputError, match=pattern):
        outputs(scene, **{field: value})


def test_outputs_without_frame_sources_read_like_input_dataset(tmp_path):
    """Other parsers' outputs read as nerfstudio's InputDataset reads them, so one dataset type serves all parsers."""
    scene = make_capture(tmp_path / "frames", "frames")
    out = outputs(scene)
    out.metadata = {}
    assert torch.equal(N3DVFrameDataset(out).get_image_uint8(3), InputDataset(out).get_image_uint8(3))
