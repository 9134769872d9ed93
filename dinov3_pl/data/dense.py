"""Data for the dense frozen-backbone evaluations: semantic segmentation and object detection.

Segmentation label maps follow ADE20K/mmseg: ``uint8`` PNGs, class id per pixel, **0 = background (or the first
class), 255 = ignore**. With ``reduce_zero_label=True`` (ADE20K, where 0 means "unlabelled") 0 becomes 255 and every
other id is shifted down by one. Detection reads COCO-format JSON (boxes ``[x, y, w, h]``) and hands out ``xyxy``
boxes with contiguous labels ``0..C-1`` (sorted COCO category ids); the detection module adds torchvision's
background class itself.

Batches: segmentation ``{"images": float [B,3,H,W] (ImageNet-normalised), "masks": long [B,H,W]}``; detection
``{"images": float [B,3,S,S] (ImageNet-normalised), "targets": [{"boxes": float [K,4] xyxy, "labels": long [K]}]}``.

The DataModules take their datasets as objects (``train``, ``val``, ``test``; in YAML by ``class_path``): any
``torch.utils.data.Dataset`` whose samples are dicts with ``"image"`` (uint8 [H,W,3] or a PIL image) and
``"mask"`` (segmentation) or ``"boxes"`` + ``"box_labels"`` (detection), and which states ``num_classes`` (or the
DataModule is given it). Without datasets they use the embedded shapes (:class:`SyntheticShapeMasks` /
:class:`~dinov3_pl.data.datasets.SyntheticShapes`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import albumentations as A
import cv2
import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dinov3_pl.data.datasets import SHAPE_CLASS_NAMES, SyntheticShapes, prepare_datasets

# Images are decoded as viewers show them (EXIF orientation applied, as OpenCV's and mmcv's readers do); label maps
# are read as stored.
from dinov3_pl.data.decode import image_to_rgb, read_rgb
from dinov3_pl.data.samplers import ShardedEvalSampler
from dinov3_pl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ProcessSeeded

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CocoDetectionDataset",
    "DenseDataModule",
    "DetectionDataModule",
    "SegmentationDataModule",
    "SegmentationFolder",
    "SyntheticShapeMasks",
    "detection_collate",
    "segmentation_collate",
]

IGNORE_INDEX = 255
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def _positive_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{what} must be a positive number of classes, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------------ datasets
class SegmentationFolder(Dataset):
    """ADE20K-style folder: ``root/images/<split>/*.jpg|png`` with ``root/annotations/<split>/<same stem>.png``.

    Samples are ``{"image": uint8 [H,W,3], "mask": uint8 [H,W], "path": str}`` in the label convention of the
    module docstring (after ``reduce_zero_label`` when set). ``num_classes`` (classes of the mask ids, background
    included where it is a class) is what ``SegmentationDataModule`` reads when it is not given one; a folder cannot
    tell it from its files without reading every label map.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        reduce_zero_label: bool = False,
        num_classes: int | None = None,
    ) -> None:
        self.num_classes = None if num_classes is None else _positive_count(num_classes, "num_classes")
        self.root = Path(root)
        image_dir, label_dir = self.root / "images" / split, self.root / "annotations" / split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"segmentation folder {folder} does not exist (expected ADE20K layout "
                    f"root/images/{split}/ and root/annotations/{split}/)"
                )
        self.images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not self.images:
            raise ValueError(f"split {split!r} is empty: no images in {image_dir}")
        self.labels = [label_dir / f"{p.stem}.png" for p in self.images]
        missing = [str(p) for p in self.labels if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} label maps missing in {label_dir}, e.g. {missing[:3]}")
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = read_rgb(self.images[index])
        with Image.open(self.labels[index]) as label:
            if label.mode not in ("L", "P", "I;16", "I"):
                raise ValueError(
                    f"label map {self.labels[index]} has mode {label.mode}; expected a single-channel PNG of class ids"
                )
            mask = np.asarray(label).astype(np.int64)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"label map {self.labels[index]} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{self.images[index]} is {image.shape[1]}x{image.shape[0]}"
            )
        if self.reduce_zero_label:
            # ADE20K: 0 means "unlabelled" -> ignore; class c -> c - 1; 255 stays ignore.
            ignore = (mask == 0) | (mask == IGNORE_INDEX)
            mask = mask - 1
            mask[ignore] = IGNORE_INDEX
        return {
            "image": image,
            "mask": mask.astype(np.uint8) if mask.max(initial=0) <= 255 else mask,
            "path": str(self.images[index]),
        }


class CocoDetectionDataset(Dataset):
    """COCO-format detection: ``annotation_file`` JSON + ``image_root/<file_name>`` images.

    Samples are ``{"image": uint8 [H,W,3], "boxes": float32 [K,4] xyxy, "box_labels": int64 [K], "path": str}``;
    labels are the index of the category id in the sorted list of ``categories`` ids. Crowd annotations and boxes
    without area are dropped; images without annotations are kept (no boxes).
    """

    def __init__(self, image_root: str | Path, annotation_file: str | Path) -> None:
        self.image_root = Path(image_root)
        annotation_file = Path(annotation_file)
        if not annotation_file.is_file():
            raise FileNotFoundError(f"COCO annotation file {annotation_file} does not exist")
        data = json.loads(annotation_file.read_text())
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"{annotation_file} is not COCO format: no {key!r} list")
        if not data["images"]:
            raise ValueError(f"{annotation_file} lists no images (empty split)")
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in categories]
        self.class_names = [c.get("name", str(c["id"])) for c in categories]
        label_of = {cid: index for index, cid in enumerate(self.category_ids)}
        self.records = {img["id"]: {"file_name": img["file_name"], "boxes": [], "labels": []} for img in data["images"]}
        unknown_images, unknown_categories = set(), set()
        for ann in data["annotations"]:
            if ann["image_id"] not in self.records:
                unknown_images.add(ann["image_id"])
                continue
            if ann["category_id"] not in label_of:
                unknown_categories.add(ann["category_id"])
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            if ann.get("iscrowd", 0) or w <= 0 or h <= 0:
                continue
            self.records[ann["image_id"]]["boxes"].append([x, y, x + w, y + h])
            self.records[ann["image_id"]]["labels"].append(label_of[ann["category_id"]])
        if unknown_images:
            raise ValueError(f"{annotation_file}: annotations point at unknown image ids {sorted(unknown_images)[:10]}")
        if unknown_categories:
            raise ValueError(f"{annotation_file}: annotations use unknown category ids {sorted(unknown_categories)}")
        self.image_ids = sorted(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        record = self.records[self.image_ids[index]]
        path = self.image_root / record["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image {path} listed in the COCO annotations does not exist")
        image = read_rgb(path)
        height, width = image.shape[:2]
        boxes = np.asarray(record["boxes"], dtype=np.float32).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return {
            "image": image,
            "boxes": boxes[keep],
            "box_labels": np.asarray(record["labels"], np.int64)[keep],
            "path": str(path),
        }


class SyntheticShapeMasks(Dataset):
    """The embedded :class:`~dinov3_pl.data.datasets.SyntheticShapes` as segmentation data: the same samples, with
    ``num_classes`` and ``class_names`` counting the background (mask id 0), as segmentation counts classes.

    ``SyntheticShapes`` itself states its 8 shape classes (right for classification and detection); its masks hold
    ids 0..8, so a segmentation head needs 9.
    """

    class_names: tuple[str, ...] = ("background", *SHAPE_CLASS_NAMES)
    num_classes: int = len(class_names)

    def __init__(self, num_samples: int = 2048, image_size: int = 64, seed: int = 0, grayscale: bool = True) -> None:
        # Wrapped, not subclassed: SyntheticShapes draws its shapes from its own num_classes.
        self.shapes = SyntheticShapes(num_samples=num_samples, image_size=image_size, seed=seed, grayscale=grayscale)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> dict:
        return self.shapes[index]


class _Transformed(Dataset):
    """Applies an albumentations pipeline to the samples of a split and checks them against the sample contract:
    PIL images become uint8 arrays here (the one place), labels must lie in ``0..num_classes-1``, and ``None``
    (an unreadable sample) passes through for the collate to drop."""

    def __init__(
        self,
        dataset: Dataset,
        transform: ProcessSeeded | A.Compose,
        kind: Literal["segmentation", "detection"],
        num_classes: int,
        name: str,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError(f"the {name} is empty")
        self.dataset, self.transform, self.kind, self.num_classes, self.name = (
            dataset,
            transform,
            kind,
            num_classes,
            name,
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def _image(self, sample: dict, where: str) -> np.ndarray:
        image = sample.get("image")
        if isinstance(image, Image.Image):
            image = image_to_rgb(image)  # as files are decoded: 16 bit scaled, alpha over white
        image = None if image is None else np.asarray(image)
        if image is None or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = "no 'image'" if image is None else f"{image.dtype} {list(image.shape)}"
            raise ValueError(f"{where}: 'image' must be uint8 [H, W, 3] RGB or a PIL image, got {got}")
        return image

    def __getitem__(self, index: int) -> dict | None:
        sample = self.dataset[index]
        if sample is None:
            return None
        where = sample.get("path") or f"{self.name} sample {index}"
        image = self._image(sample, where)
        if self.kind == "segmentation":
            if "mask" not in sample:
                raise ValueError(
                    f"{where}: a segmentation sample needs 'mask' (class ids [H, W]); got {sorted(sample)}"
                )
            mask = np.asarray(sample["mask"])
            if mask.shape != image.shape[:2]:
                raise ValueError(f"{where}: mask {mask.shape} and image {image.shape[:2]} differ in size")
            bad = np.unique(mask[(mask != IGNORE_INDEX) & ((mask >= self.num_classes) | (mask < 0))])
            if bad.size:
                raise ValueError(
                    f"{where}: label ids {bad.tolist()} outside 0..{self.num_classes - 1} for "
                    f"num_classes={self.num_classes} (only {IGNORE_INDEX} = ignore may exceed it)"
                )
            out = self.transform(image=image, mask=mask.astype(np.uint8))
            return {"image": _to_chw(out["image"]), "mask": torch.as_tensor(out["mask"], dtype=torch.long)}
        if "boxes" not in sample or "box_labels" not in sample:
            raise ValueError(
                f"{where}: a detection sample needs 'boxes' (float [K, 4] xyxy pixels) and 'box_labels' (int [K]); "
                f"got {sorted(sample)}"
            )
        labels = np.asarray(sample["box_labels"], np.int64).reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"{where}: box labels {np.unique(labels).tolist()} outside 0..{self.num_classes - 1} "
                f"for num_classes={self.num_classes}"
            )
        out = self.transform(image=image, bboxes=np.asarray(sample["boxes"], np.float32).reshape(-1, 4), labels=labels)
        boxes = torch.as_tensor(np.asarray(out["bboxes"], np.float32).reshape(-1, 4))
        return {
            "image": _to_chw(out["image"]),
            "target": {"boxes": boxes, "labels": torch.as_tensor(np.asarray(out["labels"]), dtype=torch.long)},
        }


def _to_chw(image: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()


def _readable(samples: Sequence[dict | None]) -> list[dict]:
    kept = [sample for sample in samples if sample is not None]
    if not kept:
        # The dense modules have no empty-batch step; a whole batch of unreadable files is worth stopping for.
        raise ValueError(f"all {len(samples)} samples of a batch were unreadable (the dataset returned None)")
    return kept


def segmentation_collate(samples: Sequence[dict | None]) -> dict[str, Tensor]:
    """Stacks images and masks; pads to the largest size in the batch (image 0 = mean colour, mask 255). Unreadable
    samples (``None``) are dropped and counted in ``num_bad_images``."""
    kept = _readable(samples)
    height = max(s["image"].shape[1] for s in kept)
    width = max(s["image"].shape[2] for s in kept)
    images = torch.zeros(len(kept), 3, height, width)
    masks = torch.full((len(kept), height, width), IGNORE_INDEX, dtype=torch.long)
    for i, sample in enumerate(kept):
        h, w = sample["mask"].shape
        images[i, :, :h, :w] = sample["image"]
        masks[i, :h, :w] = sample["mask"]
    return {"images": images, "masks": masks, "num_bad_images": len(samples) - len(kept)}


def detection_collate(samples: Sequence[dict | None]) -> dict:
    """Images stacked to ``[B,3,S,S]`` (all the same size after the transforms), targets as a list of dicts.
    Unreadable samples (``None``) are dropped and counted in ``num_bad_images``."""
    kept = _readable(samples)
    return {
        "images": torch.stack([s["image"] for s in kept]),
        "targets": [s["target"] for s in kept],
        "num_bad_images": len(samples) - len(kept),
    }


# ------------------------------------------------------------------------------------------------ transforms
def _scale_limit(scale_range: Sequence[float]) -> tuple[float, float]:
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must be 0 < low <= high, got {tuple(scale_range)}")
    return (low - 1.0, high - 1.0)  # albumentations' RandomScale adds 1


def segmentation_transforms(
    image_size: int, scale_range: Sequence[float], flip_prob: float, eval_size: int | None
) -> tuple[ProcessSeeded, A.Compose]:
    """(train, eval): train = resize short side, random scale, pad (mask 255), random crop, flip, normalise."""
    train = A.Compose(
        [
            A.SmallestMaxSize(max_size=image_size),
            A.RandomScale(scale_limit=_scale_limit(scale_range), p=1.0),
            A.PadIfNeeded(image_size, image_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX),
            A.RandomCrop(image_size, image_size),
            A.HorizontalFlip(p=flip_prob),
            A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )
    evaluation = A.Compose(
        ([A.SmallestMaxSize(max_size=eval_size)] if eval_size else [])
        + [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]
    )
    return ProcessSeeded(train), evaluation


def detection_transforms(
    image_size: int, scale_range: Sequence[float], flip_prob: float, min_visibility: float
) -> tuple[ProcessSeeded, A.Compose]:
    """(train, eval): longest side → ``image_size`` and pad to a square; train adds random scale, crop and flip
    (boxes cut below ``min_visibility`` of their area are dropped)."""
    pad = A.PadIfNeeded(image_size, image_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0)
    normalise = A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    train = A.Compose(
        [
            A.LongestMaxSize(max_size=image_size),
            A.RandomScale(scale_limit=_scale_limit(scale_range), p=1.0),
            pad,
            A.RandomCrop(image_size, image_size),
            A.HorizontalFlip(p=flip_prob),
            normalise,
        ],
        bbox_params=A.BboxParams(
            format="pascal_voc", label_fields=["labels"], min_visibility=min_visibility, clip=True
        ),
    )
    evaluation = A.Compose(
        [A.LongestMaxSize(max_size=image_size), pad, normalise],
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True),
    )
    return ProcessSeeded(train), evaluation


# ------------------------------------------------------------------------------------------------ datamodules
# Size and seeds of the synthetic default (no datasets given); the validation seed keeps its images disjoint from
# the training ones. Unchanged from the earlier num_train/num_val defaults, so the numbers measured with them hold.
SYNTHETIC_TRAIN_SAMPLES, SYNTHETIC_VAL_SAMPLES, SYNTHETIC_VAL_SEED_OFFSET = 512, 128, 1_000_003
# Datasets stay out of the hyper-parameters: an in-memory one would bloat every checkpoint (the CLI's config.yaml
# records those given by class_path). num_classes too: the model records the count, and Lightning refuses to log a
# model and a DataModule whose hyper-parameters of one name differ, as the CLI's (the config as given: None when
# the datasets state the count) would.
_NOT_HYPERPARAMETERS = ["train", "val", "test", "num_classes"]


def _names(dataset: Dataset) -> tuple[str, ...]:
    return tuple(str(name) for name in (getattr(dataset, "class_names", None) or ()))


class DenseDataModule(pl.LightningDataModule):
    """Datasets, checks and loaders shared by the dense DataModules (public: other dense tasks subclass it).

    A subclass sets ``kind`` (a word for messages), ``collate`` and ``synthetic_dataset``, implements
    ``_transforms`` (train, eval), calls ``save_hyperparameters(ignore=_NOT_HYPERPARAMETERS)`` (the loaders read
    ``batch_size``, ``val_batch_size`` and ``num_workers`` from it) and passes its datasets to ``_take_datasets`` in
    ``__init__``. A task whose samples are neither masks nor boxes overrides ``transformed_dataset``, which applies
    a transform to one split and checks its samples."""

    kind: str
    collate: Callable[[Sequence[dict]], dict]
    synthetic_dataset: type[Dataset]  # the embedded default data when no datasets are given

    def _take_datasets(
        self,
        train: Dataset | None,
        val: Dataset | None,
        test: Dataset | None,
        num_classes: int | None,
        image_size: int,
        seed: int,
    ) -> None:
        """Keeps the splits (the synthetic default when none is given), resolves ``num_classes`` and
        ``class_names`` and checks that the splits agree. Reads dataset attributes only: files are read in
        ``setup``, after ``prepare_data`` has let datasets that build their files do so."""
        owner = type(self).__name__
        if train is None and val is None and test is None:
            train, val = self._synthetic_default(image_size, seed)
        elif train is None or val is None:
            missing = "train" if train is None else "val"
            raise ValueError(
                f"{owner}: {missing} is missing; give train and val datasets (test is optional and falls back to "
                f"val), or none of them for the embedded synthetic shapes"
            )
        self.datasets: dict[str, Dataset] = {"train": train, "val": val, "test": val if test is None else test}
        described = {split: f"{split} dataset {type(data).__name__}" for split, data in self.datasets.items()}

        stated = {
            split: _positive_count(count, f"the {described[split]}'s num_classes")
            for split, data in self.datasets.items()
            if (count := getattr(data, "num_classes", None)) is not None
        }
        if len(set(stated.values())) > 1:
            counts = ", ".join(f"{described[split]}: {count}" for split, count in stated.items())
            raise ValueError(f"{owner}: the splits state different num_classes ({counts}); they must label alike")
        if num_classes is not None:
            self.num_classes = _positive_count(num_classes, f"{owner} num_classes")
        elif stated:
            self.num_classes = next(iter(stated.values()))
        else:
            counted = (
                "classes of the mask ids, background included" if self.kind == "segmentation" else "object classes"
            )
            raise ValueError(
                f"{owner}: the {described['train']} has no num_classes attribute; pass num_classes ({counted}; "
                f"YAML: data.init_args.num_classes) or give the dataset a num_classes attribute"
            )

        categories = {split: getattr(data, "category_ids", None) for split, data in self.datasets.items()}
        names = {split: _names(data) for split, data in self.datasets.items()}
        for split in ("val", "test"):
            if categories["train"] is not None and categories[split] is not None:
                if list(categories[split]) != list(categories["train"]):
                    raise ValueError(
                        f"{owner}: train and {split} annotations have different categories: "
                        f"{list(categories['train'])} vs {list(categories[split])}"
                    )
            if names["train"] and names[split] and names[split] != names["train"]:
                raise ValueError(
                    f"{owner}: the {described[split]} names its classes {list(names[split])}, the "
                    f"{described['train']} {list(names['train'])}; labels would not match"
                )
        class_names = next((found for found in names.values() if found), ())
        if class_names and len(class_names) != self.num_classes:
            raise ValueError(
                f"{owner}: num_classes={self.num_classes} but the datasets name {len(class_names)} classes "
                f"{list(class_names)}; leave num_classes out to use theirs"
            )
        self.class_names: list[str] | None = list(class_names) if class_names else None
        self.train_set = self.val_set = self.test_set = None

    def _synthetic_default(self, image_size: int, seed: int) -> tuple[Dataset, Dataset]:
        return (
            self.synthetic_dataset(SYNTHETIC_TRAIN_SAMPLES, image_size, seed),
            self.synthetic_dataset(SYNTHETIC_VAL_SAMPLES, image_size, seed + SYNTHETIC_VAL_SEED_OFFSET),
        )

    def _transforms(self) -> tuple[ProcessSeeded, A.Compose]:
        raise NotImplementedError

    def prepare_data(self) -> None:
        prepare_datasets(self.datasets.values())

    def setup(self, stage: str | None = None) -> None:
        self._check_model_classes()
        if self.train_set is not None:
            return
        train_tf, eval_tf = self._transforms()
        wrapped: dict[tuple[int, int], _Transformed] = {}

        def wrap(split: str, transform: ProcessSeeded | A.Compose) -> _Transformed:
            dataset = self.datasets[split]
            key = (id(dataset), id(transform))
            if key not in wrapped:  # test = val: one wrapper, its dataset read and checked once
                name = f"{split} dataset {type(dataset).__name__}"
                wrapped[key] = self.transformed_dataset(dataset, transform, name)
            return wrapped[key]

        self.train_set = wrap("train", train_tf)
        self.val_set = wrap("val", eval_tf)
        self.test_set = wrap("test", eval_tf)

    def transformed_dataset(self, dataset: Dataset, transform: ProcessSeeded | A.Compose, name: str) -> Dataset:
        """One split with its transform applied and its samples checked (``name`` for the error messages)."""
        return _Transformed(dataset, transform, self.kind, self.num_classes, name)

    def _check_model_classes(self) -> None:
        """The model's head must have the data's classes: nothing links the two in a config, and a mismatch would
        otherwise fail deep in a loss (too few) or lower mIoU/mAP silently (too many)."""
        trainer = getattr(self, "trainer", None)
        model = getattr(trainer, "lightning_module", None) if trainer is not None else None
        model_classes = getattr(model, "num_classes", None)
        if isinstance(model_classes, int) and model_classes != self.num_classes:
            sources = sorted({type(data).__name__ for data in self.datasets.values()})
            raise ValueError(
                f"{type(model).__name__} has num_classes={model_classes} but the {self.kind} data have "
                f"{self.num_classes} ({', '.join(sources)}); set model.init_args.num_classes: {self.num_classes}"
            )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, self.hparams.val_batch_size or self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, self.hparams.val_batch_size or self.hparams.batch_size)

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int) -> DataLoader:
        # Evaluation loaders shard over DDP ranks without padding duplicates (mIoU / mAP count each image once).
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=None if shuffle else ShardedEvalSampler(dataset),
            num_workers=self.hparams.num_workers,
            collate_fn=self.collate,
            drop_last=shuffle and len(dataset) > batch_size,
            persistent_workers=self.hparams.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )


class SegmentationDataModule(DenseDataModule):
    """Semantic segmentation data from any datasets of masks (``train``, ``val``, optional ``test``; YAML:
    ``class_path``), e.g. ``SegmentationFolder`` (ADE20K layout), ``FashionMNISTScenes(task="segmentation")``
    (``dinov3_pl.data.scenes``) or a user's own ``Dataset`` of ``{"image", "mask"}`` dicts. None of them: the
    embedded shapes (``SyntheticShapeMasks``, 512 training and 128 validation images of ``image_size``).

    Args:
        train, val, test: the splits; ``test`` None reuses ``val``.
        num_classes: classes of the mask ids, background included where it is a class (synthetic: 8 shapes + 1).
            None: the datasets' ``num_classes``. Every mask is checked: ids >= num_classes other than 255 raise.
        image_size: training crop size; also the synthetic default's image size.
        eval_size: resize the short side of validation images to this (None: keep their size).
        seed: seed of the synthetic default (validation: ``seed + 1000003``); given datasets carry their own.
    """

    kind = "segmentation"
    collate = staticmethod(segmentation_collate)
    synthetic_dataset = SyntheticShapeMasks

    def __init__(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        test: Dataset | None = None,
        num_classes: int | None = None,
        image_size: int = 64,
        eval_size: int | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip_prob: float = 0.5,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=_NOT_HYPERPARAMETERS)
        self._take_datasets(train, val, test, num_classes, image_size, seed)

    def _transforms(self) -> tuple[ProcessSeeded, A.Compose]:
        hp = self.hparams
        return segmentation_transforms(hp.image_size, hp.scale_range, hp.flip_prob, hp.eval_size)


class DetectionDataModule(DenseDataModule):
    """Object detection data from any datasets of boxes (``train``, ``val``, optional ``test``; YAML:
    ``class_path``), e.g. ``CocoDetectionDataset`` (COCO JSON + images), ``FashionMNISTScenes(task="detection")``
    (``dinov3_pl.data.scenes``) or a user's own ``Dataset`` of ``{"image", "boxes", "box_labels"}`` dicts. None of
    them: the embedded ``SyntheticShapes`` (512 training and 128 validation images of ``image_size``).

    Args:
        train, val, test: the splits; ``test`` None reuses ``val``. Their categories (COCO ids, class names) must
            agree.
        num_classes: object classes, background excluded. None: the datasets' ``num_classes``.
        image_size: images are resized (longest side) and padded to ``image_size``² (train: random scale + crop).
        min_visibility: training crops drop boxes keeping less than this fraction of their area.
        seed: seed of the synthetic default (validation: ``seed + 1000003``); given datasets carry their own.

    ``class_names`` (the datasets' names, else "0", "1", ...) and ``num_classes`` are attributes after ``__init__``.
    """

    kind = "detection"
    collate = staticmethod(detection_collate)
    synthetic_dataset = SyntheticShapes

    def __init__(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        test: Dataset | None = None,
        num_classes: int | None = None,
        image_size: int = 64,
        scale_range: tuple[float, float] = (0.75, 1.25),
        flip_prob: float = 0.5,
        min_visibility: float = 0.3,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=_NOT_HYPERPARAMETERS)
        self._take_datasets(train, val, test, num_classes, image_size, seed)
        if self.class_names is None:
            self.class_names = [str(label) for label in range(self.num_classes)]

    def _transforms(self) -> tuple[ProcessSeeded, A.Compose]:
        hp = self.hparams
        return detection_transforms(hp.image_size, hp.scale_range, hp.flip_prob, hp.min_visibility)
