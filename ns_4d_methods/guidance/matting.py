"""Background removal of the anchor video: every frame matted and composited on white before it becomes a target.

4Diffusion's official code runs rembg (U^2-Net) on every 4DM frame (its ``remove_bg.py``) and its loader keeps
``rgb`` where ``alpha > 0.5`` and white elsewhere, so grey halos and shadows of the generated frames are not fitted
under the heavily weighted anchor loss. rembg's model is an ONNX file fetched from GitHub, not a hub model; here
the segmentation is a text-prompted segmentation model of transformers (CLIPSeg, ``CIDAS/clipseg-rd64-refined`` by
default, prompted with the pipeline's prompt), loaded by id through :mod:`ns_4d_methods.guidance.model_loading` like
every other model. Its foreground probability, resized to the frame, takes the place of rembg's alpha: kept where
above ``threshold`` (official: 0.5), white elsewhere.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from ns_4d_methods.guidance.model_loading import from_pretrained_or_fail, load_pretrained_model

MATTING_MODEL = "CIDAS/clipseg-rd64-refined"
BATCH = 8  # frames segmented at once


def composite_on_white(images: torch.Tensor, foreground: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``images`` [N, 3, H, W] kept where ``foreground`` [N, 1, H, W] exceeds ``threshold``, white elsewhere."""
    keep = (foreground > threshold).to(images.dtype)
    return images * keep + (1.0 - keep)


class ObjectMatting:
    """A CLIPSeg model (hub id or local directory) that segments the object named by a text prompt.

    Args:
        model: hub id or directory written by ``save_pretrained`` (model and ``CLIPSegProcessor``).
        device: where it runs (fp32: it runs once per run, on a few dozen frames).
        field_name: the config field naming ``model``, for the one-line error.
    """

    def __init__(self, model: str, device: Union[str, torch.device], field_name: str) -> None:
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor  # imported when used: listing the methods (ns-train --help) skips it

        self.device = torch.device(device)
        load = dict(name_or_path=model, field_name=field_name)
        self.model = load_pretrained_model(CLIPSegForImageSegmentation, device=self.device, dtype=torch.float32, **load)
        self.processor = from_pretrained_or_fail(CLIPSegProcessor, **load)

    @torch.no_grad()
    def foreground(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """Foreground probabilities [N, 1, H, W] of ``images`` [N, 3, H, W] in [0, 1]."""
        height, width = images.shape[-2:]
        pixels = (images.clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
        masks = []
        for start in range(0, len(pixels), BATCH):
            chunk = list(pixels[start : start + BATCH])
            inputs = self.processor(text=[prompt] * len(chunk), images=chunk, padding=True, return_tensors="pt")
            logits = self.model(**inputs.to(self.device)).logits
            logits = logits.reshape(len(chunk), 1, *logits.shape[-2:]).float()
            masks.append(F.interpolate(logits.sigmoid(), size=(height, width), mode="bilinear", align_corners=False))
        return torch.cat(masks).cpu()

    def __call__(self, images: torch.Tensor, prompt: str, threshold: float = 0.5) -> torch.Tensor:
        """``images`` [N, 3, H, W] in [0, 1] with everything but the object made white."""
        return composite_on_white(images, self.foreground(images, prompt), threshold)
