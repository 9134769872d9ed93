"""Detection on a frozen backbone: mAP on hand-made boxes, pyramid strides/shapes, end-to-end fit with the backbone
unchanged, overlays, configs through LightningCLI."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from dinov3_pl.data.datasets import SyntheticShapes
from dinov3_pl.data.detection import CocoDetectionDataset, DetectionDataModule
from dinov3_pl.data.scenes import FashionMNISTScenes
from dinov3_pl.models.dense_heads import SimpleFeaturePyramid
from dinov3_pl.modules.detection import Detection, detection_overlay
from tests.helpers import fit_one_epoch, logged_image_tags, run_cli

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "img_size": 32}
SMALL_HEADS = {
    "pyramid_channels": 16,
    "representation_size": 32,
    "box_batch_size_per_image": 32,
    "rpn_post_nms_top_n_train": 64,
}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "eval"


def _map(predicted_boxes, scores, gt_boxes):
    metric = Detection._new_map_metric()
    metric.update(
        [
            {
                "boxes": torch.tensor(predicted_boxes),
                "scores": torch.tensor(scores),
                "labels": torch.zeros(len(scores), dtype=torch.long),
            }
        ],
        [{"boxes": torch.tensor(gt_boxes), "labels": torch.zeros(len(gt_boxes), dtype=torch.long)}],
    )
    return {k: v.item() for k, v in metric.compute().items() if k in ("map", "map_50", "map_75")}


@pytest.mark.parametrize(
    ("shift", "expected"),
    [
        # A 10x10 box shifted by d along x: IoU = (10 - d) / (10 + d).
        (0.0, {"map": 1.0, "map_50": 1.0, "map_75": 1.0}),
        # d = 2: IoU = 8/12 = 0.667 -> a hit at thresholds 0.50, 0.55, 0.60, 0.65 (4 of 10) and a miss above.
        (2.0, {"map": 0.4, "map_50": 1.0, "map_75": 0.0}),
        # d = 1: IoU = 9/11 = 0.818 -> hits at 0.50 ... 0.80 (7 of 10).
        (1.0, {"map": 0.7, "map_50": 1.0, "map_75": 1.0}),
        # d = 3.4: IoU = 6.6/13.4 = 0.4925, just below 0.5 -> no hit at any threshold.
        (3.4, {"map": 0.0, "map_50": 0.0, "map_75": 0.0}),
    ],
)
def test_map_on_hand_made_boxes(shift, expected):
    result = _map([[20.0 + shift, 20.0, 30.0 + shift, 30.0]], [0.9], [[20.0, 20.0, 30.0, 30.0]])
    assert result == pytest.approx(expected, abs=1e-6)


def test_map_with_one_of_two_objects_found():
    # Precision 1 up to recall 0.5, nothing after: COCO's 101-point interpolated AP = 51/101 at every threshold.
    result = _map([[0.0, 0.0, 10.0, 10.0]], [0.9], [[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 50.0, 50.0]])
    assert result["map"] == pytest.approx(51 / 101, abs=1e-6) and result["map_50"] == pytest.approx(51 / 101, abs=1e-6)


def test_map_by_box_size_logged_for_the_sizes_present(monkeypatch):
    torch.manual_seed(0)
    module = Detection(num_classes=1, backbone_kwargs=TINY, **SMALL_HEADS)
    # A small box (10x10 = 100 px^2) found exactly and a medium one (40x40) shifted by 8 px: IoU 32/48 = 0.667,
    # a hit at 4 of the 10 IoU thresholds -> AP 0.4. No large box, so no mAP_large.
    module.val_map.update(
        [
            {
                "boxes": torch.tensor([[0.0, 0, 10, 10], [58, 50, 98, 90]]),
                "scores": torch.tensor([0.9, 0.8]),
                "labels": torch.zeros(2, dtype=torch.long),
            }
        ],
        [{"boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 90, 90]]), "labels": torch.zeros(2, dtype=torch.long)}],
    )
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kwargs: logged.__setitem__(name, float(value)))
    module._log_epoch_metrics("val")
    assert logged["val/mAP_small"] == pytest.approx(1.0) and logged["val/mAP_medium"] == pytest.approx(0.4)
    # Overall: both hit at 4 thresholds (AP 1), only the higher-scored small one at 6 (AP 51/101, see above).
    assert "val/mAP_large" not in logged and logged["val/mAP"] == pytest.approx((4 + 6 * 51 / 101) / 10)


# Hand-made COCO ground truth on two images of different sizes (one taller than wide), with a crowd region, areas
# given as COCO gives them (mask areas, not box areas) spanning COCO's small and medium sizes, and detections in
# original image coordinates: hits, misses, a duplicate, a detection on the crowd region and one of the wrong class.
_COCO_IMAGES = [
    {"id": 11, "file_name": "wide.png", "width": 120, "height": 80},
    {"id": 4, "file_name": "tall.png", "width": 50, "height": 100},
]
_COCO_ANNOTATIONS = [
    {"id": 1, "image_id": 11, "category_id": 3, "bbox": [5, 5, 20, 10], "area": 150.0, "iscrowd": 0},
    {"id": 2, "image_id": 11, "category_id": 7, "bbox": [60, 20, 45, 40], "area": 1500.0, "iscrowd": 0},
    {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 40, 50, 38], "area": 1200.0, "iscrowd": 1},
    {"id": 4, "image_id": 4, "category_id": 3, "bbox": [2, 2, 10, 40], "area": 380.0, "iscrowd": 0},
    {"id": 5, "image_id": 4, "category_id": 7, "bbox": [10, 50, 36, 40], "area": 1300.0, "iscrowd": 0},
]
_COCO_DETECTIONS = [  # [x, y, w, h] in original pixels
    {"image_id": 11, "category_id": 3, "bbox": [6, 5, 19, 11], "score": 0.9},
    {"image_id": 11, "category_id": 3, "bbox": [4, 44, 40, 30], "score": 0.85},  # inside the crowd region
    {"image_id": 11, "category_id": 7, "bbox": [62, 24, 40, 38], "score": 0.7},
    {"image_id": 11, "category_id": 7, "bbox": [62, 22, 42, 36], "score": 0.65},  # duplicate
    {"image_id": 11, "category_id": 7, "bbox": [0, 0, 10, 10], "score": 0.95},  # nothing there
    {"image_id": 4, "category_id": 3, "bbox": [2, 6, 11, 34], "score": 0.6},
    {"image_id": 4, "category_id": 7, "bbox": [12, 48, 30, 44], "score": 0.3},
    {"image_id": 4, "category_id": 3, "bbox": [12, 48, 30, 44], "score": 0.5},  # wrong class
]


def test_map_in_original_coordinates_with_crowd_regions_equals_pycocotools(tmp_path):
    """Images resized for the model (and padded), predictions mapped back to the original pixels, crowd regions
    ignored, COCO's areas: our logged numbers equal pycocotools' COCOeval run directly on the same JSON."""
    # The reference implementation, independent of torchmetrics and faster-coco-eval (a dev dependency).
    COCO = pytest.importorskip("pycocotools.coco").COCO
    COCOeval = pytest.importorskip("pycocotools.cocoeval").COCOeval
    coco = {"images": _COCO_IMAGES, "annotations": _COCO_ANNOTATIONS, "categories": [{"id": 7}, {"id": 3}]}
    (tmp_path / "gt.json").write_text(json.dumps(coco))
    for image in _COCO_IMAGES:
        pixels = np.full((image["height"], image["width"], 3), 100, np.uint8)
        Image.fromarray(pixels).save(tmp_path / image["file_name"])
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        ground_truth = COCO(str(tmp_path / "gt.json"))
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(_COCO_DETECTIONS), "bbox")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    expected = dict(zip(["mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium"], evaluation.stats[:5], strict=True))
    expected["mAR100"] = evaluation.stats[8]

    dataset = CocoDetectionDataset(tmp_path, tmp_path / "gt.json")
    data = DetectionDataModule(train=dataset, val=dataset, image_size=64, val_batch_size=2)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    assert batch["images"].shape == (2, 3, 64, 64)
    module = Detection(num_classes=2, backbone_kwargs=TINY, **SMALL_HEADS).eval()
    label_of = {cid: label for label, cid in enumerate(dataset.category_ids)}

    def detector_output(images):  # what the detector sees: the resized image, so boxes in its pixels
        outputs = []
        for image_id, scale in zip(dataset.image_ids, batch["scales"], strict=True):
            mine = [d for d in _COCO_DETECTIONS if d["image_id"] == image_id]
            boxes = torch.tensor(
                [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)], dtype=torch.float64
            )
            boxes = boxes * scale[[1, 0, 1, 0]]
            outputs.append(
                {
                    "boxes": boxes.float(),
                    "scores": torch.tensor([d["score"] for d in mine]),
                    "labels": torch.tensor([label_of[d["category_id"]] for d in mine]),
                }
            )
        return outputs

    module.forward = detector_output
    module.validation_step(batch, 1)
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name.removeprefix("val/"), float(value))
    module._log_epoch_metrics("val")
    assert {name: logged[name] for name in expected} == pytest.approx(expected, abs=1e-6)
    assert "mAP_large" not in logged and evaluation.stats[5] == -1


@pytest.mark.parametrize("patch_size", [16, 8])
def test_simple_feature_pyramid_strides_and_shapes(patch_size):
    torch.manual_seed(0)
    image = 128
    pyramid = SimpleFeaturePyramid(24, patch_size=patch_size, out_channels=8, strides=(4, 8, 16, 32), top_pool=True)
    patch_map = torch.randn(2, 24, image // patch_size, image // patch_size)
    levels = pyramid(patch_map)
    assert list(levels) == ["p2", "p3", "p4", "p5", "pool"] and pyramid.output_strides == [4, 8, 16, 32, 64]
    for (name, level), stride in zip(levels.items(), pyramid.output_strides, strict=True):
        assert level.shape == (2, 8, image // stride, image // stride), name
    # Down-sampling levels are max pools of the ViT map; the identity level is the map itself.
    p5_input = pyramid.rescales[3](patch_map)
    torch.testing.assert_close(p5_input, F.max_pool2d(patch_map, 32 // patch_size))
    identity = pyramid.strides.index(patch_size)
    assert torch.equal(pyramid.rescales[identity](patch_map), patch_map)
    with pytest.raises(ValueError, match="power of two"):
        SimpleFeaturePyramid(24, patch_size=16, strides=(12,))


def test_detection_module_wiring():
    model = Detection(num_classes=3, backbone_kwargs=TINY, **SMALL_HEADS)
    assert model.detector.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    assert not any(n.startswith("detector.backbone.patch_map") for n, _ in model.named_parameters())
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"detector"}  # the ViT is frozen; pyramid + RPN + RoI heads train
    model.eval()
    images = torch.randn(2, 3, 40, 48)
    out = model(images)
    # No torchvision resize by default; padding to a multiple of 64 (patch 8, coarsest level 64) is cut back.
    batched, _ = model.detector.transform(list(images))
    assert tuple(batched.tensors.shape[-2:]) == (64, 64) and batched.image_sizes == [(40, 48), (40, 48)]
    assert len(out) == 2 and all(set(o) == {"boxes", "labels", "scores"} for o in out)
    with pytest.raises(ValueError, match="both min_size and max_size"):
        Detection(num_classes=3, backbone_kwargs=TINY, min_size=32, **SMALL_HEADS)


def test_detection_reads_the_requested_backbone_layers():
    model = Detection(num_classes=3, backbone_kwargs=TINY, layers=[0, 1], **SMALL_HEADS).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = torch.cat(model.backbone.get_intermediate_layers(images, n=[0, 1], reshape=True, norm=True), dim=1)
        torch.testing.assert_close(model._patch_map(images), expected)
    assert expected.shape[1] == 2 * TINY["embed_dim"]
    assert model(images)[0]["boxes"].shape[-1] == 4  # the pyramid takes the wider input
    with pytest.raises(ValueError, match="at least one block"):
        Detection(num_classes=3, backbone_kwargs=TINY, layers=[], **SMALL_HEADS)


def test_overlay_shape():
    targets = [{"boxes": torch.tensor([[2.0, 2.0, 10.0, 12.0]]), "labels": torch.tensor([1])}]
    predictions = [
        {"boxes": torch.tensor([[3.0, 2.0, 9.0, 12.0]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.9])}
    ]
    grid = detection_overlay(torch.zeros(1, 3, 16, 16), targets, predictions, ["a", "b"])
    assert grid.shape == (3, 16, 32) and grid.dtype == torch.uint8
    assert grid[:, :, :16].sum() > 0 and grid[:, :, 16:].sum() > 0  # boxes drawn on both sides


class _BackboneModeProbe(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        assert not module.backbone.training and module.detector.training


def test_fit_keeps_backbone_bit_identical_and_logs(tmp_path):
    torch.manual_seed(0)
    model = Detection(num_classes=8, backbone_kwargs=TINY, lr=1e-3, **SMALL_HEADS)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    pyramid_before = [p.detach().clone() for p in model.detector.backbone.pyramid.parameters()]
    data = DetectionDataModule(
        train=SyntheticShapes(8, 32), val=SyntheticShapes(4, 32, seed=1_000_003), image_size=32, batch_size=4
    )
    trainer, logger = fit_one_epoch(model, data, tmp_path, "det", callbacks=[_BackboneModeProbe()])
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), f"backbone changed: {key}"
    assert any(
        not torch.equal(a, b) for a, b in zip(model.detector.backbone.pyramid.parameters(), pyramid_before, strict=True)
    )
    metrics = trainer.callback_metrics
    assert math.isfinite(metrics["train/loss"]) and 0.0 <= metrics["val/mAP"] <= 1.0 and "val/mAP50" in metrics
    assert "val/detection" in logged_image_tags(logger)


def test_synthetic_config_runs_through_the_cli(tmp_path):
    cli = run_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "detection_synthetic.yaml"),
            "--trainer.fast_dev_run=1",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.batch_size=2",
            "--data.init_args.image_size=32",
            "--data.init_args.train.init_args.image_size=32",
            "--data.init_args.val.init_args.image_size=32",
            "--model.init_args.pyramid_channels=16",
        ]
    )
    assert isinstance(cli.model, Detection) and "val/mAP" in cli.trainer.callback_metrics


def test_fmnist_scenes_config_instantiates():
    cli = run_cli(["--config", str(CONFIGS / "detection_fmnist_scenes.yaml")])
    assert isinstance(cli.model, Detection) and cli.model.num_classes == 10 == cli.datamodule.num_classes
    assert cli.datamodule.class_names == cli.model.hparams.class_names  # the config's names are the dataset's
    train = cli.datamodule.datasets["train"]
    assert isinstance(train, FashionMNISTScenes) and train.task == "detection" and train._reader is None
