"""Optical flow (RAFT from torchvision's weights or the original checkpoint, OpenCV DIS), backward warping and the
occlusion mask.

Real data: the Sintel demo frames and the two sample videos in ../shared/data, downscaled so RAFT stays cheap on the
CPU; the original RAFT-small checkpoint in ../shared/weights.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import cv2
import pytest
import torch
from torchvision.models.optical_flow import raft_large, raft_small

from ns_4d_methods.editing.optical_flow import (
    RAFT_WEIGHTS,
    DisFlow,
    RaftFlow,
    build_flow_estimator,
    convert_raft_state_dict,
    is_small_raft_checkpoint,
    load_raft,
    raft_key_to_torchvision,
)
from ns_4d_methods.editing.warping import backward_warp, flow_in_bounds, forward_backward_valid_mask
from ns_4d_methods.guidance.model_loading import WeightsUnavailableError, torchvision_cache_path

SHARED = Path(__file__).resolve().parents[2] / "shared"
RAFT_SMALL = SHARED / "weights" / "raft-small.pth"
SINTEL = SHARED / "data" / "sintel_demo_frames"
VIDEOS = SHARED / "data" / "videos"
MARGIN = 8  # pixels left out at the borders, where warps sample outside the frame


def to_tensor(rgb, width: int) -> torch.Tensor:
    """uint8 RGB array -> float [H, W, 3] in [0, 1], resized to ``width`` (area filter, aspect kept)."""
    height = round(rgb.shape[0] * width / rgb.shape[1])
    return torch.from_numpy(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)).float() / 255.0


@cache  # decoded once per module; the tests only read the frames
def sintel_frames(count: int, width: int) -> tuple[torch.Tensor, ...]:
    paths = sorted(SINTEL.glob("frame_*.png"))[:count]
    return tuple(to_tensor(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), width) for path in paths)


@cache
def video_frames(name: str, start: int, count: int, width: int) -> tuple[torch.Tensor, ...]:
    capture = cv2.VideoCapture(str(VIDEOS / name))
    capture.set(cv2.CAP_PROP_POS_FRAMES, start)
    frames = []
    for _ in range(count):
        ok, bgr = capture.read()
        assert ok, f"could not read frame of {name}"
        frames.append(to_tensor(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), width))
    capture.release()
    return tuple(frames)


def interior_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b)[MARGIN:-MARGIN, MARGIN:-MARGIN].abs().mean().item()


def constant_flow(height: int, width: int, dx: float, dy: float) -> torch.Tensor:
    return torch.tensor([dx, dy]).expand(height, width, 2).contiguous()


@pytest.fixture(scope="module")
def raft() -> RaftFlow:
    return RaftFlow(RAFT_SMALL)


@pytest.fixture(scope="module")
def estimators(raft: RaftFlow) -> dict:
    return {"raft": raft, "dis": DisFlow()}


# ---- RAFT checkpoint conversion ---------------------------------------------------------------------------------


def test_raft_small_checkpoint_maps_every_tensor(capsys: pytest.CaptureFixture) -> None:
    original = torch.load(RAFT_SMALL, map_location="cpu", weights_only=True)
    assert all(key.startswith("module.") for key in original) and is_small_raft_checkpoint(original)
    model = raft_small(weights=None)
    converted = convert_raft_state_dict(original, model, small=True)
    assert set(converted) == set(model.state_dict()) and len(converted) == len(original) == 106
    for key, tensor in original.items():
        assert torch.equal(converted[raft_key_to_torchvision(key, small=True)], tensor)
    assert sum(t.numel() for t in converted.values()) == 990_162

    loaded, small = load_raft(RAFT_SMALL)
    assert small and not any(p.requires_grad for p in loaded.parameters())
    assert capsys.readouterr() == ("", "")  # conversion prints nothing


def original_raft_large_keys() -> list[str]:
    """The state-dict keys of princeton-vl's RAFT (raft-things.pth), written out from its module structure."""
    conv, batch_norm = ("weight", "bias"), ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = []
    for encoder, norm in (("fnet", ()), ("cnet", batch_norm)):  # fnet: instance norm (no tensors), cnet: batch norm
        modules = [("conv1", conv), ("norm1", norm), ("conv2", conv)]
        for layer in (1, 2, 3):
            for block in (0, 1):
                prefix = f"layer{layer}.{block}"
                modules += [(f"{prefix}.conv1", conv), (f"{prefix}.norm1", norm)]
                modules += [(f"{prefix}.conv2", conv), (f"{prefix}.norm2", norm)]
                if layer > 1 and block == 0:  # stride 2: downsampling branch, its norm registered twice
                    modules += [(f"{prefix}.norm3", norm), (f"{prefix}.downsample.0", conv)]
                    modules += [(f"{prefix}.downsample.1", norm)]
        keys += [f"module.{encoder}.{module}.{t}" for module, tensors in modules for t in tensors]
    update = ["encoder.convc1", "encoder.convc2", "encoder.convf1", "encoder.convf2", "encoder.conv"]
    update += [f"gru.conv{gate}{axis}" for axis in (1, 2) for gate in "zrq"]
    update += ["flow_head.conv1", "flow_head.conv2", "mask.0", "mask.2"]
    keys += [f"module.update_block.{module}.{t}" for module in update for t in conv]
    return keys


def test_raft_large_mapping_covers_torchvision_raft_large() -> None:
    model = raft_large(weights=None)
    target = model.state_dict()
    keys = original_raft_large_keys()
    assert {raft_key_to_torchvision(key, small=False) for key in keys} == set(target)
    # a checkpoint in the original layout, aliases sharing values, loads into a fresh model tensor for tensor
    original = {key: target[raft_key_to_torchvision(key, small=False)].clone() for key in keys}
    assert not is_small_raft_checkpoint(original)
    fresh = raft_large(weights=None)
    fresh.load_state_dict(convert_raft_state_dict(original, fresh, small=False))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in target.items())
    assert raft_key_to_torchvision("module.cnet.layer2.0.norm3.running_var", small=False) == (
        "context_encoder.layer2.0.downsample.1.running_var"
    )
    assert raft_key_to_torchvision("module.update_block.gru.convq2.weight", False) == (
        "update_block.recurrent_block.convgru2.convq.weight"
    )


def test_raft_checkpoint_errors_are_one_line(tmp_path: Path) -> None:
    absent = tmp_path / "raft-things.pth"
    with pytest.raises(WeightsUnavailableError) as missing:
        RaftFlow(absent, field_name="pipeline.raft_weights")
    message = str(missing.value)
    assert "\n" not in message and message.startswith(f"pipeline.raft_weights: cannot load '{absent}' (no such file")
    assert message.endswith("; or --pipeline.flow-backend dis for OpenCV's weight-free flow")

    truncated = dict(torch.load(RAFT_SMALL, map_location="cpu", weights_only=True))
    truncated.pop("module.update_block.flow_head.conv2.bias")
    truncated["module.fnet.conv1.weight"] = truncated["module.fnet.conv1.weight"][:16]
    torch.save(truncated, tmp_path / "broken.pth")
    with pytest.raises(WeightsUnavailableError) as broken:
        RaftFlow(tmp_path / "broken.pth", field_name="pipeline.raft_weights")
    message = str(broken.value)
    assert "\n" not in message and "update_block.flow_head.conv2.bias" in message and "fnet.conv1.weight" in message


def test_default_raft_is_torchvisions_raft_things_port_from_the_hub_cache(torch_home) -> None:
    """The default flow is RAFT with ``Raft_Large_Weights.C_T_V1``, read from the torch hub cache (random weights
    written there); offline and uncached, one line naming the field and the flag for DIS."""
    with pytest.raises(WeightsUnavailableError) as caught:
        build_flow_estimator("raft", field_name="--pipeline.raft-weights")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--pipeline.raft-weights: cannot load 'Raft_Large_Weights.C_T_V1'")
    assert "--pipeline.flow-backend dis" in message

    torch.manual_seed(0)
    network = raft_large(weights=None)
    path = torchvision_cache_path(RAFT_WEIGHTS)
    path.parent.mkdir(parents=True, exist_ok=True)  # the failed download made the folder
    torch.save(network.state_dict(), path)
    flow = build_flow_estimator("raft")
    assert isinstance(flow, RaftFlow) and not flow.small and flow.iterations == 20
    loaded = flow.model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in network.state_dict().items())
    # torchvision's RAFT-small layout, by path: read as small
    small = raft_small(weights=None)
    torch.save(small.state_dict(), torch_home / "small.pth")
    assert RaftFlow(torch_home / "small.pth").small


class ShapeRecorder(torch.nn.Module):
    """Stands in for RAFT: records the input size, returns a flow of (1, 0.5) px at that size."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list = []

    def forward(self, image1, image2, num_flow_updates):
        self.sizes.append(tuple(image1.shape[-2:]))
        flow = torch.zeros(image1.shape[0], 2, *image1.shape[-2:])
        flow[:, 0], flow[:, 1] = 1.0, 0.5
        return [flow]


def test_flow_of_a_full_n3dv_frame_is_computed_at_the_bounded_size() -> None:
    """A 2704x2028 pair goes through RAFT at 1352x1014 (padded to 1352x1016), and the flow comes back at 2704x2028
    in full-resolution pixels."""
    flow = RaftFlow(RAFT_SMALL)
    flow.model = ShapeRecorder()
    frames = torch.rand(2, 2028, 2704, 3)
    result = flow.estimate_flow(frames[0], frames[1])
    assert flow.model.sizes == [(1016, 1352)]
    assert result.shape == (2028, 2704, 2)
    torch.testing.assert_close(result[100, 200], torch.tensor([2.0, 1.0]), atol=1e-3, rtol=0)
    flow.model.sizes.clear()
    flow.estimate_flow(frames[0, :480, :640], frames[1, :480, :640])  # small frames: at their own size
    assert flow.model.sizes == [(480, 640)]


# ---- flow quality on real frames --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["raft", "dis"])
def test_flow_cuts_warp_error_on_sintel(estimators: dict, backend: str) -> None:
    """Warping frame t onto frame t+1 by the flow t+1 -> t beats not warping by a wide margin."""
    frames = sintel_frames(count=4, width=384)
    unwarped = warped = 0.0
    for previous, current in zip(frames[:-1], frames[1:]):
        flow = estimators[backend].estimate_flow(current, previous)
        assert flow.shape == (*current.shape[:2], 2) and flow.dtype == torch.float32
        unwarped += interior_error(previous, current)
        warped += interior_error(backward_warp(previous, flow), current)
    # measured: RAFT-small 0.50x, DIS 0.40x of the unwarped error
    assert warped < 0.6 * unwarped


@pytest.mark.parametrize("backend", ["raft", "dis"])
@pytest.mark.parametrize(("video", "start"), [("car-turn.mp4", 40), ("rabbit-watermelon.mp4", 144)])
def test_flow_cuts_warp_error_on_videos(estimators: dict, backend: str, video: str, start: int) -> None:
    frames = video_frames(video, start, count=3, width=256)
    unwarped = warped = 0.0
    for previous, current in zip(frames[:-1], frames[1:]):
        flow = estimators[backend].estimate_flow(current, previous)
        unwarped += interior_error(previous, current)
        warped += interior_error(backward_warp(previous, flow), current)
    # measured: car-turn RAFT-small 0.30x, DIS 0.20x; rabbit-watermelon RAFT-small 0.41x, DIS 0.22x
    assert warped < 0.6 * unwarped


@pytest.mark.parametrize("backend", ["raft", "dis"])
@pytest.mark.parametrize("shift", [(3.4, -2.7), (-5.25, 1.5)])
def test_known_subpixel_shift_is_recovered(estimators: dict, backend: str, shift: tuple[float, float]) -> None:
    image = sintel_frames(count=1, width=256)[0]
    height, width = image.shape[:2]
    # moved[y, x] = image[y - dy, x - dx]: content moves by +shift, so the flow image -> moved is +shift
    moved = backward_warp(image, constant_flow(height, width, -shift[0], -shift[1]))
    flow = estimators[backend].estimate_flow(image, moved)
    end_point_error = (flow - torch.tensor(shift)).norm(dim=-1)[16:-16, 16:-16].mean().item()
    assert end_point_error < 0.5  # measured: RAFT-small 0.10-0.14 px, DIS 0.05-0.06 px


def test_batched_flow_matches_per_pair(estimators: dict) -> None:
    frames = torch.stack(sintel_frames(count=3, width=256))
    for estimator in estimators.values():
        batched = estimator.estimate_flow(frames[:-1], frames[1:])
        assert batched.shape == (2, *frames.shape[1:3], 2)
        for index in range(2):
            single = estimator.estimate_flow(frames[index], frames[index + 1])
            torch.testing.assert_close(batched[index], single, atol=1e-3, rtol=0)


def test_raft_pads_any_size(raft: RaftFlow) -> None:
    image = sintel_frames(count=1, width=256)[0][:101, :150]  # not a multiple of 8, below RAFT's 128 px minimum
    flow = raft.estimate_flow(image, image)
    assert flow.shape == (101, 150, 2)
    assert flow.abs().mean() < 0.05  # identical frames: (almost) no motion


def test_build_flow_estimator() -> None:
    assert isinstance(build_flow_estimator("dis"), DisFlow)
    assert isinstance(build_flow_estimator("raft", raft_weights=RAFT_SMALL), RaftFlow)
    with pytest.raises(WeightsUnavailableError, match="pipeline.raft_weights"):
        build_flow_estimator("raft", raft_weights="no-such-raft.pth", field_name="pipeline.raft_weights")


# ---- warping and the occlusion mask ----------------------------------------------------------------------------


def test_backward_warp_by_integer_flow_is_a_shift() -> None:
    image = torch.rand(20, 30, 3)
    warped = backward_warp(image, constant_flow(20, 30, 3.0, -2.0))
    torch.testing.assert_close(warped[2:, :-3], image[:-2, 3:], atol=1e-5, rtol=0)
    flows = constant_flow(20, 30, 3.0, -2.0)[None].expand(2, -1, -1, -1)
    torch.testing.assert_close(backward_warp(image[None].expand(2, -1, -1, -1), flows)[1], warped)


def test_occlusion_mask_on_exact_flows_of_a_moving_square() -> None:
    """A square moves 6 px right over a static background: the background it uncovers is flagged, nothing else."""
    height, width, top, left, size, step = 40, 60, 10, 20, 12, 6
    flow_fwd = torch.zeros(height, width, 2)  # previous -> current, on the previous frame
    flow_fwd[top : top + size, left : left + size, 0] = step
    flow_bwd = torch.zeros(height, width, 2)  # current -> previous, on the current frame
    flow_bwd[top : top + size, left + step : left + step + size, 0] = -step
    valid = forward_backward_valid_mask(flow_fwd, flow_bwd)
    uncovered = torch.zeros(height, width, dtype=torch.bool)
    uncovered[top : top + size, left : left + step] = True
    assert torch.equal(~valid, uncovered)


@pytest.mark.parametrize("backend", ["raft", "dis"])
def test_occlusion_mask_flags_the_strip_a_translation_uncovers(estimators: dict, backend: str) -> None:
    image = sintel_frames(count=1, width=256)[0]
    height, width = image.shape[:2]
    step = 6
    moved = backward_warp(image, constant_flow(height, width, -step, 0.0))  # content moves 6 px right
    estimator = estimators[backend]
    valid = forward_backward_valid_mask(estimator.estimate_flow(image, moved), estimator.estimate_flow(moved, image))
    # the left strip of the moved frame shows nothing of the first frame; measured: all flagged, interior all valid
    assert (~valid[:, :step]).float().mean() > 0.95
    assert valid[MARGIN:-MARGIN, step + MARGIN : -MARGIN].float().mean() > 0.95


def test_flow_in_bounds() -> None:
    inside = flow_in_bounds(constant_flow(4, 5, -1.5, 0.0))
    assert inside[:, 2:].all() and not inside[:, :2].any()
