"""Semantic segmentation data: label-map datasets, upstream DINOv3's training augmentation and evaluation resizing,
and :class:`SegmentationDataModule`.

Label maps follow ADE20K/mmseg: a class id per pixel, **0 = background (or the first class), 255 = ignore**. With
``reduce_zero_label=True`` (ADE20K, where 0 means "unlabelled") 0 becomes 255 and every other id moves down by one.

Protocol (upstream ``dinov3/eval/segmentation/transforms.py``; values there): training images get their short side
resized to ``image_size`` x a ratio uniform in ``scale_range`` (image bilinear, label nearest), a random
``image_size``² crop re-drawn up to 10 times while one class covers ``cat_max_ratio`` (0.75) or more of its labelled
pixels, a horizontal flip, mmseg's photometric distortion, normalisation, and bottom/right padding to the crop size
(image 0 = the mean colour, label 255). Evaluation images get their short side resized to ``eval_size``; their
**label maps are never resized**: the model's logits are resized to each label map (``Segmentation``), so mIoU is
measured at the original label resolution.

Batches: ``{"images": float [B,3,H,W] (ImageNet-normalised, padded with 0), "masks": long [B,H',W'] (padded with
255), "image_sizes": long [B,2], "mask_sizes": long [B,2] (each sample's size before the padding),
"num_bad_images": int}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from dinov3_pl.data.datasets import SHAPE_CLASS_NAMES, SyntheticShapes
from dinov3_pl.data.decode import read_rgb
from dinov3_pl.data.dense import (
    _NOT_HYPERPARAMETERS,
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CheckedSplit,
    DenseDataModule,
    positive_count,
    readable,
    rgb_image,
    to_chw,
)
from dinov3_pl.data.transforms import ProcessSeeded

__all__ = [
    "PhotometricDistortion",
    "SegmentationDataModule",
    "SegmentationEvalTransform",
    "SegmentationFolder",
    "SegmentationTrainTransform",
    "SyntheticShapeMasks",
    "choose_crop",
    "resize_short_side",
    "segmentation_collate",
]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


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
        self.num_classes = None if num_classes is None else positive_count(num_classes, "num_classes")
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


# ------------------------------------------------------------------------------------------------ transforms
def resize_short_side(image: np.ndarray, short_side: int, mask: np.ndarray | None = None):
    """Image (bilinear, PIL: antialiased when shrinking) and optional label map (nearest) with the short side at
    ``short_side`` and the long side rounded to keep the aspect ratio, as upstream's ``FixedSideResize``."""
    height, width = image.shape[:2]
    if height > width:
        size = (short_side, int(short_side * height / width + 0.5))
    else:
        size = (int(short_side * width / height + 0.5), short_side)
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    if mask is None:
        return resized
    # torch's "nearest" (source pixel floor(i * scale)), as upstream's torchvision Resize on its label tensor; PIL's
    # nearest samples pixel centres and picks other pixels.
    labels = torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()
    labels = F.interpolate(labels, size=size[::-1], mode="nearest")[0, 0]
    return resized, labels.numpy().astype(mask.dtype)


def choose_crop(
    mask: np.ndarray, crop_size: int, cat_max_ratio: float, rng: np.random.Generator, ignore_index: int = IGNORE_INDEX
) -> tuple[int, int]:
    """Top-left corner of a random ``crop_size``² crop (smaller where the map is): re-drawn up to 10 times until the
    crop holds at least two classes and none covers ``cat_max_ratio`` or more of its labelled pixels; after 10
    failed checks the 11th draw is taken unchecked (upstream's ``RandomCropWithLabel``; 1.0 turns the rule off)."""
    margin_h, margin_w = max(mask.shape[0] - crop_size, 0), max(mask.shape[1] - crop_size, 0)

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            labels, counts = np.unique(mask[top : top + crop_size, left : left + crop_size], return_counts=True)
            counts = counts[labels != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return top, left


class PhotometricDistortion:
    """mmseg's photometric distortion with upstream DINOv3's ranges, on uint8 RGB: each of brightness (an offset in
    ±``brightness_delta``), contrast (a factor in ``contrast_range``), saturation (a factor in
    ``saturation_range``) and hue (a shift in ``hue_range``, in turns of the colour wheel) applied with probability
    0.5; contrast comes first or last with probability 0.5. Brightness and contrast clip to [0, 255] and truncate
    to uint8; saturation and hue are torchvision's ``adjust_saturation`` / ``adjust_hue``.

    Upstream's hue range is (-0.5, 0.5), the whole wheel (mmseg's own default, ``hue_delta=18`` of OpenCV's 180,
    is ±0.1); we keep upstream's value.
    """

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_range: tuple[float, float] = (-0.5, 0.5),
    ) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range, self.saturation_range, self.hue_range = contrast_range, saturation_range, hue_range

    def sample(self, rng: np.random.Generator) -> dict[str, float | bool | None]:
        """The random parameters of one call (None: that step is skipped)."""

        def maybe(low: float, high: float) -> float | None:
            return float(rng.uniform(low, high)) if rng.integers(2) else None

        brightness = maybe(-self.brightness_delta, self.brightness_delta)
        contrast_first = bool(rng.integers(2))
        contrast = maybe(*self.contrast_range)
        return {
            "brightness": brightness,
            "contrast_first": contrast_first,
            "contrast": contrast,
            "saturation": maybe(*self.saturation_range),
            "hue": maybe(*self.hue_range),
        }

    @staticmethod
    def apply(image: np.ndarray, params: dict) -> np.ndarray:
        def affine(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
            return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

        def torchvision_op(img: np.ndarray, op: Callable, factor: float) -> np.ndarray:
            return op(torch.tensor(img).permute(2, 0, 1), factor).permute(1, 2, 0).numpy()

        if params["brightness"] is not None:
            image = affine(image, beta=params["brightness"])
        if params["contrast_first"] and params["contrast"] is not None:
            image = affine(image, alpha=params["contrast"])
        if params["saturation"] is not None:
            image = torchvision_op(image, TF.adjust_saturation, params["saturation"])
        if params["hue"] is not None:
            image = torchvision_op(image, TF.adjust_hue, params["hue"])
        if not params["contrast_first"] and params["contrast"] is not None:
            image = affine(image, alpha=params["contrast"])
        return image

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(image, self.sample(rng))


def _normalise(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.float32) / 255.0 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)


class SegmentationTrainTransform:
    """Upstream's training augmentation (module docstring): random short-side resize, cat_max_ratio crop, flip,
    photometric distortion, normalisation, padding to the crop. ``set_random_seed`` makes it a ``ProcessSeeded``
    pipeline (the DataModule wraps it so it follows torch's seed in every process)."""

    def __init__(
        self,
        crop_size: int,
        scale_range: Sequence[float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        distortion: PhotometricDistortion | None = None,
    ) -> None:
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be 0 < low <= high, got {tuple(scale_range)}")
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1] (1 turns the re-drawing off), got {cat_max_ratio}")
        self.crop_size, self.scale_range, self.cat_max_ratio = crop_size, (low, high), cat_max_ratio
        self.flip_prob, self.distortion = flip_prob, distortion
        self.rng = np.random.default_rng()

    def set_random_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        rng, crop = self.rng, self.crop_size
        short_side = max(int(crop * rng.uniform(*self.scale_range)), 1)
        image, mask = resize_short_side(image, short_side, mask)
        top, left = choose_crop(mask, crop, self.cat_max_ratio, rng)
        image, mask = image[top : top + crop, left : left + crop], mask[top : top + crop, left : left + crop]
        if rng.random() < self.flip_prob:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if self.distortion is not None:
            image = self.distortion(np.ascontiguousarray(image), rng)
        padded_image = np.zeros((crop, crop, 3), np.float32)  # 0 after normalisation: the mean colour
        padded_mask = np.full((crop, crop), IGNORE_INDEX, np.uint8)
        padded_image[: image.shape[0], : image.shape[1]] = _normalise(image)
        padded_mask[: mask.shape[0], : mask.shape[1]] = mask
        return {"image": padded_image, "mask": padded_mask}


class SegmentationEvalTransform:
    """Evaluation: the image's short side resized to ``eval_size`` (None: kept) and normalised; the label map is
    returned untouched, at its original resolution."""

    def __init__(self, eval_size: int | None = None) -> None:
        self.eval_size = eval_size

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        if self.eval_size:
            image = resize_short_side(image, self.eval_size)
        return {"image": _normalise(image), "mask": mask}


def segmentation_collate(samples: Sequence[dict | None]) -> dict:
    """Pads images (0 = the mean colour) and masks (255) to the largest of each in the batch; ``image_sizes`` and
    ``mask_sizes`` keep every sample's own size (evaluation masks keep their original size, larger or smaller than
    the resized image). Unreadable samples (``None``) are dropped and counted in ``num_bad_images``."""
    kept = readable(samples)
    image_sizes = torch.tensor([list(s["image"].shape[1:]) for s in kept], dtype=torch.long)
    mask_sizes = torch.tensor([list(s["mask"].shape) for s in kept], dtype=torch.long)
    images = torch.zeros(len(kept), 3, *image_sizes.max(0).values.tolist())
    masks = torch.full((len(kept), *mask_sizes.max(0).values.tolist()), IGNORE_INDEX, dtype=torch.long)
    for i, sample in enumerate(kept):
        h, w = sample["image"].shape[1:]
        images[i, :, :h, :w] = sample["image"]
        h, w = sample["mask"].shape
        masks[i, :h, :w] = sample["mask"]
    return {
        "images": images,
        "masks": masks,
        "image_sizes": image_sizes,
        "mask_sizes": mask_sizes,
        "num_bad_images": len(samples) - len(kept),
    }


# ------------------------------------------------------------------------------------------------ datamodule
class SegmentationDataModule(DenseDataModule):
    """Semantic segmentation data from any datasets of masks (``train``, ``val``, optional ``test``; YAML:
    ``class_path``), e.g. ``SegmentationFolder`` (ADE20K layout), ``ADE20K``, ``PascalVOC``,
    ``FashionMNISTScenes(task="segmentation")`` or a user's own ``Dataset`` of ``{"image", "mask"}`` dicts. None of
    them: the embedded shapes (``SyntheticShapeMasks``, 512 training and 128 validation images of ``image_size``).

    Args:
        train, val, test: the splits; ``test`` None reuses ``val``.
        num_classes: classes of the mask ids, background included where it is a class (synthetic: 8 shapes + 1).
            None: the datasets' ``num_classes``. Every mask is checked: ids >= num_classes other than 255 raise.
        image_size: training crop size and the short side the training ratio multiplies; also the synthetic
            default's image size.
        eval_size: resize the short side of evaluation images to this (None: keep their size); labels are never
            resized.
        scale_range: training short side = ``image_size`` x a ratio uniform in this range (upstream (0.5, 2.0)).
        cat_max_ratio: re-draw training crops where one class covers this fraction or more (upstream 0.75; 1: off).
        photometric_distortion: apply mmseg's photometric distortion to training crops (upstream: yes).
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
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric_distortion: bool = True,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=_NOT_HYPERPARAMETERS)
        self._take_datasets(train, val, test, num_classes, image_size, seed)

    def _transforms(self) -> tuple[ProcessSeeded, SegmentationEvalTransform]:
        hp = self.hparams
        distortion = PhotometricDistortion() if hp.photometric_distortion else None
        train = SegmentationTrainTransform(hp.image_size, hp.scale_range, hp.cat_max_ratio, hp.flip_prob, distortion)
        return ProcessSeeded(train), SegmentationEvalTransform(hp.eval_size)

    def transformed_dataset(self, dataset: Dataset, transform: Callable, name: str) -> CheckedSplit:
        num_classes = self.num_classes

        def convert(sample: dict, where: str) -> dict:
            image = rgb_image(sample, where)
            if "mask" not in sample:
                raise ValueError(
                    f"{where}: a segmentation sample needs 'mask' (class ids [H, W]); got {sorted(sample)}"
                )
            mask = np.asarray(sample["mask"])
            if mask.shape != image.shape[:2]:
                raise ValueError(f"{where}: mask {mask.shape} and image {image.shape[:2]} differ in size")
            bad = np.unique(mask[(mask != IGNORE_INDEX) & ((mask >= num_classes) | (mask < 0))])
            if bad.size:
                raise ValueError(
                    f"{where}: label ids {bad.tolist()} outside 0..{num_classes - 1} for "
                    f"num_classes={num_classes} (only {IGNORE_INDEX} = ignore may exceed it)"
                )
            out = transform(image=image, mask=mask.astype(np.uint8))
            return {"image": to_chw(out["image"]), "mask": torch.as_tensor(np.ascontiguousarray(out["mask"])).long()}

        return CheckedSplit(dataset, convert, name)
