"""A single-file 4D splat in splaTV's ``.splatv`` layout (antimatter15/splaTV, the web viewer of Spacetime
Gaussians), baked from a deformable-Gaussian model.

Layout (as splaTV's ``hybrid.js`` writes and reads it): a little-endian uint32 magic ``0x674b``, a uint32 byte length
of a UTF-8 JSON header, the header (a list of chunks; here one ``{"type": "splat", "size", "texwidth", "texheight",
"cameras"}``), then the chunk: an RGBA32UI texture of ``texwidth`` x ``texheight`` pixels, 4 pixels (16 uint32) per
Gaussian, 1024 Gaussians per row. Per Gaussian: [0:3] float32 centre at the Gaussian's time centre; [3:5] half
quaternion (w, x, y, z); [5:7] half scales (activated) and a pad; [7] RGBA bytes (opacity in A); [8:13] nine half
motion coefficients, ``p(t) = centre + m[0:3] dt + m[3:6] dt^2 + m[6:9] dt^3``, ``dt = t - trbf_center``; [13:15] half
quaternion velocity, ``q(t) = q + omega dt`` (then normalised); [15] half (trbf_center, trbf_scale): the opacity is
multiplied by ``exp(-(dt / trbf_scale)^2)`` and a Gaussian under 0.02 of it is not drawn. Time runs over [0, 1].

Baking: the deformation MLP is sampled at ``samples`` times in [0, 1]. One cubic cannot follow much motion (on
the sample scene, whose spheres bounce and orbit once over [0, 1], a single cubic per Gaussian gave 19.8 dB at
worst against the MLP renders), so each Gaussian is written as ``segments`` copies centred at evenly spaced times,
each with a temporal radial basis of ``overlap`` times the spacing, its centres fitted by a cubic and its quaternion
by a line in dt, by least squares weighted by its temporal factor (Spacetime Gaussians' own Gaussians live over
short times in the same way). The copies' opacities are fitted so that, composited, they give the model's opacity
at every sample. Scales and colours are static in the format: the scales are the (weighted) geometric mean, the
colour the view-independent (SH DC) one. With ``segments`` 1 a Gaussian is one copy centred at 0.5 with no fade,
or, when its opacity varies, a temporal radial basis fitted at its most opaque time.

Measured on the sample scene (3,000 Gaussians on the spheres, deformation fitted to their motion, 64 px renders at
6 times; worst / mean PSNR against the MLP renders): 1 segment 19.8 / 23.4 dB; 4 segments (overlap 0.6) 32.2 /
36.2; 8 segments: overlap 0.6 34.6 / 43.9, 0.7 36.9 / 39.1, 0.8 35.9 / 37.9; 12 segments (0.7) 38.9 / 40.0;
16 segments (0.6) 46.8 / 52.3. The file grows with the segments (64 bytes per Gaussian per segment).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor

from ns_4d_methods.export.deformed_gaussians import Gaussians, active_sh_degree, gaussians_at, render_gaussians
from ns_4d_methods.models.splatfacto_4d import Splatfacto4DModel

MAGIC = 0x674B
GAUSSIANS_PER_ROW = 1024
"""splaTV's shader addresses a Gaussian's texels as ((index & 0x3ff) << 2 | k, index >> 10)."""
NO_FADE = 65504.0
"""Largest half float: a trbf_scale at which the opacity does not fade over [0, 1]."""
MIN_TEMPORAL_OPACITY = 0.02
"""splaTV skips a Gaussian whose temporal opacity factor is below this."""
SH_C0 = 0.28209479177387814
DEFAULT_SEGMENTS = 8
"""Copies of each Gaussian over [0, 1] (module docstring: 36.9 dB at worst on the sample scene with 8)."""
DEFAULT_OVERLAP = 0.7
"""Temporal scale of a copy's radial basis in spacings between copy centres (0.6-0.8 measured; 0.7 best at 8)."""


@dataclass
class Splatv:
    """The per-Gaussian arrays of a ``.splatv`` file (float32 views of what it stores) and its header."""

    centres: np.ndarray
    """[N, 3] centres at the time centre."""
    quats: np.ndarray
    """[N, 4] (w, x, y, z) at the time centre, not normalised."""
    scales: np.ndarray
    """[N, 3] activated scales."""
    rgba: np.ndarray
    """[N, 4] uint8 colour and opacity."""
    motion: np.ndarray
    """[N, 9] polynomial coefficients of dt, dt^2, dt^3 (three per order)."""
    omega: np.ndarray
    """[N, 4] quaternion velocity."""
    trbf: np.ndarray
    """[N, 2] time centre and temporal scale."""
    header: Dict

    def positions_at(self, time: float) -> np.ndarray:
        """[N, 3] centres at ``time``, as splaTV's shader evaluates them."""
        dt = (time - self.trbf[:, :1]).astype(np.float32)
        m = self.motion
        return self.centres + m[:, 0:3] * dt + m[:, 3:6] * dt**2 + m[:, 6:9] * dt**3

    def visibility(self, time: float) -> np.ndarray:
        """[N] temporal opacity factor at ``time``: exp(-(dt / trbf_scale)^2), 0 where splaTV does not draw."""
        fade = np.exp(-(((time - self.trbf[:, 0]) / self.trbf[:, 1]) ** 2))
        return np.where(fade < MIN_TEMPORAL_OPACITY, 0.0, fade)

    def gaussians_at(self, time: float) -> Gaussians:
        """The Gaussians splaTV draws at ``time`` (colours as logits: render them with ``sh_degree`` None)."""
        dt = (time - self.trbf[:, :1]).astype(np.float32)
        quats = torch.from_numpy(self.quats + self.omega * dt)
        opacity = self.rgba[:, 3] / 255.0 * self.visibility(time)
        rgb = torch.from_numpy(self.rgba[:, :3] / 255.0).float()
        return Gaussians(
            means=torch.from_numpy(self.positions_at(time)).float(),
            quats=torch.nn.functional.normalize(quats.float(), dim=-1),
            scales=torch.from_numpy(self.scales).float(),
            opacities=torch.from_numpy(opacity).float(),
            sh=torch.logit(rgb, eps=1e-4)[:, None],
        )


@dataclass
class BakeReport:
    """How far the baked polynomials are from the deformation MLP."""

    position_rms: float
    """RMS distance (scene units) between baked and MLP centres over all Gaussians and sample times, each baked
    Gaussian weighted by its temporal opacity factor there (a segment's copy counts where it is drawn)."""
    position_rms_relative: float
    """position_rms over the scene size (the diagonal of the Gaussians' bounding box)."""
    psnr_min: float
    """Lowest PSNR (dB) of a baked render against the MLP render, over the cameras given (inf without cameras)."""
    psnr_mean: float
    """Mean of those PSNRs."""


Samples = Union[int, Sequence[Gaussians]]
"""A number of evenly spaced times in [0, 1] (both ends included) at which to evaluate the deformation, or the model's
Gaussians at such times from :func:`sample_deformation` (the export evaluates it once for the bake and its report)."""


def sample_deformation(model: Splatfacto4DModel, samples: Samples) -> List[Gaussians]:
    """The model's Gaussians at ``samples`` evenly spaced times in [0, 1] (given ones are passed through)."""
    if not isinstance(samples, int):
        return list(samples)
    return [gaussians_at(model, float(t)) for t in torch.linspace(0.0, 1.0, samples, dtype=torch.float64)]


def bake(model: Splatfacto4DModel, samples: Samples = 64, segments: int = DEFAULT_SEGMENTS,
         overlap: float = DEFAULT_OVERLAP) -> Splatv:
    """Bakes the model's deformation into splaTV's per-Gaussian polynomials (module docstring): ``segments`` copies
    of each Gaussian, each fitted over its own part of [0, 1] from ``samples`` of the deformation, with a temporal
    radial basis of scale ``overlap / (segments - 1)`` that hands over to the next copy."""
    frames = sample_deformation(model, samples)
    times = torch.linspace(0.0, 1.0, len(frames), dtype=torch.float64)
    means = torch.stack([g.means for g in frames], 1).double()  # [N, T, 3]
    quats = torch.stack([g.quats for g in frames], 1).double()  # [N, T, 4]
    opacities = torch.stack([g.opacities for g in frames], 1).double()  # [N, T]
    log_scales = torch.stack([torch.log(g.scales) for g in frames], 1).double()
    n = means.shape[0]
    if segments == 1:
        centre, trbf_scale, peak_opacity = _single_window(opacities, times)
        window = lambda c: torch.ones_like(times)  # noqa: E731  (no fade inside [0, 1])
    else:
        # copies centred at evenly spaced times from 0 to 1, so that both ends are covered by a window's middle
        centres = torch.linspace(0.0, 1.0, segments, dtype=torch.float64)
        centre = centres.repeat_interleave(n)  # [S * N]: copy j is Gaussian j % N
        trbf_scale = torch.full_like(centre, overlap / (segments - 1))

        def window(c: Tensor) -> Tensor:
            w = torch.exp(-(((times - c) / (overlap / (segments - 1))) ** 2))
            return torch.where(w < MIN_TEMPORAL_OPACITY, 0.0, w)  # splaTV does not draw those

        peak_opacity = _copy_opacities(opacities, torch.stack([window(c) for c in centres])).reshape(-1)
    # weighted least squares (rows scaled by sqrt(weight)), one solve for all copies sharing a time centre
    m = len(centre)
    position_fit, rotation_fit = torch.empty(m, 4, 3, dtype=torch.float64), torch.empty(m, 2, 4, dtype=torch.float64)
    scales = torch.empty(m, 3, dtype=torch.float64)
    for c in centre.unique():
        rows = (centre == c).nonzero()[:, 0]
        source = rows % n
        weight = window(c)
        root, dt = weight.sqrt()[:, None], times - c
        cubic = torch.stack([torch.ones_like(dt), dt, dt**2, dt**3], -1) * root  # [T, 4]
        position_fit[rows] = _solve(cubic, means[source] * root)
        rotation_fit[rows] = _solve(cubic[:, :2], quats[source] * root)
        scales[rows] = torch.exp((weight[None, :, None] * log_scales[source]).sum(1) / weight.sum())

    sh_degree = active_sh_degree(model)
    dc = frames[0].sh[:, 0].repeat(segments, 1)
    rgb = torch.sigmoid(dc) if sh_degree is None else (dc * SH_C0 + 0.5)
    rgba = torch.cat([rgb, peak_opacity.float()[:, None]], -1).clamp(0, 1) * 255 + 0.5
    half = lambda x: x.float().numpy().astype(np.float16).astype(np.float32)  # noqa: E731  (what the file keeps)
    return Splatv(
        centres=position_fit[:, 0].float().numpy(),
        quats=half(rotation_fit[:, 0]),
        scales=half(scales),
        rgba=rgba.to(torch.uint8).numpy(),
        motion=half(position_fit[:, 1:].reshape(m, 9)),
        omega=half(rotation_fit[:, 1]),
        trbf=half(torch.stack([centre, trbf_scale], -1)),
        header={},
    )


def _solve(design: Tensor, values: Tensor) -> Tensor:
    """Least-squares coefficients [R, P, D] of ``design`` [T, P] for the R series ``values`` [R, T, D] at once."""
    r, t, d = values.shape
    solution = torch.linalg.lstsq(design, values.transpose(0, 1).reshape(t, r * d)).solution
    return solution.reshape(design.shape[1], r, d).transpose(0, 1)


def _copy_opacities(opacities: Tensor, windows: Tensor, steps: int = 200) -> Tensor:
    """Opacities [S, N] of S copies of N Gaussians drawn with temporal factors ``windows`` [S, T] such that,
    composited, they match the Gaussians' ``opacities`` [N, T]: least squares on 1 - prod_k (1 - a_k w_k(t)).
    Gaussians whose opacity does not change share one fit per opacity byte (the file keeps a byte)."""
    varies = (opacities.max(1).values - opacities.min(1).values) > 1e-3
    levels, inverse = (opacities[~varies].mean(1) * 255).round().unique(return_inverse=True)
    targets = torch.cat([(levels / 255)[:, None].expand(-1, opacities.shape[1]), opacities[varies]])
    with torch.enable_grad():
        logits = torch.logit(targets.mean(1).clamp(1e-4, 1 - 1e-4)).repeat(len(windows), 1).requires_grad_(True)
        optimizer = torch.optim.Adam([logits], lr=0.1)
        for _ in range(steps):
            composite = 1 - torch.prod(1 - torch.sigmoid(logits)[..., None] * windows[:, None], dim=0)
            loss = ((composite - targets) ** 2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    fitted = torch.sigmoid(logits).detach()
    result = torch.empty(len(windows), len(opacities), dtype=fitted.dtype)
    result[:, ~varies] = fitted[:, : len(levels)][:, inverse]
    result[:, varies] = fitted[:, len(levels) :]
    return result


def _single_window(opacities: Tensor, times: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Time centre, temporal scale and peak opacity [N] of Gaussians baked whole: a Gaussian whose opacity varies
    gets opacity(t) = a exp(-(dt / s)^2) fitted at its most opaque time (a the peak, 1 / s^2 the least-squares slope
    of -log(opacity / a) in dt^2); the others centre 0.5 and no fade."""
    n = len(opacities)
    varies = (opacities.max(1).values - opacities.min(1).values) > 1e-3
    centre = torch.where(varies, times[opacities.argmax(1)], torch.full((n,), 0.5, dtype=torch.float64))
    dt = times[None, :] - centre[:, None]
    peak = opacities.max(1).values
    fall = -torch.log((opacities / peak[:, None]).clamp_min(1e-6))
    inv_scale2 = (fall * dt**2).sum(1) / (dt**4).sum(1).clamp_min(1e-12)
    fades = varies & (inv_scale2 > 0)
    scale = torch.where(fades, inv_scale2.clamp_min(1e-12).rsqrt(), torch.tensor(NO_FADE, dtype=torch.float64))
    return centre, scale, peak


def bake_report(model: Splatfacto4DModel, baked: Splatv, cameras: Cameras, samples: Samples = 32) -> BakeReport:
    """Compares ``baked`` with the model: centres at the ``samples`` times in [0, 1], and renders from each of
    ``cameras`` at its own time (time 0 without times; no renders for an empty list)."""
    squared, weights, extent = [], [], None
    frames = sample_deformation(model, samples)
    for t, frame in zip(np.linspace(0.0, 1.0, len(frames)), frames):
        mlp = frame.means.numpy()
        copies = len(baked.centres) // len(mlp)  # segments: copy j of the file is Gaussian j % N of the model
        squared.append(((baked.positions_at(float(t)) - np.tile(mlp, (copies, 1))) ** 2).sum(-1))
        weights.append(baked.visibility(float(t)))
        extent = mlp.max(0) - mlp.min(0) if extent is None else np.maximum(extent, mlp.max(0) - mlp.min(0))
    rms = float(np.sqrt(np.sum(np.multiply(weights, squared)) / np.sum(weights)))
    psnrs = []
    background = model._get_background_color().detach().float().cpu()
    for k in range(len(cameras)):
        camera = cameras[k : k + 1]
        time = 0.0 if camera.times is None else float(camera.times.reshape(-1)[0])
        reference = render_gaussians(gaussians_at(model, time), camera, background, active_sh_degree(model))
        render = render_gaussians(baked.gaussians_at(time), camera, background, None)
        mse = float(((render - reference) ** 2).mean())
        psnrs.append(10 * math.log10(1.0 / max(mse, 1e-20)))
    return BakeReport(
        position_rms=rms,
        position_rms_relative=rms / max(float(np.linalg.norm(extent)), 1e-12),
        psnr_min=min(psnrs, default=math.inf),
        psnr_mean=float(np.mean(psnrs)) if psnrs else math.inf,
    )


def _halves(values: np.ndarray) -> np.ndarray:
    """[N, 2k] floats -> [N, k] uint32, each packing two halves as GLSL's packHalf2x16 (first in the low bits)."""
    return np.ascontiguousarray(values.astype("<f2")).view("<u4")


def write_splatv(splatv: Splatv, path: Path, cameras: Sequence[Dict] = ()) -> None:
    """Writes ``splatv`` to ``path``; ``cameras`` (splaTV's camera records: id, img_name, width, height, position,
    rotation, fx, fy) go into the header for the viewer's camera keys."""
    n = len(splatv.centres)
    zeros = np.zeros((n, 1), np.float32)
    rows = np.concatenate(
        [
            splatv.centres.astype("<f4").view("<u4"),
            _halves(splatv.quats),
            _halves(np.concatenate([splatv.scales, zeros], 1)),
            np.ascontiguousarray(splatv.rgba.astype(np.uint8)).view("<u4"),
            _halves(np.concatenate([splatv.motion, zeros], 1)),
            _halves(splatv.omega),
            _halves(splatv.trbf),
        ],
        axis=1,
    )
    assert rows.shape == (n, 16)
    texwidth = 4 * GAUSSIANS_PER_ROW
    texheight = math.ceil(n / GAUSSIANS_PER_ROW)
    texture = np.zeros((texheight * GAUSSIANS_PER_ROW, 16), "<u4")
    texture[:n] = rows
    header = [{"type": "splat", "size": texture.nbytes, "texwidth": texwidth, "texheight": texheight,
               "cameras": list(cameras), "gaussians": n, **splatv.header}]
    text = json.dumps(header).encode("utf-8")
    with open(path, "wb") as file:
        file.write(struct.pack("<II", MAGIC, len(text)))
        file.write(text)
        file.write(texture.tobytes())


def read_splatv(path: Path) -> Splatv:
    """Reads a ``.splatv`` file by its published layout (module docstring). splaTV takes every texel row as
    Gaussians; padding after the last one is all zeros (no opacity) and is dropped here."""
    data = Path(path).read_bytes()
    magic, length = struct.unpack_from("<II", data, 0)
    if magic != MAGIC:
        raise ValueError(f"{path}: not a splatv file (magic {magic:#x}, expected {MAGIC:#x})")
    chunks: List[Dict] = json.loads(data[8 : 8 + length].decode("utf-8"))
    splat = next(chunk for chunk in chunks if chunk["type"] == "splat")
    offset = 8 + length  # chunks follow the header in its order
    for chunk in chunks:
        if chunk is splat:
            break
        offset += chunk["size"]
    texture = np.frombuffer(data, "<u4", count=splat["size"] // 4, offset=offset).reshape(-1, 16)
    count = splat.get("gaussians", int(np.flatnonzero(texture.any(1)).max(initial=-1)) + 1)
    texture = texture[:count]
    halves = lambda columns: texture[:, columns].copy().view("<f2").astype(np.float32)  # noqa: E731
    return Splatv(
        centres=texture[:, 0:3].copy().view("<f4"),
        quats=halves(slice(3, 5)),
        scales=halves(slice(5, 7))[:, :3],
        rgba=texture[:, 7:8].copy().view(np.uint8),
        motion=halves(slice(8, 13))[:, :9],
        omega=halves(slice(13, 15)),
        trbf=halves(slice(15, 16)),
        header=splat,
    )
