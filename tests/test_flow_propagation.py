"""Flow-guided sliding-window propagation: window layout, an edit carried along a known motion of a real frame, the
occlusion fallback, the anchor handed to the editor, and memory bounded by the window."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ns_4d_methods.editing.flow_propagation import new_frames, propagate, warp_edit, window_ranges
from ns_4d_methods.editing.optical_flow import build_flow_estimator

SINTEL = Path(__file__).resolve().parents[2] / "shared" / "data" / "sintel_demo_frames" / "frame_0016.png"
RED = torch.tensor([1.0, 0.0, 0.0])


def identity_repaint(conditions, inits, *, seed):
    return inits.clone()


class DictSource:
    """Frames held in dicts; ``edited`` holds the key frame's edit."""

    def __init__(self, originals, currents=None, edits=None):
        self.originals, self.currents, self.edits = originals, currents or originals, edits or {}

    def original(self, frame):
        return self.originals[frame]

    def current(self, frame):
        return self.currents[frame]

    def edited(self, frame):
        return self.edits[frame]


class ConstantFlow:
    """Content moves by ``shift`` (dx, dy) px per frame; frames are told apart by their storage (``times``)."""

    def __init__(self, shift, times=None):
        self.shift = torch.tensor(shift, dtype=torch.float32)
        self.times = {image.data_ptr(): t for t, image in (times or {}).items()}

    def estimate_flow(self, img1, img2):
        steps = self.times.get(img2.data_ptr(), 0) - self.times.get(img1.data_ptr(), 0)
        return (steps * self.shift).expand(*img1.shape[:2], 2).clone()


def test_windows_of_five_overlapping_by_one():
    windows = window_ranges(13, 5, 1)
    assert windows == [range(0, 5), range(4, 9), range(8, 13)]
    assert [new_frames(windows, i) for i in range(3)] == [range(1, 5), range(5, 9), range(9, 13)]
    assert window_ranges(10, 5, 1) == [range(0, 5), range(4, 9), range(8, 10)]
    assert window_ranges(5, 5, 1) == [range(0, 5)]
    assert window_ranges(1, 5, 1) == []
    assert window_ranges(7, 3, 0) == [range(0, 3), range(3, 6), range(6, 7)]
    with pytest.raises(ValueError):
        window_ranges(10, 5, 5)


def translated_sequence(num_frames: int, shift=(2, 1), size=(96, 128)):
    """Crops of a real (Sintel) frame, downscaled 4x, whose content moves by ``shift`` = (dx, dy) px per frame."""
    image = torch.from_numpy(np.array(Image.open(SINTEL).convert("RGB"))).float() / 255.0
    big = F.interpolate(image.permute(2, 0, 1)[None], scale_factor=0.25, mode="area")[0].permute(1, 2, 0)
    height, width = size
    x0, y0 = 110, 12
    frames = []
    for t in range(num_frames):
        x, y = x0 - t * shift[0], y0 - t * shift[1]
        frames.append(big[y : y + height, x : x + width].contiguous())
    return frames


@pytest.mark.skipif(not SINTEL.is_file(), reason=f"needs {SINTEL}")
def test_edit_on_key_frame_follows_a_known_translation():
    """A red square painted on frame 0 must appear shifted by t x (2, 1) px in frame t, through two windows."""
    frames = translated_sequence(9)
    key_edit = frames[0].clone()
    key_edit[40:56, 40:56] = RED
    source = DictSource(dict(enumerate(frames)), edits={0: key_edit})
    windows = list(propagate(list(range(9)), source, identity_repaint, build_flow_estimator("dis")))
    assert [w.frames for w in windows] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    edited = {f: image for w in windows for f, image in zip(w.frames, w.images)}

    rows, cols = torch.meshgrid(torch.arange(96.0), torch.arange(128.0), indexing="ij")
    for t, image in edited.items():
        red = (image - RED).norm(dim=-1) < 0.3
        expected = torch.zeros_like(red)
        expected[40 + t : 56 + t, 40 + 2 * t : 56 + 2 * t] = True
        centroid = torch.stack([rows[red].mean(), cols[red].mean()])
        error = (centroid - torch.tensor([47.5 + t, 47.5 + 2 * t])).norm()
        iou = (red & expected).sum() / (red | expected).sum()
        assert error < 0.5, f"frame {t}: red square centred {error:.2f} px from where the motion puts it"
        assert iou > 0.85, f"frame {t}: IoU {iou:.3f} with the shifted square"
        # away from the square (and the strip that entered the view), the frame is the original frame t
        away = ~expected & (cols >= 2 * t + 2) & (rows >= t + 2)
        away &= ~torch.nn.functional.max_pool2d(expected[None, None].float(), 5, 1, 2)[0, 0].bool()
        assert (image[away] - frames[t][away]).abs().mean() < 0.02


def test_invalid_pixels_keep_the_current_image():
    """Content moves 3 px right: the 3 columns that enter the view have no source and keep the current image."""
    height, width = 8, 12
    blue = torch.zeros(height, width, 3)
    blue[..., 2] = 1.0
    originals = {0: torch.rand(height, width, 3), 1: torch.rand(height, width, 3)}
    source = DictSource(originals, currents={1: blue}, edits={0: RED.expand(height, width, 3).clone()})
    flow = ConstantFlow((3.0, 0.0), originals)
    (window,) = propagate([0, 1], source, identity_repaint, flow, window_size=2)
    image = window.images[0]
    torch.testing.assert_close(image[:, :3], blue[:, :3])
    torch.testing.assert_close(image[:, 3:], RED.expand(height, width - 3, 3))
    assert window.valid_fraction.tolist() == pytest.approx([(width - 3) / width])


def test_key_frame_is_the_anchor_and_originals_the_condition():
    originals = {f: torch.full((4, 4, 3), f / 10) for f in range(9)}
    key_edit = torch.full((4, 4, 3), 0.9)
    seen = []

    def recording(conditions, inits, *, seed):
        seen.append((conditions.clone(), inits.clone(), seed))
        return inits.clone()

    list(propagate(list(range(9)), DictSource(originals, edits={0: key_edit}), recording, ConstantFlow((0.0, 0.0)),
                   seed=7))
    assert [s for _, _, s in seen] == [7, 8]
    for (conditions, inits, _), frames in zip(seen, ([1, 2, 3, 4], [5, 6, 7, 8])):
        assert conditions.shape[0] == inits.shape[0] == 5
        torch.testing.assert_close(conditions[0], originals[0])
        torch.testing.assert_close(inits[0], key_edit)
        for row, frame in zip(conditions[1:], frames):
            torch.testing.assert_close(row, originals[frame])


def test_resuming_at_a_window_starts_from_the_stored_bridge_frame():
    originals = {f: torch.zeros(4, 4, 3) for f in range(9)}
    edits = {0: torch.full((4, 4, 3), 0.9), 4: torch.full((4, 4, 3), 0.3)}
    (window,) = propagate(list(range(9)), DictSource(originals, edits=edits), identity_repaint,
                          ConstantFlow((0.0, 0.0)), start_window=1)
    assert window.index == 1 and window.frames == [5, 6, 7, 8]
    torch.testing.assert_close(window.images, torch.full((4, 4, 4, 3), 0.3))


class CountingSource:
    """Makes a fresh frame per request and tracks how many are alive at once and which were requested when."""

    def __init__(self, size=16):
        self.size, self.alive, self.peak, self.requests = size, 0, 0, []

    def _frame(self, frame, kind):
        self.requests.append((kind, frame))
        image = torch.rand(self.size, self.size, 3)
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(image, self._release)
        return image

    def _release(self):
        self.alive -= 1

    def original(self, frame):
        return self._frame(frame, "original")

    def current(self, frame):
        return self._frame(frame, "current")

    def edited(self, frame):
        return self._frame(frame, "edited")


def run_counting(num_frames, window_size):
    source = CountingSource()
    requested_before_window = []
    for window in propagate(list(range(num_frames)), source, identity_repaint, ConstantFlow((0.0, 0.0)),
                            window_size=window_size):
        requested_before_window.append((max(f for _, f in source.requests), window.frames[-1]))
        del window
    return source, requested_before_window


@pytest.mark.parametrize("window_size", [3, 5, 8])
def test_frames_held_are_bounded_by_the_window_not_the_sequence(window_size):
    short, _ = run_counting(10, window_size)
    long, lazily = run_counting(40, window_size)
    # key frame (original + edit), the bridge frame's original (warps go from it), the window's new originals,
    # one current frame at a time
    bound = window_size + 3
    assert short.peak <= bound and long.peak <= bound, (short.peak, long.peak, bound)
    # frames are read only when their window is edited: nothing beyond the window yielded so far
    assert all(seen <= last for seen, last in lazily)
    # each frame is read once: the key frame's original and edit, every other frame's original and current image
    kinds = [kind for kind, _ in long.requests]
    assert kinds.count("original") == 40 and kinds.count("current") == 39 and kinds.count("edited") == 1


# ---- direct warps from the bridge frame against chained warps -------------------------------------------------------
BACKGROUND_SHIFT = (1.5, 0.5)  # px per frame, sub-pixel: every resampling blurs
OCCLUDER_SHIFT, OCCLUDER_SIZE = 5, 14  # a box moving right faster than the background passes over it


def texture(x: torch.Tensor, y: torch.Tensor, phase: float) -> torch.Tensor:
    """A smooth, continuous RGB pattern: exact at any sub-pixel position, detailed enough that bilinear resampling
    visibly blurs it."""
    channels = [0.5 + 0.25 * torch.sin(0.9 * x + 0.4 * y + phase + c) + 0.2 * torch.cos(0.5 * y - 0.7 * x + 2 * c)
                for c in range(3)]
    return torch.stack(channels, dim=-1)


def occluded_scene(num_frames: int, height: int = 40, width: int = 64):
    """Frames of a background moving by ``BACKGROUND_SHIFT`` with a box moving by ``OCCLUDER_SHIFT`` px in x in front
    of it, the box's mask per frame, and the exact flow between any two frames."""
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
    frames, masks = [], []
    for t in range(num_frames):
        background = texture(cols - BACKGROUND_SHIFT[0] * t, rows - BACKGROUND_SHIFT[1] * t, 0.0)
        left = 4 + OCCLUDER_SHIFT * t
        mask = (cols >= left) & (cols < left + OCCLUDER_SIZE) & (rows >= 10) & (rows < 10 + OCCLUDER_SIZE)
        frames.append(torch.where(mask[..., None], texture(cols - left, rows, 1.0), background).contiguous())
        masks.append(mask)

    class ExactFlow:
        times = {image.data_ptr(): t for t, image in enumerate(frames)}

        def estimate_flow(self, img1, img2):
            a, b = self.times[img1.data_ptr()], self.times[img2.data_ptr()]
            background = torch.tensor(BACKGROUND_SHIFT) * (b - a)
            box = torch.tensor([float(OCCLUDER_SHIFT * (b - a)), 0.0])
            return torch.where(masks[a][..., None], box, background).expand(height, width, 2).clone()

    return frames, masks, ExactFlow()


def invert(image: torch.Tensor) -> torch.Tensor:
    """The "edit": per pixel, so the ground-truth edited frame t is the edit of frame t."""
    return 1.0 - image


def test_direct_warps_match_the_ground_truth_edit_and_chained_warps_do_not():
    """One window of 5 frames: the edit of frame 0 warped into frames 1-4 (identity repaint) against the ground-truth
    edited frames, on the background pixels that frame 0 sees (the box passes over them during the window)."""
    frames, masks, flow = occluded_scene(5)
    source = DictSource(dict(enumerate(frames)), edits={0: invert(frames[0])})
    (window,) = propagate(list(range(5)), source, identity_repaint, flow, window_size=5)

    chained, previous, previous_original = [], invert(frames[0]), frames[0]  # what propagate did before: t from t - 1
    for t in range(1, 5):
        previous, _ = warp_edit(previous, previous_original, frames[t], frames[t], flow)
        previous_original = frames[t]
        chained.append(previous)

    height, width = frames[0].shape[:2]
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    direct_errors, chained_errors = [], []
    for t in range(1, 5):
        # background pixels of frame t whose content frame 0 shows (not behind the box there, not out of view)
        x0, y0 = cols - BACKGROUND_SHIFT[0] * t, rows - BACKGROUND_SHIFT[1] * t
        inside = (x0 >= 0) & (y0 >= 0)
        box_footprint = F.max_pool2d(masks[0][None, None].float(), 3, 1, 1)[0, 0].bool()  # bilinear's neighbours
        seen = inside & ~masks[t] & ~box_footprint[y0.clamp(min=0).long(), x0.clamp(min=0).long()]
        truth = invert(frames[t])
        direct_errors.append(float((window.images[t - 1] - truth).abs()[seen].mean()))
        chained_errors.append(float((chained[t - 1] - truth).abs()[seen].mean()))
    print(f"mean abs error against the ground-truth edit, frames 1-4: direct {direct_errors}, chained {chained_errors}")
    assert max(direct_errors) < 0.03
    assert sum(chained_errors) > 3 * sum(direct_errors)
    assert chained_errors[-1] > 0.06  # and it grows along the window
