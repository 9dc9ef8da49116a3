"""``ns-4d-convert``: turn original research checkpoints into directories the suite loads.

``ns-4d-convert 4dm --unet-config FILE --imagedream FILE --motion FILE --output DIR`` converts 4Diffusion's 4DM
(:mod:`ns_4d_methods.guidance.four_dm_conversion`): ``FILE`` for ``--unet-config`` is 4Diffusion's
``sd_v2_base_ipmv.yaml`` (or a json with a ``unet_config`` key), ``--imagedream`` ImageDream's
``sd-v2.1-base-4view-ipmv.pt``, ``--motion`` 4Diffusion's ``4dm.ckpt``. The other parts of the 4DM prior are copied
in when given (hub ids or local directories; each may be left out, e.g. to check a UNet conversion):

- ``--vae`` and ``--text-encoder``: a Stable Diffusion 2.1 pipeline (default layout: ``stabilityai/
  stable-diffusion-2-1-base``, read from its ``vae/``, ``text_encoder/`` and ``tokenizer/``); a local directory may
  also be the bare model (and tokenizer);
- ``--image-encoder``: OpenCLIP ViT-H-14 as a transformers CLIP model with its image processor
  (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, read from its root; a local directory may have ``image_encoder/`` and
  ``feature_extractor/`` subfolders instead).

Output directory (each part written with ``save_pretrained``, loadable one by one with
``model_loading.load_pretrained_model(cls, DIR, field, device, subfolder=...)``, as
:class:`~ns_4d_methods.guidance.four_dm_prior.FourDMPrior` does)::

    DIR/unet/               FourDMUNet: the multi-view UNet with camera and image-prompt inputs and motion modules
    DIR/scheduler/          DDIMScheduler with 4Diffusion's schedule (scaled_linear 0.00085-0.012, steps_offset 1,
                            no clipping, set_alpha_to_one False)
    DIR/vae/                AutoencoderKL                          (with --vae)
    DIR/text_encoder/       CLIPTextModel (SD 2.1)                 (with --text-encoder)
    DIR/tokenizer/          CLIPTokenizer                          (with --text-encoder)
    DIR/image_encoder/      CLIPVisionModel (ViT-H-14)             (with --image-encoder)
    DIR/feature_extractor/  CLIPImageProcessor                     (with --image-encoder)

``--verify REFERENCE_IO`` runs the converted UNet (fp32) on inputs saved from the original code (the format of
``shared/fixtures/4dm_tiny/reference_io.pt``) and prints the max abs difference of each saved output; the command
fails above ``--tolerance``. Everything is converted and checked before anything is written; the directory appears
only complete. Inputs are only read.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import tyro

from ns_4d_methods.errors import InputError


def part_location(name_or_path: str, subfolder: str, hub_subfolder: Optional[str]) -> dict:
    """``from_pretrained`` location of one part: a local directory's ``subfolder`` if it has one, else the directory
    itself; on the hub, ``hub_subfolder`` (None: the repository's root)."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return {"subfolder": subfolder} if (local / subfolder).is_dir() else {}
    return {"subfolder": hub_subfolder} if hub_subfolder else {}


@dataclass(kw_only=True)
class Convert4DM:
    """Convert 4Diffusion's 4DM (ImageDream ipmv UNet + 4dm.ckpt motion modules) to a directory the 4diffusion
    method loads."""

    unet_config: Path
    """4Diffusion's model config (sd_v2_base_ipmv.yaml) or a json with a 'unet_config' key (MultiViewUNetModel args)."""
    imagedream: Path
    """ImageDream's UNet checkpoint, sd-v2.1-base-4view-ipmv.pt (keys model.diffusion_model.*)."""
    motion: Path
    """4Diffusion's 4dm.ckpt: the motion modules or the whole motion-inserted UNet, with or without 'module.'."""
    output: Path
    """The directory to create (must not exist, or be empty)."""
    vae: Optional[str] = None
    """Stable Diffusion 2.1 pipeline (hub id, read from vae/) or local directory holding the VAE."""
    text_encoder: Optional[str] = None
    """Stable Diffusion 2.1 pipeline (hub id, read from text_encoder/ and tokenizer/) or local directory."""
    image_encoder: Optional[str] = None
    """CLIP ViT-H-14 (hub id such as laion/CLIP-ViT-H-14-laion2B-s32B-b79K, or local directory) and its processor."""
    verify: Optional[Path] = None
    """A reference file of inputs and outputs saved from the original code, to check the converted UNet against."""
    tolerance: float = 1e-4
    """Largest max abs difference --verify accepts."""
    device: str = "cpu"
    """Device for --verify (fp32 either way)."""
    allow_pickle: bool = False
    """Load checkpoints that hold pickled Python objects besides tensors (only for files you trust)."""

    def main(self) -> None:
        inputs = {"--unet-config": self.unet_config, "--imagedream": self.imagedream, "--motion": self.motion}
        for flag, path in {**inputs, "--verify": self.verify}.items():
            if path is not None and not path.is_file():
                raise InputError(f"{flag} {path}: no such file")
        if self.output.exists() and (not self.output.is_dir() or any(self.output.iterdir())):
            raise InputError(f"--output {self.output}: exists and is not an empty directory; choose a new one")
        # the model stack is imported only now, so that a mistyped argument fails at once
        from ns_4d_methods.guidance.four_dm_conversion import convert_4dm, first_names

        unet, unexpected = convert_4dm(self.unet_config, self.imagedream, self.motion, self.allow_pickle)
        if unexpected:
            print(f"ignored {len(unexpected)} unexpected checkpoint keys: {first_names(unexpected)}")
        motion = sum(p.numel() for p in unet.motion_modules.parameters())
        print(f"converted 4DM: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters "
              f"({motion / 1e6:.1f} M in {len(unet.motion_modules)} motion modules)")
        if self.verify is not None:
            self.check(unet)
        parts = self.load_parts()
        self.write(unet, parts)

    def check(self, unet) -> None:
        from ns_4d_methods.guidance.four_dm_conversion import read_reference, reference_differences

        differences = reference_differences(unet, read_reference(self.verify, unet), self.device)
        for name, difference in differences.items():
            print(f"{name:16s} max abs difference {difference:.3e}")
        failed = [name for name, difference in differences.items() if not difference <= self.tolerance]
        if failed:
            raise InputError(
                f"--verify {self.verify}: {', '.join(failed)} differ from the original's outputs by more than "
                f"--tolerance {self.tolerance:g} (max {max(differences[name] for name in failed):.3e})"
            )

    def load_parts(self) -> dict:
        """The optional encoders, loaded (fp32, CPU) before anything is written."""
        import torch
        from diffusers import AutoencoderKL
        from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModel

        from ns_4d_methods.guidance.model_loading import from_pretrained_or_fail, load_pretrained_model

        parts = {}
        fp32 = dict(device="cpu", dtype=torch.float32)
        if self.vae:
            parts["vae"] = load_pretrained_model(
                AutoencoderKL, self.vae, "--vae", **fp32, **part_location(self.vae, "vae", "vae")
            )
        if self.text_encoder:
            name = self.text_encoder
            parts["text_encoder"] = load_pretrained_model(
                CLIPTextModel, name, "--text-encoder", **fp32, **part_location(name, "text_encoder", "text_encoder")
            )
            parts["tokenizer"] = from_pretrained_or_fail(
                CLIPTokenizer, name, "--text-encoder", **part_location(name, "tokenizer", "tokenizer")
            )
        if self.image_encoder:
            name = self.image_encoder
            parts["image_encoder"] = load_pretrained_model(
                CLIPVisionModel, name, "--image-encoder", **fp32, **part_location(name, "image_encoder", None)
            )
            parts["feature_extractor"] = from_pretrained_or_fail(
                CLIPImageProcessor, name, "--image-encoder", **part_location(name, "feature_extractor", None)
            )
        return parts

    def write(self, unet, parts: dict) -> None:
        from diffusers import DDIMScheduler

        from ns_4d_methods.guidance.four_dm_conversion import ddim_settings

        partial = self.output.parent / f".{self.output.name}.partial-{os.getpid()}"
        self.output.parent.mkdir(parents=True, exist_ok=True)
        try:
            unet.save_pretrained(partial / "unet")
            DDIMScheduler(**ddim_settings(self.unet_config)).save_pretrained(partial / "scheduler")
            for name, part in parts.items():
                part.save_pretrained(partial / name)
            if self.output.exists():
                self.output.rmdir()
            partial.rename(self.output)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        print(f"wrote {', '.join(['unet', 'scheduler', *parts])} to {self.output}")


def entrypoint(args: Optional[Sequence[str]] = None) -> None:
    """``ns-4d-convert``; ``args`` replaces the command line (for tests)."""
    tyro.extras.subcommand_cli_from_dict({"4dm": Convert4DM}, args=args).main()


if __name__ == "__main__":
    entrypoint()
