"""How good and how consistent an edit of a frame sequence (video frames, views, panorama windows) is.

- CLIP text-image score: mean cosine between each edited frame and the edit prompt.
- CLIP directional similarity: mean cosine between the change of each frame's image embedding (edited - original)
  and the change of the text embedding (prompt - source prompt), as in Instruct-NeRF2NeRF/StyleGAN-NADA.
- CLIP frame consistency: mean cosine between consecutive edited frames' image embeddings.
- Temporal warp error (no weights): optical flow (OpenCV DIS, "medium") on the *original* frames t and t + 1; the
  edited frame t + 1 is warped back onto frame t and compared with the edited frame t, mean absolute error (RGB in
  [0, 1]) over the pixels that pass the forward-backward occlusion check. The same error of the original frames is
  reported beside it as the floor the flow itself allows.

Frames stream through :func:`edit_metrics` one pair at a time: memory holds two frames and one CLIP embedding per
frame. CLIP needs weights; when they cannot be loaded the CLIP scores are skipped with a message, not an error.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from ns_4d_methods.editing.optical_flow import DisFlow
from ns_4d_methods.editing.warping import backward_warp, forward_backward_valid_mask
from ns_4d_methods.guidance.model_loading import WeightsUnavailableError, from_pretrained_or_fail, load_pretrained_model

CLIP_MODEL = "openai/clip-vit-large-patch14"
CLIP_BATCH = 16

Frame = np.ndarray  # [H, W, 3] uint8 RGB


class ClipEmbedder:
    """CLIP image and text embeddings (L2-normalised), model and processor loaded through the package's helper.

    Args:
        model_id: hub id or local directory holding a ``CLIPModel`` and its ``CLIPProcessor``.
        device: where CLIP runs.
        field_name: the option naming ``model_id``, quoted when it cannot be loaded.
    """

    def __init__(self, model_id: str = CLIP_MODEL, device: torch.device | str = "cpu", field_name: str = "clip_model"):
        from transformers import CLIPModel, CLIPProcessor  # imported when used: listing the methods (ns-train --help) skips it

        self.device = torch.device(device)
        self.model = load_pretrained_model(CLIPModel, model_id, field_name, self.device, torch.float32)
        self.processor = from_pretrained_or_fail(CLIPProcessor, model_id, field_name)

    @staticmethod
    def _features(output: torch.Tensor | object) -> torch.Tensor:
        # transformers 4 returns the projected features, transformers 5 a model output holding them
        features = output if isinstance(output, torch.Tensor) else output.pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def images(self, frames: List[Frame]) -> torch.Tensor:
        inputs = self.processor(images=frames, return_tensors="pt")
        return self._features(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device)))

    @torch.no_grad()
    def texts(self, texts: List[str]) -> torch.Tensor:
        inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        inputs = {key: value.to(self.device) for key, value in inputs.items() if key in ("input_ids", "attention_mask")}
        return self._features(self.model.get_text_features(**inputs))


def clip_scores(
    original: torch.Tensor, edited: torch.Tensor, prompt: torch.Tensor, source_prompt: torch.Tensor
) -> Dict[str, float]:
    """CLIP scores from normalised embeddings: frames [N, D] (original and edited) and the two texts [D]."""
    direction = torch.nn.functional.normalize(edited - original, dim=-1)
    text_direction = torch.nn.functional.normalize(prompt - source_prompt, dim=-1)
    scores = {
        "clip_text_image": (edited @ prompt).mean().item(),
        "clip_directional": (direction @ text_direction).mean().item(),
    }
    if len(edited) > 1:
        scores["clip_frame_consistency"] = (edited[1:] * edited[:-1]).sum(-1).mean().item()
    return scores


def _to_tensor(frame: Frame) -> torch.Tensor:
    return torch.from_numpy(frame).float() / 255.0


def warp_error(
    original: Tuple[Frame, Frame], edited: Tuple[Frame, Frame], flow: DisFlow
) -> Tuple[float, float, int]:
    """Warp error between consecutive frames t, t + 1 with flow from the original pair.

    Returns the summed absolute error of the edited and of the original frames over the valid pixels of frame t,
    and the number of valid pixels.
    """
    orig_t, orig_next = (_to_tensor(frame) for frame in original)
    edit_t, edit_next = (_to_tensor(frame) for frame in edited)
    to_next = flow.estimate_flow(orig_t, orig_next)  # on frame t's grid: where each pixel went in t + 1
    to_prev = flow.estimate_flow(orig_next, orig_t)
    valid = forward_backward_valid_mask(to_prev, to_next)
    count = int(valid.sum())
    edited_error = (backward_warp(edit_next, to_next) - edit_t).abs().mean(-1)[valid].sum().item()
    original_error = (backward_warp(orig_next, to_next) - orig_t).abs().mean(-1)[valid].sum().item()
    return edited_error, original_error, count


def edit_metrics(
    pairs: Iterable[Tuple[Frame, Frame]],
    prompt: str,
    source_prompt: str = "",
    clip: Optional[ClipEmbedder] = None,
    temporal: bool = True,
) -> Dict[str, object]:
    """Metrics of (original, edited) frame pairs, in sequence order, both uint8 [H, W, 3] of one size per pair.

    Args:
        pairs: the frames, streamed.
        prompt: the edit prompt (CLIP target text).
        source_prompt: a description of the original frames (CLIP source text for the directional score).
        clip: the CLIP embedder; without it the CLIP scores are left out.
        temporal: compute the flow warp error between consecutive frames (videos; not for unordered views).

    Returns:
        ``frames`` and, where computed, ``clip_text_image``, ``clip_directional``, ``clip_frame_consistency``,
        ``warp_error``, ``warp_error_original`` and ``warp_valid_fraction``.
    """
    flow = DisFlow("medium") if temporal else None
    embeddings: Dict[str, List[torch.Tensor]] = {"original": [], "edited": []}
    pending: List[Tuple[Frame, Frame]] = []
    previous: Optional[Tuple[Frame, Frame]] = None
    warp = np.zeros(3)  # edited error, original error, valid pixels
    pixels = frames = 0

    def embed(batch: List[Tuple[Frame, Frame]]) -> None:
        embeddings["original"].append(clip.images([pair[0] for pair in batch]))
        embeddings["edited"].append(clip.images([pair[1] for pair in batch]))

    for original, edited in pairs:
        frames += 1
        if flow is not None and previous is not None and previous[0].shape == original.shape:
            warp += warp_error((previous[0], original), (previous[1], edited), flow)
            pixels += original.shape[0] * original.shape[1]
        previous = (original, edited)
        if clip is not None:
            pending.append((original, edited))
            if len(pending) == CLIP_BATCH:
                embed(pending)
                pending = []
    if clip is not None and pending:
        embed(pending)

    report: Dict[str, object] = {"frames": frames}
    if clip is not None and frames:
        prompt_embedding, source_embedding = clip.texts([prompt, source_prompt])
        report.update(
            clip_scores(
                torch.cat(embeddings["original"]), torch.cat(embeddings["edited"]), prompt_embedding, source_embedding
            )
        )
    if pixels:
        valid = max(warp[2], 1.0)
        report.update(
            warp_error=warp[0] / valid, warp_error_original=warp[1] / valid, warp_valid_fraction=warp[2] / pixels
        )
    return report


def load_clip_or_skip(
    model_id: str, device: torch.device | str, field_name: str = "clip_model"
) -> Optional[ClipEmbedder]:
    """The CLIP embedder, or None after printing why the CLIP scores are skipped (weights not loadable)."""
    try:
        return ClipEmbedder(model_id, device, field_name)
    except WeightsUnavailableError as error:
        print(f"CLIP metrics skipped: {error}")
        return None


def format_report(report: Dict[str, object]) -> str:
    """The report as aligned ``name  value`` lines."""
    width = max(len(name) for name in report)
    lines = []
    for name, value in report.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<{width}}  {text}")
    return "\n".join(lines)
