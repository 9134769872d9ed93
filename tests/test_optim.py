"""Upstream DINOv3 parameter groups: the no-weight-decay set, layer-wise LR decay, per-module clipping."""

import pytest
import torch
from torch import nn

from dinov3_pl.models import DINOHead, DINOv3Backbone
from dinov3_pl.optim import build_param_groups, clip_grad_norm_per_module

DEPTH = 3


@pytest.fixture(scope="module")
def modules():
    torch.manual_seed(0)
    backbone = DINOv3Backbone(
        "vit_small_patch16_dinov3_qkvb", depth=DEPTH, embed_dim=32, num_heads=2, patch_size=4, img_size=16
    )
    return {"backbone": backbone, "dino_head": DINOHead(32, 16, 24, 8), "ibot_head": DINOHead(32, 16, 24, 8)}


def multipliers(groups):
    return {
        (g["module"], name): (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
        for g in groups
        for name in g["names"]
    }


def test_every_trainable_parameter_in_exactly_one_group(modules):
    groups = build_param_groups(modules, num_blocks=DEPTH)
    grouped = [id(p) for g in groups for p in g["params"]]
    expected = [id(p) for m in modules.values() for p in m.parameters()]
    assert sorted(grouped) == sorted(expected)


def test_no_weight_decay_only_on_biases_norms_and_layerscale(modules):
    table = multipliers(build_param_groups(modules, num_blocks=DEPTH))
    no_wd = {name for (module, name), (_, wd, _) in table.items() if wd == 0.0 and module == "backbone"}
    assert "vit.cls_token" not in no_wd and "vit.reg_token" not in no_wd and "mask_token" not in no_wd
    assert "vit.patch_embed.proj.weight" not in no_wd
    for name in (
        "vit.patch_embed.proj.bias",
        "vit.norm.weight",
        "vit.norm.bias",
        "vit.blocks.0.gamma_1",
        "vit.blocks.1.gamma_2",
        "vit.blocks.2.norm1.weight",
        "vit.blocks.0.attn.q_bias",
        "vit.blocks.0.mlp.fc1.bias",
    ):
        assert name in no_wd, name
    for name in no_wd:
        assert name.endswith("bias") or "norm" in name or "gamma" in name
    head_no_wd = {name for (module, name), (_, wd, _) in table.items() if wd == 0.0 and module == "dino_head"}
    assert head_no_wd == {n for n, _ in modules["dino_head"].named_parameters() if n.endswith("bias")}


def test_layer_decay_factors(modules):
    decay, patch_mult = 0.9, 0.2
    table = multipliers(
        build_param_groups(modules, num_blocks=DEPTH, layer_decay=decay, patch_embed_lr_mult=patch_mult)
    )
    lr = {name: v[0] for (module, name), v in table.items() if module == "backbone"}
    assert lr["vit.cls_token"] == pytest.approx(decay ** (DEPTH + 1))
    assert lr["mask_token"] == pytest.approx(decay ** (DEPTH + 1))
    assert lr["vit.patch_embed.proj.weight"] == pytest.approx(decay ** (DEPTH + 1) * patch_mult)
    for block in range(DEPTH):
        assert lr[f"vit.blocks.{block}.attn.qkv.weight"] == pytest.approx(decay ** (DEPTH - block))
    assert lr["vit.norm.weight"] == 1.0
    assert all(v[0] == 1.0 for (module, _), v in table.items() if module != "backbone")
    last = {name for (module, name), v in table.items() if v[2]}
    assert last == {"last_layer.weight"}


def test_per_module_clipping_matches_manual_norms():
    torch.manual_seed(0)
    modules = {"a": nn.Linear(8, 8), "b": nn.Linear(8, 4)}
    for module, scale in zip(modules.values(), (10.0, 0.01), strict=True):
        for p in module.parameters():
            p.grad = torch.randn_like(p) * scale
    before = {k: torch.cat([p.grad.flatten() for p in m.parameters()]).norm() for k, m in modules.items()}
    norms = clip_grad_norm_per_module(modules, max_norm=1.0)
    after = {k: torch.cat([p.grad.flatten() for p in m.parameters()]).norm() for k, m in modules.items()}
    for key in modules:
        assert norms[key] == pytest.approx(before[key].item(), rel=1e-5)
    assert after["a"] == pytest.approx(1.0, rel=1e-4)  # clipped on its own norm
    assert after["b"] == pytest.approx(before["b"].item(), rel=1e-6)  # small module untouched by the big one
