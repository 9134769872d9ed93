"""Data for monocular depth: NYU Depth v2 in upstream DINOv3's layout, an embedded synthetic scene set, and
:class:`DepthDataModule`.

Samples: ``{"image": uint8 [H, W, 3], "depth": float32 [H, W] metres (0 = no measurement), "path": str}``.
Batches: ``{"images": float [B, 3, H, W] (ImageNet-normalised), "depths": float [B, H, W]}``, padded to the largest
image of the batch (image 0, depth 0 = not measured).

Training augmentation follows upstream's ``make_depth_train_transforms`` (``dinov3/eval/depth/transforms.py``): an
optional fixed crop of the frame (NYU: the box (43, 45)–(608, 472) of 640×480, scaled to the image), rotation by
±2.5° with probability 0.5 (bilinear image, nearest depth, 0 = no measurement outside), horizontal flip 0.5, a random
crop (NYU 416×544), upstream's colour augmentation with probability 0.5 (on the 0–255 image: power ``γ ∈ [0.9,
1.1]``, times a brightness in ``brightness_range``, times a colour per channel in [0.9, 1.1], clipped), normalise.
Evaluation: the whole image, normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dinov3_pl.data.decode import read_rgb
from dinov3_pl.data.dense import _NOT_HYPERPARAMETERS, CheckedSplit, DenseDataModule, readable, rgb_image, to_chw
from dinov3_pl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ProcessSeeded

__all__ = [
    "NYU_TRAIN_CROP",
    "DepthDataModule",
    "NYUDepthV2",
    "SyntheticDepth",
    "depth_collate",
    "depth_transforms",
]

# Upstream's NYUCrop for training: (x1, y1, x2, y2) of the 640×480 frame, cutting the border Kinect does not measure.
NYU_TRAIN_CROP: tuple[int, int, int, int] = (43, 45, 608, 472)
_NYU_FRAME_WIDTH, _NYU_FRAME_HEIGHT = 640, 480
_NYU_SPLIT_FILES = {"train": "nyu_train.txt", "test": "nyu_test.txt", "val": "nyu_test.txt"}


# ------------------------------------------------------------------------------------------------ NYU Depth v2
class NYUDepthV2(Dataset):
    """NYU Depth v2 as upstream DINOv3 reads it (``dinov3/data/datasets/nyu.py``, DATASETS.md): BTS's subset.

    ``root`` holds ``nyu_train.txt`` and ``nyu_test.txt`` (BTS's ``nyudepthv2_{train,test}_files_with_gt.txt``)
    and the scene folders they point into. Each line is ``<image> <depth png> <focal>`` with paths relative to
    ``root`` (a leading ``/`` is ignored); lines are read in sorted order, as upstream. Depth PNGs are 16-bit, in
    millimetres (``depth_scale`` 1000 → metres), 0 = no measurement.

    ``split``: ``"train"`` (24,231 pairs in BTS's list) or ``"test"`` (the 654 official test images); ``"val"``
    reads the test list, as upstream validates on it.
    """

    def __init__(self, root: str | Path, split: Literal["train", "val", "test"] = "train", depth_scale: float = 1000.0):
        if split not in _NYU_SPLIT_FILES:
            raise ValueError(f"NYU split must be one of {sorted(_NYU_SPLIT_FILES)}, got {split!r}")
        if depth_scale <= 0:
            raise ValueError(f"depth_scale must be positive (PNG units per metre), got {depth_scale}")
        self.root, self.split, self.depth_scale = Path(root), split, float(depth_scale)
        split_file = self.root / _NYU_SPLIT_FILES[split]
        if not split_file.is_file():
            raise FileNotFoundError(
                f"NYU split file {split_file} does not exist: root must be the NYU folder holding nyu_train.txt and "
                "nyu_test.txt (BTS's nyudepthv2_{train,test}_files_with_gt.txt) next to the scene folders"
            )
        self.pairs: list[tuple[Path, Path]] = []
        for line in sorted(split_file.read_text().splitlines()):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise ValueError(f"{split_file}: line {line!r} needs '<image> <depth png> [focal]'")
            self.pairs.append((self.root / fields[0].strip("/"), self.root / fields[1].strip("/")))
        if not self.pairs:
            raise ValueError(f"{split_file} lists no images (empty split)")
        missing = [str(path) for pair in self.pairs for path in pair if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} files listed in {split_file} do not exist under {self.root}, e.g. {missing[:3]}"
            )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_path, depth_path = self.pairs[index]
        # The depth is registered to the stored pixels: no EXIF turn.
        image = read_rgb(image_path, apply_exif_orientation=False)
        with Image.open(depth_path) as png:
            if png.mode not in ("I;16", "I;16B", "I;16L", "I"):
                raise ValueError(f"depth map {depth_path} has mode {png.mode}; expected a 16-bit PNG of millimetres")
            depth = np.asarray(png).astype(np.float32) / self.depth_scale
        if depth.shape != image.shape[:2]:
            raise ValueError(
                f"depth map {depth_path} is {depth.shape[1]}x{depth.shape[0]} but its image {image_path} is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        return {"image": image, "depth": depth, "path": str(image_path)}


# ------------------------------------------------------------------------------------------------ synthetic scenes
class SyntheticDepth(Dataset):
    """Embedded depth data, generated from ``(seed, index)``: a pinhole camera over a checkered ground plane that
    meets a striped back wall, with 1–3 upright boxes standing on the ground, all in fog (far surfaces fade to
    grey), so depth shows in perspective, occlusion and contrast. Depths in metres within (0.5, 9.5); 2% of the
    pixels have no measurement (0), as a depth sensor's holes. No files needed; for demos and tests.
    """

    def __init__(self, num_samples: int = 512, image_size: int = 64, seed: int = 0) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
        self.num_samples, self.image_size, self.seed = int(num_samples), int(image_size), int(seed)
        coords = np.arange(self.image_size, dtype=np.float32) + 0.5
        self._ys, self._xs = np.meshgrid(coords, coords, indexing="ij")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for SyntheticDepth of length {self.num_samples}")
        rng = np.random.default_rng((self.seed, int(index)))
        size = self.image_size
        focal, centre = float(size), size / 2
        horizon = size * rng.uniform(0.2, 0.4)
        camera_height = rng.uniform(1.0, 1.6)
        wall = rng.uniform(6.0, 9.5)
        below = self._ys - horizon
        ground = focal * camera_height / np.maximum(below, 1e-3)
        depth = np.where((below > 0) & (ground < wall), ground, wall).astype(np.float32)
        on_ground = depth < wall
        lateral = (self._xs - centre) * depth / focal  # metres left/right of the optical axis
        checker = (np.floor(lateral / 0.5) + np.floor(depth / 0.5)) % 2
        stripes = np.floor(lateral / 0.7) % 2
        ground_colours = rng.uniform(40, 220, size=(2, 3))
        wall_colours = rng.uniform(40, 220, size=(2, 3))
        albedo = np.where(
            on_ground[..., None],
            ground_colours[checker.astype(int)],
            wall_colours[stripes.astype(int)],
        ).astype(np.float32)
        boxes = []
        for _ in range(int(rng.integers(1, 4))):
            boxes.append(
                (rng.uniform(1.2, wall - 0.5), rng.uniform(0.5, 1.6), rng.uniform(0.5, 1.4), rng.uniform(0.1, 0.9))
            )
        for distance, height, width, column in sorted(boxes, reverse=True):  # far first: near boxes hide them
            base = horizon + focal * camera_height / distance
            top = base - focal * height / distance
            half_width = focal * width / (2 * distance)
            inside = (self._ys >= top) & (self._ys < base) & (np.abs(self._xs - column * size) < half_width)
            colour = rng.uniform(30, 230, size=3)
            shading = 1.0 - 0.3 * (self._xs[inside] - (column * size - half_width)) / (2 * half_width)
            depth[inside] = distance
            albedo[inside] = colour * shading[:, None]
        visibility = np.exp(-depth / 4.0)[..., None]  # fog: contrast fades with distance
        image = albedo * visibility + 190.0 * (1 - visibility)
        image += rng.standard_normal((size, size, 1)).astype(np.float32) * 3.0
        depth[rng.random((size, size)) < 0.02] = 0.0
        return {"image": np.clip(image, 0, 255).astype(np.uint8), "depth": depth}


# ------------------------------------------------------------------------------------------------ transforms
class FrameCrop(A.DualTransform):
    """Crops a fixed box given in pixels of a reference frame, scaled to the image (upstream's ``NYUCrop``:
    ``int(x1 / 640 · W)``, ...); the depth (``mask``) alike."""

    def __init__(self, box: Sequence[int], frame_size: tuple[int, int] = (_NYU_FRAME_WIDTH, _NYU_FRAME_HEIGHT)):
        super().__init__(p=1.0)
        self.box, self.frame_size = tuple(box), frame_size

    def _crop(self, array: np.ndarray) -> np.ndarray:
        height, width = array.shape[:2]
        (x1, y1, x2, y2), (frame_w, frame_h) = self.box, self.frame_size
        rows = slice(int(y1 / frame_h * height), int(y2 / frame_h * height))
        cols = slice(int(x1 / frame_w * width), int(x2 / frame_w * width))
        return np.ascontiguousarray(array[rows, cols])

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return self._crop(img)

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:
        return self._crop(mask)


class DepthColourJitter(A.ImageOnlyTransform):
    """Upstream's depth ``ColorAug`` on the 0–255 image: ``clip(image ** γ · brightness · colour[c], 0, 255)``, with
    γ, brightness and one colour factor per channel drawn uniformly from their ranges. The power acts on 0–255
    values, as upstream's does, so γ > 1 brightens strongly and saturates. Returns float32 0–255 (no rounding)."""

    def __init__(
        self,
        gamma_range: tuple[float, float] = (0.9, 1.1),
        brightness_range: tuple[float, float] = (0.9, 1.1),
        colour_range: tuple[float, float] = (0.9, 1.1),
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        self.gamma_range, self.brightness_range, self.colour_range = gamma_range, brightness_range, colour_range

    def get_params(self) -> dict[str, Any]:
        return {
            "gamma": self.py_random.uniform(*self.gamma_range),
            "brightness": self.py_random.uniform(*self.brightness_range),
            "colour": np.array([self.py_random.uniform(*self.colour_range) for _ in range(3)], dtype=np.float32),
        }

    def apply(self, img: np.ndarray, gamma: float, brightness: float, colour: np.ndarray, **params: Any) -> np.ndarray:
        return np.clip(img.astype(np.float32) ** gamma * brightness * colour, 0, 255)


def depth_transforms(
    crop_size: tuple[int, int],
    fixed_crop: Literal["nyu", "full"] = "full",
    rotation_degrees: float = 2.5,
    rotation_prob: float = 0.5,
    flip_prob: float = 0.5,
    colour_prob: float = 0.5,
    brightness_range: tuple[float, float] = (0.9, 1.1),
) -> tuple[ProcessSeeded, A.Compose]:
    """(train, eval) pipelines for ``image`` and ``mask`` = depth (float32 metres); see the module docstring.
    Images smaller than ``crop_size`` (height, width) are padded with 0 = no measurement."""
    if fixed_crop not in ("nyu", "full"):
        raise ValueError(f"fixed_crop must be 'nyu' or 'full', got {fixed_crop!r}")
    height, width = crop_size
    train = A.Compose(
        ([FrameCrop(NYU_TRAIN_CROP)] if fixed_crop == "nyu" else [])
        + [
            A.Rotate(
                limit=rotation_degrees,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=rotation_prob,
            ),
            A.HorizontalFlip(p=flip_prob),
            A.RandomCrop(height, width, pad_if_needed=True, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
            DepthColourJitter(brightness_range=tuple(brightness_range), p=colour_prob),
            A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )
    return ProcessSeeded(train), A.Compose([A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])


class _DepthSample:
    """Checks a sample's ``depth`` against its image and applies the transform (``CheckedSplit``'s ``convert``)."""

    def __init__(self, transform: ProcessSeeded | A.Compose) -> None:
        self.transform = transform

    def __call__(self, sample: dict, where: str) -> dict:
        image = rgb_image(sample, where)
        if "depth" not in sample:
            raise ValueError(
                f"{where}: a depth sample needs 'depth' (float [H, W] metres, 0 = none); got {sorted(sample)}"
            )
        depth = np.asarray(sample["depth"], dtype=np.float32)
        if depth.shape != image.shape[:2]:
            raise ValueError(f"{where}: depth {depth.shape} and image {image.shape[:2]} differ in size")
        depth = np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)  # NaN / inf: not measured
        if (depth < 0).any():
            raise ValueError(f"{where}: negative depths (min {depth.min():g}); depths are metres, 0 = no measurement")
        out = self.transform(image=image, mask=depth)
        return {"image": to_chw(out["image"]), "depth": torch.as_tensor(out["mask"], dtype=torch.float32)}


def depth_collate(samples: Sequence[dict | None]) -> dict[str, Tensor | int]:
    """Stacks images and depths, padded to the largest size in the batch (image 0 = mean colour, depth 0 = none).
    Unreadable samples (``None``) are dropped and counted in ``num_bad_images``."""
    kept = readable(samples)
    height = max(s["image"].shape[1] for s in kept)
    width = max(s["image"].shape[2] for s in kept)
    images = torch.zeros(len(kept), 3, height, width)
    depths = torch.zeros(len(kept), height, width)
    for i, sample in enumerate(kept):
        h, w = sample["depth"].shape
        images[i, :, :h, :w] = sample["image"]
        depths[i, :h, :w] = sample["depth"]
    return {"images": images, "depths": depths, "num_bad_images": len(samples) - len(kept)}


# ------------------------------------------------------------------------------------------------ datamodule
class DepthDataModule(DenseDataModule):
    """Monocular depth data from any datasets of ``{"image", "depth"}`` samples (``train``, ``val``, optional
    ``test``; YAML: ``class_path``), e.g. :class:`NYUDepthV2`. None of them: the embedded :class:`SyntheticDepth`
    (512 training and 128 validation scenes of ``image_size``).

    Args:
        train, val, test: the splits; ``test`` None reuses ``val``.
        image_size: the synthetic default's image size; the training crop when ``crop_size`` is None.
        crop_size: training crop (height, width) (upstream NYU: 416×544).
        fixed_crop: ``"nyu"`` crops NYU's unmeasured border off training images first (upstream), ``"full"`` not.
        rotation_degrees, rotation_prob, flip_prob, colour_prob, brightness_range: training augmentation
            (upstream NYU: 2.5°, 0.5, 0.5, 0.5, (0.75, 1.25)).
        seed: seed of the synthetic default (validation: ``seed + 1000003``).
    """

    kind = "depth"
    collate = staticmethod(depth_collate)
    synthetic_dataset = SyntheticDepth

    def __init__(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        test: Dataset | None = None,
        image_size: int = 64,
        crop_size: tuple[int, int] | None = None,
        fixed_crop: Literal["nyu", "full"] = "full",
        rotation_degrees: float = 2.5,
        rotation_prob: float = 0.5,
        flip_prob: float = 0.5,
        colour_prob: float = 0.5,
        brightness_range: tuple[float, float] = (0.9, 1.1),
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=_NOT_HYPERPARAMETERS)
        # Depth has no classes: one nominal class keeps the base's class bookkeeping out of the way.
        self._take_datasets(train, val, test, 1, image_size, seed)

    def _transforms(self) -> tuple[ProcessSeeded, A.Compose]:
        hp = self.hparams
        crop = tuple(hp.crop_size) if hp.crop_size is not None else (hp.image_size, hp.image_size)
        return depth_transforms(
            crop,
            hp.fixed_crop,
            hp.rotation_degrees,
            hp.rotation_prob,
            hp.flip_prob,
            hp.colour_prob,
            hp.brightness_range,
        )

    def transformed_dataset(self, dataset: Dataset, transform: ProcessSeeded | A.Compose, name: str) -> Dataset:
        return CheckedSplit(dataset, _DepthSample(transform), name)
