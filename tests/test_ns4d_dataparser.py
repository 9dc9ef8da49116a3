"""ns4d-data: timed transforms.json parsing, time normalisation, and a one-line error for each kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ns_4d_methods.data.ns4d_dataparser import Ns4dDataParserConfig
from ns_4d_methods.errors import InputError
from tree_digest import tree_digest

SHARED = Path(__file__).resolve().parents[2] / "shared"
NRNERF = SHARED / "data" / "nrnerf_example_sequence"


def make_scene(root: Path, n: int = 4, times=None, sizes=None, **top) -> Path:
    """A tiny timed transforms.json with n solid-colour frames."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    frames = []
    for i in range(n):
        w, h = sizes[i] if sizes else (16, 12)
        Image.fromarray(np.full((h, w, 3), 20 * i, np.uint8)).save(root / "images" / f"{i:03d}.png")
        pose = np.eye(4)
        pose[:3, 3] = [0.1 * i, 0.0, 1.0]
        frame = {"file_path": f"images/{i:03d}.png", "transform_matrix": pose.tolist()}
        if times is not None and times[i] is not None:
            frame["time"] = times[i]
        frames.append(frame)
    meta = {"fl_x": 20.0, "fl_y": 20.0, "cx": 8.0, "cy": 6.0, "w": 16, "h": 12, "frames": frames, **top}
    meta = {k: v for k, v in meta.items() if v is not None}
    (root / "transforms.json").write_text(json.dumps(meta))
    return root


def parse(data: Path, split: str = "train", **kwargs):
    return Ns4dDataParserConfig(data=data, eval_mode="all", **kwargs).setup().get_dataparser_outputs(split)


def test_times_in_seconds_are_normalised_and_range_recorded(tmp_path):
    scene = make_scene(tmp_path, times=[10.0, 12.0, 14.0, 18.0])
    out = parse(scene)
    assert out.cameras.times.squeeze(-1).tolist() == pytest.approx([0.0, 0.25, 0.5, 1.0])
    assert out.metadata["time_range"] == (10.0, 18.0)


def test_frame_index_time_source_needs_no_time_field(tmp_path):
    out = parse(make_scene(tmp_path), time_source="frame_index")
    assert out.cameras.times.squeeze(-1).tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])


def test_nrnerf_real_poses_split_and_times():
    cfg = Ns4dDataParserConfig(data=NRNERF / "transforms_nerfstudio_derived.json")
    parser = cfg.setup()
    train, test = parser.get_dataparser_outputs("train"), parser.get_dataparser_outputs("test")
    assert len(train.image_filenames) + len(test.image_filenames) == 86
    assert len(test.image_filenames) > 0
    assert set(map(str, train.image_filenames)).isdisjoint(map(str, test.image_filenames))
    times = train.cameras.times.squeeze(-1)
    assert float(times.min()) == 0.0 and float(times.max()) == 1.0
    assert int(train.cameras.width[0]) == 512 and int(train.cameras.height[0]) == 384
    # Auto-scaling puts every camera inside the unit cube.
    assert float(train.cameras.camera_to_worlds[:, :3, 3].abs().max()) <= 1.0 + 1e-5


BAD_CASES = {
    "missing_time": (dict(times=[0.0, None, 0.5, 1.0]), r"frames\[1\].*no 'time' field"),
    "malformed_time": (dict(times=[0.0, "noon", 0.5, 1.0]), r"frames\[1\]\.time is 'noon'; expected a finite number"),
    "nan_time": (dict(times=[0.0, float("nan"), 0.5, 1.0]), r"frames\[1\]\.time is nan"),
    "no_frames": (dict(n=0), r"'frames' is missing or empty"),
    "mismatched_sizes": (
        dict(times=[0, 1, 2, 3], sizes=[(16, 12), (16, 12), (20, 10), (16, 12)], w=None, h=None),
        r"images have different sizes .* no per-frame 'w'/'h'",
    ),
    "size_disagrees": (dict(times=[0, 1, 2, 3], sizes=[(20, 10)] * 4), r"is 20x10 but the intrinsics say w=16, h=12"),
    "no_focal": (dict(times=[0, 1, 2, 3], fl_x=None, fl_y=None), r"'fl_x'/'fl_y' missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_a_one_line_error_and_dataset_untouched(tmp_path, case):
    kwargs, pattern = dict(BAD_CASES[case][0]), BAD_CASES[case][1]
    n = kwargs.pop("n", 4)
    scene = make_scene(tmp_path, n=n, **kwargs)
    before = tree_digest(scene)
    with pytest.raises(InputError, match=pattern) as err:
        parse(scene)
    assert "\n" not in str(err.value) and "transforms.json" in str(err.value)
    assert tree_digest(scene) == before


def test_missing_and_unreadable_images(tmp_path):
    scene = make_scene(tmp_path, times=[0, 1, 2, 3])
    (scene / "images" / "002.png").unlink()
    with pytest.raises(InputError, match=r"frames\[2\]\.file_path: image .*002.png does not exist"):
        parse(scene)
    (scene / "images" / "002.png").write_bytes(b"not a png at all")
    with pytest.raises(InputError, match=r"frames\[2\]\.file_path: image .*002.png is unreadable"):
        parse(scene)


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "transforms.json").write_text("{ frames: oops")
    with pytest.raises(InputError, match=r"transforms.json: not valid JSON"):
        parse(tmp_path)


def test_ns_train_exits_nonzero_with_one_line_for_bad_data(tmp_path):
    """Through the real command line: one error line on stderr, exit status 1, no traceback."""
    scene = make_scene(tmp_path / "scene", times=[0.0, None, 0.5, 1.0])
    result = subprocess.run(
        [sys.executable, "-m", "nerfstudio.scripts.train", "splatfacto-4d", "--vis", "tensorboard",
         "--output-dir", str(tmp_path / "out"), "ns4d-data", "--data", str(scene)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "frames[1]" in last and "'time'" in last
