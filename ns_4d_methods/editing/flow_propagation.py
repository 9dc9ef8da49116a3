"""Flow-guided sliding-window propagation (Instruct 4D-to-4D, temporal): carries an edit along a frame sequence.

The frames of one camera, in time order, are cut into windows of ``window_size`` frames that overlap by ``overlap``
frames (window i covers frames ``[i (size - overlap), i (size - overlap) + size)``); frame 0 is the key frame, already
edited. The frame before a window's new frames (the key frame, then the last frame of the previous window, already
repainted) is the window's *bridge*. For every frame of the window, as in the official code:

- optical flow is computed on the *original* frames, bridge -> frame and frame -> bridge;
- the *edited* bridge frame is backward-warped straight into the frame (with the flow frame -> bridge);
- where the forward-backward check fails (occlusion, disocclusion, out of view) the current image is kept.

Warps go straight from the bridge, never from the previous frame's warp: content occluded in one frame of a window (and
so kept unedited there) is not carried on as "valid" into the next ones, and bilinear resampling blurs once, not once
per frame (``tests/test_flow_propagation.py`` measures chained warps against direct ones).

The warped window, with the edited key frame prepended as the anchor, is then re-noised and repainted by an
anchor-aware editor (few steps), conditioned on the original frames. With ``from_current`` (refresh passes) nothing is
warped: the window is repainted from the current images (the model's renders), anchored on the key frame's edit.

:func:`propagate` is a generator that yields one window at a time and reads frames from a :class:`FrameSource` only
when that window needs them, so a caller can edit one window per call and memory holds a window, not the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterator, List, Protocol, Sequence

import torch

from ns_4d_methods.editing.optical_flow import FlowEstimator
from ns_4d_methods.editing.warping import backward_warp, forward_backward_valid_mask


class FrameSource(Protocol):
    """Where :func:`propagate` reads frames: images [H, W, 3] float in [0, 1], looked up by frame id."""

    def original(self, frame: Hashable) -> torch.Tensor:
        """The unedited frame (flow and the editor's image condition use it)."""
        ...

    def current(self, frame: Hashable) -> torch.Tensor:
        """What a pixel keeps when the warped edit is not valid there (the training image, or a render)."""
        ...

    def edited(self, frame: Hashable) -> torch.Tensor:
        """The edit of a frame propagated earlier (the key frame; the last frame before ``start_window``)."""
        ...


class WindowRepainter(Protocol):
    """Re-noises and repaints a window: ``conditions`` (original frames) and ``inits`` (frames to start from) are
    [F, H, W, 3] with frame 0 the anchor; returns the edited frames [F, H, W, 3]."""

    def __call__(self, conditions: torch.Tensor, inits: torch.Tensor, *, seed: int) -> torch.Tensor: ...


@dataclass
class PropagatedWindow:
    """One window's result."""

    index: int
    """Window number in the sequence."""
    frames: List[Hashable]
    """The frames this window edited (those no earlier window covered), in time order."""
    images: torch.Tensor
    """Their edited images [len(frames), H, W, 3]."""
    valid_fraction: torch.Tensor
    """Per frame, the fraction of pixels that took the warped edit (the rest started from the current image)."""


def window_ranges(num_frames: int, window_size: int = 5, overlap: int = 1) -> List[range]:
    """Frame positions of every window over a sequence whose frame 0 is the key frame.

    Windows stop once the last frame is covered; a sequence of one frame (the key frame alone) has none.
    """
    if window_size < 2 or not 0 <= overlap < window_size:
        raise ValueError(f"need window_size >= 2 and 0 <= overlap < window_size, got {window_size} and {overlap}")
    stride = window_size - overlap
    windows = []
    start = 0
    while num_frames > 1:
        end = min(start + window_size, num_frames)
        windows.append(range(start, end))
        if end == num_frames:
            break
        start += stride
    return windows


def new_frames(windows: Sequence[range], index: int) -> range:
    """The positions window ``index`` edits: those after the key frame and after every earlier window."""
    first = 1 if index == 0 else windows[index - 1].stop
    return range(first, windows[index].stop)


def warp_edit(
    source_edit: torch.Tensor,
    source_original: torch.Tensor,
    original: torch.Tensor,
    current: torch.Tensor,
    flow: FlowEstimator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An edited frame (``source_edit``, the edit of ``source_original``) carried into the frame ``original``, and where
    it is valid ([H, W, 3], [H, W] bool).

    Flow is estimated on the original frames; invalid pixels take ``current``.
    """
    flow_bwd = flow.estimate_flow(original, source_original)  # this frame -> source: where each pixel came from
    flow_fwd = flow.estimate_flow(source_original, original)
    valid = forward_backward_valid_mask(flow_fwd, flow_bwd)
    warped = backward_warp(source_edit, flow_bwd)
    return torch.where(valid[..., None], warped, current), valid


def propagate(
    frames: Sequence[Hashable],
    source: FrameSource,
    repaint: WindowRepainter,
    flow: FlowEstimator,
    *,
    window_size: int = 5,
    overlap: int = 1,
    start_window: int = 0,
    seed: int = 0,
    from_current: bool = False,
) -> Iterator[PropagatedWindow]:
    """Propagate the edit of ``frames[0]`` (``source.edited``) through ``frames`` (time order), window by window.

    Args:
        frames: frame ids in time order; the first is the key frame.
        source: reads original, current and already edited frames.
        repaint: the anchor-aware editor; window ``i`` is repainted with ``seed + i``.
        flow: optical flow estimator.
        window_size: frames per window.
        overlap: frames shared by consecutive windows.
        start_window: first window to edit (to continue a sequence: frames before it must be edited already).
        seed: base seed of the repaints.
        from_current: repaint every window from the current images instead of warped edits (no flow is computed).

    Yields:
        :class:`PropagatedWindow` for windows ``start_window, start_window + 1, ...``.
    """
    windows = window_ranges(len(frames), window_size, overlap)
    if start_window >= len(windows):
        return
    key = frames[0]
    key_original, key_edit = source.original(key), source.edited(key)
    bridge = frames[new_frames(windows, start_window).start - 1]
    if from_current:
        bridge_original = bridge_edit = None
    elif bridge == key:
        bridge_original, bridge_edit = key_original, key_edit
    else:
        bridge_original, bridge_edit = source.original(bridge), source.edited(bridge)
    for index in range(start_window, len(windows)):
        positions = new_frames(windows, index)
        conditions, inits, valid_fraction = [key_original], [key_edit], []
        for position in positions:
            original, current = source.original(frames[position]), source.current(frames[position])
            if from_current:
                init, valid = current, torch.zeros(())
            else:
                init, valid = warp_edit(bridge_edit, bridge_original, original, current, flow)
            conditions.append(original)
            inits.append(init)
            valid_fraction.append(valid.float().mean())
            del current
        edited = repaint(torch.stack(conditions), torch.stack(inits), seed=seed + index)[1:]
        if not from_current:  # the last frame, repainted, is the next window's bridge
            bridge_original, bridge_edit = conditions[-1], edited[-1].clone()
        del conditions, inits
        result = PropagatedWindow(index, [frames[p] for p in positions], edited, torch.stack(valid_fraction))
        del edited
        yield result
        del result
