"""``dinov3-pl export``: each format (slim dinov3-pl checkpoint, timm state dict, Hugging Face folder) from an SSL
checkpoint, a ``_qkvb`` ViT with non-zero q/v biases and storage tokens, and a SwiGLU ViT; the outputs checked
against transformers' ``DINOv3ViTModel`` and timm's own loader, the round trips bit for bit, the bad inputs as one
line. The 3-step CLI fit that makes the real SSL checkpoint takes ~15 s on 2 CPU cores (once per module)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from dinov3_pl.cli import console_main
from dinov3_pl.export import export_backbone
from dinov3_pl.models.backbone import DINOv3Backbone
from dinov3_pl.models.weights import build_backbone, read_checkpoint, recorded_backbones
from tests.helpers import save_tiny_ssl_checkpoint

TOLERANCE = 1e-5
TINY = dict(depth=2, embed_dim=64, num_heads=2, patch_size=8)
CASES = {
    # (b) q/v biases (non-zero after _randomised) and 4 storage tokens
    "qkvb_storage": ("vit_small_patch16_dinov3_qkvb", TINY),
    # (c) SwiGLU MLP (the H+ arch at toy size)
    "swiglu": ("vit_huge_plus_patch16_dinov3_qkvb", {**TINY, "img_size": 32}),
    # no q/v bias parameters at all, no storage tokens
    "plain_no_storage": ("vit_small_patch16_dinov3", {**TINY, "num_reg_tokens": 0}),
}


def _randomised(arch: str, overrides: dict, seed: int) -> DINOv3Backbone:
    """A backbone whose every parameter is non-trivial (biases, LayerScale and mask token included)."""
    backbone = DINOv3Backbone(arch, **overrides).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in backbone.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return backbone


def _two_backbone_checkpoint(path: Path, arch: str, overrides: dict) -> tuple[DINOv3Backbone, DINOv3Backbone]:
    """A checkpoint laid out as DINOSSLModule writes it: teacher (the default) and student, both recorded."""
    teacher, student = _randomised(arch, overrides, seed=1), _randomised(arch, overrides, seed=2)
    record = {"arch": arch, "timm_overrides": overrides}
    state = {f"teacher.backbone.{key}": value for key, value in teacher.state_dict().items()}
    state |= {f"student.backbone.{key}": value for key, value in student.state_dict().items()}
    state["teacher.dino_head.last_layer.weight"] = torch.zeros(4, 4)
    teacher_record = {**record, "prefix": "teacher.backbone."}
    torch.save(
        {
            "state_dict": state,
            "backbone_config": teacher_record,
            "backbone_configs": {"teacher": teacher_record, "student": {**record, "prefix": "student.backbone."}},
        },
        path,
    )
    return teacher, student


def _images(patch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-square images (not the configured size) and a mask over their 5x3 patch grid."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 5 * patch_size, 3 * patch_size, generator=generator)
    return images, torch.rand(2, 15, generator=generator) > 0.6


def _tokens(backbone: DINOv3Backbone, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """Our outputs laid out as transformers' last_hidden_state and timm's forward_features: [CLS, storage, patches]."""
    with torch.no_grad():
        out = backbone(images, masks=masks)
    return torch.cat([out["cls"][:, None], out["storage"], out["patch"]], dim=1)


def _assert_same_tensors(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def _assert_matches_transformers(folder: Path, backbone: DINOv3Backbone) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(folder).eval()
    assert type(model).__name__ == "DINOv3ViTModel"
    images, masks = _images(backbone.patch_size)
    with torch.no_grad():
        plain, masked = model(images), model(images, bool_masked_pos=masks)
    for output, ours in ((plain, _tokens(backbone, images)), (masked, _tokens(backbone, images, masks))):
        assert (output.last_hidden_state - ours).abs().max() <= TOLERANCE
        assert (output.pooler_output - ours[:, 0]).abs().max() <= TOLERANCE
    # The masked forward differs, so the mask token went across too.
    assert (masked.last_hidden_state - plain.last_hidden_state).abs().max() > 1e-3


def _load_with_timm(path: Path, arch: str, overrides: dict) -> torch.nn.Module:
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **overrides).eval()


# ------------------------------------------------------------------------------------------------ Hugging Face
@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_export_matches_transformers(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    arch, overrides = CASES[case]
    teacher, _ = _two_backbone_checkpoint(tmp_path / "run.ckpt", arch, overrides)
    if case == "qkvb_storage":
        assert teacher.vit.blocks[0].attn.q_bias.abs().min() > 0 and teacher.num_storage_tokens == 4
    export_backbone(tmp_path / "run.ckpt", "hf", tmp_path / "hf")
    assert sorted(path.name for path in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    _assert_matches_transformers(tmp_path / "hf", teacher)

    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    fields = transformers.DINOv3ViTConfig().to_dict()
    assert set(written) - {"architectures"} <= set(fields), set(written) - set(fields)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    vit, block = teacher.vit, teacher.vit.blocks[0]
    gated = case == "swiglu"
    expected = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": (block.mlp.fc1_g if gated else block.mlp.fc1).out_features,
        "patch_size": 8,
        "num_register_tokens": teacher.num_storage_tokens,
        "use_gated_mlp": gated,
        "hidden_act": "silu" if gated else "gelu",
        "query_bias": case != "plain_no_storage",
        "value_bias": case != "plain_no_storage",
        "key_bias": False,
        "rope_theta": vit.rope.temperature,
        "layer_norm_eps": vit.norm.eps,
        "layerscale_value": block.init_values,
        "image_size": vit.patch_embed.img_size[0],
    }
    assert {key: getattr(config, key) for key in expected} == expected


@pytest.mark.parametrize("case", ["qkvb_storage", "swiglu"])
def test_hf_round_trip_is_exact(case, tmp_path):
    arch, overrides = CASES[case]
    teacher, _ = _two_backbone_checkpoint(tmp_path / "run.ckpt", arch, overrides)
    export_backbone(tmp_path / "run.ckpt", "hf", tmp_path / "hf")
    loaded = build_backbone(arch, weights=tmp_path / "hf", **overrides)
    _assert_same_tensors(loaded.state_dict(), teacher.state_dict())


def test_hf_round_trip_without_storage_tokens(tmp_path):
    arch, overrides = CASES["plain_no_storage"]
    teacher, _ = _two_backbone_checkpoint(tmp_path / "run.ckpt", arch, overrides)
    export_backbone(tmp_path / "run.ckpt", "hf", tmp_path / "hf")
    loaded = build_backbone(arch, weights=tmp_path / "hf", **overrides)
    _assert_same_tensors(loaded.state_dict(), teacher.state_dict())


# ------------------------------------------------------------------------------------------------ timm
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_timm_export_loads_with_timms_own_loader(case, suffix, tmp_path):
    from timm.models.eva import checkpoint_filter_fn

    arch, overrides = CASES[case]
    teacher, _ = _two_backbone_checkpoint(tmp_path / "run.ckpt", arch, overrides)
    out = tmp_path / f"timm{suffix}"
    export_backbone(tmp_path / "run.ckpt", "timm", out)
    model = _load_with_timm(out, arch, overrides)
    _assert_same_tensors(model.state_dict(), teacher.vit.state_dict())
    images, _ = _images()
    with torch.no_grad():
        assert (model.forward_features(images) - _tokens(teacher, images)).abs().max() <= TOLERANCE
    # Back into dinov3-pl: the same ViT; the mask token is not in timm's model, so it stays at its init (zero).
    loaded = build_backbone(arch, weights=out, **overrides)
    _assert_same_tensors(loaded.vit.state_dict(), teacher.vit.state_dict())
    # Why the file holds no mask_token: timm's filter would take it for a masked-image-modelling checkpoint and
    # move the final norm to fc_norm, which this model does not use.
    written = read_checkpoint(out)
    assert "mask_token" not in written
    assert "fc_norm.weight" in checkpoint_filter_fn({**written, "mask_token": teacher.mask_token}, model)


# ------------------------------------------------------------------------------------------------ slim ckpt
def test_ckpt_export_is_slim_and_loads_everywhere(tmp_path):
    from dinov3_pl.modules.features import FeatureExtractor
    from dinov3_pl.modules.knn import KNN

    arch, overrides = CASES["swiglu"]
    teacher, student = _two_backbone_checkpoint(tmp_path / "run.ckpt", arch, overrides)
    out = tmp_path / "student.ckpt"
    export_backbone(tmp_path / "run.ckpt", "ckpt", out, backbone_name="student")
    slim = torch.load(out, map_location="cpu", weights_only=True)  # no pickled objects
    assert set(slim) == {"state_dict", "backbone_config", "backbone_configs"}
    assert slim["backbone_config"] == {
        "arch": arch,
        "timm_overrides": overrides,
        "prefix": "backbone.",
        "kind": "dinov3",
    }
    assert recorded_backbones(slim) == {"student": slim["backbone_config"]}
    _assert_same_tensors(slim["state_dict"], {f"backbone.{k}": v for k, v in student.state_dict().items()})
    for backbone in (
        DINOv3Backbone(None, weights=out),
        build_backbone(None, weights=str(out), backbone_name="student"),
        KNN(arch=None, weights=str(out), backbone_kwargs=None).backbone,
        FeatureExtractor(arch=None, weights=str(out), backbone_kwargs=None, output=str(tmp_path / "f.pt")).backbone,
    ):
        _assert_same_tensors(backbone.state_dict(), student.state_dict())
    assert not torch.equal(teacher.mask_token, student.mask_token)


def test_weights_without_a_record_export_with_arch(tmp_path):
    arch, overrides = CASES["qkvb_storage"]
    teacher, _ = _two_backbone_checkpoint(tmp_path / "run.ckpt", arch, overrides)
    export_backbone(tmp_path / "run.ckpt", "hf", tmp_path / "hf")
    # A Hugging Face folder records no dinov3-pl architecture: --arch and the overrides rebuild it.
    console_main(
        ["export", str(tmp_path / "hf"), "--format", "ckpt", "--out", str(tmp_path / "from_hf.ckpt"), "--arch", arch]
        + ["--timm-overrides", json.dumps(overrides)]
    )
    _assert_same_tensors(DINOv3Backbone(None, weights=tmp_path / "from_hf.ckpt").state_dict(), teacher.state_dict())


# ------------------------------------------------------------------------------------------------ SSL checkpoints
@pytest.fixture(scope="module")
def fitted_checkpoint(tmp_path_factory) -> Path:
    """A real DINOSSLModule checkpoint: 3 steps of the demo recipe from the CLI (as tests/test_ssl_fit.py)."""
    from dinov3_pl.cli import main as cli_main
    from tests.test_ssl_fit import cli_args

    root = tmp_path_factory.mktemp("fit")
    cli_main(cli_args(root))
    return root / "checkpoints" / "last.ckpt"


def _recorded_state(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The backbone's tensors as the checkpoint stores them, read without any dinov3-pl loader."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


@pytest.mark.parametrize("source", ["helper", "cli_fit"])
def test_ssl_checkpoint_exports_every_format_from_the_command_line(source, request, tmp_path):
    if source == "helper":
        overrides = dict(depth=2, embed_dim=32, num_heads=2, patch_size=4, img_size=16)
        ckpt = save_tiny_ssl_checkpoint(tmp_path / "tiny.ckpt", overrides)
    else:
        ckpt = request.getfixturevalue("fitted_checkpoint")
        overrides = read_checkpoint(ckpt)["backbone_config"]["timm_overrides"]
    arch = "vit_small_patch16_dinov3"
    teacher_state = _recorded_state(ckpt, "teacher.backbone.")
    teacher = DINOv3Backbone(arch, **overrides).eval()
    teacher.load_state_dict(teacher_state)
    for fmt, out in (("ckpt", "slim.ckpt"), ("timm", "timm.pth"), ("hf", "hf")):
        console_main(["export", str(ckpt), "--format", fmt, "--out", str(tmp_path / out)])

    slim = torch.load(tmp_path / "slim.ckpt", map_location="cpu", weights_only=True)
    _assert_same_tensors(slim["state_dict"], {f"backbone.{key}": value for key, value in teacher_state.items()})
    model = _load_with_timm(tmp_path / "timm.pth", arch, overrides)
    images, _ = _images(teacher.patch_size)
    with torch.no_grad():
        assert (model.forward_features(images) - _tokens(teacher, images)).abs().max() <= TOLERANCE
    _assert_same_tensors(build_backbone(arch, weights=tmp_path / "hf", **overrides).state_dict(), teacher_state)
    _assert_matches_transformers(tmp_path / "hf", teacher)

    if source == "cli_fit":  # the student is recorded too, and after 3 steps it is not the EMA teacher
        console_main(
            ["export", str(ckpt), "--format", "ckpt", "--out", str(tmp_path / "s.ckpt"), "--backbone", "student"]
        )
        student_state = _recorded_state(ckpt, "student.backbone.")
        assert not all(torch.equal(student_state[key], value) for key, value in teacher_state.items())
        exported = torch.load(tmp_path / "s.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        _assert_same_tensors(exported, {f"backbone.{key}": value for key, value in student_state.items()})


# ------------------------------------------------------------------------------------------------ timm backbones
def _timm_kind_checkpoint(path: Path) -> torch.nn.Module:
    """A distillation-style checkpoint whose student is a TimmBackbone (a non-DINOv3 timm model, record kind
    "timm"); skipped where TimmBackbone does not exist."""
    timm_backbone = pytest.importorskip("dinov3_pl.models.timm_backbone")
    student = timm_backbone.TimmBackbone("test_convnext").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    record = {"arch": "test_convnext", "timm_overrides": {}, "prefix": "student.backbone.", "kind": "timm"}
    torch.save(
        {
            "state_dict": {f"student.backbone.{key}": value for key, value in student.state_dict().items()},
            "backbone_config": record,
            "backbone_configs": {"student": record},
        },
        path,
    )
    return student


def test_timm_kind_backbone_exports_the_timm_model(tmp_path, capsys):
    student = _timm_kind_checkpoint(tmp_path / "distill.ckpt")
    message = export_backbone(tmp_path / "distill.ckpt", "timm", tmp_path / "convnext.safetensors")
    assert "'test_convnext', pretrained=True" in message and "num_classes=0" in message  # TimmBackbone drops the head
    loaded = _load_with_timm(tmp_path / "convnext.safetensors", "test_convnext", {"num_classes": 0})
    _assert_same_tensors(loaded.state_dict(), student.model.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), student(images)["cls"])

    export_backbone(tmp_path / "distill.ckpt", "ckpt", tmp_path / "slim.ckpt")
    slim = torch.load(tmp_path / "slim.ckpt", map_location="cpu", weights_only=True)
    assert slim["backbone_config"] == {
        "arch": "test_convnext",
        "timm_overrides": {},
        "prefix": "backbone.",
        "kind": "timm",
    }
    _assert_same_tensors(build_backbone(None, weights=tmp_path / "slim.ckpt").state_dict(), student.state_dict())

    line = _error_line(capsys, [str(tmp_path / "distill.ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert "--format hf writes DINOv3 ViTs only; backbone 'student' is timm's test_convnext" in line
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------------ bad input
def _error_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        console_main(["export", *argv])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_input_is_one_line(tmp_path, capsys):
    arch, overrides = CASES["qkvb_storage"]
    teacher, _ = _two_backbone_checkpoint(tmp_path / "run.ckpt", arch, overrides)
    torch.save(teacher.vit.state_dict(), tmp_path / "timm.pth")
    run, out = str(tmp_path / "run.ckpt"), str(tmp_path / "out.ckpt")

    line = _error_line(capsys, [run, "--format", "ckpt", "--out", out, "--backbone", "ema"])
    assert "records no backbone named 'ema' (it records student, teacher)" in line
    line = _error_line(capsys, [str(tmp_path / "timm.pth"), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert "records no architecture" in line and "give --arch" in line
    line = _error_line(capsys, [str(tmp_path / "timm.pth"), "--format", "ckpt", "--out", out, "--backbone", "teacher"])
    assert "records no named backbones" in line and "drop --backbone" in line
    line = _error_line(capsys, [run, "--format", "ckpt", "--out", out, "--arch", "vit_base_patch16_dinov3"])
    assert "drop --arch" in line
    line = _error_line(capsys, [run, "--format", "ckpt", "--out", out, "--timm-overrides", "depth=2"])
    assert "--timm-overrides" in line and "not valid JSON" in line
    line = _error_line(capsys, [run, "--format", "onnx", "--out", out])
    assert "invalid choice: 'onnx'" in line
    line = _error_line(capsys, [str(tmp_path / "nowhere.ckpt"), "--format", "ckpt", "--out", out])
    assert "nowhere.ckpt does not exist" in line
    line = _error_line(capsys, [run, "--format", "ckpt", "--out", run, "--overwrite"])
    assert "is the input WEIGHTS" in line
    assert not (tmp_path / "out.ckpt").exists() and not (tmp_path / "hf").exists()  # nothing half-written

    console_main(["export", run, "--format", "ckpt", "--out", out])
    line = _error_line(capsys, [run, "--format", "ckpt", "--out", out, "--backbone", "student"])
    assert "exists; pass --overwrite" in line
    console_main(["export", run, "--format", "ckpt", "--out", out, "--backbone", "student", "--overwrite"])
    assert recorded_backbones(read_checkpoint(out)).keys() == {"student"}
    assert [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")] == []


def test_hf_refuses_what_transformers_cannot_compute(tmp_path, capsys):
    arch, overrides = CASES["qkvb_storage"]
    torch.save(_randomised(arch, {**overrides, "qk_norm": True}, seed=0).vit.state_dict(), tmp_path / "timm.pth")
    argv = [str(tmp_path / "timm.pth"), "--format", "hf", "--out", str(tmp_path / "hf"), "--arch", arch]
    line = _error_line(capsys, [*argv, "--timm-overrides", json.dumps({**overrides, "qk_norm": True})])
    assert "cannot be written as a Hugging Face DINOv3ViTModel" in line and "norms inside the attention" in line


# ------------------------------------------------------------------------------------------------ the command
def test_other_subcommands_still_reach_lightning_cli(capsys):
    with pytest.raises(SystemExit) as stop:
        console_main(["--help"])
    assert stop.value.code == 0
    assert "{fit,validate,test,predict}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        console_main(["export", "--help"])
    assert stop.value.code == 0 and "usage: dinov3-pl export" in capsys.readouterr().out


def test_python_dash_m_runs_the_export(tmp_path):
    arch, overrides = CASES["qkvb_storage"]
    teacher, _ = _two_backbone_checkpoint(tmp_path / "run.ckpt", arch, overrides)
    argv = [str(tmp_path / "run.ckpt"), "--format", "timm", "--out", str(tmp_path / "t.safetensors")]
    result = subprocess.run(
        [sys.executable, "-m", "dinov3_pl.export", *argv], capture_output=True, text=True, check=True, timeout=120
    )
    assert "timm.create_model('vit_small_patch16_dinov3_qkvb', pretrained=True" in result.stdout
    _assert_same_tensors(read_checkpoint(tmp_path / "t.safetensors"), teacher.vit.state_dict())
