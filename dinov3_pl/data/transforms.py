"""DINOv3 multi-crop augmentation (albumentations) and the evaluation transform.

:class:`MultiCropTransform` follows upstream ``dinov3/data/augmentations.py`` (DataAugmentationDINO): 2 global + N
local bicubic random-resized crops with horizontal flips, colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8 drawn per crop,
grayscale p=0.2, Gaussian blur (kernel 9, sigma in [0.1, 2]) and solarize p=0.2 on global crop 2, ImageNet
normalisation. Optional Gram-teacher crops share each global crop's crop box and flip, resized to ``gram_size``,
without photometric augmentation (upstream ``gram_teacher_no_distortions=True``).

Blur probabilities are given as the *intended* ones (global 1 / global 2 / local = 1.0 / 0.1 / 0.5). Upstream's
``GaussianBlur`` wrapper passes ``1 - p`` to ``RandomApply`` (upstream issue #286), so its released models were
trained with 0.0 / 0.9 / 0.5; ``blur_as_upstream_trained=True`` reproduces that.

Randomness comes from a ``np.random.Generator`` passed per call (the data module derives it from
(seed, epoch, index)), so workers draw different crops and a run is reproducible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropTransform",
    "EvalTransform",
    "sample_crop_box",
    "to_rgb_array",
    "resize_bicubic",
    "ProcessSeeded",
]

# Data-loader workers are the parallelism; OpenCV's own thread pool (used inside albumentations) is not fork-safe:
# a pool created in the main process can deadlock forked workers. Single-threaded OpenCV avoids both problems.
cv2.setNumThreads(0)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class ProcessSeeded:
    """An albumentations pipeline whose random state is seeded from torch's seed of the process that calls it.

    Left alone, ``A.Compose`` draws from its own generator, seeded from the OS: ``seed_everything`` does not make it
    reproducible, and every DataLoader worker starts from a pickled copy of the same state, so the workers repeat each
    other's augmentations. ``torch.initial_seed()`` is the run's seed in the main process and a distinct, reproducible
    seed in each worker (Lightning's ``seed_everything(workers=True)`` / torch's worker seeding), so seeding from it on
    first use in each process fixes both.
    """

    def __init__(self, pipeline: A.Compose) -> None:
        self.pipeline = pipeline
        self._seeded_for: int | None = None

    def __call__(self, **data: Any) -> dict[str, Any]:
        seed = torch.initial_seed()
        if seed != self._seeded_for:
            self.pipeline.set_random_seed(seed % 2**32)
            self._seeded_for = seed
        return self.pipeline(**data)


def to_rgb_array(image: Any) -> np.ndarray:
    """A uint8 [H, W, 3] array from an RGB/grayscale numpy array or a PIL image (grayscale replicated; PIL images
    of any mode as ``dinov3_pl.data.decode.image_to_rgb`` converts them: 16 bit scaled, alpha over white)."""
    if not isinstance(image, np.ndarray):
        from dinov3_pl.data.decode import image_to_rgb

        image = image_to_rgb(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image)


def sample_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """A random-resized-crop box ``(top, left, crop_height, crop_width)`` with torchvision's algorithm.

    Up to 10 tries of an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``;
    if none fits, the largest centred crop with the aspect ratio clamped to ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_height, crop_width = height, int(round(height * max(ratio)))
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def resize_bicubic(
    image: np.ndarray, width: int, height: int, box: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """Bicubic resize of ``image`` (or of its ``box`` = (left, top, right, bottom)) to ``width`` x ``height``.

    Uses PIL, which low-pass filters when shrinking: the same result as upstream's torchvision
    RandomResizedCrop/Resize on PIL images (antialiased bicubic), unlike OpenCV's INTER_CUBIC.
    """
    full_box = (0, 0, image.shape[1], image.shape[0])
    if (box is None or tuple(box) == full_box) and image.shape[:2] == (height, width):
        return image
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC, box=box)
    return np.asarray(resized)


class MultiCropTransform:
    """Image -> ``{"global_crops": [2 x CHW], "local_crops": [n x CHW], "gram_crops": [2 x CHW] (optional)}``.

    All crops are float32 CHW tensors normalised with ``mean``/``std``. See the module docstring for the recipe.
    ``blur_probabilities`` are the intended (global 1, global 2, local) probabilities; with
    ``blur_as_upstream_trained=True`` the applied ones are ``1 - p`` as in upstream's code.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        num_local_crops: int = 8,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        horizontal_flip_probability: float = 0.5,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_probability: float = 0.8,
        grayscale_probability: float = 0.2,
        blur_kernel_size: int = 9,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_probabilities: tuple[float, float, float] = (1.0, 0.1, 0.5),
        blur_as_upstream_trained: bool = False,
        solarize_probability: float = 0.2,
        solarize_threshold: int = 128,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        gram_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        for name, value in (("global_size", global_size), ("local_size", local_size)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if num_local_crops < 0:
            raise ValueError(f"num_local_crops must be >= 0, got {num_local_crops}")
        for name, interval in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0 < interval[0] <= interval[1] <= 1:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {tuple(interval)}")
        if blur_kernel_size % 2 != 1:
            raise ValueError(f"blur_kernel_size must be odd, got {blur_kernel_size}")
        if gram_size is not None and gram_size <= 0:
            raise ValueError(f"gram_size must be positive or None, got {gram_size}")
        probabilities = [horizontal_flip_probability, color_jitter_probability, grayscale_probability]
        probabilities += [solarize_probability, *blur_probabilities]
        if not all(0.0 <= p <= 1.0 for p in probabilities) or len(blur_probabilities) != 3:
            raise ValueError("all probabilities must lie in [0, 1] and blur_probabilities needs 3 values")
        self.global_size = int(global_size)
        self.local_size = int(local_size)
        self.num_local_crops = int(num_local_crops)
        self.global_scale = tuple(global_scale)
        self.local_scale = tuple(local_scale)
        self.aspect_ratio = tuple(aspect_ratio)
        self.horizontal_flip_probability = float(horizontal_flip_probability)
        self.gram_size = None if gram_size is None else int(gram_size)
        self.blur_as_upstream_trained = bool(blur_as_upstream_trained)
        self.intended_blur_probabilities = tuple(float(p) for p in blur_probabilities)
        # What is actually applied: upstream's wrapper applies 1 - p (issue #286).
        self.blur_probabilities = tuple(
            (1.0 - p) if self.blur_as_upstream_trained else p for p in self.intended_blur_probabilities
        )
        self._scale = (255.0 * np.asarray(std, dtype=np.float32)).reshape(1, 1, 3)
        self._offset = (255.0 * np.asarray(mean, dtype=np.float32)).reshape(1, 1, 3)
        self._rng = np.random.default_rng(seed)

        brightness, contrast, saturation, hue = color_jitter

        def photometric(blur_probability: float, solarize: float) -> A.Compose:
            steps = [
                A.ColorJitter(
                    brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, p=color_jitter_probability
                ),
                A.ToGray(num_output_channels=3, method="weighted_average", p=grayscale_probability),
                A.GaussianBlur(
                    blur_limit=(blur_kernel_size, blur_kernel_size), sigma_limit=tuple(blur_sigma), p=blur_probability
                ),
            ]
            if solarize > 0:
                threshold = solarize_threshold / 255.0  # albumentations takes a fraction of the max value
                steps.append(A.Solarize(threshold_range=(threshold, threshold), p=solarize))
            return A.Compose(steps)

        self.global_photometric = (
            photometric(self.blur_probabilities[0], 0.0),
            photometric(self.blur_probabilities[1], solarize_probability),
        )
        self.local_photometric = photometric(self.blur_probabilities[2], 0.0)

    def _normalise(self, image: np.ndarray) -> torch.Tensor:
        normalised = (image.astype(np.float32) - self._offset) / self._scale
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))

    def _geometric(
        self, image: np.ndarray, scale: tuple[float, float], sizes: Sequence[int], rng: np.random.Generator
    ) -> list[np.ndarray]:
        """One random crop box and flip, applied at every output size in ``sizes`` (same geometry)."""
        top, left, crop_height, crop_width = sample_crop_box(
            image.shape[0], image.shape[1], scale, self.aspect_ratio, rng
        )
        box = (left, top, left + crop_width, top + crop_height)
        flip = rng.random() < self.horizontal_flip_probability
        outputs = []
        for size in sizes:
            resized = resize_bicubic(image, size, size, box=box)
            outputs.append(np.ascontiguousarray(resized[:, ::-1]) if flip else resized)
        return outputs

    @staticmethod
    def _photometric(pipeline: A.Compose, image: np.ndarray, rng: np.random.Generator, py_random) -> np.ndarray:
        pipeline.set_random_state(rng, py_random)
        return pipeline(image=image)["image"]

    def __call__(self, image: Any, rng: np.random.Generator | None = None) -> dict[str, list[torch.Tensor]]:
        rng = self._rng if rng is None else rng
        image = to_rgb_array(image)
        # All crop geometry is drawn first, so it does not depend on the photometric settings.
        global_sizes = [self.global_size] if self.gram_size is None else [self.global_size, self.gram_size]
        global_views = [self._geometric(image, self.global_scale, global_sizes, rng) for _ in range(2)]
        local_views = [
            self._geometric(image, self.local_scale, [self.local_size], rng)[0] for _ in range(self.num_local_crops)
        ]
        py_random = random.Random(int(rng.integers(2**62)))
        output = {
            "global_crops": [
                self._normalise(self._photometric(pipeline, views[0], rng, py_random))
                for pipeline, views in zip(self.global_photometric, global_views, strict=True)
            ],
            "local_crops": [
                self._normalise(self._photometric(self.local_photometric, view, rng, py_random)) for view in local_views
            ],
        }
        if self.gram_size is not None:
            output["gram_crops"] = [self._normalise(views[1]) for views in global_views]
        return output


class EvalTransform:
    """Deterministic evaluation transform: bicubic resize of the shorter side, centre crop, normalise -> CHW float.

    ``resize_size`` defaults to ``round(size * 256 / 224)`` (the usual ImageNet ratio); set it equal to ``size``
    to keep the whole image (square inputs).
    """

    def __init__(
        self,
        size: int = 224,
        resize_size: int | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.size = int(size)
        self.resize_size = int(round(size * 256 / 224)) if resize_size is None else int(resize_size)
        if self.resize_size < self.size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= size ({self.size})")
        self._scale = (255.0 * np.asarray(std, dtype=np.float32)).reshape(1, 1, 3)
        self._offset = (255.0 * np.asarray(mean, dtype=np.float32)).reshape(1, 1, 3)

    def __call__(self, image: Any) -> torch.Tensor:
        image = to_rgb_array(image)
        height, width = image.shape[:2]
        shorter = min(height, width)
        new_height = max(self.size, int(round(height * self.resize_size / shorter)))
        new_width = max(self.size, int(round(width * self.resize_size / shorter)))
        if (new_height, new_width) != (height, width):
            image = resize_bicubic(image, new_width, new_height)
        top, left = (new_height - self.size) // 2, (new_width - self.size) // 2
        image = image[top : top + self.size, left : left + self.size]
        normalised = (image.astype(np.float32) - self._offset) / self._scale
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))
