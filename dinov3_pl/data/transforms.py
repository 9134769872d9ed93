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

``crops_dtype="uint8"`` (both transforms) leaves the crops as uint8 CHW, a quarter of the bytes of float32 through
worker IPC, pinned memory and the host-to-device copy; :func:`normalise_uint8` then normalises them on the device
with the same float32 operations as the worker-side path, so both give bit-identical tensors.
"""

from __future__ import annotations

import functools
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
    "CROPS_DTYPES",
    "normalisation_constants",
    "normalise_uint8",
]

# Data-loader workers are the parallelism; OpenCV's own thread pool (used inside albumentations) is not fork-safe:
# a pool created in the main process can deadlock forked workers. Single-threaded OpenCV avoids both problems.
cv2.setNumThreads(0)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CROPS_DTYPES = ("uint8", "float32")


def normalisation_constants(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(255 * mean, 255 * std)`` as [1, 1, 3]: normalised = (uint8 value - offset) / scale.

    Every normalisation in this module, in the workers or on the device, uses these exact float32 constants and
    the same two operations, which is what makes the uint8 and float32 paths bit-identical.
    """
    offset = (255.0 * np.asarray(mean, dtype=np.float32)).reshape(1, 1, 3)
    scale = (255.0 * np.asarray(std, dtype=np.float32)).reshape(1, 1, 3)
    return offset, scale


def normalise_uint8(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 ``(x - 255 mean) / (255 std)``, on the tensor's device; bit-identical to
    the float32 crops of :class:`MultiCropTransform` and :class:`EvalTransform`."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalise_uint8 expects uint8 images, got {images.dtype}")
    offset, scale = _device_constants(tuple(map(float, mean)), tuple(map(float, std)), images.device)
    return images.float().sub_(offset).div_(scale)


@functools.lru_cache(maxsize=16)
def _device_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached so that normalising a batch costs no host-to-device copy of the constants.
    return tuple(torch.from_numpy(c.reshape(3, 1, 1)).to(device) for c in normalisation_constants(mean, std))


def _check_crops_dtype(crops_dtype: str) -> str:
    if crops_dtype not in CROPS_DTYPES:
        raise ValueError(
            f"crops_dtype must be 'uint8' (normalised on the device) or 'float32' (normalised in the workers), "
            f"got {crops_dtype!r}"
        )
    return crops_dtype


def _to_chw_tensor(image: np.ndarray, offset: np.ndarray, scale: np.ndarray, crops_dtype: str) -> torch.Tensor:
    """HWC uint8 -> contiguous CHW tensor, uint8 as it is or float32 normalised with ``offset``/``scale``."""
    if crops_dtype == "float32":
        image = (image.astype(np.float32) - offset) / scale
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


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

    All crops are float32 CHW tensors normalised with ``mean``/``std``, or with ``crops_dtype="uint8"`` the uint8
    CHW crops before normalisation (see :func:`normalise_uint8`). See the module docstring for the recipe.
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
        crops_dtype: str = "float32",
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
        self.crops_dtype = _check_crops_dtype(crops_dtype)
        self.blur_as_upstream_trained = bool(blur_as_upstream_trained)
        self.intended_blur_probabilities = tuple(float(p) for p in blur_probabilities)
        # What is actually applied: upstream's wrapper applies 1 - p (issue #286).
        self.blur_probabilities = tuple(
            (1.0 - p) if self.blur_as_upstream_trained else p for p in self.intended_blur_probabilities
        )
        self._offset, self._scale = normalisation_constants(mean, std)
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
        return _to_chw_tensor(image, self._offset, self._scale, self.crops_dtype)

    @property
    def min_source_pixels(self) -> int:
        """The fewest pixels a source image needs for every crop box of the smallest scale, at the most extreme
        aspect ratio, to be at least its output size on both sides (so it is resized down, never up).

        A box of area fraction ``s`` and aspect ``r`` in an image of ``A`` pixels has sides ``sqrt(s A r)`` and
        ``sqrt(s A / r)``; the shorter is ``sqrt(s A r')`` with ``r' = min(r_low, 1 / r_high)``, so a crop kind of
        output size ``S`` needs ``A >= S^2 / (s r')``. The maximum over the global, local and Gram crops is what a
        JPEG decoded at reduced size must keep (``MultiCropDataModule(jpeg_draft=True)``).
        """
        shortest_side_ratio = min(self.aspect_ratio[0], 1.0 / self.aspect_ratio[1])
        kinds = [(self.global_size, self.global_scale[0])]
        if self.num_local_crops:
            kinds.append((self.local_size, self.local_scale[0]))
        if self.gram_size is not None:
            kinds.append((self.gram_size, self.global_scale[0]))
        return max(math.ceil(size**2 / (scale * shortest_side_ratio)) for size, scale in kinds)

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
    to keep the whole image (square inputs). ``crops_dtype="uint8"``: the uint8 CHW crop, normalised later by
    :func:`normalise_uint8`.
    """

    def __init__(
        self,
        size: int = 224,
        resize_size: int | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        crops_dtype: str = "float32",
    ) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.size = int(size)
        self.resize_size = int(round(size * 256 / 224)) if resize_size is None else int(resize_size)
        if self.resize_size < self.size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= size ({self.size})")
        self.crops_dtype = _check_crops_dtype(crops_dtype)
        self._offset, self._scale = normalisation_constants(mean, std)

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
        return _to_chw_tensor(image, self._offset, self._scale, self.crops_dtype)
