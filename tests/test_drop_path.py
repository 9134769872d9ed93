"""Subset stochastic depth (upstream DINOv3's) against timm's per-sample DropPath."""

from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath

from dinov3_pl.models.backbone import DINOv3Backbone
from dinov3_pl.models.drop_path import subset_drop_path_block, subset_residual

TINY = dict(depth=2, embed_dim=64, num_heads=2, patch_size=4, img_size=32, init_values=1.0)


class FixedMask(torch.nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens * self.mask


def branch(tokens: torch.Tensor) -> torch.Tensor:
    return torch.tanh(tokens) * 3 + 1


@pytest.mark.parametrize("batch, rate", [(8, 0.3), (5, 0.5), (3, 0.9)])
def test_subset_residual_keeps_a_fixed_number_and_scales_it(batch, rate):
    x = torch.randn(batch, 6, 4)
    subset = max(int(batch * (1 - rate)), 1)
    out = subset_residual(x, branch, rate)
    touched = (out - x).flatten(1).abs().amax(1) > 0
    assert touched.sum() == subset
    torch.testing.assert_close(out[touched], x[touched] + branch(x[touched]) * batch / subset)
    torch.testing.assert_close(out[~touched], x[~touched])


def test_expectation_equals_timm_drop_path_and_the_full_residual():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4)
    draws, rate = 4000, 0.3
    subset_mean = torch.stack([subset_residual(x, branch, rate) for _ in range(draws)]).mean(0)
    drop_path = DropPath(rate).train()
    timm_mean = torch.stack([x + drop_path(branch(x)) for _ in range(draws)]).mean(0)
    expected = x + branch(x)
    # Each estimate's standard error is below 0.03 * |branch| here (Bernoulli keep, 4000 draws).
    tolerance = 0.12 * branch(x).abs() + 1e-3
    assert ((subset_mean - expected).abs() <= tolerance).all()
    assert ((timm_mean - expected).abs() <= tolerance).all()


def test_block_matches_timm_forward_with_the_same_samples_dropped():
    backbone = DINOv3Backbone("vit_small_patch16_dinov3", **TINY, drop_path_rate=0.4).train()
    block = backbone.vit.blocks[0]
    x = torch.randn(5, 1 + backbone.num_storage_tokens + 64, 64)
    rope = backbone._rope((8, 8))
    torch.manual_seed(3)
    ours = subset_drop_path_block(block, x, rope, rate=0.4)

    # timm's own block forward, its DropPath replaced by masks that keep the very samples the subset drew.
    torch.manual_seed(3)
    subset = int(5 * 0.6)
    masks = []
    for _ in range(2):
        keep = torch.zeros(5, 1, 1)
        keep[torch.randperm(5)[:subset]] = 5 / subset
        masks.append(keep)
    block.drop_path1, block.drop_path2 = (FixedMask(mask) for mask in masks)
    torch.testing.assert_close(ours, block(x, rope=rope), rtol=1e-5, atol=1e-5)


def test_backbone_uses_it_only_in_training_and_gradient_checkpointing_replays_it():
    images = torch.randn(4, 3, 32, 32)
    plain = DINOv3Backbone("vit_small_patch16_dinov3", **TINY, drop_path_rate=0.5, drop_path_subset=True)
    recomputed = DINOv3Backbone(
        "vit_small_patch16_dinov3", **TINY, drop_path_rate=0.5, drop_path_subset=True, grad_checkpointing=True
    )
    recomputed.load_state_dict(plain.state_dict())
    grads = []
    for model in (plain, recomputed):
        model.train()
        torch.manual_seed(7)
        model(images)["cls"].square().sum().backward()
        grads.append(model.vit.blocks[1].mlp.fc1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    # Half of the samples skip each branch: outputs vary between training forwards, never in eval.
    with torch.no_grad():
        assert not torch.equal(plain(images)["cls"], plain(images)["cls"])
        plain.eval()
        torch.testing.assert_close(plain(images)["cls"], recomputed.eval()(images)["cls"])
