"""instruct4d's training, as the official NeRFPlayer-nerfacto: 16,384 rays sampled as 32x32 image patches, an LPIPS
(AlexNet) loss of weight 1 on them, and a constant learning rate of 1e-2 for the fields and proposal networks. The
LPIPS backbone follows the weights rule (random AlexNet weights in conftest's offline torch hub cache)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager
from nerfstudio.data.pixel_samplers import PatchPixelSampler
from nerfstudio.data.scene_box import SceneBox
from test_nerfacto_4d import TINY_GRID, TINY_PROPOSALS, _camera_at
from test_phase_start_schedule import learning_rate_at
from tiny_4dm import assert_lpips_weights_missing, write_random_backbone

from method_configs.instruct4d import instruct4d
from ns_4d_methods.errors import InputError
from ns_4d_methods.models.image_metrics import ALEXNET

CONFIG = instruct4d.config


def test_batches_are_contiguous_image_patches():
    datamanager = CONFIG.pipeline.datamanager
    assert datamanager.train_num_rays_per_batch == 16384 and datamanager.patch_size == 32
    # the sampler nerfstudio's VanillaDataManager builds from this config (its dataset is not consulted for patches)
    sampler = VanillaDataManager._get_pixel_sampler(SimpleNamespace(config=datamanager), None, 16384)
    assert isinstance(sampler, PatchPixelSampler)
    # images whose pixels hold their own (image, row, column): a sampled ray says where it came from
    images, height, width = 3, 48, 64
    n, y, x = torch.meshgrid(torch.arange(images), torch.arange(height), torch.arange(width), indexing="ij")
    batch = {"image": torch.stack([n, y, x], -1).float(), "image_idx": torch.arange(images)}
    torch.manual_seed(0)
    sampled = sampler.sample(batch)
    assert sampled["indices"].shape == (16384, 3)
    patches = sampled["image"].reshape(16, 32, 32, 3)  # the model's reshape: 16 patches, row by row
    for patch in patches:
        top, left = patch[0, 0, 1:].long().tolist()
        assert 0 <= top <= height - 32 and 0 <= left <= width - 32
        rows, columns = torch.meshgrid(torch.arange(32) + top, torch.arange(32) + left, indexing="ij")
        assert (patch[..., 0] == patch[0, 0, 0]).all()  # one image per patch
        assert torch.equal(patch[..., 1], rows.float()) and torch.equal(patch[..., 2], columns.float())
    assert len({tuple(p[0, 0].tolist()) for p in patches}) > 1  # patches are drawn at random places


def tiny_model(**changes):
    """instruct4d's model settings on a tiny grid."""
    config = copy.deepcopy(CONFIG.pipeline.model)
    for name, value in dict(
        TINY_GRID, max_res_4d=32, log2_hashmap_size_4d=10, proposal_net_args_list=TINY_PROPOSALS,
        num_proposal_samples_per_ray=(16, 8), num_nerf_samples_per_ray=8, near_plane=2.0, far_plane=6.0,
        disable_scene_contraction=True, background_color="white", implementation="torch", **changes,
    ).items():
        setattr(config, name, value)
    scene_box = SceneBox(aabb=torch.tensor([[-1.5, -1.5, -1.5], [1.5, 1.5, 1.5]]))
    return config.setup(scene_box=scene_box, num_train_data=2, metadata={})


def test_lpips_loss_on_rendered_patches_has_weight_one_and_gradient(torch_home):
    write_random_backbone(ALEXNET, features_only=True)
    model = tiny_model()
    assert model.config.lpips_loss_weight == 1.0 and model.config.lpips_weights == ALEXNET
    model.load_lpips_loss()
    assert not any("lpips" in name for name in model.state_dict())  # AlexNet stays out of checkpoints
    model.train()
    torch.manual_seed(0)
    # one 32x32 patch: the rays of a 32x32 camera row by row (as the patch sampler orders them)
    rays = _camera_at(torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.2]]), size=32).generate_rays(0).reshape((-1,))
    outputs, target = model(rays), torch.rand(1024, 3)
    batch = {"image": target}
    losses = model.get_loss_dict(outputs, batch, model.get_metrics_dict(outputs, batch))
    loss = losses["lpips_loss"]
    assert torch.isfinite(loss) and loss > 0
    as_official = model.patch_lpips._network(  # the official: [-1, 1] inputs, no normalisation inside
        (outputs["rgb"].reshape(1, 32, 32, 3).permute(0, 3, 1, 2) * 2 - 1).clamp(-1, 1),
        (target.reshape(1, 32, 32, 3).permute(0, 3, 1, 2) * 2 - 1).clamp(-1, 1),
    ).mean()
    torch.testing.assert_close(loss, as_official)
    loss.backward()
    assert model.field.mlp_base[0].grid_4d.hash_table.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not whole 32x32 patches"):
        model.patch_lpips_loss({k: outputs[k][:1000] for k in ("rgb", "accumulation")}, {"image": target[:1000]})


def test_lpips_without_weights_is_one_line_naming_the_flag_that_turns_it_off(torch_home):
    model = tiny_model()
    assert_lpips_weights_missing(
        model.load_lpips_loss, "--pipeline.model.lpips-weights", ALEXNET, "--pipeline.model.lpips-loss-weight"
    )
    model = tiny_model(lpips_loss_weight=0.0)
    model.load_lpips_loss()  # off: nothing to load
    model.train()
    rays = _camera_at(torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.5]]), size=32).generate_rays(0).reshape((-1,))
    outputs, batch = model(rays), {"image": torch.rand(1024, 3)}
    assert "lpips_loss" not in model.get_loss_dict(outputs, batch, model.get_metrics_dict(outputs, batch))


def test_fields_and_proposals_train_at_a_constant_1e_2():
    for name in ("fields", "proposal_networks"):
        group = CONFIG.optimizers[name]
        rates = [learning_rate_at(group, step) for step in (0, 30000, 50000, 200000)]
        assert rates == pytest.approx([1e-2] * 4), name


def test_batches_that_are_not_whole_patches_are_one_line_errors():
    from ns_4d_methods.pipelines.instruct4d_pipeline import _check_patches

    def check(rays=16384, patch=32, side=48, lpips=1.0, lpips_patch=32):
        config = copy.deepcopy(CONFIG.pipeline)
        config.datamanager.train_num_rays_per_batch, config.datamanager.patch_size = rays, patch
        config.model.lpips_loss_weight, config.model.lpips_patch_size = lpips, lpips_patch
        frames = SimpleNamespace(cameras=SimpleNamespace(height=torch.tensor([[side]]), width=torch.tensor([[64]])))
        _check_patches(config, frames)

    check()
    check(rays=256, patch=1, lpips=0.0)  # plain ray sampling
    off = ", or --pipeline.model.lpips-loss-weight 0 trains without the LPIPS term"
    for kwargs, message in [
        (dict(rays=256), "--pipeline.datamanager.train-num-rays-per-batch 256 is not a whole number of 32x32 patches"),
        (dict(rays=1500, lpips=0.0), "train-num-rays-per-batch 1500 is not a whole number of 32x32 patches"),
        (dict(side=24), "training frames of 64x24 px are smaller than the 32x32 patches"),
        (dict(patch=16), "--pipeline.datamanager.patch-size 16: the LPIPS loss takes 32x32 patches"),
    ]:
        with pytest.raises(InputError) as caught:
            check(**kwargs)
        text = str(caught.value)
        assert message in text and "\n" not in text and text.endswith(off) == (kwargs.get("lpips", 1.0) > 0), text
