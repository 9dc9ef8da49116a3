"""4diffusion against the official code (aejion/4Diffusion): PyTorch MLP heads under tiny-cuda-nn, the anchor
loss's LPIPS (loaded by weights enum from a temporary torch hub cache, weight 200, [0, 1] input; without the weights
the run stops in one line unless the term is off), the LPIPS metric's loading, the anchor view, the matting step
and the 8-frame default."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from nerfstudio.field_components import mlp as nerfstudio_mlp
from test_four_diffusion_method import PROMPT, tiny_model_config
from tiny_4dm import assert_lpips_weights_missing, build_tiny_4dm, build_tiny_clipseg, write_random_backbone
from torch import nn

from ns_4d_methods.cli.sample_object_video import write_object_video
from ns_4d_methods.data.object_video import ObjectVideoConfig, ObjectVideoDataManagerConfig, read_object_video
from ns_4d_methods.errors import InputError
from ns_4d_methods.guidance.four_dm_prior import FourDMPrior
from ns_4d_methods.guidance.matting import ObjectMatting, composite_on_white
from ns_4d_methods.guidance.model_loading import WeightsUnavailableError, hold_frozen
from ns_4d_methods.models.four_diffusion import FourDiffusionField
from ns_4d_methods.models.image_metrics import ALEXNET, VGG16, LazyLPIPS, image_metrics, load_lpips
from ns_4d_methods.pipelines.four_diffusion_pipeline import FourDiffusionPipelineConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
JUMPINGJACKS = DATA / "dnerf_jumpingjacks_400" / "train"


@pytest.fixture()
def torch_home(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """conftest's empty, offline torch hub cache, with LazyLPIPS's once-per-process warning armed again."""
    monkeypatch.setattr(LazyLPIPS, "_warned", set())
    return torch_home


# ---- defect 1: tiny-cuda-nn ----------------------------------------------------------------------------------------
class FakeFusedMLP(nn.Module):
    """Stands for tiny-cuda-nn's fully fused MLP, which has no double backward."""

    def __init__(self, n_input_dims, n_output_dims, network_config, **kwargs) -> None:
        super().__init__()
        self.params = nn.Parameter(torch.zeros(1))


def test_heads_are_pytorch_mlps_when_tcnn_is_asked_for(monkeypatch):
    # make nerfstudio's MLP believe tiny-cuda-nn is installed: any head still built by tcnn would be a FakeFusedMLP
    monkeypatch.setattr(nerfstudio_mlp, "TCNN_EXISTS", True)
    monkeypatch.setattr(nerfstudio_mlp, "tcnn", types.SimpleNamespace(Network=FakeFusedMLP))
    field = FourDiffusionField(
        torch.tensor([[-1.0] * 3, [1.0] * 3]), num_levels=2, max_res=32, log2_hashmap_size=8, max_res_4d=16,
        log2_hashmap_size_4d=8, implementation="tcnn",
    )
    for head in (field.density_mlp, field.colour_mlp):  # the normals differentiate the density head twice
        assert head.tcnn_encoding is None and not any(isinstance(m, FakeFusedMLP) for m in head.modules())
        assert all(isinstance(m, nn.Linear) for m in head.modules() if list(m.parameters(recurse=False)))


@pytest.mark.cuda
def test_one_step_with_tcnn_on_cuda():
    pytest.importorskip("tinycudann")
    from nerfstudio.cameras.cameras import Cameras  # noqa: F401  (CUDA set-up of nerfstudio)
    from test_four_diffusion_oracle import tiny_model

    from ns_4d_methods.render.orbit_cameras import orbit_cameras

    _, model = tiny_model(implementation="tcnn")
    model = model.to("cuda")
    cameras = orbit_cameras(0.0, torch.tensor([0.0, 90.0]), 1.1, 45.0, 16, torch.tensor([0.2, 0.7]))
    outputs = model.render_views(cameras, with_normals=True)
    losses = model.regularisers(outputs, outputs, step=0)
    sum(losses.values()).backward()  # double backward through the normals
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.field.grids.parameters())


# ---- defect 2 and the weights rule: LPIPS ---------------------------------------------------------------------------
def test_lpips_metric_loads_alexnet_from_the_torch_hub_cache_like_torchmetrics(torch_home):
    from torchmetrics.functional.image.lpips import _LPIPS

    write_random_backbone(ALEXNET)
    metric = LazyLPIPS()
    assert metric.available and not list(metric.parameters())  # nothing of it in a checkpoint
    reference = _LPIPS(pretrained=True, net="alex").eval()  # torchmetrics' own loading, from the same cache file
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    expected = reference(a, b, normalize=True).mean()
    assert torch.allclose(metric(a, b), expected, atol=1e-6) and float(expected) > 0
    assert set(image_metrics(a[0].permute(1, 2, 0), b[0].permute(1, 2, 0), metric)) == {"psnr", "ssim", "lpips"}


def test_lpips_metric_is_skipped_with_one_line_offline(torch_home, monkeypatch):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metric = LazyLPIPS()
        assert not metric.available and not LazyLPIPS().available
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith("LPIPS skipped: LPIPS backbone: cannot load")
    assert "\n" not in messages[0]
    image = torch.rand(8, 8, 3)
    assert set(image_metrics(image, image, metric)) == {"psnr", "ssim"}

    # HF_HUB_OFFLINE (the suite's offline switch): the cache only, no download attempt
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE is set"):
        load_lpips(ALEXNET, "f")


def test_anchor_loss_is_200_lpips_on_01_input_plus_100_one_minus_ssim(torch_home):
    from test_four_diffusion_oracle import tiny_model

    state = write_random_backbone(VGG16, features_only=True)
    _, model = tiny_model()
    assert model.config.anchor_lpips_weight == 200.0 and model.config.anchor_ssim_weight == 100.0
    model.load_anchor_lpips()
    network = model.anchor_lpips._network
    loaded = {f"features.{k.split('.', 1)[1]}": v for k, v in network.net.state_dict().items()}
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)  # the written VGG
    assert not any(name.startswith("anchor_lpips") for name in model.state_dict())  # VGG stays out of checkpoints
    torch.manual_seed(0)
    render, anchor = torch.rand(1, 3, 32, 32, requires_grad=True), torch.rand(1, 3, 32, 32)
    losses = model.anchor_loss(render, anchor)
    assert set(losses) == {"anchor_ssim", "anchor_lpips"}
    as_official = network(render, anchor, normalize=False).mean()  # [0, 1] images fed as they are
    assert torch.allclose(losses["anchor_lpips"], 200.0 * as_official)
    assert not torch.allclose(as_official, network(render, anchor, normalize=True).mean())
    losses["anchor_lpips"].backward()
    assert render.grad is not None and render.grad.abs().sum() > 0


def test_anchor_lpips_without_weights_stops_in_one_line_unless_off(torch_home):
    from test_four_diffusion_oracle import tiny_model

    _, model = tiny_model()
    assert_lpips_weights_missing(
        model.load_anchor_lpips, "--pipeline.model.anchor-lpips-weights", VGG16, "--pipeline.model.anchor-lpips-weight"
    )
    _, model = tiny_model(anchor_lpips_weight=0.0)
    model.load_anchor_lpips()  # off: nothing to load
    image = torch.rand(1, 3, 32, 32)
    assert set(model.anchor_loss(image, image)) == {"anchor_ssim"}


# ---- points 3-5: anchor view, matting, frames -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    return write_object_video(tmp_path_factory.mktemp("scene") / "object", resolution=32, gt_instants=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    return {"4dm": str(build_tiny_4dm(root)), "clipseg": str(build_tiny_clipseg(root / "clipseg"))}


def pipeline_for(scene: Path, models: dict, **overrides):
    video = ObjectVideoConfig(**overrides.pop("video", {}))
    return FourDiffusionPipelineConfig(
        prompt=PROMPT,
        prior_model=models["4dm"],
        matting_model=models["clipseg"],
        anchor_steps=1,
        model=tiny_model_config(),
        datamanager=ObjectVideoDataManagerConfig(data=scene / "frames", video=video),
        **overrides,
    ).setup(device="cpu")


def test_matting_keeps_the_object_and_whitens_the_rest(models):
    images = torch.rand(3, 3, 16, 16)
    known = torch.zeros(3, 1, 16, 16)
    known[..., 4:12, 4:12] = 0.9  # the object
    matted = composite_on_white(images, known)
    assert torch.equal(matted[..., 4:12, 4:12], images[..., 4:12, 4:12])
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[4:12, 4:12] = False
    assert torch.all(matted[..., outside] == 1.0)
    # the model loaded by id through the loader: probabilities of the frames' size, thresholded at 0.5
    matting = ObjectMatting(models["clipseg"], "cpu", "--pipeline.matting-model")
    foreground = matting.foreground(images, PROMPT)
    assert foreground.shape == (3, 1, 16, 16) and 0 <= float(foreground.min()) and float(foreground.max()) <= 1
    assert torch.equal(matting(images, PROMPT), composite_on_white(images, foreground))
    with pytest.raises(InputError, match="--pipeline.matting-model: cannot load"):
        ObjectMatting(str(Path(models["clipseg"]) / "missing"), "cpu", "--pipeline.matting-model")


def test_anchor_frames_are_matted_and_the_anchor_view_is_the_official_one(scene, models, tmp_path, monkeypatch):
    """Known mask in (the left half is the object), white background out; the loss renders anchor view 0 at azimuth
    0, 90 deg from the input view."""
    decoded = []

    def left_half(self, images, prompt):
        decoded.append(images.clone())  # the 4DM frames as decoded, before matting
        mask = torch.zeros(len(images), 1, *images.shape[-2:])
        mask[..., : images.shape[-1] // 2] = 1.0
        return mask

    monkeypatch.setattr(ObjectMatting, "foreground", left_half)
    matted = pipeline_for(scene, models)
    matted.setup_generation(tmp_path / "matted")
    raw = (decoded[0] * 255.0 + 0.5).to(torch.uint8).reshape(matted.anchor.shape)
    half = raw.shape[-1] // 2
    assert matted.anchor.shape == (8, 4, 3, 64, 64)
    assert torch.equal(matted.anchor[..., :half], raw[..., :half])
    assert torch.all(matted.anchor[..., half:] == 255) and not torch.all(raw[..., half:] == 255)
    unmatted = pipeline_for(scene, models, matting=False)
    assert unmatted._anchor_key() != matted._anchor_key()  # a checkpoint's anchor is reused only with its matting

    assert matted.config.anchor_view == 0
    seen = []
    monkeypatch.setattr(matted.model, "render_views", lambda cameras: seen.append(cameras) or {"rgb": None})
    _, target = matted.anchor_pair(5)
    position = seen[0].camera_to_worlds[0, :3, 3]
    assert torch.allclose(position, torch.tensor([1.1, 0.0, 0.0]), atol=1e-5)  # azimuth 0; the input is at -90
    assert torch.equal((target[0] * 255).round().to(torch.uint8), matted.anchor[5, 0])


def test_eight_frames_by_default_and_longer_anchors_share_their_boundary_frames(scene, models, tmp_path):
    assert ObjectVideoConfig().num_frames == 8
    if JUMPINGJACKS.is_dir():  # 200 frames: still the official 8
        assert len(read_object_video(JUMPINGJACKS, ObjectVideoConfig(resolution=16)).frames) == 8
    pipeline = pipeline_for(scene, models, matting=False, video=dict(num_frames=15))
    prior = FourDMPrior(models["4dm"], "cpu")
    sample, calls = prior.sample_latents, []

    def recording(*args, **kwargs):
        latents = sample(*args, **kwargs)
        calls.append((kwargs.get("known"), latents))
        return latents

    prior.sample_latents = recording
    hold_frozen(pipeline, "prior", prior)  # setup_generation uses an attached prior
    pipeline.setup_generation(tmp_path / "long")
    assert pipeline.anchor_windows() == [0, 7] and pipeline.anchor.shape[0] == 15
    (first_known, first), (second_known, second) = calls
    assert first_known is None and torch.equal(second_known, first[28:])  # block 2 starts from block 1's last frame
    assert torch.equal(second[:4], first[28:])
    decoded = prior.decode_latents(first[28:])  # the shared instant 7 of the anchor is that latent, decoded once
    assert (pipeline.anchor[7].int() - (decoded * 255.0 + 0.5).to(torch.uint8).int()).abs().max() <= 1
