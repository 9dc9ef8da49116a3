"""X-CLIP score of a video against a text prompt, as 4Real reports it: 100 x the cosine between X-CLIP's text
embedding of the prompt and its video embedding of 8 evenly spaced frames (4Real's table: 19.5 - 24.8).

The model (``microsoft/xclip-base-patch32`` by default: transformers' ``XCLIPModel`` with its ``XCLIPProcessor``) is
loaded through the suite's loader; without its weights the score is skipped with one line, not an error.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from transformers import XCLIPModel, XCLIPProcessor

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
        self.device = torch.device(device)
        self.model = load_pretrained_model(XCLIPModel, model_id, field_name, self.device, torch.float32)
        self.processor = from_pretrained_or_fail(XCLIPProcessor, model_id, field_name)
        self.num_frames = int(self.model.config.vision_config.num_frames)

    @staticmethod
    def _unit(output: torch.Tensor | object) -> torch.Tensor:
        # transformers 4 returns the projected features, transformers 5 an output object holding them
        features = output if isinstance(output, torch.Tensor) else output.pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def score(self, frames: Sequence[np.ndarray], prompt: str) -> float:
        """100 x cosine between ``prompt`` and the video of uint8 ``frames`` [H, W, 3] (``num_frames`` of them,
        evenly spaced, are embedded)."""
        picks = np.linspace(0, len(frames) - 1, self.num_frames).round().astype(int)
        video = self.processor(videos=[[frames[i] for i in picks]], return_tensors="pt")
        video_features = self._unit(self.model.get_video_features(pixel_values=video["pixel_values"].to(self.device)))
        text = self.processor(text=[prompt], return_tensors="pt", padding=True, truncation=True)
        text_features = self._unit(
            self.model.get_text_features(
                input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)
            )
        )
        return 100.0 * float((video_features * text_features).sum())


def load_xclip_or_skip(model_id: str, device: torch.device | str, field_name: str) -> Optional[XClipScorer]:
    """The scorer, or None after printing one line on why the X-CLIP score is skipped (weights not loadable)."""
    try:
        return XClipScorer(model_id, device, field_name)
    except WeightsUnavailableError as error:
        print(f"X-CLIP score skipped: {error}")
        return None
