"""A dinov3-pl ``.ckpt`` records the backbone architecture it was trained with: building from it uses that record,
and arguments that contradict it fail with an error whose last sentence says what to change."""

from __future__ import annotations

import pytest
import torch

from dinov3_pl.models import DINOv3Backbone, build_backbone, load_backbone_weights
from dinov3_pl.modules import KNN, FrozenBackboneModule
from tests.helpers import save_tiny_ssl_checkpoint

ARCH = "vit_small_patch16_dinov3"
RECORDED = {"depth": 2, "embed_dim": 96, "num_heads": 3, "patch_size": 8, "img_size": 32}
FIX = (
    "pass arch: null and drop backbone_kwargs "
    "(in Python: DINOv3Backbone(None, weights=path) or build_backbone(None, path))."
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_ssl_checkpoint(tmp_path_factory.mktemp("run") / "run.ckpt", RECORDED, arch=ARCH)


def _teacher_state(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {key.removeprefix("teacher.backbone."): value for key, value in state.items()}


def _assert_loaded_exactly(backbone: torch.nn.Module, path) -> None:
    loaded = backbone.state_dict()
    for key, value in _teacher_state(path).items():
        assert torch.equal(loaded[key], value), key


def _assert_fix_is_the_last_sentence(message: str) -> None:
    assert "\n" not in message
    assert message.endswith(FIX), message
    assert f"arch {ARCH!r}" in message and "'num_heads': 3" in message  # names what the checkpoint records


def test_knn_with_the_configs_arch_and_other_overrides_says_to_drop_them(ckpt):
    # The user's case: an eval config's arch + backbone_kwargs over a checkpoint trained with other overrides.
    other = {"depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 4, "img_size": 32}
    with pytest.raises(ValueError, match="contradict the architecture recorded") as error:
        KNN(arch=ARCH, weights=str(ckpt), backbone_kwargs=other, ks=(1,))
    message = str(error.value)
    assert "embed_dim: recorded 96, given 64" in message and "patch_size: recorded 8, given 4" in message
    _assert_fix_is_the_last_sentence(message)


def test_an_override_that_changes_no_shape_is_still_an_error(ckpt):
    # num_heads=6 over 3 recorded heads fits every parameter shape, so it used to load silently.
    with pytest.raises(ValueError, match="num_heads: recorded 3, given 6") as error:
        build_backbone(ARCH, ckpt, **{**RECORDED, "num_heads": 6})
    _assert_fix_is_the_last_sentence(str(error.value))
    with pytest.raises(ValueError, match="num_heads: recorded 3, given 6"):
        load_backbone_weights(DINOv3Backbone(ARCH, **{**RECORDED, "num_heads": 6}), ckpt)


def test_unrecorded_overrides_other_than_harmless_ones_are_errors(ckpt):
    with pytest.raises(ValueError, match=r"mlp_ratio: not recorded \(the arch's default was trained\), given 2"):
        build_backbone(None, ckpt, mlp_ratio=2)
    with pytest.raises(ValueError, match="img_size: recorded 32, given 64"):
        build_backbone(None, ckpt, img_size=64)


def test_another_arch_is_an_error_with_the_fix(ckpt):
    with pytest.raises(ValueError, match="differs from the checkpoint's recorded arch") as error:
        FrozenBackboneModule(arch="vit_base_patch16_dinov3", weights=str(ckpt))
    _assert_fix_is_the_last_sentence(str(error.value))


def test_a_mismatching_backbone_gets_the_fix_in_the_shape_error(ckpt):
    # Loading in place: a backbone whose arch/overrides attributes say nothing about its shapes (built elsewhere).
    backbone = DINOv3Backbone(ARCH, depth=2, embed_dim=64, num_heads=2, patch_size=8)
    backbone.timm_overrides = dict(RECORDED)
    with pytest.raises(ValueError, match="shape mismatches") as error:
        load_backbone_weights(backbone, ckpt)
    _assert_fix_is_the_last_sentence(str(error.value))


def test_the_recorded_architecture_is_built_and_loaded_exactly(ckpt):
    for backbone in (
        DINOv3Backbone(None, weights=ckpt),  # was a TypeError
        DINOv3Backbone(None, weights=str(ckpt)),
        DINOv3Backbone(ARCH, weights=ckpt),  # the recorded overrides fill in
        build_backbone(None, ckpt),
        build_backbone(ARCH, ckpt, **RECORDED),  # repeating the record (the eval configs as they are) is fine
        build_backbone(None, ckpt, dynamic_img_size=True),  # DINOv3Backbone's own default
        FrozenBackboneModule(arch=None, weights=str(ckpt), backbone_kwargs=None).backbone,
    ):
        assert backbone.arch == ARCH and RECORDED.items() <= backbone.timm_overrides.items()
        assert backbone.depth == 2 and backbone.vit.blocks[0].attn.num_heads == 3
        _assert_loaded_exactly(backbone, ckpt)


def test_harmless_and_runtime_options_may_be_added(tmp_path):
    recorded = {key: value for key, value in RECORDED.items() if key != "img_size"}
    path = save_tiny_ssl_checkpoint(tmp_path / "run.ckpt", recorded, arch=ARCH)
    backbone = build_backbone(None, path, img_size=64, drop_path_rate=0.1, grad_checkpointing=True)
    assert backbone.timm_overrides == {**recorded, "img_size": 64} and backbone.grad_checkpointing
    _assert_loaded_exactly(backbone, path)
    images = torch.randn(1, 3, 48, 40)
    torch.testing.assert_close(backbone.eval()(images)["cls"], build_backbone(None, path).eval()(images)["cls"])


def test_no_recorded_architecture_needs_an_arch(tmp_path):
    torch.save(DINOv3Backbone(ARCH, **RECORDED).vit.state_dict(), tmp_path / "timm.pth")
    with pytest.raises(ValueError, match="arch is required: these weights record no architecture"):
        DINOv3Backbone(None, weights=tmp_path / "timm.pth")
    with pytest.raises(ValueError, match="arch is required: no weights were given"):
        DINOv3Backbone(None)
    assert DINOv3Backbone(ARCH, weights=tmp_path / "timm.pth", **RECORDED).timm_overrides == RECORDED


def test_the_checkpoint_records_which_backbone_to_evaluate_and_export(tmp_path):
    """The record's prefix decides which sub-module is the backbone (a frozen-teacher run evaluates its student, not
    the untrained teacher a fixed prefix list would pick); other recorded backbones are picked by name."""
    torch.manual_seed(0)
    teacher, student = DINOv3Backbone(ARCH, **RECORDED), DINOv3Backbone(ARCH, **RECORDED)
    record = {"arch": ARCH, "timm_overrides": RECORDED}
    checkpoint = {
        "state_dict": {
            **{f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()},
            **{f"student_ema.backbone.{k}": v for k, v in student.state_dict().items()},
        },
        "backbone_config": {**record, "prefix": "student_ema.backbone."},
        "backbone_configs": {
            "student": {**record, "prefix": "student_ema.backbone."},
            "teacher": {**record, "prefix": "teacher.backbone."},
        },
    }
    path = tmp_path / "distilled.ckpt"
    torch.save(checkpoint, path)
    for built, expected in (
        (build_backbone(None, path), student),
        (DINOv3Backbone(None, weights=str(path)), student),
        (build_backbone(None, path, backbone_name="teacher"), teacher),
    ):
        for key, value in expected.state_dict().items():
            assert torch.equal(built.state_dict()[key], value), key
    with pytest.raises(ValueError, match="records no backbone named 'vitb' \\(it records student, teacher\\)"):
        build_backbone(None, path, backbone_name="vitb")
    torch.save({**checkpoint, "backbone_config": {**record, "prefix": "missing."}}, path)
    with pytest.raises(ValueError, match="records its backbone under 'missing.' but holds no such keys"):
        build_backbone(None, path)
