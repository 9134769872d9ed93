"""Dense-eval data: ADE20K-style folder reader, COCO reader, DataModules, transforms and bad-input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinov3_pl.data.dense import (
    IGNORE_INDEX,
    CocoDetectionDataset,
    DetectionDataModule,
    SegmentationDataModule,
    SegmentationFolder,
    segmentation_collate,
)


def _write_segmentation_folder(root, masks_by_split, image_sizes=None):
    rng = np.random.default_rng(0)
    for split, masks in masks_by_split.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for index, mask in enumerate(masks):
            height, width = image_sizes[index] if image_sizes else mask.shape
            image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"img{index}.jpg")
            Image.fromarray(np.asarray(mask, np.uint8)).save(root / "annotations" / split / f"img{index}.png")
    return root


def test_folder_reads_ids_and_reduce_zero_label(tmp_path):
    mask = np.array([[0, 1, 2, 255], [3, 3, 0, 1]], np.uint8).repeat(4, 0).repeat(4, 1)
    root = _write_segmentation_folder(tmp_path, {"training": [mask], "validation": [mask]})
    sample = SegmentationFolder(root, "training")[0]
    assert sample["image"].shape == (8, 16, 3) and sample["path"].endswith("img0.jpg")
    np.testing.assert_array_equal(sample["mask"], mask)
    reduced = SegmentationFolder(root, "training", reduce_zero_label=True)[0]["mask"]
    # ADE20K convention: 0 (unlabelled) -> ignore, c -> c - 1, 255 stays ignore.
    expected = np.where((mask == 0) | (mask == 255), 255, mask.astype(int) - 1)
    np.testing.assert_array_equal(reduced, expected)


def test_folder_errors(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    root = _write_segmentation_folder(tmp_path / "a", {"training": [mask], "validation": [mask]}, [(8, 12)])
    with pytest.raises(ValueError, match=r"img0\.png is 8x8 but its image .*img0\.jpg is 12x8"):
        SegmentationFolder(root, "training")[0]
    (tmp_path / "b" / "images" / "training").mkdir(parents=True)
    (tmp_path / "b" / "annotations" / "training").mkdir(parents=True)
    with pytest.raises(ValueError, match="'training' is empty"):
        SegmentationFolder(tmp_path / "b", "training")
    with pytest.raises(FileNotFoundError, match="ADE20K layout"):
        SegmentationFolder(tmp_path / "missing", "training")


def test_segmentation_datamodule_folder_and_label_check(tmp_path):
    good = np.array([[0, 1], [2, 255]], np.uint8).repeat(16, 0).repeat(16, 1)
    root = _write_segmentation_folder(tmp_path / "good", {"training": [good, good], "validation": [good]})
    dm = SegmentationDataModule("folder", root=str(root), num_classes=3, image_size=16, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (2, 3, 16, 16) and batch["masks"].dtype == torch.long
    # Nearest-neighbour masks: no invented ids after scaling, cropping and flipping.
    assert set(batch["masks"].unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
    val = next(iter(dm.val_dataloader()))
    assert val["images"].shape == (1, 3, 32, 32)
    torch.testing.assert_close(val["masks"][0], torch.as_tensor(good, dtype=torch.long))

    bad = good.copy()
    bad[0, 0] = 7
    root = _write_segmentation_folder(tmp_path / "bad", {"training": [bad], "validation": [bad]})
    dm = SegmentationDataModule("folder", root=str(root), num_classes=3, image_size=16)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"label ids \[7\] >= num_classes=3"):
        dm.train_set[0]
    with pytest.raises(ValueError, match="needs root and num_classes"):
        SegmentationDataModule("folder", root=str(root))


def test_segmentation_collate_pads_with_ignore():
    samples = [
        {"image": torch.ones(3, 4, 6), "mask": torch.zeros(4, 6, dtype=torch.long)},
        {"image": torch.ones(3, 6, 4), "mask": torch.ones(6, 4, dtype=torch.long)},
    ]
    batch = segmentation_collate(samples)
    assert batch["images"].shape == (2, 3, 6, 6)
    assert (batch["masks"][0, 4:] == IGNORE_INDEX).all() and (batch["masks"][1, :, 4:] == IGNORE_INDEX).all()
    assert batch["images"][0, :, 4:].abs().sum() == 0 and (batch["masks"][1, :, :4] == 1).all()


def _write_coco(tmp_path, annotations, images=None, image_size=(20, 40)):
    height, width = image_size
    (tmp_path / "imgs").mkdir(exist_ok=True)
    images = images or [{"id": 5, "file_name": "a.png", "width": width, "height": height}]
    for image in images:
        Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(tmp_path / "imgs" / image["file_name"])
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    return path


def test_coco_reader_converts_boxes_and_categories(tmp_path):
    annotations = [
        {"id": 1, "image_id": 5, "category_id": 7, "bbox": [2, 3, 10, 5], "iscrowd": 0},
        {"id": 2, "image_id": 5, "category_id": 3, "bbox": [30, 0, 20, 4]},  # runs past the right border
        {"id": 3, "image_id": 5, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1},  # crowd: dropped
    ]
    dataset = CocoDetectionDataset(tmp_path / "imgs", _write_coco(tmp_path, annotations))
    sample = dataset[0]
    assert dataset.class_names == ["three", "seven"] and dataset.num_classes == 2
    np.testing.assert_allclose(sample["boxes"], [[2, 3, 12, 8], [30, 0, 40, 4]])
    np.testing.assert_array_equal(sample["box_labels"], [1, 0])  # sorted ids: 3 -> 0, 7 -> 1


def test_coco_reader_errors(tmp_path):
    bad = [{"id": 1, "image_id": 99, "category_id": 7, "bbox": [0, 0, 2, 2]}]
    with pytest.raises(ValueError, match=r"unknown image ids \[99\]"):
        CocoDetectionDataset(tmp_path / "imgs", _write_coco(tmp_path, bad))
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1}]}))
    with pytest.raises(ValueError, match="empty split"):
        CocoDetectionDataset(tmp_path, path)
    with pytest.raises(FileNotFoundError):
        CocoDetectionDataset(tmp_path, tmp_path / "nope.json")


def test_detection_datamodule_coco_batches(tmp_path):
    annotations = [{"id": 1, "image_id": 5, "category_id": 7, "bbox": [2, 3, 10, 5]}]
    path = _write_coco(tmp_path, annotations)
    dm = DetectionDataModule(
        "coco",
        image_root=str(tmp_path / "imgs"),
        train_annotations=str(path),
        val_annotations=str(path),
        image_size=80,
        batch_size=2,
    )
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.class_names == ["three", "seven"]
    val = next(iter(dm.val_dataloader()))
    assert val["images"].shape == (1, 3, 80, 80) and isinstance(val["targets"], list)
    # Longest side 40 -> 80 (x2), padded at the bottom/right: the box scales by 2.
    torch.testing.assert_close(val["targets"][0]["boxes"], torch.tensor([[4.0, 6.0, 24.0, 16.0]]))
    assert val["targets"][0]["labels"].tolist() == [1]
    for _ in range(5):
        target = dm.train_set[0]["target"]
        boxes = target["boxes"]
        assert len(boxes) == len(target["labels"]) and ((boxes >= 0) & (boxes <= 80)).all()


def test_detection_datamodule_synthetic():
    dm = DetectionDataModule("synthetic", image_size=32, batch_size=4, num_train=8, num_val=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 3, 32, 32) and len(batch["targets"]) == 4
    assert all(t["labels"].max() < dm.num_classes for t in batch["targets"] if len(t["labels"]))
