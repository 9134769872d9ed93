"""LinearProbe (LR grid, frozen backbone, fine-tuning mode) and ClassificationDataModule."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from dinov3_pl.data import ImageFolder, SyntheticShapes
from dinov3_pl.data.classification import ClassificationDataModule
from dinov3_pl.modules.linear_probe import DEFAULT_LEARNING_RATES, LinearProbe

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 4, "img_size": 32}


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    return L.Trainer(**{**defaults, **kwargs})


class _FixedFeatureProbe(LinearProbe):
    """The batch's "images" already are feature vectors: isolates the heads, the grid and the optimiser."""

    def features(self, images, feature_type=None, n_last_blocks=None):
        return images


def _separable(num: int, dim: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters (unit noise) around fixed random centres ~8 noise-stds apart: linearly separable."""
    generator = torch.Generator().manual_seed(seed)
    centres = 0.5 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(0, num_classes, (num,), generator=generator)
    return centres[labels] + torch.randn(num, dim, generator=generator), labels


def _dict_loader(features: torch.Tensor, labels: torch.Tensor, shuffle: bool) -> DataLoader:
    def collate(items):
        return {"images": torch.stack([x for x, _ in items]), "labels": torch.stack([y for _, y in items])}

    return DataLoader(TensorDataset(features, labels), batch_size=64, shuffle=shuffle, collate_fn=collate)


def test_lr_grid_reaches_99_percent_and_picks_the_best_head():
    torch.manual_seed(0)
    train_x, train_y = _separable(768, 128, 6, seed=0)
    val_x, val_y = _separable(256, 128, 6, seed=1)
    learning_rates = [1e-5, 1e-3, 0.1, 1.0]
    model = _FixedFeatureProbe(num_classes=6, backbone_kwargs=TINY, learning_rates=learning_rates)
    assert model.feature_dim == 128  # [CLS, mean patch] of a 64-dim backbone
    trainer = _trainer(max_epochs=3, num_sanity_val_steps=0)
    trainer.fit(model, _dict_loader(train_x, train_y, True), _dict_loader(val_x, val_y, False))
    logged = trainer.callback_metrics
    with torch.no_grad():
        accuracies = torch.tensor([(head(val_x).argmax(1) == val_y).float().mean().item() for head in model.heads])
    assert int(model.best_head) == int(accuracies.argmax())
    assert logged["linear/top1"].item() == pytest.approx(accuracies.max().item(), abs=1e-6)
    assert logged["linear/best_lr"].item() == pytest.approx(learning_rates[int(accuracies.argmax())])
    for lr, accuracy in zip(learning_rates, accuracies, strict=True):
        assert logged[f"linear/lr_{lr:g}/top1"].item() == pytest.approx(accuracy.item(), abs=1e-6)
    assert logged["linear/top1"] >= 0.99
    assert accuracies[0] < 0.9  # the tiny learning rate has barely moved: the grid matters
    assert logged["linear/top5"] >= logged["linear/top1"]
    # test reports the head chosen on validation.
    (tested,) = trainer.test(model, _dict_loader(val_x, val_y, False))
    assert tested["linear/test_top1"] == pytest.approx(accuracies.max().item(), abs=1e-6)


def test_real_backbone_probe_is_frozen_and_scales_lr():
    torch.manual_seed(0)
    data = ClassificationDataModule(
        train=SyntheticShapes(48, image_size=32, seed=0), val=SyntheticShapes(16, image_size=32, seed=1), batch_size=16
    )
    model = LinearProbe(num_classes=8, backbone_kwargs=TINY, learning_rates=[0.01, 0.1])
    before = {name: value.clone() for name, value in model.backbone.state_dict().items()}
    modes = []

    class RecordMode(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append(pl_module.backbone.training)

    trainer = _trainer(max_epochs=2, callbacks=[RecordMode()], num_sanity_val_steps=1)
    trainer.fit(model, datamodule=data)
    assert modes == [False] * 6
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, before[name]), name
    # Upstream scaling: lr x global batch / 256; cosine to 0 at the last step.
    optimizer = trainer.optimizers[0]
    assert [group["initial_lr"] for group in optimizer.param_groups] == pytest.approx([0.01 / 16] * 2 + [0.1 / 16] * 2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert "linear/top1" in trainer.callback_metrics and "linear/lr_0.1/top1" in trainer.callback_metrics
    assert len(DEFAULT_LEARNING_RATES) == 13


def test_finetune_mode_layer_decay_and_frozen_rest():
    torch.manual_seed(0)
    model = LinearProbe(
        num_classes=3,
        backbone_kwargs=TINY,
        learning_rates=[0.01],
        finetune_last_blocks=1,
        layer_decay=0.5,
        optimizer="adamw",
        weight_decay=0.05,
        scale_lr_with_batch_size=False,
    )
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))
    before = {name: value.clone() for name, value in model.backbone.named_parameters()}
    trainer = _trainer(max_steps=2)
    trainer.fit(model, _dict_loader(images, labels, True))
    lr_of = {}
    for group in trainer.optimizers[0].param_groups:
        for param in group["params"]:
            lr_of[id(param)] = (group["initial_lr"], group["weight_decay"])
    params = dict(model.backbone.named_parameters())
    assert lr_of[id(params["vit.blocks.1.attn.qkv.weight"])] == pytest.approx((0.01 * 0.5, 0.05))
    assert lr_of[id(params["vit.blocks.1.attn.proj.bias"])] == pytest.approx((0.01 * 0.5, 0.0))
    assert lr_of[id(params["vit.norm.weight"])] == pytest.approx((0.01, 0.0))
    assert id(params["vit.blocks.0.attn.qkv.weight"]) not in lr_of
    changed = {name for name, value in model.backbone.named_parameters() if not torch.equal(value, before[name])}
    assert any(name.startswith("vit.blocks.1.") for name in changed)
    assert all(name.startswith(("vit.blocks.1.", "vit.norm.")) for name in changed), changed


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="learning_rates"):
        LinearProbe(num_classes=3, backbone_kwargs=TINY, learning_rates=[])
    with pytest.raises(ValueError, match="one learning rate"):
        LinearProbe(num_classes=3, backbone_kwargs=TINY, finetune_last_blocks=1, learning_rates=[0.1, 0.2])
    model = LinearProbe(num_classes=3, backbone_kwargs=TINY, learning_rates=[0.1])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        model.training_step({"images": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 3])}, 0)
    data = ClassificationDataModule(train=SyntheticShapes(8, seed=0), val=SyntheticShapes(8, seed=1), batch_size=8)
    with pytest.raises(ValueError, match="num_classes=3 but the data have 8"):
        _trainer(max_steps=1).fit(model, datamodule=data)


# ------------------------------------------------------------------------------------------- the DataModule
def _write_folder(root, split: str, classes: list[str], per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def _folders(root, *splits: str) -> dict[str, ImageFolder]:
    return {split: ImageFolder(root / split, with_labels=True) for split in splits}


def test_folder_datamodule_knn_mode_and_labels(tmp_path):
    _write_folder(tmp_path, "train", ["cat", "dog"], per_class=3)
    _write_folder(tmp_path, "val", ["cat", "dog"], per_class=2)
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"")  # skipped and counted
    data = ClassificationDataModule(**_folders(tmp_path, "train", "val"), image_size=16, batch_size=16, knn_mode=True)
    data.setup("validate")
    bank_loader, query_loader = data.val_dataloader()
    bank, queries = next(iter(bank_loader)), next(iter(query_loader))
    assert bank["images"].shape == (6, 3, 16, 16) and bank["num_bad_images"] == 1
    assert bank["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    assert queries["labels"].tolist() == [0, 0, 1, 1]
    assert data.num_classes == 2 and data.class_names == ("cat", "dog")
    # Eval transform: normalised with ImageNet statistics, deterministic.
    again = next(iter(data.val_dataloader()[0]))
    assert torch.equal(again["images"], bank["images"])
    assert not isinstance(ClassificationDataModule(**_folders(tmp_path, "train", "val")).val_dataloader(), list)


def test_train_augmentation_changes_crops_but_eval_is_fixed():
    data = ClassificationDataModule(
        train=SyntheticShapes(4, image_size=32, seed=3),
        val=SyntheticShapes(4, image_size=32, seed=4),
        image_size=32,
        eval_crop_ratio=1.0,
        batch_size=4,
        seed=3,
    )
    data.setup()
    train, bank = data.split("train"), data.split("bank")
    assert not torch.equal(train[0]["image"], train[0]["image"])  # random resized crop + flip
    assert train[0]["label"] == bank[0]["label"] and bank[0]["image"].shape == (3, 32, 32)
    # Eval transform at the native size: just ImageNet normalisation of the raw pixels.
    raw = torch.from_numpy(SyntheticShapes(4, 32, seed=3)[0]["image"]).permute(2, 0, 1).float() / 255.0
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(bank[0]["image"], (raw - mean[:, None, None]) / std[:, None, None])
