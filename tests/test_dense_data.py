"""Dense-eval data: ADE20K-style folder reader, COCO reader, DataModules taking datasets as objects (the synthetic
default, folders, COCO, a user's in-memory dataset), transforms and bad-input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from dinov3_pl.data.datasets import SyntheticShapes
from dinov3_pl.data.dense import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from dinov3_pl.data.detection import CocoDetectionDataset, DetectionDataModule, detection_collate
from dinov3_pl.data.segmentation import (
    PhotometricDistortion,
    SegmentationDataModule,
    SegmentationFolder,
    SegmentationTrainTransform,
    SyntheticShapeMasks,
    choose_crop,
    resize_short_side,
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


def _folder_splits(root, num_classes=None):
    return {
        "train": SegmentationFolder(root, "training", num_classes=num_classes),
        "val": SegmentationFolder(root, "validation", num_classes=num_classes),
    }


def test_segmentation_datamodule_folder_and_label_check(tmp_path):
    good = np.array([[0, 1], [2, 255]], np.uint8).repeat(16, 0).repeat(16, 1)
    root = _write_segmentation_folder(tmp_path / "good", {"training": [good, good], "validation": [good]})
    dm = SegmentationDataModule(**_folder_splits(root, num_classes=3), image_size=16, batch_size=2)
    assert dm.num_classes == 3
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (2, 3, 16, 16) and batch["masks"].dtype == torch.long
    # Nearest-neighbour masks: no invented ids after scaling, cropping and flipping.
    assert set(batch["masks"].unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
    val = next(iter(dm.val_dataloader()))
    assert val["images"].shape == (1, 3, 32, 32)
    torch.testing.assert_close(val["masks"][0], torch.as_tensor(good, dtype=torch.long))
    # num_classes given to the DataModule supplies it for a folder that does not state it.
    assert SegmentationDataModule(**_folder_splits(root), num_classes=4).num_classes == 4

    bad = good.copy()
    bad[0, 0] = 7
    root = _write_segmentation_folder(tmp_path / "bad", {"training": [bad], "validation": [bad]})
    dm = SegmentationDataModule(**_folder_splits(root, num_classes=3), image_size=16)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"img0\.jpg: label ids \[7\] outside 0\.\.2 for num_classes=3"):
        dm.train_set[0]


def test_dense_datamodules_refuse_missing_splits_and_unknown_class_counts(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    root = _write_segmentation_folder(tmp_path, {"training": [mask], "validation": [mask]})
    splits = _folder_splits(root)
    with pytest.raises(ValueError, match="SegmentationDataModule: val is missing; give train and val datasets"):
        SegmentationDataModule(train=splits["train"])
    with pytest.raises(ValueError, match="DetectionDataModule: train is missing"):
        DetectionDataModule(val=SyntheticShapes(4))
    with pytest.raises(ValueError, match="train dataset SegmentationFolder has no num_classes attribute; pass num_cl"):
        SegmentationDataModule(**splits)
    with pytest.raises(ValueError, match="the splits state different num_classes"):
        SegmentationDataModule(train=SyntheticShapeMasks(4), val=SyntheticShapes(4))
    with pytest.raises(ValueError, match="num_classes must be a positive number of classes, got 0"):
        SegmentationFolder(root, "training", num_classes=0)


def test_synthetic_default_is_the_earlier_default():
    """No datasets: 512 training / 128 validation shapes of image_size, seeds seed and seed + 1000003, exactly the
    samples the earlier num_train/num_val defaults gave (the configs' measured numbers rely on them)."""
    segmentation, detection = SegmentationDataModule(image_size=32, seed=3), DetectionDataModule(image_size=32, seed=3)
    assert segmentation.num_classes == 9 and segmentation.class_names[0] == "background"
    assert detection.num_classes == 8 and detection.class_names == list(SyntheticShapes.class_names)
    for dm in (segmentation, detection):
        train, val, test = (dm.datasets[split] for split in ("train", "val", "test"))
        assert (len(train), len(val)) == (512, 128) and test is val
        for dataset, seed in ((train, 3), (val, 3 + 1_000_003)):
            expected = SyntheticShapes(len(dataset), 32, seed=seed)[5]
            for key, value in dataset[5].items():
                np.testing.assert_array_equal(value, expected[key])
    assert not {"train", "val", "test", "num_classes"} & set(segmentation.hparams) and segmentation.hparams.seed == 3


class _InMemoryMasks(Dataset):
    """A user's segmentation data: PIL images (greyscale, so the DataModule must make them RGB) and PIL masks."""

    num_classes = 3

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> dict:
        mask = np.zeros((12, 20), np.uint8)
        mask[:, 10:] = 1 + index % 2
        image = (np.arange(12 * 20).reshape(12, 20) + 40 * index) % 256
        return {"image": Image.fromarray(image.astype(np.uint8)), "mask": Image.fromarray(mask)}


def test_in_memory_pil_dataset_reaches_the_batches_as_rgb():
    data = _InMemoryMasks()
    dm = SegmentationDataModule(train=data, val=data, batch_size=3)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    grey = np.stack([np.asarray(data[i]["image"], np.float32) / 255 for i in range(3)])
    expected = (grey[:, None] - np.reshape(IMAGENET_MEAN, (1, 3, 1, 1))) / np.reshape(IMAGENET_STD, (1, 3, 1, 1))
    torch.testing.assert_close(batch["images"], torch.as_tensor(expected, dtype=torch.float32))
    np.testing.assert_array_equal(batch["masks"].numpy(), np.stack([np.asarray(data[i]["mask"]) for i in range(3)]))
    assert dm.test_set is dm.val_set


def test_unreadable_samples_are_dropped_and_counted_and_bad_samples_are_named():
    kept = {"image": torch.zeros(3, 4, 4), "mask": torch.zeros(4, 4, dtype=torch.long)}
    batch = segmentation_collate([kept, None, kept])
    assert batch["images"].shape[0] == 2 and batch["num_bad_images"] == 1
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    assert detection_collate([None, {"image": torch.zeros(3, 4, 4), "target": target}])["num_bad_images"] == 1
    with pytest.raises(ValueError, match="all 2 samples of a batch were unreadable"):
        segmentation_collate([None, None])

    class Boxless(_InMemoryMasks):
        num_classes = 2

    dm = DetectionDataModule(train=Boxless(), val=Boxless())
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"train dataset Boxless sample 0: a detection sample needs 'boxes'"):
        dm.train_set[0]

    class FloatImages(_InMemoryMasks):
        def __getitem__(self, index):
            return {"image": np.zeros((12, 20, 3), np.float32), "mask": np.zeros((12, 20), np.uint8)}

    dm = SegmentationDataModule(train=FloatImages(), val=FloatImages())
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"'image' must be uint8 \[H, W, 3\] RGB or a PIL image, got float32"):
        dm.val_set[0]


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
        {"id": 2, "image_id": 5, "category_id": 3, "bbox": [30, 0, 20, 4], "area": 33.5},  # past the right border
        {"id": 3, "image_id": 5, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1},  # crowd: an ignore region
    ]
    dataset = CocoDetectionDataset(tmp_path / "imgs", _write_coco(tmp_path, annotations))
    sample = dataset[0]
    assert dataset.class_names == ["three", "seven"] and dataset.num_classes == 2
    # As annotated (the evaluation compares with the JSON); the training transform clips.
    np.testing.assert_allclose(sample["boxes"], [[2, 3, 12, 8], [30, 0, 50, 4]])
    np.testing.assert_array_equal(sample["box_labels"], [1, 0])  # sorted ids: 3 -> 0, 7 -> 1
    np.testing.assert_allclose(sample["box_areas"], [50, 33.5])  # COCO's area where given, else the box's
    np.testing.assert_allclose(sample["crowd_boxes"], [[0, 0, 5, 5]])
    np.testing.assert_array_equal(sample["crowd_labels"], [0])


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
    annotations = [
        {"id": 1, "image_id": 5, "category_id": 7, "bbox": [2, 3, 10, 5]},
        {"id": 2, "image_id": 5, "category_id": 3, "bbox": [30, 0, 20, 4]},  # past the right border
        {"id": 3, "image_id": 5, "category_id": 3, "bbox": [0, 10, 6, 6], "iscrowd": 1, "area": 20},
    ]
    path = _write_coco(tmp_path, annotations)
    coco = CocoDetectionDataset(tmp_path / "imgs", path)
    dm = DetectionDataModule(train=coco, val=coco, image_size=80, batch_size=2)
    assert dm.num_classes == 2 and dm.class_names == ["three", "seven"]
    dm.setup("fit")
    val = next(iter(dm.val_dataloader()))
    assert val["images"].shape == (1, 3, 80, 80) and isinstance(val["targets"], list)
    # The image: longest side 40 -> 80 (x2), padded at the bottom/right; the targets stay in the original pixels, the
    # crowd region flagged, with the resize factors and the original size beside them.
    target = val["targets"][0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3, 12, 8], [30, 0, 50, 4], [0, 10, 6, 16]]))
    assert target["labels"].tolist() == [1, 0, 0] and target["iscrowd"].tolist() == [0, 0, 1]
    torch.testing.assert_close(target["area"], torch.tensor([50.0, 80, 20]))
    assert val["scales"].tolist() == [[2.0, 2.0]] and val["original_sizes"].tolist() == [[20, 40]]
    for _ in range(5):  # training: no crowd region, boxes clipped to the crop
        target = dm.train_set[0]["target"]
        boxes = target["boxes"]
        assert len(boxes) == len(target["labels"]) <= 2 and ((boxes >= 0) & (boxes <= 80)).all()


def test_detection_datamodule_refuses_splits_with_other_categories(tmp_path):
    path = _write_coco(tmp_path, [])
    other = json.loads(path.read_text())
    other["categories"] = [{"id": 7, "name": "seven"}, {"id": 4, "name": "four"}]
    (tmp_path / "other.json").write_text(json.dumps(other))
    train = CocoDetectionDataset(tmp_path / "imgs", path)
    val = CocoDetectionDataset(tmp_path / "imgs", tmp_path / "other.json")
    with pytest.raises(ValueError, match=r"train and val annotations have different categories: \[3, 7\] vs \[4, 7\]"):
        DetectionDataModule(train=train, val=val)
    renamed = dict(other, categories=[{"id": 7, "name": "seven"}, {"id": 3, "name": "tree"}])
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    with pytest.raises(ValueError, match=r"test dataset CocoDetectionDataset names its classes \['tree', 'seven'\]"):
        DetectionDataModule(
            train=train, val=train, test=CocoDetectionDataset(tmp_path / "imgs", tmp_path / "renamed.json")
        )
    with pytest.raises(ValueError, match="num_classes=3 but the datasets name 2 classes"):
        DetectionDataModule(train=train, val=train, num_classes=3)


def test_detection_datamodule_synthetic_and_a_separate_test_split():
    dm = DetectionDataModule(
        train=SyntheticShapes(8, 32),
        val=SyntheticShapes(4, 32, seed=1),
        test=SyntheticShapes(6, 32, seed=2),
        image_size=32,
        batch_size=4,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 3, 32, 32) and len(batch["targets"]) == 4
    assert all(t["labels"].max() < dm.num_classes for t in batch["targets"] if len(t["labels"]))
    assert len(dm.val_dataloader().dataset) == 4 and len(dm.test_dataloader().dataset) == 6


# ------------------------------------------------------------------------------------------------ augmentation seeds
def _first_train_batch(module_class, seed: int) -> dict:
    torch.manual_seed(seed)
    data = module_class(image_size=32, batch_size=8)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


@pytest.mark.parametrize("module_class", [SegmentationDataModule, DetectionDataModule])
def test_training_augmentation_follows_the_torch_seed(module_class):
    """albumentations keeps its own generator: without ProcessSeeded, seeding torch (seed_everything) left the random
    scale / crop / flip unseeded, so two runs with one seed differed."""
    first, again, other = (_first_train_batch(module_class, seed) for seed in (5, 5, 6))
    assert torch.equal(first["images"], again["images"])
    assert not torch.equal(first["images"], other["images"])


class _ConstantImage(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        image = np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3))  # a horizontal ramp
        return {"image": image, "mask": np.zeros((32, 32), np.uint8)}


def test_dataloader_workers_do_not_repeat_each_others_augmentations():
    """Each worker starts from a pickled copy of the pipeline: unseeded per process, both workers drew the same crops
    and flips (the same image gave identical outputs at the same position in each worker's batches)."""
    torch.manual_seed(0)
    data = SegmentationDataModule(
        train=_ConstantImage(), val=_ConstantImage(), num_classes=2, image_size=16, scale_range=(0.5, 2.0),
        batch_size=1, num_workers=2,
    )  # fmt: skip
    data.setup("fit")
    images = [batch["images"] for batch in data.train_dataloader()]  # workers alternate: 0, 1, 0, 1, ...
    assert not all(torch.equal(images[i], images[i + 1]) for i in range(0, len(images), 2))


# ------------------------------------------------------------------------------------------------ upstream's recipe
def test_crop_is_redrawn_while_one_class_covers_cat_max_ratio():
    """A 40x40 map: class 1 only in the top-left 16x16 corner, the rest class 0 (ignore in the bottom rows). A
    20x20 crop passes upstream's rule (two classes, none >= 0.75 of the labelled pixels) only when it takes enough of
    the corner (70 of the 441 offsets); an all-class-0 map passes never, so the 11th draw is taken unchecked."""
    mask = np.zeros((40, 40), np.uint8)
    mask[:16, :16] = 1
    mask[36:] = IGNORE_INDEX

    def passes(top, left):
        labels, counts = np.unique(mask[top : top + 20, left : left + 20], return_counts=True)
        counts = counts[labels != IGNORE_INDEX]
        return len(counts) > 1 and counts.max() / counts.sum() < 0.75

    corners = [choose_crop(mask, 20, 0.75, np.random.default_rng(seed)) for seed in range(200)]
    assert all(0 <= top <= 20 and 0 <= left <= 20 for top, left in corners)
    # 16% of the offsets pass; up to 11 draws find one 85% of the time (1 - 0.84^11).
    assert sum(passes(t, x) for t in range(21) for x in range(21)) == 70
    assert np.mean([passes(*corner) for corner in corners]) > 0.7
    draws = []

    class CountingRng:
        def integers(self, low, high):
            draws.append(high)
            return 0

    choose_crop(np.zeros((40, 40), np.uint8), 20, 0.75, CountingRng())
    assert len(draws) == 2 * 11  # (top, left) drawn once, then re-drawn after each of 10 failed checks
    draws.clear()
    choose_crop(np.zeros((40, 40), np.uint8), 20, 1.0, CountingRng())  # the rule off
    assert len(draws) == 2


def test_photometric_distortion_draws_upstreams_ranges_and_applies_them():
    distortion, rng = PhotometricDistortion(), np.random.default_rng(0)
    draws = [distortion.sample(rng) for _ in range(4000)]
    ranges = {"brightness": (-32, 32), "contrast": (0.5, 1.5), "saturation": (0.5, 1.5), "hue": (-0.5, 0.5)}
    for key, (low, high) in ranges.items():
        values = np.array([d[key] for d in draws if d[key] is not None])
        assert 0.45 < len(values) / len(draws) < 0.55  # each step with probability 0.5
        assert low <= values.min() < low + 0.05 * (high - low) and high - 0.05 * (high - low) < values.max() <= high
    assert 0.45 < np.mean([d["contrast_first"] for d in draws]) < 0.55
    image = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    off = {"brightness": None, "contrast_first": True, "contrast": None, "saturation": None, "hue": None}
    brighter = PhotometricDistortion.apply(image, {**off, "brightness": 20.7})
    np.testing.assert_array_equal(brighter, np.clip(image + 20.7, 0, 255).astype(np.uint8))  # clipped, truncated
    stronger = PhotometricDistortion.apply(image, {**off, "contrast": 1.3})
    np.testing.assert_array_equal(stronger, np.clip(image * np.float32(1.3), 0, 255).astype(np.uint8))
    hued = PhotometricDistortion.apply(image, {**off, "hue": 0.25})
    expected = TF.adjust_hue(torch.tensor(image).permute(2, 0, 1), 0.25).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(hued, expected)
    # Contrast last: after the saturation change, not before it.
    last = PhotometricDistortion.apply(image, {**off, "contrast_first": False, "contrast": 1.3, "saturation": 0.5})
    grey_blend = TF.adjust_saturation(torch.tensor(image).permute(2, 0, 1), 0.5).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(last, np.clip(grey_blend * np.float32(1.3), 0, 255).astype(np.uint8))


def test_training_transform_resizes_crops_and_pads_with_ignore():
    transform = SegmentationTrainTransform(32, scale_range=(0.25, 0.25), cat_max_ratio=1.0, flip_prob=0.0)
    transform.set_random_seed(0)
    image = np.full((40, 60, 3), 200, np.uint8)
    mask = np.ones((40, 60), np.uint8)
    out = transform(image=image, mask=mask)
    # Short side 32 x 0.25 = 8, long side 12: smaller than the crop, padded bottom/right (0 = the mean colour, 255).
    assert out["image"].shape == (32, 32, 3) and out["mask"].shape == (32, 32)
    assert (out["mask"][:8, :12] == 1).all() and (out["mask"][8:] == IGNORE_INDEX).all()
    assert (out["mask"][:, 12:] == IGNORE_INDEX).all() and (out["image"][8:] == 0).all()
    assert resize_short_side(image, 16).shape == (16, 24, 3)  # upstream's FixedSideResize: int(16 * 60 / 40 + 0.5)
    with pytest.raises(ValueError, match="cat_max_ratio must be in"):
        SegmentationTrainTransform(32, cat_max_ratio=0)


def test_label_resize_picks_upstreams_pixels():
    """Training label maps are resized with torch's nearest (pixel floor(i * scale)), as upstream's torchvision Resize
    on its label tensor; PIL's nearest would pick other pixels. Expected maps from upstream's FixedSideResize
    (facebookresearch/dinov3 dinov3/eval/segmentation/transforms.py, commit 6876159a), run outside this repository."""
    mask = (np.arange(35).reshape(5, 7) * 7 % 50).astype(np.uint8)
    image = np.zeros((5, 7, 3), np.uint8)
    shrunk = resize_short_side(image, 3, mask)[1]
    np.testing.assert_array_equal(shrunk, [[0, 7, 21, 35], [49, 6, 20, 34], [47, 4, 18, 32]])
    grown = resize_short_side(image, 8, mask)[1]
    assert grown.shape == (8, 11)
    expected = [[0, 0, 7, 7], [0, 0, 7, 7], [49, 49, 6, 6], [49, 49, 6, 6], [48, 48, 5, 5], [47, 47, 4, 4]]
    np.testing.assert_array_equal(grown[:6, :4], expected)
