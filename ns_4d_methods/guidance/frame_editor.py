"""Training frames through InstructPix2Pix at a bounded resolution.

Training images come at any size and as [H, W, 3]; Stable Diffusion's VAE needs sides that are multiples of 8, and
the cost grows with the pixel count (users of the official Instruct 4D-to-4D code run out of memory above about
512 px). :class:`FrameEditor` resizes a batch of frames so that its long side is at most ``max_resolution`` and both
sides are multiples of 8, edits it with :class:`~ns_4d_methods.guidance.ip2p_editor.InstructPix2PixEditor`, and
resizes the result back to the frames' size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ns_4d_methods.guidance.ip2p_editor import AnchorAttentionMode, InstructPix2PixEditor

SIZE_MULTIPLE = 8  # Stable Diffusion's VAE downscales by 8


def edit_size(height: int, width: int, max_resolution: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """The (height, width) frames are edited at: long side at most ``max_resolution`` (never enlarged; no cap when
    ``max_resolution`` <= 0), both sides rounded to the nearest multiple of ``multiple`` (at least ``multiple``)."""
    scale = 1.0 if max_resolution <= 0 else min(1.0, max_resolution / max(height, width))
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))  # type: ignore


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images [F, 3, H, W] resized to ``size`` (bilinear, antialiased when shrinking)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrink)


class FrameEditor:
    """Edits batches of frames [F, H, W, 3] in [0, 1] (frame 0 the anchor) with an InstructPix2Pix editor.

    Args:
        editor: the loaded InstructPix2Pix editor.
        max_resolution: long side, in pixels, that frames are edited at (at most); 0: their own size.
    """

    def __init__(self, editor: InstructPix2PixEditor, max_resolution: int = 512) -> None:
        self.editor = editor
        self.max_resolution = max_resolution

    @torch.no_grad()
    def __call__(
        self,
        conditions: torch.Tensor,
        inits: torch.Tensor,
        *,
        prompt: str,
        strength: float,
        num_inference_steps: int,
        guidance_scale: float,
        image_guidance_scale: float,
        anchor: AnchorAttentionMode,
        seed: int,
    ) -> torch.Tensor:
        """Edit ``inits`` (the frames sampling starts from) under the image condition ``conditions`` (the original
        frames), both [F, H, W, 3]; the other arguments as in :meth:`InstructPix2PixEditor.edit`. Returns [F, H, W, 3]
        float32 on the frames' device."""
        height, width = conditions.shape[1:3]
        size = edit_size(height, width, self.max_resolution)

        def prepare(frames: torch.Tensor) -> torch.Tensor:
            return resize(frames.permute(0, 3, 1, 2).float(), size)

        edited = self.editor.edit(
            prepare(conditions).to(self.editor.device),
            prompt,
            init_images=prepare(inits).to(self.editor.device),
            strength=strength,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale,
            anchor=anchor,
            seed=seed,
        )
        return resize(edited.float(), (height, width)).clamp(0, 1).permute(0, 2, 3, 1).to(conditions.device)
