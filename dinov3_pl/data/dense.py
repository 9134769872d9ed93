"""Data for the dense frozen-backbone evaluations: semantic segmentation and object detection.

Segmentation label maps follow ADE20K/mmseg: ``uint8`` PNGs, class id per pixel, **0 = background (or the first
class), 255 = ignore**. With ``reduce_zero_label=True`` (ADE20K, where 0 means "unlabelled") 0 becomes 255 and every
other id is shifted down by one. Detection reads COCO-format JSON (boxes ``[x, y, w, h]``) and hands out ``xyxy``
boxes with contiguous labels ``0..C-1`` (sorted COCO category ids); the detection module adds torchvision's
background class itself.

Batches: segmentation ``{"images": float [B,3,H,W] (ImageNet-normalised), "masks": long [B,H,W]}``; detection
``{"images": float [B,3,S,S] (ImageNet-normalised), "targets": [{"boxes": float [K,4] xyxy, "labels": long [K]}]}``.
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

from dinov3_pl.data.datasets import FashionMNIST, SyntheticShapes

# Images are decoded as viewers show them (EXIF orientation applied, as OpenCV's and mmcv's readers do); label maps
# are read as stored.
from dinov3_pl.data.decode import read_rgb
from dinov3_pl.data.samplers import ShardedEvalSampler

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CocoDetectionDataset",
    "DetectionDataModule",
    "SegmentationDataModule",
    "SegmentationFolder",
    "detection_collate",
    "segmentation_collate",
]

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


# ------------------------------------------------------------------------------------------------ datasets
class SegmentationFolder(Dataset):
    """ADE20K-style folder: ``root/images/<split>/*.jpg|png`` with ``root/annotations/<split>/<same stem>.png``.

    Samples are ``{"image": uint8 [H,W,3], "mask": uint8 [H,W], "path": str}`` in the label convention of the
    module docstring (after ``reduce_zero_label`` when set).
    """

    def __init__(self, root: str | Path, split: str = "training", reduce_zero_label: bool = False) -> None:
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


class _Transformed(Dataset):
    """Applies an albumentations pipeline to samples of a dataset and checks their labels."""

    def __init__(
        self, dataset: Dataset, transform: A.Compose, kind: Literal["segmentation", "detection"], num_classes: int
    ) -> None:
        if len(dataset) == 0:
            raise ValueError(f"the {kind} dataset {type(dataset).__name__} is empty")
        self.dataset, self.transform, self.kind, self.num_classes = dataset, transform, kind, num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        where = sample.get("path", f"sample {index}")
        if self.kind == "segmentation":
            mask = np.asarray(sample["mask"])
            if mask.shape != sample["image"].shape[:2]:
                raise ValueError(f"{where}: mask {mask.shape} and image {sample['image'].shape[:2]} differ in size")
            bad = np.unique(mask[(mask != IGNORE_INDEX) & (mask >= self.num_classes)])
            if bad.size:
                raise ValueError(
                    f"{where}: label ids {bad.tolist()} >= num_classes={self.num_classes} "
                    f"(only {IGNORE_INDEX} = ignore may exceed it)"
                )
            out = self.transform(image=sample["image"], mask=mask.astype(np.uint8))
            return {"image": _to_chw(out["image"]), "mask": torch.as_tensor(out["mask"], dtype=torch.long)}
        labels = np.asarray(sample["box_labels"], np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"{where}: box labels {np.unique(labels).tolist()} outside 0..{self.num_classes - 1}")
        out = self.transform(
            image=sample["image"], bboxes=np.asarray(sample["boxes"], np.float32).reshape(-1, 4), labels=labels
        )
        boxes = torch.as_tensor(np.asarray(out["bboxes"], np.float32).reshape(-1, 4))
        return {
            "image": _to_chw(out["image"]),
            "target": {"boxes": boxes, "labels": torch.as_tensor(np.asarray(out["labels"]), dtype=torch.long)},
        }


def _to_chw(image: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()


def segmentation_collate(samples: Sequence[dict]) -> dict[str, Tensor]:
    """Stacks images and masks; pads to the largest size in the batch (image 0 = mean colour, mask 255)."""
    height = max(s["image"].shape[1] for s in samples)
    width = max(s["image"].shape[2] for s in samples)
    images = torch.zeros(len(samples), 3, height, width)
    masks = torch.full((len(samples), height, width), IGNORE_INDEX, dtype=torch.long)
    for i, sample in enumerate(samples):
        h, w = sample["mask"].shape
        images[i, :, :h, :w] = sample["image"]
        masks[i, :h, :w] = sample["mask"]
    return {"images": images, "masks": masks}


def detection_collate(samples: Sequence[dict]) -> dict:
    """Images stacked to ``[B,3,S,S]`` (all the same size after the transforms), targets as a list of dicts."""
    return {"images": torch.stack([s["image"] for s in samples]), "targets": [s["target"] for s in samples]}


# ------------------------------------------------------------------------------------------------ transforms
def _scale_limit(scale_range: Sequence[float]) -> tuple[float, float]:
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must be 0 < low <= high, got {tuple(scale_range)}")
    return (low - 1.0, high - 1.0)  # albumentations' RandomScale adds 1


def segmentation_transforms(
    image_size: int, scale_range: Sequence[float], flip_prob: float, eval_size: int | None
) -> tuple[A.Compose, A.Compose]:
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
    return train, evaluation


def detection_transforms(
    image_size: int, scale_range: Sequence[float], flip_prob: float, min_visibility: float
) -> tuple[A.Compose, A.Compose]:
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
    return train, evaluation


# ------------------------------------------------------------------------------------------------ datamodules
# Classes including background of the built-in datasets (SyntheticShapes: 8 shapes; Fashion-MNIST: 10 garments).
_KNOWN_SEGMENTATION_CLASSES = {
    "synthetic": SyntheticShapes.num_classes + 1,
    "fmnist_scenes": FashionMNIST.num_classes + 1,
}


class _DenseDataModule(pl.LightningDataModule):
    """Loaders shared by the dense DataModules: subclasses set ``collate`` and fill ``train_set`` / ``val_set`` in
    ``setup`` (testing reuses the validation split)."""

    collate: Callable[[Sequence[dict]], dict]

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, self.hparams.val_batch_size or self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

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

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node: the scenes are built once, not by every DDP rank.
        if self.hparams.dataset == "fmnist_scenes":
            self._build_scenes()

    def _build_scenes(self) -> Path:
        from dinov3_pl.data.scenes import ensure_fmnist_scenes

        if self.hparams.root is None:
            raise ValueError("dataset='fmnist_scenes' needs root (where the scenes are, or will be, written)")
        return ensure_fmnist_scenes(
            self.hparams.root,
            fmnist_root=self.hparams.fmnist_root,
            num_train=self.hparams.num_train,
            num_val=self.hparams.num_val,
            seed=self.hparams.seed,
        )

    def _synthetic(self, train: bool):
        count = self.hparams.num_train if train else self.hparams.num_val
        # Different seeds keep the validation images disjoint from the training ones.
        return SyntheticShapes(
            num_samples=count,
            image_size=self.hparams.image_size,
            seed=self.hparams.seed if train else self.hparams.seed + 1_000_003,
        )


class SegmentationDataModule(_DenseDataModule):
    """Semantic segmentation data: ``synthetic`` (SyntheticShapes masks), ``folder`` (ADE20K layout under
    ``root``) or ``fmnist_scenes`` (built into ``root`` from Fashion-MNIST if missing, then read as a folder).

    Args:
        num_classes: classes including background (synthetic: shapes + 1; fmnist_scenes: 11). Required for
            ``folder``; checked against every label map (ids >= num_classes other than 255 raise).
        image_size: training crop size; also the synthetic image size.
        eval_size: resize the short side of validation images to this (None: keep their size).
        num_train, num_val, seed: sizes and seed of synthetic data / built scenes.
        fmnist_root: Fashion-MNIST idx files for building scenes (None: the Debian package's folder).
    """

    collate = staticmethod(segmentation_collate)

    def __init__(
        self,
        dataset: Literal["synthetic", "folder", "fmnist_scenes"] = "synthetic",
        root: str | None = None,
        num_classes: int | None = None,
        image_size: int = 64,
        eval_size: int | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip_prob: float = 0.5,
        reduce_zero_label: bool = False,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        num_train: int = 512,
        num_val: int = 128,
        seed: int = 0,
        fmnist_root: str | None = None,
    ) -> None:
        super().__init__()
        if dataset == "folder" and (root is None or num_classes is None):
            raise ValueError("dataset='folder' needs root and num_classes")
        known = _KNOWN_SEGMENTATION_CLASSES.get(dataset)
        if num_classes is not None and known is not None and num_classes != known:
            raise ValueError(f"num_classes={num_classes} but dataset {dataset!r} has {known} (with background)")
        # Resolved before save_hyperparameters so the logged value matches the model's num_classes.
        num_classes = num_classes if num_classes is not None else known
        self.num_classes = num_classes
        self.save_hyperparameters()
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        if hp.dataset == "synthetic":
            train, val = self._synthetic(True), self._synthetic(False)
        elif hp.dataset in ("folder", "fmnist_scenes"):
            root = self._build_scenes() if hp.dataset == "fmnist_scenes" else Path(hp.root)
            train = SegmentationFolder(root, "training", hp.reduce_zero_label)
            val = SegmentationFolder(root, "validation", hp.reduce_zero_label)
        else:
            raise ValueError(f"unknown segmentation dataset {hp.dataset!r}; use synthetic, folder or fmnist_scenes")
        known = self.num_classes
        train_tf, eval_tf = segmentation_transforms(hp.image_size, hp.scale_range, hp.flip_prob, hp.eval_size)
        self.train_set = _Transformed(train, train_tf, "segmentation", known)
        self.val_set = _Transformed(val, eval_tf, "segmentation", known)


class DetectionDataModule(_DenseDataModule):
    """Object detection data: ``synthetic`` (SyntheticShapes boxes), ``coco`` (``image_root`` +
    ``train_annotations``/``val_annotations`` JSON) or ``fmnist_scenes`` (built into ``root`` if missing; its
    ``instances_{train,val}.json`` are read with ``root/images`` as image root).

    Args:
        image_size: images are resized (longest side) and padded to ``image_size``² (train: random scale + crop).
        min_visibility: training crops drop boxes keeping less than this fraction of their area.
    """

    collate = staticmethod(detection_collate)

    def __init__(
        self,
        dataset: Literal["synthetic", "coco", "fmnist_scenes"] = "synthetic",
        root: str | None = None,
        image_root: str | None = None,
        train_annotations: str | None = None,
        val_annotations: str | None = None,
        image_size: int = 64,
        scale_range: tuple[float, float] = (0.75, 1.25),
        flip_prob: float = 0.5,
        min_visibility: float = 0.3,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        num_train: int = 512,
        num_val: int = 128,
        seed: int = 0,
        fmnist_root: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if dataset == "coco" and not (image_root and train_annotations and val_annotations):
            raise ValueError("dataset='coco' needs image_root, train_annotations and val_annotations")
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        if hp.dataset == "synthetic":
            train, val = self._synthetic(True), self._synthetic(False)
            self.class_names = list(getattr(train, "class_names", range(train.num_classes)))
        elif hp.dataset in ("coco", "fmnist_scenes"):
            if hp.dataset == "fmnist_scenes":
                root = self._build_scenes()
                image_root, train_json, val_json = (
                    root / "images",
                    root / "instances_train.json",
                    root / "instances_val.json",
                )
            else:
                image_root, train_json, val_json = hp.image_root, hp.train_annotations, hp.val_annotations
            train, val = CocoDetectionDataset(image_root, train_json), CocoDetectionDataset(image_root, val_json)
            if train.category_ids != val.category_ids:
                raise ValueError(
                    f"train and val annotations have different categories: {train.category_ids} vs {val.category_ids}"
                )
            self.class_names = train.class_names
        else:
            raise ValueError(f"unknown detection dataset {hp.dataset!r}; use synthetic, coco or fmnist_scenes")
        self.num_classes = len(self.class_names)
        train_tf, eval_tf = detection_transforms(hp.image_size, hp.scale_range, hp.flip_prob, hp.min_visibility)
        self.train_set = _Transformed(train, train_tf, "detection", self.num_classes)
        self.val_set = _Transformed(val, eval_tf, "detection", self.num_classes)
