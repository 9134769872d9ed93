"""TimmBackbone: any timm model behind DINOv3Backbone's outputs, against timm's own calls on an independently built
copy of the model; weights and checkpoint records; the frozen evaluation modules on it; the error messages."""

from __future__ import annotations

import math

import lightning as L
import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

from dinov3_pl.data import SyntheticShapes
from dinov3_pl.data.classification import ClassificationDataModule
from dinov3_pl.data.dense import SegmentationDataModule, SyntheticShapeMasks
from dinov3_pl.models import DINOv3Backbone, TimmBackbone, build_backbone
from dinov3_pl.models.weights import backbone_record
from dinov3_pl.modules import KNN, FrozenBackboneModule, LinearProbe
from dinov3_pl.modules.detection import Detection
from dinov3_pl.modules.features import FeatureExtractor
from dinov3_pl.modules.segmentation import Segmentation

# Small members of five families; the ViT is a 2-block timm ViT that takes any image size.
FAMILIES = {
    "resnet18": {},
    "convnext_atto": {},
    "mobilenetv4_conv_small": {},
    "efficientvit_b0": {},
    "vit_tiny_patch16_224": {"depth": 2, "patch_size": 8, "img_size": 32, "dynamic_img_size": True},
}
# (cls width, patch width, stride, number of layers) as timm builds them: the cls width is that of the model's own
# pre-logits feature, wider than the final map for MobileNetV4 (conv_head 960 -> 1280) and EfficientViT (head MLP).
EXPECTED = {
    "resnet18": (512, 512, 32, 5),
    "convnext_atto": (320, 320, 32, 4),
    "mobilenetv4_conv_small": (1280, 960, 32, 5),
    "efficientvit_b0": (1280, 128, 32, 4),
    "vit_tiny_patch16_224": (192, 192, 8, 2),
}


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    return L.Trainer(**{**defaults, **kwargs})


def _timm_twin(backbone: TimmBackbone) -> nn.Module:
    """The same network built by timm directly (not through the adapter), with the backbone's weights."""
    model = timm.create_model(backbone.arch, pretrained=False, num_classes=0, **backbone.timm_overrides).eval()
    model.load_state_dict(backbone.model.state_dict())
    return model


def _as_map(features: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
    if features.ndim == 3:  # ViT tokens
        return features[:, num_prefix_tokens:].transpose(1, 2).unflatten(2, grid)
    return features


# ------------------------------------------------------------------------------------------------ output contract
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_outputs_are_timms_own_features_and_pooling(arch):
    torch.manual_seed(0)
    backbone = TimmBackbone(arch, **FAMILIES[arch]).eval()
    cls_dim, embed_dim, stride, depth = EXPECTED[arch]
    assert (backbone.cls_dim, backbone.embed_dim, backbone.patch_size, backbone.depth) == EXPECTED[arch]
    assert backbone.num_storage_tokens == 0 and backbone.kind == "timm"
    images = torch.randn(2, 3, 2 * stride, 3 * stride)  # non-square: rows and columns must not be swapped
    twin = _timm_twin(backbone)
    with torch.no_grad():
        out = backbone(images)
        features = twin.forward_features(images)
        expected_cls = twin.forward_head(features, pre_logits=True)
        assert len(twin.forward_intermediates(images, intermediates_only=True)) == depth
    feature_map = _as_map(features, getattr(twin, "num_prefix_tokens", 0), (2, 3))
    assert set(out) == {"cls", "storage", "patch"}
    assert out["cls"].shape == (2, cls_dim) and out["storage"].shape == (2, 0, embed_dim)
    assert out["patch"].shape == (2, 6, embed_dim)
    torch.testing.assert_close(out["cls"], expected_cls)
    # Token i * w + j is map pixel (i, j).
    torch.testing.assert_close(out["patch"][:, 1 * 3 + 2], feature_map[:, :, 1, 2])
    torch.testing.assert_close(out["patch"], feature_map.flatten(2).transpose(1, 2))


def test_convnext_cls_is_pool_then_head_norm():
    """Independent of timm's forward_head: ConvNeXt pools, then applies its head LayerNorm (eps 1e-6)."""
    torch.manual_seed(0)
    backbone = TimmBackbone("convnext_atto").eval()
    norm = backbone.model.head.norm
    with torch.no_grad():
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
        out = backbone(torch.randn(2, 3, 64, 64))
        pooled = out["patch"].mean(dim=1)
        expected = F.layer_norm(pooled, (320,), norm.weight, norm.bias, eps=1e-6)
    torch.testing.assert_close(out["cls"], expected)


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224"])
def test_intermediate_layers_follow_forward_intermediates(arch):
    torch.manual_seed(0)
    backbone = TimmBackbone(arch, **FAMILIES.get(arch, {})).eval()
    twin = _timm_twin(backbone)
    depth, images = backbone.depth, torch.randn(2, 3, 64, 96)
    grid = (64 // backbone.patch_size, 96 // backbone.patch_size)
    with torch.no_grad():
        raw = twin.forward_intermediates(images, intermediates_only=True)
        normed_final, normed = twin.forward_intermediates(images, norm=True)
        out = backbone(images)
        asked = [depth - 1, 0, -2]  # the order asked, negative indices allowed
        layers = backbone.get_intermediate_layers(images, n=asked, reshape=True, norm=False)
        for index, layer in zip(asked, layers, strict=True):
            torch.testing.assert_close(layer, raw[index])
        tokens = backbone.get_intermediate_layers(images, n=2, norm=False)
        torch.testing.assert_close(tokens[0], raw[-2].flatten(2).transpose(1, 2))
        # norm=True: timm's norm on the layers, and the last layer is the final feature map, i.e. "patch".
        with_tokens = backbone.get_intermediate_layers(
            images, n=2, reshape=True, return_class_token=True, return_extra_tokens=True
        )
    (second, second_pooled, second_storage), (last, last_pooled, last_storage) = with_tokens
    torch.testing.assert_close(second, normed[-2])
    torch.testing.assert_close(second_pooled, normed[-2].mean(dim=(2, 3)))
    torch.testing.assert_close(last, _as_map(normed_final, getattr(twin, "num_prefix_tokens", 0), grid))
    torch.testing.assert_close(last.flatten(2).transpose(1, 2), out["patch"])
    torch.testing.assert_close(last_pooled, out["cls"])
    assert second_storage.shape == (2, 0, second.shape[1]) and last_storage.shape == (2, 0, last.shape[1])
    assert [layer.shape[1] for layer in (second, last)] == list(backbone.layer_channels[-2:])
    assert len(raw) == depth
    if arch == "efficientnet_b0":  # the final map is conv_head's 1280 channels, the last stage's only 320
        assert raw[-1].shape[1] == 320 and last.shape[1] == backbone.embed_dim == 1280


def test_every_parameter_gets_a_gradient_and_storage_is_empty():
    backbone = TimmBackbone("convnext_atto").train()
    out = backbone(torch.randn(2, 3, 64, 64))
    (out["cls"].sum() + out["patch"].sum()).backward()
    assert all(p.grad is not None for p in backbone.parameters())
    assert out["storage"].numel() == 0 and torch.isfinite(out["cls"]).all()


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_gives_one_line_that_says_what_to_change():
    with pytest.raises(ValueError, match=r"timm has no model named 'resnet5'.*resnet50.*timm\.list_models") as error:
        TimmBackbone("resnet5")
    assert "\n" not in str(error.value)
    backbone = TimmBackbone("resnet18")
    with pytest.raises(ValueError, match="not divisible by resnet18's total stride 32; resize or crop to a multiple"):
        backbone(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match="not divisible"):
        backbone.get_intermediate_layers(torch.randn(1, 3, 64, 40))
    with pytest.raises(ValueError, match="has no mask token"):
        backbone(torch.randn(1, 3, 64, 64), masks=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"layer indices \[5\] out of range: resnet18 has 5 layers"):
        backbone.get_intermediate_layers(torch.randn(1, 3, 64, 64), n=[5])
    with pytest.raises(ValueError, match="weights come only from a local file"):
        TimmBackbone("resnet18", pretrained=True)
    with pytest.raises(ValueError, match="without a classifier"):
        TimmBackbone("resnet18", num_classes=10)
    with pytest.raises(ValueError, match="timm could not build resnet18"):
        TimmBackbone("resnet18", depth=2)
    fixed = TimmBackbone("vit_tiny_patch16_224", depth=1, patch_size=8, img_size=32)
    with pytest.raises(ValueError, match="built for 32x32 images only, got 64x64.*dynamic_img_size=True"):
        fixed(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="arch is required.*resnet50"):
        TimmBackbone(None)


# ------------------------------------------------------------------------------------------------ weights
def test_plain_timm_state_dict_loads_and_its_classifier_is_dropped(tmp_path):
    torch.manual_seed(0)
    classifier_model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(classifier_model.state_dict(), path)  # as timm ships it: with fc.weight / fc.bias
    backbone = TimmBackbone("resnet18", weights=path).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = classifier_model.forward_head(classifier_model.forward_features(images), pre_logits=True)
        torch.testing.assert_close(backbone(images)["cls"], expected)
    own = tmp_path / "own.pth"  # the adapter's own layout, "model." keys
    torch.save(backbone.state_dict(), own)
    assert next(iter(torch.load(own))).startswith("model.")
    again = TimmBackbone("resnet18", weights=own)
    for key, value in backbone.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    # An eval module given arch + a timm file builds the same backbone.
    module = FrozenBackboneModule(arch="resnet18", weights=str(path))
    assert isinstance(module.backbone, TimmBackbone) and module.feature_dim == 512
    torch.testing.assert_close(module.features(images), expected)


def test_mismatched_weights_name_the_keys_in_one_line(tmp_path):
    path = tmp_path / "convnext_atto.pth"
    torch.save(timm.create_model("convnext_atto", num_classes=0).state_dict(), path)
    with pytest.raises(
        ValueError,
        match=r"shape mismatches: model\.head\.norm\.bias: checkpoint \(320,\) vs model \(384,\).*Check arch "
        r"\('convnext_femto'\)",
    ) as error:
        TimmBackbone("convnext_femto", weights=path)
    assert "\n" not in str(error.value)
    with pytest.raises(
        ValueError, match=r"missing keys: model\.bn1\.bias.*\(120 in all\); unexpected keys: model\.head\.norm"
    ):
        TimmBackbone("resnet18", weights=path)


def _save_run(path, backbone: nn.Module, prefix: str = "student.backbone.", **extra_record) -> None:
    """A checkpoint as a dinov3-pl run saves one: the backbone under its prefix, the record beside it."""
    record = {**backbone_record(backbone, prefix), **extra_record}
    state = {prefix + key: value for key, value in backbone.state_dict().items()}
    state["head.weight"] = torch.zeros(2, 2)  # other modules of the run are not the backbone's
    torch.save({"state_dict": state, "backbone_config": record, "backbone_configs": {"student": record}}, path)


def test_checkpoint_record_of_kind_timm_round_trips_through_build_backbone(tmp_path):
    torch.manual_seed(0)
    student = TimmBackbone("convnext_atto", depths=(1, 1, 1, 1))
    assert backbone_record(student, "student.backbone.") == {
        "arch": "convnext_atto",
        "timm_overrides": {"depths": (1, 1, 1, 1)},
        "prefix": "student.backbone.",
        "kind": "timm",
    }
    path = tmp_path / "run.ckpt"
    _save_run(path, student)
    images = torch.randn(2, 3, 64, 64)
    for rebuilt in (
        build_backbone(None, weights=path),
        build_backbone(None, weights=str(path), backbone_name="student"),
        TimmBackbone(None, weights=path),
    ):
        assert isinstance(rebuilt, TimmBackbone) and rebuilt.timm_overrides == {"depths": (1, 1, 1, 1)}
        with torch.no_grad():
            torch.testing.assert_close(rebuilt.eval()(images)["cls"], student.eval()(images)["cls"])
    knn = KNN(arch=None, weights=str(path))  # arch: null on a run that recorded a timm student
    assert isinstance(knn.backbone, TimmBackbone) and knn.feature_dim == 320
    # A record without "kind" (an older run): a name that is not a timm DINOv3 ViT is a TimmBackbone.
    _save_run(path, student, kind=None)
    assert isinstance(build_backbone(None, weights=path), TimmBackbone)
    # The record is the architecture: another arch or a contradicting override is refused with the fix.
    with pytest.raises(ValueError, match=r"differs from the checkpoint's recorded arch.*TimmBackbone\(None, weights"):
        build_backbone("convnext_femto", weights=path)
    with pytest.raises(ValueError, match=r"depths: recorded \(1, 1, 1, 1\), given \[2, 2, 2, 2\]"):
        build_backbone(None, weights=path, depths=[2, 2, 2, 2])


def test_the_two_kinds_are_not_confused(tmp_path):
    student = TimmBackbone("resnet18")
    timm_run = tmp_path / "timm.ckpt"
    _save_run(timm_run, student)
    with pytest.raises(ValueError, match="records a timm model .*TimmBackbone\\(None, weights=path\\)"):
        DINOv3Backbone(None, weights=timm_run)
    vit = DINOv3Backbone(depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=32)
    dinov3_run = tmp_path / "dinov3.ckpt"
    _save_run(dinov3_run, vit, prefix="teacher.backbone.")
    with pytest.raises(ValueError, match="records a DINOv3Backbone .*build_backbone\\(None, weights=path\\)"):
        TimmBackbone(None, weights=dinov3_run)
    assert isinstance(build_backbone(None, weights=dinov3_run), DINOv3Backbone)
    assert isinstance(build_backbone("resnet18"), TimmBackbone)
    assert isinstance(build_backbone("vit_small_patch16_dinov3", depth=1, embed_dim=32, num_heads=2), DINOv3Backbone)


# ------------------------------------------------------------------------------------------------ frozen evaluation
def test_frozen_features_and_dims_with_a_wider_pooled_feature():
    """MobileNetV4: cls is 1280 wide (conv_head after pooling), patch tokens 960, the stage before 96."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    module = FrozenBackboneModule(arch="mobilenetv4_conv_small", feature_type="cls_meanpatch", n_last_blocks=2)
    assert module.feature_dim == 96 + 1280 + 960
    twin = _timm_twin(module.backbone)
    with torch.no_grad():
        stages = twin.forward_intermediates(images, intermediates_only=True)
        final = twin.forward_features(images)
        expected = torch.cat(
            [stages[-2].mean(dim=(2, 3)), twin.forward_head(final, pre_logits=True), final.mean(dim=(2, 3))], dim=1
        )
        torch.testing.assert_close(module.features(images), expected)
        assert module.features(images, "cls", 1).shape == (2, 1280)
        maps = module.patch_maps(images, layers=2, concat=False)
        assert [tuple(m.shape) for m in maps] == [(2, 96, 4, 4), (2, 960, 2, 2)]
        assert module.patch_maps(images).shape == (2, 960, 2, 2) and module.patch_map_channels(1) == 960
        assert module.patch_map_channels([-2, -1]) == 96 + 960
    with pytest.raises(ValueError, match=r"different resolutions \[\(4, 4\), \(2, 2\)\].*concat=False"):
        module.patch_maps(images, layers=2)


def test_unfreeze_last_stages_trains_them_and_what_follows():
    convnext = FrozenBackboneModule(arch="convnext_atto")
    convnext.unfreeze_last_blocks(1)
    trainable = {name for name, p in convnext.backbone.named_parameters() if p.requires_grad}
    assert trainable == {name for name in trainable if name.startswith(("model.stages.3.", "model.head.norm."))}
    assert any(name.startswith("model.head.norm.") for name in trainable)
    assert any(name.startswith("model.stages.3.") for name in trainable)
    resnet = FrozenBackboneModule(arch="resnet18")
    resnet.unfreeze_last_blocks(2)
    trainable = {name.split(".")[1] for name, p in resnet.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    resnet.train()  # trainable stages follow the module's mode (their BatchNorm statistics update)
    assert resnet.backbone.model.layer4.training and not resnet.backbone.model.layer2.training
    layers = resnet.backbone.parameter_layers()
    assert set(layers) == {name for name, _ in resnet.backbone.named_parameters()}
    assert layers["model.conv1.weight"] == 0 and layers["model.layer1.0.conv1.weight"] == 1
    assert layers["model.layer4.1.bn2.bias"] == 4
    with pytest.raises(ValueError, match=r"num_blocks must be -1 \(all\) or in \[0, 5\]"):
        resnet.unfreeze_last_blocks(6)
    # A model registered in another order than it runs cannot be split by registration order: refused.
    shuffled = TimmBackbone("resnet18")
    maxpool = shuffled.model.maxpool
    del shuffled.model.maxpool
    shuffled.model.maxpool = maxpool  # now registered last, still run second
    with pytest.raises(ValueError, match="another order than it registers them.*unfreeze the whole backbone"):
        shuffled.last_layers(1)


def test_knn_and_linear_probe_on_a_timm_backbone():
    torch.manual_seed(0)
    splits = {"train": SyntheticShapes(32, seed=0), "val": SyntheticShapes(16, seed=1)}
    data = ClassificationDataModule(**splits, batch_size=16, image_size=32, knn_mode=True)
    knn = KNN(arch="resnet18", feature_type="cls_meanpatch", ks=(5,))
    result = _trainer().validate(knn, datamodule=data)[0]  # one dict per loader [bank, queries], the same values
    assert 0.0 <= result["knn/top1_k5"] <= 1.0 and result["knn/bank_size"] == 32
    assert result["knn/num_queries"] == 16
    data = ClassificationDataModule(**splits, batch_size=16, image_size=32)
    probe = LinearProbe(num_classes=8, arch="convnext_atto", learning_rates=[0.01, 0.1])
    assert probe.feature_dim == 2 * 320
    before = {name: value.clone() for name, value in probe.backbone.state_dict().items()}
    trainer = _trainer(max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(probe, datamodule=data)
    assert "linear/top1" in trainer.callback_metrics
    for name, value in probe.backbone.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_segmentation_step_detection_and_features_on_a_timm_backbone(tmp_path):
    torch.manual_seed(0)
    model = Segmentation(num_classes=9, arch="resnet18", dropout=0.0)
    splits = {"train": SyntheticShapeMasks(4, 64), "val": SyntheticShapeMasks(4, 64, seed=1)}
    data = SegmentationDataModule(**splits, batch_size=4)
    before = model.head.classifier.weight.detach().clone()
    trainer = _trainer(max_steps=1, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    assert not torch.equal(model.head.classifier.weight, before)
    assert math.isfinite(trainer.callback_metrics["train/loss"]) and 0 <= trainer.callback_metrics["val/mIoU"] <= 1
    assert model.eval()(torch.randn(1, 3, 50, 40)).shape == (1, 9, 50, 40)  # padded to stride 32, cut back
    detection = Detection(
        num_classes=2, arch="resnet18", pyramid_channels=16, representation_size=32, rpn_post_nms_top_n_test=20
    ).eval()
    with torch.no_grad():
        detections = detection(torch.randn(1, 3, 64, 64))
    assert detections[0]["boxes"].shape[-1] == 4
    extractor = FeatureExtractor(arch="mobilenetv4_conv_small", output=str(tmp_path / "f.pt"), save_patch_maps=True)
    features = extractor.extract(torch.randn(2, 3, 64, 96))
    assert features["cls"].shape == (2, 1280) and features["mean_patch"].shape == (2, 960)
    assert features["patch_maps"].shape == (2, 960, 2, 3)
