"""Converting 4Diffusion's original 4DM checkpoints to a :class:`~ns_4d_methods.guidance.four_dm.FourDMUNet`.

The original 4DM is built in three steps (aejion/4Diffusion ``model_zoo.build_model``): the ImageDream UNet
(``MultiViewUNetModel``) with motion modules inserted into its blocks; the ImageDream "ipmv" checkpoint loaded over
it with the spatial keys shifted past the inserted modules (``middle_block.2`` -> ``.3``, ``output_blocks.2.1`` ->
``2.2``, ``5.2`` -> ``5.3``, ``8.2`` -> ``8.3``); then ``4dm.ckpt["state_dict"]`` (a leading ``module.`` stripped)
loaded over that, non-strict, later keys winning. ``4dm.ckpt`` may hold the motion modules only or the whole
motion-inserted UNet; both are accepted.

The conversion, done with diffusers' own converters where they exist:

- spatial keys in ImageDream's layout (``4dm.ckpt``'s spatial keys, if any, moved back past the motion modules):
  ``camera_embed.{0,2}`` renamed to ``label_emb.0.{0,2}``, then diffusers'
  ``convert_ldm_unet_checkpoint(..., {"layers_per_block": L, "class_embed_type": "projection"})``; the
  image-prompt projections ``attn2.to_{k,v}_ip`` -> ``attn2.processor.to_{k,v}_ip.0``;
- the Resampler ``image_embed.*``: ``UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers``;
- motion modules (``*.temporal_transformer.*``): diffusers' AnimateDiff renames
  (``convert_animatediff_checkpoint_to_diffusers``: ``norms.0/1`` -> ``norm1/2``, ``ff_norm`` -> ``norm3``,
  ``attention_blocks.0/1`` -> ``attn1/2``), placed by
  :func:`~ns_4d_methods.guidance.motion_module.motion_module_placements`. Each original block has two fixed
  sinusoidal position tables, diffusers' block one shared table: the first is loaded, the second must equal it.

Bad input ends with one line (:class:`~ns_4d_methods.errors.InputError`): an unreadable file, a configuration this
composition cannot express, missing keys (count and first names), a shape mismatch (naming the key). Unexpected keys
(in a checkpoint, used by nothing) are reported by count and first names and skipped, as the original loads
non-strict.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple

import torch
import yaml
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers, convert_ldm_unet_checkpoint

from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.four_dm import CAMERA_DIM, FourDMUNet

UNET_PREFIX = "model.diffusion_model."
TEMPORAL = ".temporal_transformer."
SHOWN_KEYS = 5
StateDict = Dict[str, torch.Tensor]


def first_names(keys: Iterable[str], count: int = SHOWN_KEYS) -> str:
    keys = list(keys)
    return ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")


# ---------------------------------------------------------------- configuration
def read_unet_config(path: Path) -> Dict[str, Any]:
    """The original ``MultiViewUNetModel`` arguments from the official yaml (``model.params.unet_config.params``) or
    from a json/yaml holding a ``unet_config`` key (flat, or with ``params``)."""
    try:
        document = yaml.safe_load(Path(path).read_text())  # json is yaml
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise InputError(f"{path}: cannot read the UNet configuration ({type(error).__name__})") from error
    config = document
    for key in ("model", "params"):
        if isinstance(config, dict) and key in config and "unet_config" not in config:
            config = config[key]
    config = config.get("unet_config") if isinstance(config, dict) else None
    if isinstance(config, dict) and isinstance(config.get("params"), dict):
        config = config["params"]
    if not isinstance(config, dict) or "model_channels" not in config:
        raise InputError(
            f"{path}: expected 4Diffusion's model config (model.params.unet_config.params) or a json with a "
            "'unet_config' key holding the MultiViewUNetModel arguments"
        )
    return config


def four_dm_config(params: Dict[str, Any], source: Path) -> Dict[str, Any]:
    """:class:`FourDMUNet` arguments equivalent to the original ``MultiViewUNetModel(**params)``."""

    def require(name: str, expected: Any) -> None:
        if params.get(name, expected) != expected:
            raise InputError(f"{source}: unet_config.{name} is {params[name]!r}; 4DM here expects {expected!r}")

    for name, expected in [
        ("use_spatial_transformer", True), ("with_ip", True), ("ip_mode", "local_resample"), ("dims", 2),
        ("camera_dim", CAMERA_DIM), ("use_motion_module", True), ("motion_module_type", "Vanilla"),
        ("use_scale_shift_norm", False), ("resblock_updown", False), ("conv_resample", True),
        ("num_classes", None), ("disable_self_attentions", None), ("num_attention_blocks", None),
    ]:
        require(name, expected)
    for name in ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                 "attention_resolutions", "context_dim", "camera_dim", "ip_dim"):
        if name not in params:
            raise InputError(f"{source}: unet_config.{name} is missing")
    layers = params["num_res_blocks"]
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise InputError(f"{source}: unet_config.num_res_blocks {layers}: expected the same number at every level")
        layers = layers[0]
    motion = dict(params.get("motion_module_kwargs") or {})
    if list(motion.get("attention_block_types", ["Temporal_Self"] * 2)) != ["Temporal_Self"] * 2:
        raise InputError(
            f"{source}: unet_config.motion_module_kwargs.attention_block_types: expected two Temporal_Self"
        )
    if not motion.get("temporal_position_encoding", False) or motion.get("cross_frame_attention_mode") is not None:
        raise InputError(
            f"{source}: unet_config.motion_module_kwargs: expected temporal_position_encoding and no cross-frame mode"
        )
    channels = [params["model_channels"] * mult for mult in params["channel_mult"]]
    head_channels, heads = params.get("num_head_channels", -1), params.get("num_heads", -1)
    if head_channels == -1 and heads == -1:
        raise InputError(f"{source}: unet_config needs num_head_channels or num_heads")
    heads = [width // head_channels for width in channels] if head_channels != -1 else heads
    has_attention = [2**level in params["attention_resolutions"] for level in range(len(channels))]
    unet = dict(
        sample_size=params.get("image_size", 32),
        in_channels=params["in_channels"],
        out_channels=params["out_channels"],
        down_block_types=["CrossAttnDownBlock2D" if attn else "DownBlock2D" for attn in has_attention],
        up_block_types=["CrossAttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(has_attention)],
        block_out_channels=channels,
        layers_per_block=layers,
        cross_attention_dim=params["context_dim"],
        attention_head_dim=heads,  # diffusers' name for the number of heads (SD 2 convention)
        use_linear_projection=bool(params.get("use_linear_in_transformer", False)),
        transformer_layers_per_block=params.get("transformer_depth", 1),
        class_embed_type="projection",
        projection_class_embeddings_input_dim=params["camera_dim"],
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    return dict(
        unet_config=unet,
        image_tokens=params["ip_dim"],
        image_scale=float(params.get("ip_weight", 1.0)),
        motion_heads=motion.get("num_attention_heads", 8),
        motion_layers=motion.get("num_transformer_block", 2),
        motion_max_frames=motion.get("temporal_position_encoding_max_len", 24),
        motion_attention_dim_div=motion.get("temporal_attention_dim_div", 1),
    )


def ddim_settings(config_path: Path) -> Dict[str, Any]:
    """4Diffusion's noise schedule as ``DDIMScheduler`` arguments (its yaml's ``linear_start/end``, ``timesteps``
    when present, else SD's), with ImageDream's sampler settings."""
    document = yaml.safe_load(Path(config_path).read_text())
    params = (document.get("model") or {}).get("params") or {} if isinstance(document, dict) else {}
    return dict(
        num_train_timesteps=params.get("timesteps", 1000),
        beta_start=params.get("linear_start", 0.00085),
        beta_end=params.get("linear_end", 0.012),
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="epsilon",
    )


# ---------------------------------------------------------------- checkpoints
def read_checkpoint(path: Path, allow_pickle: bool = False) -> StateDict:
    """Tensors of a ``.pt``/``.ckpt``/``.safetensors`` checkpoint, unwrapped from a ``state_dict`` entry."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            content: Any = load_file(str(path))
        else:
            content = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as error:
        raise InputError(
            f"{path}: holds pickled objects besides tensors; if you trust the file, pass --allow-pickle"
        ) from error
    except Exception as error:  # torch.load raises anything for a file that is not a checkpoint
        raise InputError(f"{path}: not a readable checkpoint ({type(error).__name__})") from error
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    tensors = {key: value for key, value in content.items() if isinstance(value, torch.Tensor)} if isinstance(
        content, dict
    ) else {}
    if not tensors:
        raise InputError(f"{path}: expected a state dict of tensors")
    return tensors


def strip_prefix(key: str, *prefixes: str) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def unshift_past_motion_modules(key: str, motion_slots: Dict[str, int]) -> str:
    """A spatial key of the motion-inserted UNet -> its key in ImageDream's layout (4Diffusion's shift undone)."""
    parts = key.split(".")
    block_len = 1 if parts[0] == "middle_block" else 2
    block, index = ".".join(parts[:block_len]), parts[block_len] if len(parts) > block_len else ""
    slot = motion_slots.get(block)
    if slot is not None and index.isdigit() and int(index) > slot:
        parts[block_len] = str(int(index) - 1)
    return ".".join(parts)


@dataclass
class Conversion:
    """Converted weights and what was left over."""

    state_dict: StateDict
    """``FourDMUNet`` state dict."""
    sources: Dict[str, str] = field(default_factory=dict)
    """Converted key -> original key, for messages."""
    unexpected: List[str] = field(default_factory=list)
    """Original keys that nothing used."""


def convert_4dm_checkpoints(
    imagedream: StateDict, four_dm: StateDict, model: FourDMUNet, names: Tuple[str, str]
) -> Conversion:
    """Original ImageDream + ``4dm.ckpt`` state dicts -> a ``FourDMUNet`` state dict (not yet loaded).

    ``names`` are the two files' names for messages.
    """
    imagedream_name, four_dm_name = names
    unet_keys = {key[len(UNET_PREFIX):]: value for key, value in imagedream.items() if key.startswith(UNET_PREFIX)}
    if not unet_keys:
        raise InputError(f"{imagedream_name}: no '{UNET_PREFIX}*' keys: expected ImageDream's ipmv checkpoint")
    spatial = {key: value for key, value in unet_keys.items() if TEMPORAL not in key}
    motion_from_imagedream = [UNET_PREFIX + key for key in unet_keys if TEMPORAL in key]
    motion_slots = {p.original.rsplit(".", 1)[0]: int(p.original.rsplit(".", 1)[1]) for p in model.placements}
    motion: StateDict = {}
    for key, value in four_dm.items():
        key = strip_prefix(key, "module.", UNET_PREFIX)
        if TEMPORAL in key:
            motion[key] = value
        else:  # a whole-UNet 4dm.ckpt: its spatial weights win
            spatial[unshift_past_motion_modules(key, motion_slots)] = value

    converted = Conversion(state_dict={})
    spatial_unused = _convert_spatial(spatial, model, imagedream_name, converted)
    motion_unused = _convert_motion(motion, model, four_dm_name, converted)
    converted.unexpected = motion_from_imagedream + spatial_unused + motion_unused
    return converted


def _convert_spatial(spatial: StateDict, model: FourDMUNet, source: str, converted: Conversion) -> List[str]:
    """ImageDream-layout keys -> ``unet.*`` and ``image_projection.*``; returns the keys nothing used."""
    renamed = {}
    for key, value in spatial.items():
        if key.startswith("camera_embed."):
            key = key.replace("camera_embed.", "label_emb.0.", 1)
        renamed[key] = value
    resampler = {strip_prefix(k, "image_embed."): v for k, v in renamed.items() if k.startswith("image_embed.")}
    layers = {k: v for k, v in renamed.items() if not k.startswith("image_embed.")}
    original_of = {id(value): key for key, value in layers.items()}
    config = {"layers_per_block": model.unet.config.layers_per_block, "class_embed_type": "projection"}
    try:
        unet = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in layers.items()}, config)
    except KeyError as error:
        raise InputError(f"{source}: missing key '{UNET_PREFIX}{error.args[0]}'") from error
    for key, value in unet.items():
        key = key.replace(".attn2.to_k_ip.", ".attn2.processor.to_k_ip.0.").replace(
            ".attn2.to_v_ip.", ".attn2.processor.to_v_ip.0."
        )
        converted.state_dict["unet." + key] = value
        converted.sources["unet." + key] = original_of.get(id(value), key).replace("label_emb.0.", "camera_embed.")
    used = {id(value) for value in unet.values()}
    unused = [UNET_PREFIX + key for key, value in layers.items() if id(value) not in used]

    if not resampler:
        raise InputError(f"{source}: no '{UNET_PREFIX}image_embed.*' keys: expected ImageDream's Resampler")
    try:
        projection = model.unet._convert_ip_adapter_image_proj_to_diffusers(resampler, low_cpu_mem_usage=False)
    except (KeyError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{source}: the Resampler '{UNET_PREFIX}image_embed.*' does not convert: {reason}") from error
    for key, value in projection.state_dict().items():
        converted.state_dict["image_projection." + key] = value
        converted.sources["image_projection." + key] = f"image_embed.* ({key})"
    return [key.replace("label_emb.0.", "camera_embed.") for key in unused]


def _convert_motion(motion: StateDict, model: FourDMUNet, source: str, converted: Conversion) -> List[str]:
    """Motion-module keys (4Diffusion's layout) -> ``motion_modules.{i}.*``; returns the keys nothing used."""
    index_of = {placement.original: index for index, placement in enumerate(model.placements)}
    unused = []
    by_module: Dict[int, StateDict] = {}
    for key, value in motion.items():
        module = key.split(TEMPORAL, 1)[0]
        if module not in index_of:
            unused.append(key)
            continue
        by_module.setdefault(index_of[module], {})[key] = value
    for index, weights in by_module.items():
        original = model.placements[index].original
        for key, value in convert_animatediff_checkpoint_to_diffusers(weights).items():
            name = f"motion_modules.{index}." + strip_prefix(key, original + ".")
            converted.state_dict[name] = value
            converted.sources[name] = key.replace(original + ".", original + TEMPORAL, 1)
        for key, value in weights.items():  # fixed sinusoids: diffusers' block shares one between its attentions
            if "attention_blocks.0.pos_encoder.pe" in key:
                block = key.split(TEMPORAL, 1)[1].split(".attention_blocks.", 1)[0]
                name = f"motion_modules.{index}.{block}.pos_embed.pe"
                converted.state_dict[name] = value
                converted.sources[name] = key
                second = weights.get(key.replace("attention_blocks.0.", "attention_blocks.1."))
                if second is not None and (second.shape != value.shape or not torch.equal(second, value)):
                    raise InputError(
                        f"{source}: '{key.replace('attention_blocks.0.', 'attention_blocks.1.')}' differs from "
                        "'...attention_blocks.0.pos_encoder.pe': expected the same sinusoidal table"
                    )
    return unused


def load_converted(model: FourDMUNet, conversion: Conversion) -> None:
    """Load converted weights into ``model``: every parameter and buffer must be provided, in its shape."""
    expected = model.state_dict()
    mismatched = [
        key for key, value in conversion.state_dict.items() if key in expected and value.shape != expected[key].shape
    ]
    if mismatched:
        key = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise InputError(
            f"shape mismatch at '{conversion.sources.get(key, key)}' (-> {key}): checkpoint "
            f"{tuple(conversion.state_dict[key].shape)}, model {tuple(expected[key].shape)}{more}; does --unet-config "
            "describe this checkpoint?"
        )
    missing = [key for key in expected if key not in conversion.state_dict]
    if missing:
        raise InputError(
            f"the checkpoints lack {len(missing)} of the model's {len(expected)} weights: {first_names(missing)}"
        )
    unknown = [conversion.sources.get(key, key) for key in conversion.state_dict if key not in expected]
    conversion.unexpected.extend(unknown)
    model.load_state_dict({key: value for key, value in conversion.state_dict.items() if key in expected}, strict=True)


def convert_4dm(
    unet_config: Path, imagedream: Path, four_dm: Path, allow_pickle: bool = False
) -> Tuple[FourDMUNet, List[str]]:
    """Build a fp32 ``FourDMUNet`` from the original files; returns it and the unexpected original keys."""
    model = FourDMUNet(**four_dm_config(read_unet_config(unet_config), unet_config))
    conversion = convert_4dm_checkpoints(
        read_checkpoint(imagedream, allow_pickle),
        read_checkpoint(four_dm, allow_pickle),
        model,
        (str(imagedream), str(four_dm)),
    )
    load_converted(model, conversion)
    return model.eval(), conversion.unexpected


# ---------------------------------------------------------------- parity with outputs saved from the original code
REFERENCE_KEYS = (
    "x", "t", "context", "camera", "ip_per_frame", "ip_img", "eps_4dm", "eps_4dm_uncond", "eps_imagedream"
)


def read_reference(path: Path, model: FourDMUNet) -> Dict[str, torch.Tensor]:
    """A reference file (inputs and the original's outputs, see ``shared/fixtures/4dm_tiny/SOURCE.md``), checked
    against the model's sizes."""
    try:
        reference = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(f"{path}: not a readable reference file ({type(error).__name__})") from error
    if not isinstance(reference, dict) or not all(isinstance(reference.get(k), torch.Tensor) for k in REFERENCE_KEYS):
        raise InputError(f"{path}: expected a dict of tensors with the keys {', '.join(REFERENCE_KEYS)}")
    shapes = {key: tuple(reference[key].shape) for key in REFERENCE_KEYS}
    views, config = model.config.num_views, model.unet.config
    clip_dim = model.image_projection.proj_in.in_features
    if len(shapes["ip_per_frame"]) != 3 or shapes["ip_per_frame"][2] != clip_dim:
        raise InputError(
            f"{path}: 'ip_per_frame' has shape {shapes['ip_per_frame']}; expected (frames, tokens, {clip_dim})"
        )
    frames = shapes["ip_per_frame"][0]
    total, latent = frames * views, shapes["x"][2:]
    factor = 2 ** (len(config.block_out_channels) - 1)
    if len(latent) != 2 or latent[0] % factor or latent[1] % factor:
        raise InputError(
            f"{path}: 'x' has shape {shapes['x']}: expected latents [N, C, h, w], h and w divisible by {factor}"
        )
    expected = {
        "x": (total, config.in_channels) + latent,
        "t": (total,),
        "context": (total,) + shapes["context"][1:2] + (config.cross_attention_dim,),
        "camera": (total, CAMERA_DIM),
        "ip_img": (frames, config.in_channels) + latent,
        "eps_4dm": (total, config.out_channels) + latent,
        "eps_4dm_uncond": (total, config.out_channels) + latent,
        "eps_imagedream": (views, config.out_channels) + latent,
    }
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise InputError(
                f"{path}: '{key}' has shape {shapes[key]}; expected {shape} for {frames} time steps x {views} views "
                "of this model"
            )
    return reference


@torch.no_grad()
def reference_differences(
    model: FourDMUNet, reference: Dict[str, torch.Tensor], device: str = "cpu"
) -> Dict[str, float]:
    """Max abs differences between the model's outputs and the original's on the reference inputs (fp32).

    As in 4Diffusion's guidance: conditional and unconditional branches in one batch of ``2 x frames x views``
    (unconditional: zero CLIP tokens and a zero image latent), each time step's image latent written into its
    image-prompt slot; ``eps_imagedream``: the UNet without motion modules on the first time step's views.
    """
    views = model.config.num_views
    inputs = {key: value.to(device) for key, value in reference.items()}
    frames = inputs["ip_per_frame"].shape[0]
    clip = inputs["ip_per_frame"].repeat_interleave(views, dim=0)
    cond, uncond = inputs["x"].clone(), inputs["x"].clone()
    cond[views - 1 :: views] = inputs["ip_img"]
    uncond[views - 1 :: views] = 0.0
    if model.dtype != torch.float32:
        raise ValueError("parity is checked in fp32")
    model = model.to(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 parity, not TF32
    try:
        eps = model(
            torch.cat([cond, uncond]),
            inputs["t"].repeat(2),
            inputs["context"].repeat(2, 1, 1),
            inputs["camera"].repeat(2, 1),
            torch.cat([clip, torch.zeros_like(clip)]),
            num_frames=frames,
        )
        first = slice(0, views)
        eps_imagedream = model(
            cond[first], inputs["t"][first], inputs["context"][first], inputs["camera"][first], clip[first]
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    eps_cond, eps_uncond = eps.chunk(2)
    return {
        "eps_4dm": (eps_cond - inputs["eps_4dm"]).abs().max().item(),
        "eps_4dm_uncond": (eps_uncond - inputs["eps_4dm_uncond"]).abs().max().item(),
        "eps_imagedream": (eps_imagedream - inputs["eps_imagedream"]).abs().max().item(),
    }
