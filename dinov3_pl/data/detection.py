"""Object detection data: the COCO-format reader, transforms and :class:`DetectionDataModule`.

Detection reads COCO-format JSON (boxes ``[x, y, w, h]``) and hands out ``xyxy`` boxes with contiguous labels
``0..C-1`` (sorted COCO category ids); the detection module adds torchvision's background class itself.

Sample contract: ``{"image": uint8 [H,W,3] or PIL, "boxes": float [K,4] xyxy pixels, "box_labels": int [K]}``, and
optionally ``"box_areas"`` [K] (COCO's ``area``: the object's mask area, which COCO's small / medium / large split
reads; default: the box area) and ``"crowd_boxes"`` [M,4] / ``"crowd_labels"`` [M] / ``"crowd_areas"`` [M]: COCO's
``iscrowd`` regions, left out of training and **ignored by the evaluation** (a detection matching one is neither a
true nor a false positive), as COCO's evaluation does.

Batches: training ``{"images": float [B,3,S,S] (ImageNet-normalised), "targets": [{"boxes", "labels"}]}`` in the
augmented image's pixels; evaluation ``{"images", "targets": [{"boxes", "labels", "iscrowd", "area"}],
"scales": float [B,2], "original_sizes": long [B,2]}`` with the targets **in original image coordinates** and each
image's resize factors (height, width), which ``Detection`` divides its boxes by before the metric.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dinov3_pl.data.datasets import SyntheticShapes
from dinov3_pl.data.decode import read_rgb
from dinov3_pl.data.dense import (
    _NOT_HYPERPARAMETERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CheckedSplit,
    DenseDataModule,
    readable,
    rgb_image,
    to_chw,
)
from dinov3_pl.data.transforms import ProcessSeeded

__all__ = [
    "CocoDetectionDataset",
    "DetectionDataModule",
    "DetectionEvalTransform",
    "detection_collate",
    "detection_transforms",
]


# ------------------------------------------------------------------------------------------------ dataset
class CocoDetectionDataset(Dataset):
    """COCO-format detection: ``annotation_file`` JSON + ``image_root/<file_name>`` images.

    Samples are ``{"image": uint8 [H,W,3], "boxes": float32 [K,4] xyxy, "box_labels": int64 [K], "box_areas":
    float32 [K], "crowd_boxes", "crowd_labels", "crowd_areas", "path": str}`` (module docstring); labels are the
    index of the category id in the sorted list of ``categories`` ids. Boxes are as annotated (not clipped: the
    evaluation compares with the JSON); boxes without width or height are dropped; images without annotations are
    kept (no boxes).
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
        self.records = {
            img["id"]: {"file_name": img["file_name"], "objects": [], "crowds": []} for img in data["images"]
        }
        unknown_images, unknown_categories = set(), set()
        for ann in data["annotations"]:
            if ann["image_id"] not in self.records:
                unknown_images.add(ann["image_id"])
                continue
            if ann["category_id"] not in label_of:
                unknown_categories.add(ann["category_id"])
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w <= 0 or h <= 0:
                continue
            kind = "crowds" if ann.get("iscrowd", 0) else "objects"
            area = float(ann.get("area", w * h))
            self.records[ann["image_id"]][kind].append((x, y, x + w, y + h, label_of[ann["category_id"]], area))
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
        sample = {"image": read_rgb(path), "path": str(path)}
        for kind, prefix in (("objects", "box"), ("crowds", "crowd")):
            rows = np.asarray(record[kind], np.float64).reshape(-1, 6)
            sample["boxes" if kind == "objects" else "crowd_boxes"] = rows[:, :4].astype(np.float32)
            sample[f"{prefix}_labels"] = rows[:, 4].astype(np.int64)
            sample[f"{prefix}_areas"] = rows[:, 5].astype(np.float32)
        return sample


# ------------------------------------------------------------------------------------------------ transforms
def _scale_limit(scale_range: Sequence[float]) -> tuple[float, float]:
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must be 0 < low <= high, got {tuple(scale_range)}")
    return (low - 1.0, high - 1.0)  # albumentations' RandomScale adds 1


def _square_pad(image_size: int) -> A.PadIfNeeded:
    return A.PadIfNeeded(image_size, image_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0)


class DetectionEvalTransform:
    """Evaluation: longest side → ``image_size``, padded (bottom/right) to a square, normalised; the boxes are not
    touched. Returns the image and its resize factors ``(new_height / height, new_width / width)``."""

    def __init__(self, image_size: int) -> None:
        self.resize = A.LongestMaxSize(max_size=image_size)
        self.finish = A.Compose([_square_pad(image_size), A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])

    def __call__(self, image: np.ndarray) -> dict:
        resized = self.resize(image=image)["image"]
        scale = (resized.shape[0] / image.shape[0], resized.shape[1] / image.shape[1])
        return {"image": self.finish(image=resized)["image"], "scale": scale}


def detection_transforms(
    image_size: int, scale_range: Sequence[float], flip_prob: float, min_visibility: float
) -> tuple[ProcessSeeded, DetectionEvalTransform]:
    """(train, eval): longest side → ``image_size`` and pad to a square; train adds random scale, crop and flip
    (boxes are clipped to the image, and those cut below ``min_visibility`` of their area are dropped)."""
    train = A.Compose(
        [
            A.LongestMaxSize(max_size=image_size),
            A.RandomScale(scale_limit=_scale_limit(scale_range), p=1.0),
            _square_pad(image_size),
            A.RandomCrop(image_size, image_size),
            A.HorizontalFlip(p=flip_prob),
            A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ],
        bbox_params=A.BboxParams(
            format="pascal_voc", label_fields=["labels"], min_visibility=min_visibility, clip=True
        ),
    )
    return ProcessSeeded(train), DetectionEvalTransform(image_size)


def detection_collate(samples: Sequence[dict | None]) -> dict:
    """Images stacked to ``[B,3,S,S]`` (all the same size after the transforms), targets as a list of dicts;
    evaluation batches also stack ``scales`` and ``original_sizes``. Unreadable samples (``None``) are dropped and
    counted in ``num_bad_images``."""
    kept = readable(samples)
    batch = {
        "images": torch.stack([s["image"] for s in kept]),
        "targets": [s["target"] for s in kept],
        "num_bad_images": len(samples) - len(kept),
    }
    if "scale" in kept[0]:
        batch["scales"] = torch.tensor([s["scale"] for s in kept], dtype=torch.float64)
        batch["original_sizes"] = torch.tensor([s["original_size"] for s in kept], dtype=torch.long)
    return batch


# ------------------------------------------------------------------------------------------------ datamodule
def _array(sample: dict, key: str, dtype: type, width: int | None = None) -> np.ndarray:
    """``sample[key]`` as an array of ``width`` columns (or a vector); missing: empty."""
    value = np.asarray(sample.get(key, ()), dtype)
    return value.reshape(-1, width) if width else value.reshape(-1)


class DetectionDataModule(DenseDataModule):
    """Object detection data from any datasets of boxes (``train``, ``val``, optional ``test``; YAML:
    ``class_path``), e.g. ``CocoDetectionDataset`` (COCO JSON + images), ``COCODetection``,
    ``FashionMNISTScenes(task="detection")`` or a user's own ``Dataset`` of ``{"image", "boxes", "box_labels"}``
    dicts. None of them: the embedded ``SyntheticShapes`` (512 training and 128 validation images of ``image_size``).

    Args:
        train, val, test: the splits; ``test`` None reuses ``val``. Their categories (COCO ids, class names) must
            agree.
        num_classes: object classes, background excluded. None: the datasets' ``num_classes``.
        image_size: images are resized (longest side) and padded to ``image_size``² (train: random scale + crop).
            Evaluation targets stay in original image coordinates (module docstring).
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

    def _transforms(self) -> tuple[ProcessSeeded, DetectionEvalTransform]:
        hp = self.hparams
        return detection_transforms(hp.image_size, hp.scale_range, hp.flip_prob, hp.min_visibility)

    def transformed_dataset(self, dataset: Dataset, transform: Callable, name: str) -> CheckedSplit:
        num_classes = self.num_classes
        evaluation = isinstance(transform, DetectionEvalTransform)

        def labels_of(sample: dict, key: str, where: str) -> np.ndarray:
            labels = _array(sample, key, np.int64)
            if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(
                    f"{where}: {key} {np.unique(labels).tolist()} outside 0..{num_classes - 1} "
                    f"for num_classes={num_classes}"
                )
            return labels

        def convert(sample: dict, where: str) -> dict:
            image = rgb_image(sample, where)
            if "boxes" not in sample or "box_labels" not in sample:
                raise ValueError(
                    f"{where}: a detection sample needs 'boxes' (float [K, 4] xyxy pixels) and 'box_labels' "
                    f"(int [K]); got {sorted(sample)}"
                )
            boxes, labels = _array(sample, "boxes", np.float32, 4), labels_of(sample, "box_labels", where)
            if not evaluation:  # crowd regions are not objects to learn; only the evaluation ignores them
                out = transform(image=image, bboxes=boxes, labels=labels)
                target = {
                    "boxes": torch.as_tensor(np.asarray(out["bboxes"], np.float32).reshape(-1, 4)),
                    "labels": torch.as_tensor(np.asarray(out["labels"]), dtype=torch.long),
                }
                return {"image": to_chw(out["image"]), "target": target}
            crowd_boxes = _array(sample, "crowd_boxes", np.float32, 4)
            crowd_labels = labels_of(sample, "crowd_labels", where)
            if len(crowd_boxes) != len(crowd_labels):
                raise ValueError(f"{where}: {len(crowd_boxes)} crowd_boxes but {len(crowd_labels)} crowd_labels")
            all_boxes = np.concatenate([boxes, crowd_boxes])
            box_areas = (all_boxes[:, 2] - all_boxes[:, 0]) * (all_boxes[:, 3] - all_boxes[:, 1])
            given = {"box_areas": len(boxes), "crowd_areas": len(crowd_boxes)}
            areas = np.concatenate(
                [
                    _array(sample, key, np.float32) if key in sample else np.full(count, np.nan)
                    for key, count in given.items()
                ]
            )
            areas = np.where(np.isnan(areas), box_areas, areas)
            out = transform(image)
            target = {
                "boxes": torch.as_tensor(all_boxes),
                "labels": torch.as_tensor(np.concatenate([labels, crowd_labels])),
                "iscrowd": torch.cat([torch.zeros(len(boxes)), torch.ones(len(crowd_boxes))]).long(),
                "area": torch.as_tensor(areas, dtype=torch.float32),
            }
            return {
                "image": to_chw(out["image"]),
                "target": target,
                "scale": out["scale"],
                "original_size": image.shape[:2],
            }

        return CheckedSplit(dataset, convert, name)
