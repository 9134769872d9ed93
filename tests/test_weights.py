"""Weight loading: parity with upstream DINOv3 and Hugging Face outputs, round trips, and clear errors.

The upstream fixture holds only outputs of upstream's DinoVisionTransformer run on weights made by
``make_upstream_state_dict`` below (see experiments/golden/README.md); the test rebuilds the same weights from the
same seed, so no upstream code or weights are stored here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from dinov3_pl.models.backbone import DINOv3Backbone
from dinov3_pl.models.weights import build_backbone, detect_format, load_backbone_weights, read_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
TOLERANCE = 1e-4

# Layouts the upstream fixture was made with: (fixture name, timm arch, timm overrides, generator kwargs).
UPSTREAM_LAYOUTS = {
    "vits16_depth2": (
        "vit_small_patch16_dinov3_qkvb",
        dict(depth=2),
        dict(embed_dim=384, depth=2, num_heads=6, ffn="mlp", ffn_hidden=1536),
    ),
    "vithplus16_tiny_swiglu": (
        "vit_huge_plus_patch16_dinov3_qkvb",
        dict(depth=2, embed_dim=64, num_heads=2),
        dict(embed_dim=64, depth=2, num_heads=2, ffn="swiglu", ffn_hidden=256),
    ),
}


def upstream_key_shapes(
    embed_dim: int, depth: int, num_heads: int, ffn: str, ffn_hidden: int, storage_tokens: int = 4, patch: int = 16
) -> list[tuple[str, tuple[int, ...]]]:
    """Key names and shapes of upstream's DinoVisionTransformer (layerscale, qkv bias with K-bias mask)."""
    dim = embed_dim
    shapes = [
        ("cls_token", (1, 1, dim)),
        ("storage_tokens", (1, storage_tokens, dim)),
        ("mask_token", (1, dim)),
        ("rope_embed.periods", (dim // num_heads // 4,)),
        ("patch_embed.proj.weight", (dim, 3, patch, patch)),
        ("patch_embed.proj.bias", (dim,)),
    ]
    for i in range(depth):
        block = f"blocks.{i}."
        shapes += [
            (block + "norm1.weight", (dim,)),
            (block + "norm1.bias", (dim,)),
            (block + "attn.qkv.weight", (3 * dim, dim)),
            (block + "attn.qkv.bias", (3 * dim,)),
            (block + "attn.qkv.bias_mask", (3 * dim,)),
            (block + "attn.proj.weight", (dim, dim)),
            (block + "attn.proj.bias", (dim,)),
            (block + "ls1.gamma", (dim,)),
            (block + "norm2.weight", (dim,)),
            (block + "norm2.bias", (dim,)),
        ]
        if ffn == "mlp":
            linears = [("mlp.fc1", ffn_hidden, dim), ("mlp.fc2", dim, ffn_hidden)]
        else:
            linears = [("mlp.w1", ffn_hidden, dim), ("mlp.w2", ffn_hidden, dim), ("mlp.w3", dim, ffn_hidden)]
        for name, out_features, in_features in linears:
            shapes += [
                (block + name + ".weight", (out_features, in_features)),
                (block + name + ".bias", (out_features,)),
            ]
        shapes.append((block + "ls2.gamma", (dim,)))
    shapes += [("norm.weight", (dim,)), ("norm.bias", (dim,))]
    return shapes


def make_upstream_state_dict(seed: int = 0, **layout) -> dict[str, torch.Tensor]:
    """Deterministic, non-trivial upstream weights: non-zero q/k/v biases and mask token, LayerScale far from 1e-5.

    The K third of each qkv bias is non-zero on purpose: upstream's bias_mask zeroes it, so the loader must too.
    """
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in upstream_key_shapes(**layout):
        noise = torch.randn(shape, generator=generator)
        if key == "rope_embed.periods":
            quarter = shape[0]
            value = 100.0 ** (2 * torch.arange(quarter, dtype=torch.float32) / (2 * quarter))
        elif key.endswith("bias_mask"):
            value = torch.ones(shape)
            value[shape[0] // 3 : 2 * shape[0] // 3] = 0
        elif key.endswith("gamma"):
            value = 0.5 + 0.25 * noise
        elif "norm" in key and key.endswith("weight"):
            value = 1.0 + 0.1 * noise
        elif key.endswith("bias"):
            value = 0.1 * noise
        elif key.endswith("weight"):
            value = noise / shape[1] ** 0.5 if len(shape) == 2 else 0.05 * noise
        else:  # cls, storage and mask tokens
            value = noise
        state_dict[key] = value.float()
    return state_dict


def fixed_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixture's inputs: 2 images 3x64x48 and a mask over their 4x3 patch grid."""
    generator = torch.Generator().manual_seed(1234)
    images = torch.randn(2, 3, 64, 48, generator=generator)
    masks = torch.zeros(2, 12, dtype=torch.bool)
    masks[0, [0, 5, 7]] = True
    masks[1, [2, 3, 4, 11]] = True
    return images, masks


def backbone_outputs(backbone: DINOv3Backbone, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same outputs the fixture stores for upstream, computed with our backbone."""
    with torch.no_grad():
        plain, masked = backbone(images), backbone(images, masks=masks)
        layers = backbone.get_intermediate_layers(images, n=2, return_class_token=True, return_extra_tokens=True)
        unnormed = backbone.get_intermediate_layers(images, n=[0], reshape=True, norm=False)
    out = {"cls": plain["cls"], "storage": plain["storage"], "patch": plain["patch"]}
    out.update({"masked_cls": masked["cls"], "masked_storage": masked["storage"], "masked_patch": masked["patch"]})
    for i, (patch, cls, storage) in enumerate(layers):
        out.update({f"layer{i}_patch": patch, f"layer{i}_cls": cls, f"layer{i}_storage": storage})
    out["block0_unnormed_reshaped"] = unnormed[0]
    return out


@pytest.mark.parametrize("name", sorted(UPSTREAM_LAYOUTS))
def test_upstream_pth_matches_upstream_outputs(name, tmp_path):
    arch, overrides, layout = UPSTREAM_LAYOUTS[name]
    expected = torch.load(FIXTURES / f"upstream_backbone_{name}.pt", weights_only=True)
    path = tmp_path / "upstream.pth"
    torch.save(make_upstream_state_dict(seed=0, **layout), path)
    backbone = DINOv3Backbone(arch, weights=path, **overrides).eval()
    images, masks = fixed_inputs()
    actual = backbone_outputs(backbone, images, masks)
    assert set(actual) == set(expected)
    errors = {key: (actual[key] - expected[key]).abs().max().item() for key in expected}
    assert max(errors.values()) <= TOLERANCE, errors
    # The outputs are not degenerate: the masked forward differs and the mask token was loaded.
    assert (actual["masked_patch"] - actual["patch"]).abs().max() > 1e-2
    torch.testing.assert_close(backbone.mask_token.data, make_upstream_state_dict(0, **layout)["mask_token"])


def test_upstream_training_dump_is_unwrapped(tmp_path):
    arch, overrides, layout = UPSTREAM_LAYOUTS["vits16_depth2"]
    weights = make_upstream_state_dict(seed=0, **layout)
    head = {"dino_head.mlp.0.weight": torch.zeros(3, 3)}
    teacher = {f"backbone.{k}": v for k, v in weights.items()} | head
    student = {f"student.backbone.{k}": v + 1 for k, v in weights.items()}
    full = {f"teacher.backbone.{k}": v for k, v in weights.items()} | student
    reference = DINOv3Backbone(arch, weights=weights, **overrides)
    for checkpoint in ({"teacher": teacher}, {"model": full, "iteration": 5}):
        backbone = DINOv3Backbone(arch, weights=checkpoint, **overrides)
        for (key, value), ref in zip(backbone.state_dict().items(), reference.state_dict().values(), strict=True):
            assert torch.equal(value, ref), key


def _hf_model(gated: bool, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.DINOv3ViTConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=8,
        image_size=32,
        num_register_tokens=4,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        layerscale_value=1.0,
    )
    torch.manual_seed(seed)
    model = transformers.DINOv3ViTModel(config).eval()
    with torch.no_grad():  # make every parameter non-trivial (HF initialises biases/tokens to 0 and scales to 1)
        for name, param in model.named_parameters():
            scale = 1.0 if "token" in name else 0.1
            param.add_(scale * torch.randn_like(param))
    return model


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_huggingface_folder_and_safetensors_match_transformers(gated, tmp_path):
    model = _hf_model(gated)
    model.save_pretrained(tmp_path / "hf")
    arch = "vit_small_plus_patch16_dinov3_qkvb" if gated else "vit_small_patch16_dinov3_qkvb"
    overrides = dict(depth=2, embed_dim=64, num_heads=2, patch_size=8, mlp_ratio=4.0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 40, 24, generator=generator)  # non-square, not the config's 32x32
    masks = torch.rand(2, 15, generator=generator) > 0.6
    with torch.no_grad():
        hidden = model(images).last_hidden_state
        hidden_masked = model(images, bool_masked_pos=masks).last_hidden_state
    for source in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors"):
        assert detect_format(read_state_dict(source)) == "huggingface"
        backbone = DINOv3Backbone(arch, weights=source, **overrides).eval()
        with torch.no_grad():
            ours, ours_masked = backbone(images), backbone(images, masks=masks)
        for out, reference in ((ours, hidden), (ours_masked, hidden_masked)):
            error = max(
                (out["cls"] - reference[:, 0]).abs().max().item(),
                (out["storage"] - reference[:, 1:5]).abs().max().item(),
                (out["patch"] - reference[:, 5:]).abs().max().item(),
            )
            assert error <= TOLERANCE, (source.name, error)


def test_huggingface_in_memory_state_dict_loads_like_the_saved_file(tmp_path):
    model = _hf_model(gated=False)
    model.save_pretrained(tmp_path / "hf")
    overrides = dict(depth=2, embed_dim=64, num_heads=2, patch_size=8)
    from_memory = DINOv3Backbone("vit_small_patch16_dinov3_qkvb", weights=model.state_dict(), **overrides)
    from_file = DINOv3Backbone("vit_small_patch16_dinov3_qkvb", weights=tmp_path / "hf", **overrides)
    assert any(key.startswith("model.layer.") for key in model.state_dict())  # in memory the blocks sit under model.
    for key, value in from_file.state_dict().items():
        assert torch.equal(from_memory.state_dict()[key], value), key


def test_upstream_conversion_agrees_with_timm_filter():
    from timm.models.eva import checkpoint_filter_fn

    arch, overrides, layout = UPSTREAM_LAYOUTS["vithplus16_tiny_swiglu"]
    weights = make_upstream_state_dict(seed=0, **layout)
    backbone = DINOv3Backbone(arch, weights=weights, **overrides)
    timm_view = checkpoint_filter_fn(weights, backbone.vit)  # timm's own converter (it drops mask_token)
    ours = backbone.vit.state_dict()
    assert set(timm_view) == set(ours)
    for key, value in timm_view.items():
        assert torch.equal(ours[key], value), key
    # Released upstream models store RoPE periods in bf16: still accepted.
    weights["rope_embed.periods"] = weights["rope_embed.periods"].bfloat16()
    DINOv3Backbone(arch, weights=weights, **overrides)


def test_huggingface_config_mismatch_is_reported(tmp_path):
    model = _hf_model(gated=False)
    model.config.rope_theta = 10000.0
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="rope_theta=10000"):
        DINOv3Backbone(
            "vit_small_patch16_dinov3_qkvb", weights=tmp_path / "hf", depth=2, embed_dim=64, num_heads=2, patch_size=8
        )


def _tiny(arch: str = "vit_small_patch16_dinov3_qkvb", **kw) -> DINOv3Backbone:
    return DINOv3Backbone(arch, depth=2, embed_dim=64, num_heads=2, patch_size=4, img_size=32, **kw)


def _randomise(backbone: DINOv3Backbone, seed: int = 0) -> DINOv3Backbone:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in backbone.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return backbone


def test_timm_state_dict_round_trip(tmp_path):
    source = _randomise(_tiny())
    torch.save(source.vit.state_dict(), tmp_path / "timm.pth")
    assert detect_format(read_state_dict(tmp_path / "timm.pth")) == "timm"
    loaded = _tiny(weights=tmp_path / "timm.pth")
    for key, value in source.vit.state_dict().items():
        assert torch.equal(loaded.vit.state_dict()[key], value), key
    assert torch.equal(loaded.mask_token, torch.zeros_like(loaded.mask_token))  # timm has none: stays at init
    in_place = _tiny()
    load_backbone_weights(in_place, source.vit.state_dict())
    assert torch.equal(in_place.vit.blocks[1].gamma_2, source.vit.blocks[1].gamma_2)


def test_lightning_ckpt_round_trip_rebuilds_arch(tmp_path):
    overrides = dict(depth=2, embed_dim=64, num_heads=2, patch_size=4, img_size=32)
    teacher = _randomise(DINOv3Backbone("vit_small_plus_patch16_dinov3", **overrides), seed=1)
    student = _randomise(DINOv3Backbone("vit_small_plus_patch16_dinov3", **overrides), seed=2)
    state = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    state |= {f"student.backbone.{k}": v for k, v in student.state_dict().items()}
    state["teacher.dino_head.last_layer.weight"] = torch.zeros(4, 4)
    ckpt = {
        "state_dict": state,
        "backbone_config": {"arch": "vit_small_plus_patch16_dinov3", "timm_overrides": overrides},
        "hyper_parameters": {"root": Path("/data")},  # not loadable with weights_only=True
        "epoch": 3,
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    with pytest.warns(UserWarning, match="weights_only=False"):
        rebuilt = build_backbone(weights=tmp_path / "last.ckpt")
    assert rebuilt.arch == "vit_small_plus_patch16_dinov3" and rebuilt.depth == 2
    for key, value in teacher.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    with pytest.raises(ValueError, match="differs from the checkpoint's recorded arch"):
        build_backbone("vit_small_patch16_dinov3", weights=ckpt)
    with pytest.raises(ValueError, match="arch is required"):
        build_backbone(weights={"state_dict": state})


def test_missing_and_wrong_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        _tiny(weights=tmp_path / "nowhere.pth")
    source = _tiny()
    torch.save(source.state_dict(), tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not read .*truncated.pth.*truncated, corrupt"):
        _tiny(weights=tmp_path / "truncated.pth")
    (tmp_path / "empty.safetensors").write_bytes(b"12345678")
    with pytest.raises(ValueError, match="could not read .*not a valid safetensors"):
        _tiny(weights=tmp_path / "empty.safetensors")
    with pytest.raises(FileNotFoundError, match="without model.safetensors"):
        _tiny(weights=tmp_path)


def test_other_architecture_is_reported_with_shapes(tmp_path):
    deeper = DINOv3Backbone("vit_small_patch16_dinov3_qkvb", depth=3, embed_dim=64, num_heads=2, patch_size=4)
    torch.save(deeper.state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(ValueError, match=r"dinov3_pl format.*unexpected keys: blocks\.2\."):
        _tiny(weights=tmp_path / "deeper.pth")
    wider = DINOv3Backbone("vit_small_patch16_dinov3_qkvb", depth=2, embed_dim=96, num_heads=2, patch_size=4)
    with pytest.raises(ValueError, match=r"shape mismatches: blocks\.0\.attn\.proj\.bias: checkpoint \(96,\) vs model"):
        _tiny(weights=wider.vit.state_dict())
    with pytest.raises(ValueError, match="could not recognise the weights format.*conv1.weight"):
        _tiny(weights={"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)})


def test_qkv_bias_rules():
    _, _, layout = UPSTREAM_LAYOUTS["vits16_depth2"]
    weights = make_upstream_state_dict(seed=0, **layout)
    # Non-zero Q/V biases cannot go into an arch without q_bias/v_bias: the error points to the _qkvb arch.
    with pytest.raises(ValueError, match="use the '_qkvb' variant"):
        DINOv3Backbone("vit_small_patch16_dinov3", weights=weights, depth=2)
    # All-zero biases (like the released distilled models) load into the bias-free arch exactly.
    zero_bias = dict(weights)
    for key in zero_bias:
        if key.endswith("qkv.bias"):
            zero_bias[key] = torch.zeros_like(zero_bias[key])
    DINOv3Backbone("vit_small_patch16_dinov3", weights=zero_bias, depth=2)
    # Without bias_mask upstream applies the K bias; timm cannot, so loading must refuse rather than drop it.
    no_mask = {k: v for k, v in weights.items() if not k.endswith("bias_mask")}
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.bias has a non-zero key \(K\) bias"):
        DINOv3Backbone("vit_small_patch16_dinov3_qkvb", weights=no_mask, depth=2)
    # A model trained without qkv bias loads into a _qkvb arch with zero biases (exact).
    no_bias = {k: v for k, v in weights.items() if not k.endswith(("qkv.bias", "qkv.bias_mask"))}
    backbone = DINOv3Backbone("vit_small_patch16_dinov3_qkvb", weights=no_bias, depth=2)
    assert torch.count_nonzero(backbone.vit.blocks[0].attn.q_bias) == 0
    # ... but a K bias that is already zero is harmless.
    for key in no_mask:
        if key.endswith("qkv.bias"):
            no_mask[key] = no_mask[key] * weights[key + "_mask"]
    DINOv3Backbone("vit_small_patch16_dinov3_qkvb", weights=no_mask, depth=2)
    # A model trained without qkv bias loads into a _qkvb arch with zero biases (exact).
    no_bias = {k: v for k, v in weights.items() if not k.endswith(("qkv.bias", "qkv.bias_mask"))}
    backbone = DINOv3Backbone("vit_small_patch16_dinov3_qkvb", weights=no_bias, depth=2)
    assert torch.count_nonzero(backbone.vit.blocks[0].attn.q_bias) == 0


def test_wrong_rope_periods_are_reported():
    _, _, layout = UPSTREAM_LAYOUTS["vits16_depth2"]
    weights = make_upstream_state_dict(seed=0, **layout)
    weights["rope_embed.periods"] = weights["rope_embed.periods"] ** 2  # RoPE base 10000 instead of 100
    with pytest.raises(ValueError, match="rope_embed.periods"):
        DINOv3Backbone("vit_small_patch16_dinov3_qkvb", weights=weights, depth=2)


def test_real_ssl_checkpoint_rebuilds_the_teacher_backbone(tmp_path):
    from dinov3_pl.modules.ssl import DINOSSLModule
    from dinov3_pl.modules.ssl_config import BackboneConfig, HeadConfig

    overrides = dict(depth=2, embed_dim=64, num_heads=2, patch_size=4, img_size=32)
    head = HeadConfig(hidden_dim=32, bottleneck_dim=16, num_prototypes=64)
    module = DINOSSLModule(
        backbone=BackboneConfig(arch="vit_small_plus_patch16_dinov3", timm_overrides=overrides),
        dino_head=head,
        ibot_head=head,
    )
    torch.manual_seed(0)
    with torch.no_grad():  # teacher and student must differ so that picking the wrong one fails
        for param in module.teacher.parameters():
            param.add_(torch.randn_like(param))
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)  # records backbone_config, as Lightning does when saving
    torch.save(checkpoint, tmp_path / "run.ckpt")
    # The module stores its dataclass hyper-parameters as dicts, so the file loads with weights_only=True (no
    # fallback warning) and can be read safely.
    torch.load(tmp_path / "run.ckpt", map_location="cpu", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        backbone = build_backbone(weights=tmp_path / "run.ckpt")
    assert backbone.arch == "vit_small_plus_patch16_dinov3"
    for key, value in module.teacher.backbone.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key
