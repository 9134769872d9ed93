"""Linear segmentation on a frozen backbone: mIoU vs a hand-computed confusion matrix, sliding window, end-to-end
fit with the backbone unchanged, TensorBoard overlays, a user's in-memory dataset through the Python API, datasets
by class_path through the CLI, configs through the CLI."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassJaccardIndex

from dinov3_pl.data.scenes import FashionMNISTScenes
from dinov3_pl.data.segmentation import SegmentationDataModule, SegmentationFolder, SyntheticShapeMasks
from dinov3_pl.models.dense_heads import LinearSegmentationHead, _window_starts, sliding_window_logits
from dinov3_pl.modules.frozen import lr_factor
from dinov3_pl.modules.segmentation import Segmentation, colour_palette, segmentation_overlay
from tests.helpers import fit_one_epoch, logged_image_tags, run_cli

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "img_size": 32}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "eval"


def test_miou_matches_hand_computed_confusion_matrix():
    model = Segmentation(num_classes=3, backbone_kwargs=TINY)
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    preds = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    # Confusion (rows = label, cols = prediction), the ignored pixel left out:
    #   label 0: pred 0 x1, pred 1 x1 | label 1: pred 1 x3 | label 2: pred 2 x1, pred 0 x1
    # IoU_c = TP / (row + col - TP): 1/(2+2-1), 3/(3+4-3), 1/(2+1-1) -> mIoU = (1/3 + 3/4 + 1/2) / 3 = 19/36.
    # Two updates (one row each): the matrix is accumulated over the dataset, not averaged per batch.
    for row in range(2):
        model.val_miou.update(preds[row : row + 1], labels[row : row + 1])
        model.val_pixel_accuracy.update(preds[row : row + 1], labels[row : row + 1])
    assert model.val_miou.compute().item() == pytest.approx(19 / 36)
    assert model.val_pixel_accuracy.compute().item() == pytest.approx(5 / 7)


def test_head_is_dropout_then_bn_then_conv_and_forward_pads_to_patch_multiple():
    torch.manual_seed(0)
    head = LinearSegmentationHead(4, 3, dropout=0.5)
    x = torch.randn(2, 4, 5, 5)
    bn = head.norm
    # Training: upstream's order, dropout first, so the BatchNorm's batch statistics see the dropped-out features.
    torch.manual_seed(1)
    dropped = nn.functional.dropout2d(x, 0.5, training=True)
    normed = (dropped - dropped.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        dropped.var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps
    )
    expected = nn.functional.conv2d(normed, head.classifier.weight, head.classifier.bias)
    torch.manual_seed(1)
    torch.testing.assert_close(head(x), expected)
    head.eval()
    expected = nn.functional.conv2d(
        (x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps),
        head.classifier.weight,
        head.classifier.bias,
    )
    torch.testing.assert_close(head(x), expected)
    # A checkpoint of the earlier order (BatchNorm, dropout, conv) has the same names: it loads and, dropout being
    # the identity in eval(), evaluates the same.
    assert sorted(head.state_dict()) == sorted(
        f"{module}.{name}"
        for module in ("norm", "classifier")
        for name in (
            ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
            if module == "norm"
            else ("weight", "bias")
        )
    )
    model = Segmentation(num_classes=3, backbone_kwargs=TINY).eval()
    assert model(torch.randn(1, 3, 30, 21)).shape == (1, 3, 30, 21)  # padded to 32x24 inside, cut back
    two_layers = Segmentation(num_classes=3, backbone_kwargs=TINY, n_layers=2, dropout=0.0).eval()
    assert two_layers.head.classifier.in_channels == 2 * TINY["embed_dim"]
    images = torch.randn(1, 3, 16, 16)
    maps = two_layers.backbone.get_intermediate_layers(images, n=2, reshape=True, norm=True)
    expected = nn.functional.interpolate(two_layers.head(torch.cat(maps, 1)), size=(16, 16), mode="bilinear")
    torch.testing.assert_close(two_layers(images), expected)


def test_head_norm_becomes_sync_batchnorm_under_multi_gpu_ddp_only(monkeypatch):
    model = Segmentation(num_classes=3, backbone_kwargs=TINY)
    backbone_modules = dict(model.backbone.named_modules())
    norm = model.head.norm
    model.setup("fit")  # no trainer: nothing to synchronise
    assert model.head.norm is norm

    def attach(world_size, device):
        strategy = SimpleNamespace(root_device=torch.device(device))
        monkeypatch.setattr(model, "_trainer", SimpleNamespace(world_size=world_size, strategy=strategy))

    attach(1, "cuda")
    model.setup("fit")
    assert model.head.norm is norm
    attach(2, "cpu")
    with pytest.warns(UserWarning, match="SyncBatchNorm needs GPUs"):
        model.setup("fit")
    assert type(model.head.norm) is nn.BatchNorm2d
    attach(2, "cuda")
    model.setup("fit")
    synced = model.head.norm
    assert isinstance(synced, nn.SyncBatchNorm) and synced.weight is norm.weight
    assert synced.running_mean is norm.running_mean
    # The frozen backbone is left alone, module for module.
    assert dict(model.backbone.named_modules()) == backbone_modules
    model.setup("validate")
    assert model.head.norm is synced


class _OddSizes(Dataset):
    """Three images of different, odd sizes in one batch; their label maps are what mIoU must be measured on."""

    num_classes = 3
    sizes = ((13, 21), (19, 11), (7, 9))

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> dict:
        height, width = self.sizes[index]
        rng = np.random.default_rng(index)
        mask = rng.integers(0, 3, (height, width)).astype(np.uint8)
        mask[0, :3] = 255
        return {"image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "mask": mask}


def test_miou_is_measured_at_the_original_label_resolution():
    """eval_size resizes the images (16 px short side) but never the labels: each image's logits are resized
    bilinearly to its own label map. Checked against torchmetrics on the original labels and the logits resized
    here."""
    data = _OddSizes()
    dm = SegmentationDataModule(train=data, val=data, eval_size=16, val_batch_size=3)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["mask_sizes"].tolist() == [list(size) for size in data.sizes]
    assert batch["image_sizes"].tolist() == [[16, 26], [28, 16], [16, 21]]  # short side 16, long side rounded
    model = Segmentation(num_classes=3, backbone_kwargs=TINY).eval()
    seen, produced = [], []

    def predict_logits(images):  # logits that differ across the image, at its (resized) size
        seen.append(tuple(images.shape[-2:]))
        generator = torch.Generator().manual_seed(len(seen))
        produced.append(torch.randn(len(images), 3, *images.shape[-2:], generator=generator))
        return produced[-1]

    model.predict_logits = predict_logits
    model.validation_step(batch, 1)
    assert seen == [(16, 26), (28, 16), (16, 21)]  # each image without the batch's padding
    reference = MulticlassJaccardIndex(3, ignore_index=255, average="macro")
    for logits, index in zip(produced, range(3), strict=True):
        label = torch.as_tensor(data[index]["mask"]).long()[None]
        resized = nn.functional.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
        reference.update(resized.argmax(1), label)
    assert model.val_miou.compute().item() == pytest.approx(reference.compute().item(), abs=1e-7)
    # Images of one size (no padding) go through in one batched forward; the labels still take their own sizes.
    seen.clear()
    resized = model.label_logits(
        torch.zeros(2, 3, 16, 24), torch.tensor([[16, 24]] * 2), torch.tensor([[5, 7], [9, 4]])
    )
    assert seen == [(16, 24)] and [tuple(r.shape) for r in resized] == [(1, 3, 5, 7), (1, 3, 9, 4)]


def test_miou_leaves_out_classes_absent_from_labels_and_predictions():
    """Upstream averages the per-class IoU with nanmean: a class neither labelled nor predicted anywhere is not a
    zero. Class 3 of 4 never occurs: mIoU = (1 + 1/2 + 1/2) / 3, not / 4."""
    model = Segmentation(num_classes=4, backbone_kwargs=TINY)
    model.val_miou.update(torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 1, 2, 2]]))
    assert model.val_miou.compute().item() == pytest.approx(2 / 3)


def test_sliding_window_averages_overlaps():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 1)  # per-pixel: any tiling must give the whole-image result
    images = torch.randn(2, 3, 20, 28)
    torch.testing.assert_close(sliding_window_logits(conv, images, 2, window=8, stride=5), conv(images).detach())
    # A predictor returning 1 everywhere in a window: averaging over overlaps must give exactly 1 everywhere.
    ones = lambda crop: torch.ones(crop.shape[0], 1, *crop.shape[-2:])
    torch.testing.assert_close(sliding_window_logits(ones, images, 1, window=8, stride=3), torch.ones(2, 1, 20, 28))
    model = Segmentation(num_classes=3, backbone_kwargs=TINY, inference="slide", window_size=16, window_stride=8)
    assert model.eval().predict_logits(torch.randn(1, 3, 32, 40)).shape == (1, 3, 32, 40)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        Segmentation(num_classes=3, backbone_kwargs=TINY, inference="slide", window_size=12, window_stride=4)


@pytest.mark.parametrize(
    ("length", "window", "stride", "starts"),
    [(40, 16, 11, [0, 11, 22, 24]), (57, 16, 11, [0, 11, 22, 33, 41]), (683, 512, 341, [0, 171]),
     (1000, 512, 341, [0, 341, 488]), (512, 512, 341, [0])],
)  # fmt: skip
def test_sliding_windows_sit_where_upstreams_do(length, window, stride, starts):
    """Window offsets of upstream's slide_inference (facebookresearch/dinov3 dinov3/eval/segmentation/inference.py,
    commit 6876159a; run outside this repository, where its logits also equalled ours on four image sizes)."""
    assert _window_starts(length, window, stride) == starts


def test_lr_schedules():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 0, "cosine", min_ratio=0.01) == pytest.approx(0.01)
    assert lr_factor(50, 100, 0, "poly") == pytest.approx(0.5**0.9)
    assert lr_factor(80, 100, 0, "constant") == 1.0


def test_overlay_grid_and_palette():
    palette = colour_palette(5)
    assert palette.shape == (6, 3) and palette[0].sum() == 0 and (palette[-1] == 255).all()
    assert len({tuple(c.tolist()) for c in palette}) == 6
    masks = torch.tensor([[[0, 1], [255, 4]]])
    grid = segmentation_overlay(torch.zeros(1, 3, 2, 2), masks, masks, 5)
    assert grid.shape == (3, 2, 6) and grid.dtype == torch.uint8
    torch.testing.assert_close(grid[:, 1, 2], palette[-1])  # ignore pixel drawn in the ignore colour


class _BackboneModeProbe(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        assert not module.backbone.training and module.head.training


def test_fit_trains_head_only_and_logs_overlays(tmp_path):
    torch.manual_seed(0)
    model = Segmentation(num_classes=9, backbone_kwargs=TINY, lr=1e-2, log_images_every_n_epochs=1)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.classifier.weight.detach().clone()
    data = SegmentationDataModule(
        train=SyntheticShapeMasks(16, 32), val=SyntheticShapeMasks(8, 32, seed=1_000_003), image_size=32, batch_size=8
    )
    trainer, logger = fit_one_epoch(model, data, tmp_path, "seg", callbacks=[_BackboneModeProbe()])
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), f"backbone changed: {key}"
    assert not torch.equal(model.head.classifier.weight, head_before)
    metrics = trainer.callback_metrics
    assert 0.0 <= metrics["val/mIoU"] <= 1.0 and math.isfinite(metrics["train/loss"])
    assert "val/segmentation" in logged_image_tags(logger)


def test_synthetic_config_runs_through_the_cli(tmp_path):
    config = str(CONFIGS / "segmentation_synthetic.yaml")
    cli = run_cli(
        [
            "fit",
            "--config",
            config,
            "--trainer.fast_dev_run=1",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert isinstance(cli.model, Segmentation) and isinstance(cli.datamodule, SegmentationDataModule)
    assert "val/mIoU" in cli.trainer.callback_metrics


def test_fmnist_scenes_config_instantiates():
    # Builds model and DataModule from the YAML without fitting: the scenes dataset reads nothing before prepare_data
    # (no Fashion-MNIST needed).
    cli = run_cli(["--config", str(CONFIGS / "segmentation_fmnist_scenes.yaml")])
    assert isinstance(cli.model, Segmentation) and cli.model.num_classes == 11 == cli.datamodule.num_classes
    train, val = cli.datamodule.datasets["train"], cli.datamodule.datasets["val"]
    assert isinstance(train, FashionMNISTScenes) and (train.split, val.split) == ("train", "val")
    assert train.task == "segmentation" and train._reader is None and cli.model.hparams.inference == "slide"


class GreyBands(Dataset):
    """A user's own segmentation data in memory: PIL greyscale images whose bright band is class 1, dark band
    class 2, background 0. Importable, so configs can name it by class_path."""

    num_classes = 3

    def __init__(self, count: int = 8, size: int = 32) -> None:
        self.count, self.size = count, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(index)
        mask = np.zeros((self.size, self.size), np.uint8)
        top = int(rng.integers(0, self.size // 2))
        mask[top : top + 8] = 1
        mask[:, :4] = 2
        image = np.choose(mask, [100, 220, 20]).astype(np.uint8) + rng.integers(0, 20, mask.shape, dtype=np.uint8)
        return {"image": Image.fromarray(image), "mask": Image.fromarray(mask)}


def test_user_in_memory_dataset_fits_through_the_python_api(tmp_path):
    torch.manual_seed(0)
    model = Segmentation(num_classes=3, backbone_kwargs=TINY, lr=1e-2)
    data = SegmentationDataModule(train=GreyBands(8), val=GreyBands(4), image_size=32, batch_size=4)
    trainer = L.Trainer(
        fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, datamodule=data)
    assert math.isfinite(trainer.callback_metrics["train/loss"]) and 0 <= trainer.callback_metrics["val/mIoU"] <= 1
    # The datasets stay out of the checkpoint (an in-memory one would bloat it); the DataModule's settings go in.
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["datamodule_hyper_parameters"]
    assert saved["batch_size"] == 4 and not {"train", "val", "test"} & set(saved)


def test_model_and_data_class_counts_must_agree():
    model = Segmentation(num_classes=5, backbone_kwargs=TINY)
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    expected = r"Segmentation has num_classes=5 but the segmentation data have 3 \(GreyBands\); set model.init_args"
    with pytest.raises(ValueError, match=expected):
        trainer.fit(model, datamodule=SegmentationDataModule(train=GreyBands(4), val=GreyBands(4)))


def test_datasets_by_class_path_through_the_cli(tmp_path):
    """A YAML that names the datasets by class_path (a user's class and SegmentationFolder), a root given on the
    command line, fit through dinov3-pl's CLI; its saved config.yaml records the datasets."""
    folder = tmp_path / "folder"
    for split, count in (("training", 4), ("validation", 2)):
        (folder / "images" / split).mkdir(parents=True)
        (folder / "annotations" / split).mkdir(parents=True)
        for index in range(count):
            sample = GreyBands()[index]
            sample["image"].convert("RGB").save(folder / "images" / split / f"{index}.png")
            sample["mask"].save(folder / "annotations" / split / f"{index}.png")
    config = {
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "default_root_dir": str(tmp_path / "run")},
        "model": {"class_path": "dinov3_pl.modules.segmentation.Segmentation", "init_args": {"num_classes": 3}},
        "data": {
            "class_path": "dinov3_pl.data.segmentation.SegmentationDataModule",
            "init_args": {
                "train": {"class_path": "tests.test_segmentation.GreyBands", "init_args": {"count": 4}},
                "val": {
                    "class_path": "dinov3_pl.data.SegmentationFolder",
                    "init_args": {"root": "set/on/the/command/line", "split": "validation", "num_classes": 3},
                },
                "image_size": 32,
                "batch_size": 2,
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    tiny = "{depth: 2, embed_dim: 32, num_heads: 2, patch_size: 8, img_size: 32}"
    cli = run_cli(
        [
            "fit",
            "--config",
            str(path),
            f"--model.init_args.backbone_kwargs={tiny}",
            f"--data.init_args.val.init_args.root={folder}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0",
        ]
    )
    data = cli.datamodule
    # Imported by its class_path (pytest may have imported this file under another module name).
    assert type(data.datasets["train"]).__name__ == "GreyBands" and isinstance(data.datasets["val"], SegmentationFolder)
    assert data.num_classes == 3 and len(data.val_set) == 2 and "val/mIoU" in cli.trainer.callback_metrics
    saved = yaml.safe_load(Path(cli.trainer.log_dir, "config.yaml").read_text())["data"]["init_args"]
    assert saved["val"]["init_args"]["root"] == str(folder) and saved["train"]["class_path"].endswith("GreyBands")
