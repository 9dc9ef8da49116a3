"""Panorama editing by latent fusion: overlapping square windows of one latent canvas, inverted and denoised together
with the injection editor (:mod:`ns_4d_methods.guidance.attention_injection`) and averaged where they overlap after
every inversion and sampling step (MultiDiffusion, arXiv 2302.08113), so that every window sees the same latents in
its overlaps at every step and no edit is blended in pixels.

One reference window is edited first, PnP-style, and its self-attention K/V are shared with every window for the
context steps. A panorama that covers 360 degrees (``wrap``) has windows that run across its right edge onto its left
one, and is encoded and decoded with its other end beside each border, so its two ends continue each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from ns_4d_methods.guidance.attention_injection import AttentionInjectionEditor, ReferenceContext


def window_starts(length: int, window: int, overlap: float) -> List[int]:
    """Evenly spaced starts of windows covering ``[0, length)`` that overlap by at least ``overlap``."""
    stride = max(1, int(window * (1.0 - overlap)))
    count = math.ceil((length - window) / stride) + 1
    return [int(round(i * (length - window) / max(count - 1, 1))) for i in range(count)]


def is_full_circle(height: int, width: int) -> bool:
    """Whether a panorama's aspect ratio is the 2:1 of an equirectangular 360-degree image (within a pixel)."""
    return abs(width - 2 * height) <= 1


@dataclass
class PanoramaWindows:
    """Square windows of side ``side`` over a canvas [..., height, width] (latent pixels)."""

    height: int
    """Canvas height."""
    width: int
    """Canvas width."""
    side: int
    """Window side."""
    starts: List[Tuple[int, int]]
    """Top-left corners (y, x); with ``wrap``, a window may run past the right edge onto the left one."""
    wrap: bool
    """Whether the canvas is a full circle horizontally."""

    @classmethod
    def cover(cls, height: int, width: int, side: int, overlap: float, wrap: bool) -> "PanoramaWindows":
        """Windows covering the canvas, neighbours overlapping by at least ``overlap`` of a window (also across the
        seam with ``wrap``)."""
        ys = window_starts(height, side, overlap)
        if wrap:
            count = math.ceil(width / max(1, int(side * (1.0 - overlap))))
            xs = [int(round(i * width / count)) for i in range(count)]
        else:
            xs = window_starts(width, side, overlap)
        return cls(height, width, side, [(y, x) for y in ys for x in xs], wrap)

    def columns(self, x: int, device: torch.device) -> torch.Tensor:
        return torch.arange(x, x + self.side, device=device) % self.width

    def crop(self, canvas: torch.Tensor, index: int) -> torch.Tensor:
        """Window ``index`` of ``canvas`` [B, C, height, width]."""
        y, x = self.starts[index]
        return canvas[..., y : y + self.side, :].index_select(-1, self.columns(x, canvas.device))

    def fuse(self, windows: List[torch.Tensor]) -> torch.Tensor:
        """The canvas [B, C, height, width] whose every pixel is the mean of the windows [B, C, side, side] over it."""
        total = windows[0].new_zeros(*windows[0].shape[:2], self.height, self.width)
        count = windows[0].new_zeros(self.height, self.width)
        for (y, x), window in zip(self.starts, windows):
            columns = self.columns(x, window.device)
            total[..., y : y + self.side, :].index_add_(-1, columns, window)
            count[y : y + self.side, :].index_add_(-1, columns, torch.ones_like(window[0, 0]))
        return total / count


@torch.no_grad()
def edit_panorama(
    editor: AttentionInjectionEditor,
    image: torch.Tensor,
    prompt: str,
    window: int,
    overlap: float,
    wrap: bool,
    reference: int,
    callback: Optional[Callable[[int, List[torch.Tensor]], None]] = None,
) -> torch.Tensor:
    """Edit a panorama [3, H, W] in [0, 1] (sides multiples of the VAE's scale factor) in fused windows.

    Args:
        window: window side in pixels (a multiple of the editor's ``size_multiple``).
        overlap: least overlap of neighbouring windows, a fraction of the window.
        wrap: the panorama covers 360 degrees horizontally.
        reference: index of the reference window in :attr:`PanoramaWindows.starts` order.
        callback: called with each sampling step's index and every window's input latents, and last with
            ``num_inference_steps`` and the windows of the final latents.

    Returns:
        The edited panorama [3, H, W], fp32 on the CPU.
    """
    factor = editor.pipeline.vae_scale_factor
    pad = factor * 8 if wrap else 0  # pixels of the other end beside each border for the VAE's convolutions
    pixels = image[None]
    if pad:
        pixels = torch.cat([pixels[..., -pad:], pixels, pixels[..., :pad]], dim=-1)
    canvas = editor.encode(pixels, multiple=factor)
    canvas = canvas[..., pad // factor : canvas.shape[-1] - pad // factor]
    windows = PanoramaWindows.cover(*canvas.shape[-2:], window // factor, overlap, wrap)
    if not 0 <= reference < len(windows.starts):
        raise ValueError(f"reference window {reference} of {len(windows.starts)}")

    reference_path = editor.invert(windows.crop(canvas, reference))
    context = ReferenceContext()
    editor.sample(reference_path[-1], prompt, source=reference_path, record=context)

    def fused(step: Callable[[torch.Tensor, List[int]], torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
        """One step of every window, ``batch_size`` windows at a time, averaged back onto the canvas."""
        outputs: List[torch.Tensor] = []
        size = editor.config.batch_size
        for first in range(0, len(windows.starts), size):
            indices = list(range(first, min(first + size, len(windows.starts))))
            outputs.extend(step(torch.cat([windows.crop(latents, i) for i in indices]), indices).split(1))
        return windows.fuse(outputs)

    timesteps, keep = editor.inversion_timesteps()
    trajectory, latents = [canvas], canvas
    for i, t in enumerate(timesteps):
        latents = fused(lambda crops, _: editor.invert_step(t, crops), latents)
        if i in keep:
            trajectory.append(latents)

    steps = editor.config.num_inference_steps
    with editor.injection():
        for i in range(steps):
            if callback is not None:
                callback(i, [windows.crop(latents, w) for w in range(len(windows.starts))])
            source = trajectory[steps - i]

            def denoise(crops: torch.Tensor, indices: List[int]) -> torch.Tensor:
                structure = torch.cat([windows.crop(source, w) for w in indices])
                return editor.denoise_step(i, crops, prompt, structure, "other", shared=context)

            latents = fused(denoise, latents)
    if callback is not None:
        callback(steps, [windows.crop(latents, w) for w in range(len(windows.starts))])

    pad = pad // factor
    if pad:
        latents = torch.cat([latents[..., -pad:], latents, latents[..., :pad]], dim=-1)
    decoded = editor.decode(latents)
    return decoded[0, :, :, pad * factor : decoded.shape[-1] - pad * factor].cpu()
