"""A backbone built without weights starts as upstream DINOv3 initialises DinoVisionTransformer, not as timm does.

Upstream's rule (dinov3/models/vision_transformer.py ``init_weights`` / ``init_weights_vit``, layers/patch_embed.py,
layers/layer_scale.py): Linear weights truncated normal std 0.02 with zero biases in every block (timm's Eva divides
attn.proj and mlp.fc2 by sqrt(2 (block + 1))), CLS/storage tokens normal std 0.02, mask token 0, norms 1/0,
LayerScale at its init value, patch-embedding conv uniform in ±1/sqrt(fan_in). Statistics are checked on ViT-S-sized
tensors (384 wide), where the standard error of a std estimate is 0.2-4% and timm's rescaled blocks are 29-71% off.
"""

from __future__ import annotations

import math

import pytest
import torch

from dinov3_pl.models import DINOv3Backbone, init_as_upstream

WIDTH = 384  # ViT-S


def _assert_std(tensor: torch.Tensor, expected: float, name: str) -> None:
    values = tensor.detach().double().flatten()
    relative_error = 1 / math.sqrt(2 * values.numel())  # standard error of a sample std, relative
    assert abs(values.std().item() / expected - 1) < 5 * relative_error + 1e-3, (name, values.std().item())
    assert abs(values.mean().item()) < 5 * expected / math.sqrt(values.numel()), (name, values.mean().item())


@pytest.fixture(scope="module")
def vit_s():
    torch.manual_seed(0)
    return DINOv3Backbone("vit_small_patch16_dinov3_qkvb", depth=4)  # 4 blocks: timm's rescale grows with depth


def test_every_linear_weight_has_std_002_and_zero_bias(vit_s):
    linears = {name: module for name, module in vit_s.named_modules() if isinstance(module, torch.nn.Linear)}
    assert len(linears) == 4 * 4  # qkv, proj, fc1, fc2 per block
    for name, linear in linears.items():
        _assert_std(linear.weight, 0.02, name)
        assert linear.weight.abs().max() <= 2.0  # trunc_normal_'s default bounds, as upstream
        if not name.endswith("qkv"):  # timm's fused qkv has no bias: q_bias / v_bias below
            assert torch.count_nonzero(linear.bias) == 0, name
    for block in vit_s.vit.blocks:  # the fused qkv bias upstream; timm holds its Q and V parts
        assert torch.count_nonzero(block.attn.q_bias) == 0 and torch.count_nonzero(block.attn.v_bias) == 0


def test_tokens_patch_embedding_norms_and_layerscale(vit_s):
    vit = vit_s.vit
    _assert_std(vit.cls_token, 0.02, "cls_token")
    _assert_std(vit.reg_token, 0.02, "reg_token")
    assert torch.count_nonzero(vit_s.mask_token) == 0
    bound = 1 / math.sqrt(3 * 16 * 16)
    for name, param in (("weight", vit.patch_embed.proj.weight), ("bias", vit.patch_embed.proj.bias)):
        assert param.abs().max() <= bound, name
        _assert_std(param, bound / math.sqrt(3), f"patch_embed.{name}")  # uniform(-b, b) has std b / sqrt(3)
    norms = [module for module in vit.modules() if isinstance(module, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 4 + 1
    for norm in norms:
        assert torch.all(norm.weight == 1) and torch.count_nonzero(norm.bias) == 0
    for block in vit.blocks:
        assert torch.all(block.gamma_1 == 1e-5) and torch.all(block.gamma_2 == 1e-5)


def test_swiglu_layerscale_override_and_rope_follow_the_same_rule():
    torch.manual_seed(1)
    backbone = DINOv3Backbone("vit_small_plus_patch16_dinov3", depth=2, init_values=0.1)
    for block in backbone.vit.blocks:
        for name in ("fc1_g", "fc1_x", "fc2"):
            _assert_std(getattr(block.mlp, name).weight, 0.02, name)
        assert torch.all(block.gamma_1 == 0.1) and torch.all(block.gamma_2 == 0.1)
    head_dim = WIDTH // 6  # RoPE periods: base 100 ** (2 i / (head_dim / 2)), i < head_dim / 4, as upstream
    expected = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 2))
    torch.testing.assert_close(backbone.vit.rope.periods.double(), expected, rtol=1e-6, atol=0)


def test_weights_replace_every_initialised_value(tmp_path):
    torch.manual_seed(2)
    source = DINOv3Backbone("vit_small_patch16_dinov3", depth=2, embed_dim=64, num_heads=2)
    with torch.no_grad():
        for param in source.parameters():
            param.add_(torch.randn_like(param))
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    loaded = DINOv3Backbone(
        "vit_small_patch16_dinov3", weights=tmp_path / "backbone.pth", depth=2, embed_dim=64, num_heads=2
    )
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_parameter_upstream_does_not_have_is_reported():
    with pytest.raises(ValueError, match=r"does not know how upstream DINOv3 initialises \['vit.pos_embed'\]"):
        DINOv3Backbone("vit_small_patch16_dinov3", depth=1, embed_dim=64, num_heads=2, use_abs_pos_emb=True)
    backbone = DINOv3Backbone("vit_small_patch16_dinov3", depth=1, embed_dim=64, num_heads=2)
    init_as_upstream(backbone)  # idempotent in kind: callable again, e.g. after changing a layer
    assert torch.count_nonzero(backbone.mask_token) == 0
