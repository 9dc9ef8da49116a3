"""4real's X-CLIP score is X-CLIP's own video-text logit: the prompt embedding conditioned on the video by X-CLIP's
prompt generator, not the cosine of the bare text features."""

from __future__ import annotations

import numpy as np
import torch
from tiny_models import build_tiny_xclip

from ns_4d_methods.models.xclip_score import XClipScorer


def test_score_is_the_models_video_text_logit(tmp_path) -> None:
    build_tiny_xclip(tmp_path / "xclip")
    scorer = XClipScorer(str(tmp_path / "xclip"))
    frames = list(np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    score = scorer.score(frames, "a red ball")

    picks = np.linspace(0, 11, 8).round().astype(int)
    inputs = scorer.processor(text=["a red ball"], videos=[[frames[i] for i in picks]], return_tensors="pt",
                              padding=True)  # fmt: skip
    model = scorer.model
    with torch.no_grad():
        outputs = model(**inputs)
        video = torch.nn.functional.normalize(outputs.video_embeds, dim=-1)
        conditioned = torch.nn.functional.normalize(outputs.text_embeds[0, 0], dim=-1)  # after the prompt generator
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        bare = torch.nn.functional.normalize(getattr(text, "pooler_output", text), dim=-1)
    scale = float(model.logit_scale.exp())
    assert score == float(outputs.logits_per_video[0, 0])
    assert abs(score - scale * float((video[0] * conditioned).sum())) < 1e-4
    assert abs(score - scale * float((video[0] * bare[0]).sum())) > 1e-3  # the video-conditioned prompt counts
