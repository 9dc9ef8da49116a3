"""``ns-4d-edit``: edit a video, a wide panorama or a multi-view image set by a prompt, consistently, with the
self-attention injection editor (:mod:`ns_4d_methods.guidance.attention_injection`), and report edit metrics.

- ``ns-4d-edit video IN.mp4 --prompt "..."``: every frame, batched against one reference frame; frames stream from
  and to disk, so memory does not grow with the video's length.
- ``ns-4d-edit panorama IN.jpg --prompt "..."``: overlapping square windows of one latent canvas, edited against a
  shared reference window and averaged in latent space after every step (:mod:`ns_4d_methods.guidance.panorama_fusion`);
  a 360-degree panorama (2:1, or ``--wrap on``) wraps around, so its ends continue each other. Its report adds LPIPS.
- ``ns-4d-edit images DIR --prompt "..."``: every image of a folder (views of a scene) against one reference view.
- ``ns-4d-edit metrics ORIGINAL EDITED --prompt "..."``: the metrics of an existing edit.
- ``ns-4d-edit run RUN_DIR``: the metrics of an editing run (``instruct4d``, ``unified-edit``), per camera.

Each edit writes its result (never over the input) and a ``<output stem>.metrics.json`` report beside it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Union

import imageio_ffmpeg
import numpy as np
import torch
import tyro
from PIL import Image
from tqdm import tqdm
from typing_extensions import Annotated

from ns_4d_methods.editing.comparison_videos import read_index, run_metrics
from ns_4d_methods.editing.edit_metrics import CLIP_MODEL, edit_metrics, format_report, load_clip_or_skip
from ns_4d_methods.data.video_io import (
    IMAGE_SUFFIXES, Size, list_images, probe_video, read_image, read_video, resize, to_frame, to_tensor,
)
from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.attention_injection import (
    PNP_NEGATIVE_PROMPT, SD21_BASE, AttentionInjectionConfig, AttentionInjectionEditor,
)
from ns_4d_methods.guidance.panorama_fusion import PanoramaWindows, edit_panorama, is_full_circle, window_starts
from ns_4d_methods.models.image_metrics import LazyLPIPS

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

def fit_size(size: Size, height: Optional[int], multiple: int) -> Size:
    """``size`` scaled to ``height`` (keeping the aspect ratio), both sides rounded to a multiple of ``multiple``."""
    scale = (height or size[0]) / size[0]
    return tuple(max(multiple, int(round(side * scale / multiple)) * multiple) for side in size)  # type: ignore


def crop(image: np.ndarray, y: int, x: int, side: int) -> np.ndarray:
    return image[y : y + side, x : x + side]


def lpips_report(pairs: List[Tuple[np.ndarray, np.ndarray]]) -> Dict[str, float]:
    """``{"lpips": mean LPIPS (AlexNet) of the (original, edited) pairs}``, or {} after one line when its weights are
    not on disk (nothing is downloaded)."""
    metric = LazyLPIPS()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = metric.available
    if not available:
        print(f"LPIPS skipped: {caught[0].message if caught else 'weights not found'}")
        return {}
    scores = [metric(to_tensor(original)[None], to_tensor(edited)[None]).item() for original, edited in pairs]
    return {"lpips": float(np.mean(scores))}


# ---------------------------------------------------------------- commands
@dataclass(kw_only=True)
class EditOptions:
    """Options shared by every edit command."""

    prompt: str
    """The edit prompt: a description of the edited result (e.g. "a red sports car on a snowy road")."""
    source_prompt: str = ""
    """A description of the input: the DDIM inversion prompt and CLIP's source text (PnP inverts with "")."""
    negative_prompt: str = PNP_NEGATIVE_PROMPT
    """Prompt of the unconditional guidance branch (PnP's default)."""
    model: str = SD21_BASE
    """Stable Diffusion to edit with: a hub id or a local directory saved with save_pretrained."""
    steps: int = 50
    """DDIM sampling steps of the edit."""
    inversion_steps: int = 1000
    """DDIM inversion steps (PnP: one per training timestep); the latents at the sampling timesteps are kept."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale of the edit."""
    t_resnet: float = 0.8
    """Fraction of the sampling steps, from the noisiest, with the image's inverted ResNet features, in [0, 1]."""
    t_edit: float = 0.5
    """Fraction of the sampling steps, from the noisiest, with the image's inverted self-attention Q/K, in [0, 1]."""
    t_context: float = 0.5
    """Fraction of the sampling steps after which (to the last step) images take the reference's self-attention K/V,
    in [0, 1]."""
    batch_size: int = 4
    """Images edited at once against the reference (memory grows with it, not with the input's length)."""
    reference: Optional[int] = None
    """Index of the reference frame / window / image (default: the middle one)."""
    output: Optional[Path] = None
    """Where to write the result (default: next to the input, with an _edited suffix); never the input itself."""
    clip_model: str = CLIP_MODEL
    """CLIP model for the metric report (hub id or local directory); skipped with a message when unavailable."""
    device: str = DEFAULT_DEVICE
    """Device to run on."""

    def editor_config(self) -> AttentionInjectionConfig:
        return AttentionInjectionConfig(
            model=self.model, num_inference_steps=self.steps, inversion_steps=self.inversion_steps,
            guidance_scale=self.guidance_scale, t_resnet=self.t_resnet, t_edit=self.t_edit, t_context=self.t_context,
            negative_prompt=self.negative_prompt,
            inversion_prompt=self.source_prompt, batch_size=self.batch_size,
        )

    def output_path(self, source: Path, default: Path) -> Path:
        output = self.output or default
        if output.resolve() == source.resolve():
            raise InputError(f"--output {output}: is the input; choose another path (inputs are never overwritten)")
        output.parent.mkdir(parents=True, exist_ok=True)
        return output

    def reference_index(self, count: int, what: str) -> int:
        index = count // 2 if self.reference is None else self.reference
        if not 0 <= index < count:
            raise InputError(f"--reference {index}: expected a {what} index in [0, {count - 1}]")
        return index

    def report(
        self, pairs: Iterator[Tuple[np.ndarray, np.ndarray]], output: Path, temporal: bool,
        extra: Optional[Dict] = None,
    ) -> None:
        clip = load_clip_or_skip(self.clip_model, self.device, "--clip-model")
        report = {**edit_metrics(pairs, self.prompt, self.source_prompt, clip, temporal), **(extra or {})}
        path = output.parent / f"{output.stem}.metrics.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(format_report(report))
        print(f"Wrote the metric report to {path}")


@dataclass(kw_only=True)
class EditVideo(EditOptions):
    """Edit every frame of a video against one reference frame; writes an mp4 and a metric report."""

    input: tyro.conf.Positional[Path]
    """The video to edit."""
    height: int = 512
    """Frame height to edit at (the width keeps the aspect ratio); rounded to the model's size multiple."""
    max_frames: Optional[int] = None
    """Edit only the first this many frames."""

    def main(self) -> None:
        config = self.editor_config()  # validates the schedule before anything is read or loaded
        if self.max_frames is not None and self.max_frames < 1:
            raise InputError(f"--max-frames {self.max_frames}: expected at least 1")
        count, fps, native = probe_video(self.input)
        count = min(count, self.max_frames or count)
        index = self.reference_index(count, "frame")
        output = self.output_path(self.input, self.input.with_name(f"{self.input.stem}_edited.mp4"))
        editor = AttentionInjectionEditor(config, self.device, field_name="--model")
        size = fit_size(native, self.height, editor.size_multiple)
        reference = next((f for i, f in enumerate(read_video(self.input, size)) if i == index), None)
        if reference is None:
            raise InputError(f"{self.input}: frame {index} cannot be read")
        frames = (to_tensor(frame) for frame in read_video(self.input, size, self.max_frames))
        writer = imageio_ffmpeg.write_frames(
            str(output), (size[1], size[0]), fps=fps, codec="libx264", quality=8, macro_block_size=1,
        )
        writer.send(None)  # start ffmpeg
        try:
            for edited in tqdm(editor.edit(frames, to_tensor(reference), self.prompt), total=count, unit="frame"):
                writer.send(np.ascontiguousarray(to_frame(edited)))
        finally:
            writer.close()
        print(f"Wrote {output} ({size[1]}x{size[0]}, reference frame {index})")
        pairs = zip(read_video(self.input, size, self.max_frames), read_video(output))
        self.report(pairs, output, temporal=True)


@dataclass(kw_only=True)
class EditPanorama(EditOptions):
    """Edit a wide image in overlapping windows fused in latent space at every step, against a shared reference."""

    input: tyro.conf.Positional[Path]
    """The panorama (any image file)."""
    window: int = 512
    """Side of the square windows in pixels (a multiple of the model's size multiple)."""
    overlap: float = 0.5
    """Least overlap of neighbouring windows, as a fraction of the window, in [0, 1)."""
    height: Optional[int] = None
    """Resize the panorama to this height first (the width keeps the aspect ratio)."""
    wrap: Literal["auto", "on", "off"] = "auto"
    """Whether the panorama covers 360 degrees, so that windows wrap across its ends: "auto" when it is 2:1."""

    def main(self) -> None:
        config = self.editor_config()
        if not 0.0 <= self.overlap < 1.0:
            raise InputError(f"--overlap {self.overlap}: expected a fraction in [0, 1)")
        panorama = read_image(self.input)
        if self.height:
            scale = self.height / panorama.shape[0]
            panorama = resize(panorama, (self.height, max(1, int(round(panorama.shape[1] * scale)))))
        height, width = panorama.shape[:2]
        if height < self.window or width < self.window:
            raise InputError(f"{self.input}: {width}x{height} is smaller than one {self.window}x{self.window} window")
        output = self.output_path(self.input, self.input.with_name(f"{self.input.stem}_edited.png"))
        editor = AttentionInjectionEditor(config, self.device, field_name="--model")
        if self.window % editor.size_multiple:
            raise InputError(f"--window {self.window}: expected a multiple of {editor.size_multiple} for this model")
        factor = editor.pipeline.vae_scale_factor
        size = fit_size((height, width), None, factor)  # the latent canvas needs sides in whole latent pixels
        wrap = self.wrap == "on" or (self.wrap == "auto" and is_full_circle(height, width))
        windows = PanoramaWindows.cover(size[0] // factor, size[1] // factor, self.window // factor, self.overlap, wrap)
        index = self.reference_index(len(windows.starts), "window")
        edited = edit_panorama(
            editor, to_tensor(resize(panorama, size)), self.prompt, self.window, self.overlap, wrap, index
        )
        result = resize(to_frame(edited), (height, width))
        Image.fromarray(result).save(output)
        print(f"Wrote {output} ({width}x{height}, {len(windows.starts)} windows, "
              f"{'wrapping around 360 degrees' if wrap else 'no wrap'})")
        ys, xs = (window_starts(side, self.window, self.overlap) for side in (height, width))
        pairs = [(crop(panorama, y, x, self.window), crop(result, y, x, self.window)) for y in ys for x in xs]
        self.report(iter(pairs), output, temporal=False, extra=lpips_report(pairs))


@dataclass(kw_only=True)
class EditImages(EditOptions):
    """Edit every image of a folder (views of a scene) against one reference view; writes a folder."""

    input: tyro.conf.Positional[Path]
    """The folder of images."""
    height: int = 512
    """Height to edit at; every view is edited and written at the reference view's aspect ratio, rounded to the
    model's size multiple."""

    def main(self) -> None:
        config = self.editor_config()
        paths = list_images(self.input)
        index = self.reference_index(len(paths), "image")
        reference = read_image(paths[index])
        output = self.output_path(self.input, self.input.with_name(f"{self.input.name}_edited"))
        output.mkdir(exist_ok=True)
        editor = AttentionInjectionEditor(config, self.device, field_name="--model")
        size = fit_size(reference.shape[:2], self.height, editor.size_multiple)
        images = (to_tensor(resize(read_image(path), size)) for path in paths)
        edits = editor.edit(images, to_tensor(resize(reference, size)), self.prompt)
        for path, edited in tqdm(zip(paths, edits), total=len(paths), unit="image"):
            Image.fromarray(to_frame(edited)).save(output / path.name)
        print(f"Wrote {len(paths)} edited images to {output} (reference {paths[index].name})")
        pairs = ((resize(read_image(path), size), read_image(output / path.name)) for path in paths)
        self.report(pairs, output, temporal=False)


@dataclass(kw_only=True)
class EditMetrics:
    """Metrics of an existing edit: two videos, two folders of images, or two images (scored in square windows)."""

    original: tyro.conf.Positional[Path]
    """The input that was edited."""
    edited: tyro.conf.Positional[Path]
    """The edited result."""
    prompt: str
    """The edit prompt (CLIP's target text)."""
    source_prompt: str = ""
    """A description of the original (CLIP's source text for the directional similarity)."""
    clip_model: str = CLIP_MODEL
    """CLIP model (hub id or local directory); the CLIP scores are skipped with a message when it is unavailable."""
    output: Optional[Path] = None
    """Also write the report as JSON here."""
    device: str = DEFAULT_DEVICE
    """Device to run CLIP on."""

    def pairs(self) -> Tuple[Iterator[Tuple[np.ndarray, np.ndarray]], bool]:
        """(original, edited) frame pairs with the original resized to the edit, and whether they are a sequence."""
        if self.original.is_dir() and self.edited.is_dir():
            names = [path.name for path in list_images(self.edited)]
            missing = [name for name in names if not (self.original / name).is_file()]
            if missing:
                raise InputError(f"{self.original}: has no {missing[0]} to compare with {self.edited / missing[0]}")
            images = ((read_image(self.edited / name), read_image(self.original / name)) for name in names)
            return ((resize(original, edited.shape[:2]), edited) for edited, original in images), False
        if self.original.suffix.lower() in IMAGE_SUFFIXES and self.edited.suffix.lower() in IMAGE_SUFFIXES:
            edited = read_image(self.edited)
            original = resize(read_image(self.original), edited.shape[:2])
            side = min(edited.shape[:2])  # CLIP sees square windows of a wide image, not one squashed frame
            ys, xs = (window_starts(length, side, 0.5) for length in edited.shape[:2])
            windows = [(y, x) for y in ys for x in xs]
            return ((crop(original, y, x, side), crop(edited, y, x, side)) for y, x in windows), False
        probe_video(self.original)
        _, _, size = probe_video(self.edited)
        return zip(read_video(self.original, size), read_video(self.edited)), True

    def main(self) -> None:
        pairs, temporal = self.pairs()
        clip = load_clip_or_skip(self.clip_model, self.device, "--clip-model")
        report = edit_metrics(pairs, self.prompt, self.source_prompt, clip, temporal)
        print(format_report(report))
        if self.output:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.output.write_text(json.dumps(report, indent=2) + "\n")
            print(f"Wrote the metric report to {self.output}")


@dataclass(kw_only=True)
class EditRunMetrics:
    """Metrics of an editing run (instruct4d, unified-edit): its original|edited videos scored per camera."""

    run: tyro.conf.Positional[Path]
    """The run directory (holding config.yml and edit_videos/), or its config.yml."""
    prompt: Optional[str] = None
    """CLIP's target text (default: the run's edit prompt)."""
    source_prompt: Optional[str] = None
    """CLIP's source text for the directional similarity (default: the run's source prompt)."""
    clip_model: str = CLIP_MODEL
    """CLIP model (hub id or local directory); the CLIP scores are skipped with a message when it is unavailable."""
    output: Optional[Path] = None
    """Also write the report as JSON here."""
    device: str = DEFAULT_DEVICE
    """Device to run CLIP on."""

    def main(self) -> None:
        run = self.run.parent if self.run.name == "config.yml" else self.run
        read_index(run)  # a wrong path fails before CLIP loads
        clip = load_clip_or_skip(self.clip_model, self.device, "--clip-model")
        report = run_metrics(run, clip, self.prompt, self.source_prompt)
        print(f"prompt: {report['prompt']}")
        sections = {**report["cameras"], **({"all cameras": report["all"]} if len(report["cameras"]) > 1 else {})}
        for name, section in sections.items():
            print(f"[{name}]\n{format_report(section)}")
        if self.output:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.output.write_text(json.dumps(report, indent=2) + "\n")
            print(f"Wrote the metric report to {self.output}")


Command = Union[
    Annotated[EditVideo, tyro.conf.subcommand("video")],
    Annotated[EditPanorama, tyro.conf.subcommand("panorama")],
    Annotated[EditImages, tyro.conf.subcommand("images")],
    Annotated[EditMetrics, tyro.conf.subcommand("metrics")],
    Annotated[EditRunMetrics, tyro.conf.subcommand("run")],
]


def entrypoint(args: Optional[Sequence[str]] = None) -> None:
    """``ns-4d-edit``; ``args`` replaces the command line (for tests)."""
    tyro.cli(Command, args=args).main()


if __name__ == "__main__":
    entrypoint()
