"""Fashion-MNIST scenes: real garments pasted on a canvas, written as an ADE20K-style segmentation folder and COCO
detection annotations, so the standard readers of ``dinov3_pl.data.dense`` evaluate on them.

Layout written under ``out_dir``::

    images/{training,validation}/000000.png        RGB canvas (grey garments on a mild noisy background)
    annotations/{training,validation}/000000.png   uint8 label map: 0 = background, class c -> c + 1, 255 = ignore
    instances_train.json, instances_val.json       COCO: bbox [x, y, w, h], category_id = c + 1, file_name
                                                   relative to images/ (e.g. "training/000000.png")
    scenes_meta.json                               the build parameters (a rebuild with others is refused)

Training scenes use Fashion-MNIST's train garments, validation scenes its test garments. Later garments occlude
earlier ones; an item keeping less than ``min_visible`` of its pixels gets no box and its visible pixels are set to
255 (ignore) in the label map, so every labelled pixel lies inside a box of its class. Boxes are the tight boxes of
the visible pixels (x2/y2 exclusive). Everything is a function of ``seed``.

As a dataset for the dense DataModules (by ``class_path``): :class:`FashionMNISTScenes` builds the folder on
``prepare()`` (``prepare_data``, once per node) and reads it lazily afterwards. Command:
``python -m dinov3_pl.data.scenes --fmnist-root /usr/share/datasets/fashion-mnist --out data/fmnist_scenes``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dinov3_pl.data.datasets import FashionMNIST, default_fashion_mnist_root
from dinov3_pl.data.dense import CocoDetectionDataset, SegmentationFolder

__all__ = ["FashionMNISTScenes", "build_fmnist_scenes", "ensure_fmnist_scenes", "render_scene"]

IGNORE_INDEX = 255
_SPLITS = (("training", "train", True), ("validation", "val", False))


def _box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(box[0], others[:, 0]), np.maximum(box[1], others[:, 1])
    x2, y2 = np.minimum(box[2], others[:, 2]), np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area(box) + area(others) - inter)


def render_scene(
    garments: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    canvas_size: int = 112,
    items: tuple[int, int] = (2, 5),
    scale_range: tuple[float, float] = (0.7, 1.6),
    threshold: float = 0.2,
    max_iou: float = 0.4,
    min_visible: float = 0.5,
) -> dict:
    """One scene from a pool of 28×28 ``garments`` (uint8) and their ``labels``.

    Returns ``{"image": uint8 [S,S,3], "mask": uint8 [S,S], "boxes": float32 [K,4] xyxy, "box_labels": int64 [K],
    "areas": int64 [K]}``. A garment pixel is one brighter than ``threshold`` × the garment's maximum.
    """
    size = canvas_size
    # Mild background: a random grey level, low-frequency shading and pixel noise.
    level = rng.uniform(10, 60)
    coarse = rng.normal(0, 12, size=(4, 4)).astype(np.float32)
    shading = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR)
    canvas = level + shading + rng.normal(0, 6, size=(size, size))
    instance_map = np.full((size, size), -1, dtype=np.int16)
    placed_boxes: list[np.ndarray] = []
    item_labels, item_pixels = [], []
    for _ in range(int(rng.integers(items[0], items[1] + 1))):
        pick = int(rng.integers(len(garments)))
        side = int(round(28 * rng.uniform(*scale_range)))
        side = min(max(side, 8), size)
        garment = cv2.resize(garments[pick].astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
        # Try a few positions with moderate overlap with the garments already placed.
        for _attempt in range(20):
            top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            box = np.array([left, top, left + side, top + side], np.float32)
            if not placed_boxes or _box_iou(box, np.stack(placed_boxes)).max() <= max_iou:
                break
        else:
            continue
        inside = garment > threshold * max(float(garment.max()), 1.0)
        if not inside.any():
            continue
        brightness = rng.uniform(0.75, 1.0)
        region = canvas[top : top + side, left : left + side]
        region[inside] = garment[inside] * brightness + rng.normal(0, 3, size=int(inside.sum()))
        instance_map[top : top + side, left : left + side][inside] = len(item_labels)
        placed_boxes.append(box)
        item_labels.append(int(labels[pick]))
        item_pixels.append(int(inside.sum()))

    mask = np.zeros((size, size), np.uint8)
    boxes, box_labels, areas = [], [], []
    for instance, (label, pixels) in enumerate(zip(item_labels, item_pixels, strict=True)):
        visible = instance_map == instance
        count = int(visible.sum())
        if count == 0:
            continue
        if count < min_visible * pixels:
            mask[visible] = IGNORE_INDEX  # mostly hidden: no box, and not scored either
            continue
        mask[visible] = label + 1
        rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
        box_labels.append(label)
        areas.append(count)
    image = np.repeat(np.clip(canvas, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return {
        "image": image,
        "mask": mask,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "box_labels": np.asarray(box_labels, np.int64),
        "areas": np.asarray(areas, np.int64),
    }


def build_fmnist_scenes(
    fmnist_root: str | Path,
    out_dir: str | Path,
    num_train: int = 2000,
    num_val: int = 500,
    canvas_size: int = 112,
    items: Sequence[int] = (2, 5),
    scale_range: Sequence[float] = (0.7, 1.6),
    seed: int = 0,
    threshold: float = 0.2,
    max_iou: float = 0.4,
    min_visible: float = 0.5,
) -> Path:
    """Writes the scenes dataset (see the module docstring) into ``out_dir`` and returns it. Deterministic by seed."""
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if len(items) != 2 or not 1 <= items[0] <= items[1]:
        raise ValueError(f"items must be (min, max) with 1 <= min <= max, got {tuple(items)}")
    if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {tuple(scale_range)}")
    if 28 * scale_range[1] > canvas_size:
        raise ValueError(f"garments up to {28 * scale_range[1]:.0f} px do not fit a {canvas_size} px canvas")
    out_dir = Path(out_dir)
    meta = {
        "num_train": num_train,
        "num_val": num_val,
        "canvas_size": canvas_size,
        "items": list(items),
        "scale_range": list(scale_range),
        "seed": seed,
        "threshold": threshold,
        "max_iou": max_iou,
        "min_visible": min_visible,
    }
    categories = [
        {"id": c + 1, "name": name, "supercategory": "garment"} for c, name in enumerate(FashionMNIST.class_names)
    ]
    for folder, short, train in _SPLITS:
        source = FashionMNIST(fmnist_root, train=train)
        count = num_train if train else num_val
        (out_dir / "images" / folder).mkdir(parents=True, exist_ok=True)
        (out_dir / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            rng = np.random.default_rng((seed, int(train), index))
            scene = render_scene(
                source.images,
                source.labels,
                rng,
                canvas_size,
                (int(items[0]), int(items[1])),
                (float(scale_range[0]), float(scale_range[1])),
                threshold,
                max_iou,
                min_visible,
            )
            name = f"{index:06d}.png"
            Image.fromarray(scene["image"]).save(out_dir / "images" / folder / name)
            Image.fromarray(scene["mask"]).save(out_dir / "annotations" / folder / name)
            images.append(
                {"id": index + 1, "file_name": f"{folder}/{name}", "width": canvas_size, "height": canvas_size}
            )
            for box, label, area in zip(scene["boxes"], scene["box_labels"], scene["areas"], strict=True):
                x1, y1, x2, y2 = (float(v) for v in box)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": index + 1,
                        "category_id": int(label) + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": int(area),
                        "iscrowd": 0,
                    }
                )
        coco = {
            "info": {"description": "Fashion-MNIST scenes (dinov3-pl)", **meta},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (out_dir / f"instances_{short}.json").write_text(json.dumps(coco))
    (out_dir / "scenes_meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return out_dir


def ensure_fmnist_scenes(
    root: str | Path,
    fmnist_root: str | Path | None = None,
    num_train: int = 2000,
    num_val: int = 500,
    seed: int = 0,
    **kwargs,
) -> Path:
    """Returns ``root`` holding the scenes, building them first if ``root/scenes_meta.json`` is missing.

    A ``root`` built with different sizes or seed raises instead of being reused silently. The build goes to a
    temporary folder next to ``root`` and is renamed into place, so an interrupted build leaves no half dataset.
    """
    root = Path(root)
    meta_file = root / "scenes_meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        wanted = {"num_train": num_train, "num_val": num_val, "seed": seed, **kwargs}
        differs = {
            k: (meta.get(k), v) for k, v in wanted.items() if meta.get(k) != (list(v) if isinstance(v, tuple) else v)
        }
        if differs:
            raise ValueError(
                f"{root} holds scenes built with other settings (have, want): {differs}; "
                "delete it or point root elsewhere"
            )
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not a Fashion-MNIST scenes folder (no scenes_meta.json)")
    fmnist_root = fmnist_root or default_fashion_mnist_root()
    if fmnist_root is None:
        raise FileNotFoundError(
            "building Fashion-MNIST scenes needs fmnist_root (the idx .gz files); install the "
            "Debian package dataset-fashion-mnist or pass fmnist_root"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        build_fmnist_scenes(fmnist_root, staging, num_train=num_train, num_val=num_val, seed=seed, **kwargs)
        try:
            if root.exists():
                root.rmdir()
            staging.rename(root)
        except OSError:
            if not meta_file.is_file():
                raise
            # Another process finished the same build first: check its settings and use it.
            return ensure_fmnist_scenes(root, fmnist_root, num_train, num_val, seed, **kwargs)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return root


class FashionMNISTScenes(Dataset):
    """One split of the Fashion-MNIST scenes as segmentation or detection data, built into ``root`` when missing.

    ``prepare()`` builds the scenes (from ``fmnist_root``; None: the Debian package's copy) unless ``root`` holds a
    build with the same settings, and refuses one built with others; the dense DataModules call it from
    ``prepare_data``, so under DDP one process builds. Nothing is read in ``__init__``; the first ``len`` or sample
    reads the folder (preparing it first if nobody did). The two splits and two tasks share one build: give each
    the same ``root`` and build settings.

    Samples: segmentation ``{"image", "mask", "path"}`` (mask: 0 = background, garment class c -> c + 1, 255 =
    ignore; ``num_classes`` 11); detection ``{"image", "boxes", "box_labels", "path"}`` (xyxy boxes, labels 0..9;
    ``num_classes`` 10).

    Args:
        root: folder of the build (written if missing).
        split: ``"train"`` (scenes of Fashion-MNIST's train garments) or ``"val"`` (its test garments).
        task: ``"segmentation"`` or ``"detection"``.
        num_train, num_val, seed, canvas_size, items, scale_range: the build (see :func:`build_fmnist_scenes`).
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "val"] = "train",
        task: Literal["segmentation", "detection"] = "segmentation",
        fmnist_root: str | Path | None = None,
        num_train: int = 2000,
        num_val: int = 500,
        seed: int = 0,
        canvas_size: int = 112,
        items: tuple[int, int] = (2, 5),
        scale_range: tuple[float, float] = (0.7, 1.6),
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"FashionMNISTScenes split must be 'train' or 'val', got {split!r}")
        if task not in ("segmentation", "detection"):
            raise ValueError(f"FashionMNISTScenes task must be 'segmentation' or 'detection', got {task!r}")
        self.root, self.split, self.task = Path(root), split, task
        self.fmnist_root = fmnist_root
        self.build = {
            "num_train": int(num_train),
            "num_val": int(num_val),
            "seed": int(seed),
            "canvas_size": int(canvas_size),
            "items": tuple(int(v) for v in items),
            "scale_range": tuple(float(v) for v in scale_range),
        }
        segmentation = task == "segmentation"
        self.class_names: tuple[str, ...] = (("background",) if segmentation else ()) + FashionMNIST.class_names
        self.num_classes: int = len(self.class_names)
        self._reader: Dataset | None = None

    def prepare(self) -> Path:
        """Builds the scenes into ``root`` unless a build with these settings is there; returns ``root``."""
        build = dict(self.build)
        return ensure_fmnist_scenes(
            self.root, self.fmnist_root, build.pop("num_train"), build.pop("num_val"), build.pop("seed"), **build
        )

    @property
    def reader(self) -> Dataset:
        """The generic reader of the built split (``SegmentationFolder`` or ``CocoDetectionDataset``)."""
        if self._reader is None:
            root = self.prepare()  # checks the build's settings; builds only if prepare_data did not run
            if self.task == "segmentation":
                folder = "training" if self.split == "train" else "validation"
                self._reader = SegmentationFolder(root, folder, num_classes=self.num_classes)
            else:
                self._reader = CocoDetectionDataset(root / "images", root / f"instances_{self.split}.json")
        return self._reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict:
        return self.reader[index]


def main(args: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--fmnist-root", default=default_fashion_mnist_root(), help="folder of the idx .gz files")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--canvas-size", type=int, default=112)
    parser.add_argument("--items", type=int, nargs=2, default=(2, 5), metavar=("MIN", "MAX"))
    parser.add_argument("--scale-range", type=float, nargs=2, default=(0.7, 1.6), metavar=("LOW", "HIGH"))
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(args)
    if options.fmnist_root is None:
        parser.error("--fmnist-root is required (the Debian package dataset-fashion-mnist is not installed)")
    out = build_fmnist_scenes(
        options.fmnist_root,
        options.out,
        options.num_train,
        options.num_val,
        options.canvas_size,
        tuple(options.items),
        tuple(options.scale_range),
        options.seed,
    )
    print(f"wrote Fashion-MNIST scenes to {out}")


if __name__ == "__main__":
    main()
