"""X-CLIP score of a video against a text prompt, as 4Real reports it (its table: 19.5 - 24.8): X-CLIP's own
video-text logit over 8 evenly spaced frames, i.e. 100 x the cosine between the video embedding and the prompt's
embedding after X-CLIP's video-conditioned prompt generator (the cosine of the bare text features skips that part of
the model).

The model (``microsoft/xclip-base-patch32`` by default: transformers' ``XCLIPModel`` with its ``XCLIPProcessor``) is
loaded through the suite's loader; without its weights the score is skipped with one line, not an error.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ns_4d_methods.guidance.model_loading import WeightsUnavailableError, from_pretrained_or_fail, load_pretrained_model

XCLIP_MODEL = "microsoft/xclip-base-patch32"


class XClipScorer:
    """Scores videos against prompts with X-CLIP.

    Args:
        model_id: hub id or local directory of an ``XCLIPModel`` and its ``XCLIPProcessor``.
        device: where X-CLIP runs.
        field_name: the option naming ``model_id``, quoted when it cannot be loaded.
    """

    def __init__(
        self, model_id: str = XCLIP_MODEL, device: torch.device | str = "cpu", field_name: str = "xclip_model"
    ) -> None:
        from transformers import XCLIPModel, XCLIPProcessor  # imported when used: listing the methods (ns-train --help) skips it

        self.device = torch.device(device)
        self.model = load_pretrained_model(XCLIPModel, model_id, field_name, self.device, torch.float32)
        self.processor = from_pretrained_or_fail(XCLIPProcessor, model_id, field_name)
        self.num_frames = int(self.model.config.vision_config.num_frames)

    @torch.no_grad()
    def score(self, frames: Sequence[np.ndarray], prompt: str) -> float:
        """X-CLIP's own video-text logit of ``prompt`` and the video of uint8 ``frames`` [H, W, 3] (``num_frames`` of
        them, evenly spaced): ``XCLIPModel``'s forward, whose prompt generator conditions the text embedding on the
        video before the cosine, times its learned logit scale (100 in the released models, so 100 x cosine)."""
        picks = np.linspace(0, len(frames) - 1, self.num_frames).round().astype(int)
        inputs = self.processor(
            text=[prompt], videos=[[frames[i] for i in picks]], return_tensors="pt", padding=True, truncation=True
        )
        outputs = self.model(
            input_ids=inputs["input_ids"].to(self.device),
            attention_mask=inputs["attention_mask"].to(self.device),
            pixel_values=inputs["pixel_values"].to(self.device),
        )
        return float(outputs.logits_per_video[0, 0])


def load_xclip_or_skip(model_id: str, device: torch.device | str, field_name: str) -> Optional[XClipScorer]:
    """The scorer, or None after printing one line on why the X-CLIP score is skipped (weights not loadable)."""
    try:
        return XClipScorer(model_id, device, field_name)
    except WeightsUnavailableError as error:
        print(f"X-CLIP score skipped: {error}")
        return None
