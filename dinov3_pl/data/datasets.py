"""Datasets returning per-sample dicts (see notes/CONTRACTS.md "Samples").

Every dataset yields ``{"image": uint8 [H, W, 3], "label": int}`` (label ``-1`` when unknown) plus, where the data
has them, ``"mask"`` (uint8 [H, W], 0 = background, class c -> c + 1), ``"boxes"`` (float32 [K, 4] xyxy pixels),
``"box_labels"`` (int64 [K]) and ``"path"``.

- :class:`SyntheticShapes`: embedded, generated on the fly from ``(seed, index)``; the default demo data.
- :class:`FashionMNIST`: reads the original idx ``.gz`` files with numpy (Debian ``dataset-fashion-mnist`` or
  torchvision's ``FashionMNIST/raw`` layout).
- :class:`ImageFolder`: any PIL-readable images below a folder, decoded by :func:`dinov3_pl.data.decode.read_rgb`
  (16-bit, float, EXIF orientation, alpha, CMYK, palette, very large images); bad files are skipped (``None``) or
  raise.
"""

from __future__ import annotations

import gzip
import inspect
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset, Subset

from dinov3_pl.data.decode import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLargeError, read_rgb

__all__ = [
    "SyntheticShapes",
    "SHAPE_CLASS_NAMES",
    "SHAPE_PATTERN_NAMES",
    "FashionMNIST",
    "ImageFolder",
    "default_fashion_mnist_root",
    "describe_dataset",
    "prepare_datasets",
    "FASHION_MNIST_DEBIAN_ROOT",
]

Sample = dict[str, Any]


def describe_dataset(dataset: Dataset) -> str:
    """The dataset's class, and its folder when it has one, for error messages."""
    if isinstance(dataset, Subset):
        return f"a subset of {describe_dataset(dataset.dataset)}"
    # Static lookup: a dataset that reads its files lazily must not be made to read them for a message.
    root = inspect.getattr_static(dataset, "root", None)
    return f"{type(dataset).__name__} at {root}" if isinstance(root, str | Path) else type(dataset).__name__


def prepare_datasets(datasets: Iterable[Dataset | None]) -> None:
    """Runs ``prepare()`` (download or build files) of each dataset that has one, once per object.

    DataModules call it from ``prepare_data``, which Lightning runs on one process per node: files are written once,
    not by every DDP rank (see docs/datasets.md).
    """
    for dataset in {id(data): data for data in datasets if data is not None}.values():
        prepare = getattr(dataset, "prepare", None)
        if callable(prepare):
            prepare()


# --------------------------------------------------------------------------------------------------------------------
# SyntheticShapes
# --------------------------------------------------------------------------------------------------------------------

SHAPE_CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "star",
    "horizontal_bar",
    "diamond",
)


def _shape_inside(shape_index: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean membership of the unit-size shape ``shape_index`` at local coordinates (u right, v down).

    Every shape fits in the unit disc and fills a good part of it, so its size is set by one radius.
    Shapes are chosen so that a small rotation (<= 15 degrees) never turns one class into another
    (square vs diamond differ by 45 degrees, the bar stays horizontal).
    """
    if shape_index == 0:  # circle
        return u * u + v * v <= 1.0
    if shape_index == 1:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape_index == 2:  # equilateral triangle pointing up, circumradius 1 (inradius 0.5)
        edge_normals = ((0.0, 1.0), (-math.sqrt(3) / 2, -0.5), (math.sqrt(3) / 2, -0.5))
        inside = np.ones_like(u, dtype=bool)
        for nu, nv in edge_normals:
            inside &= u * nu + v * nv <= 0.5
        return inside
    if shape_index == 3:  # plus-shaped cross
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if shape_index == 4:  # ring
        rho2 = u * u + v * v
        return (rho2 <= 1.0) & (rho2 >= 0.55**2)
    if shape_index == 5:  # five-pointed star, tip pointing up
        rho = np.sqrt(u * u + v * v)
        sector = 2 * math.pi / 5
        phase = np.mod(np.arctan2(u, -v), sector) / sector  # 0 at a tip, 0.5 between tips
        tip_closeness = np.abs(2.0 * phase - 1.0)  # 1 at tips, 0 in the valleys
        return rho <= 0.38 + 0.62 * tip_closeness
    if shape_index == 6:  # horizontal bar
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.28)
    if shape_index == 7:  # diamond
        return np.abs(u) + np.abs(v) <= 1.0
    raise ValueError(f"unknown shape index {shape_index}")


# Surface pattern of each class (indexed like SHAPE_CLASS_NAMES). Every pattern covers about half of the shape, so
# mean brightness does not give the class away, and each one stays distinct under a horizontal flip (the SSL
# augmentation), which is why there are no diagonal stripes (a flip turns / into \).
SHAPE_PATTERN_NAMES: tuple[str, ...] = (
    "rings",
    "checkerboard",
    "horizontal_stripes",
    "dots",
    "spokes",
    "diagonal_checkerboard",
    "vertical_stripes",
    "chevrons",
)
_PATTERN_PERIOD = 0.4  # in units of the shape's radius: 2.5 periods across the radius


def _surface_pattern(shape_index: int, u: np.ndarray, v: np.ndarray, phase: float) -> np.ndarray:
    """Boolean two-tone pattern of class ``shape_index`` at local shape coordinates; ``phase`` shifts it."""
    frequency = 2 * math.pi / _PATTERN_PERIOD
    if shape_index == 0:
        return np.sin(frequency * np.sqrt(u * u + v * v) + phase) > 0
    if shape_index == 1:
        return (np.sin(frequency * u + phase) > 0) ^ (np.sin(frequency * v) > 0)
    if shape_index == 2:
        return np.sin(frequency * v + phase) > 0
    if shape_index == 3:
        return np.cos(frequency * u + phase) + np.cos(frequency * v) > 0
    if shape_index == 4:
        return np.sin(6 * np.arctan2(v, u) + phase) > 0
    if shape_index == 5:
        diagonal = frequency / math.sqrt(2)
        return (np.sin(diagonal * (u + v) + phase) > 0) ^ (np.sin(diagonal * (u - v)) > 0)
    if shape_index == 6:
        return np.sin(frequency * u + phase) > 0
    if shape_index == 7:
        return np.sin(frequency * (v + np.abs(u)) + phase) > 0
    raise ValueError(f"unknown shape index {shape_index}")


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 weights, as PIL's convert("L")


class SyntheticShapes(Dataset):
    """Embedded toy dataset of patterned shapes on noisy, textured backgrounds (grey by default); no files needed.

    Each image holds 1-3 shapes; the label is the class of the largest one (drawn last, on top, fully inside the
    image). A class is an outline *and* a two-tone surface pattern (``SHAPE_PATTERN_NAMES``); colours, position,
    size, pattern phase, a small rotation and aspect jitter are random, so colour says nothing about the class.
    The pattern is there because outline alone is too slow to learn for a demo: a tiny ViT trained *supervised*
    on outline-only shapes stayed at chance for 600 steps, and with the patterns it reached 57% in 300 (measured).
    Images are grey levels (3 equal channels) unless ``grayscale=False``: random colours are the easiest instance
    cue for self-supervised learning: a few-minute DINO run on the coloured images clustered them by colour (kNN
    on the classes 16-19%, chance 12.5%), on grey images the demo (``configs/pretrain/demo_cpu.yaml``) reaches 39.5%.
    Sample ``i`` depends only on ``(seed, i)``.

    Returns ``image`` uint8 [S, S, 3], ``label``, ``mask`` uint8 [S, S] (0 = background, class c -> c + 1, the
    visible pixels of each shape), ``boxes`` float32 [K, 4] (xyxy, tight box of each shape's visible pixels,
    x2/y2 exclusive) and ``box_labels`` int64 [K]. Fully occluded distractors have no box.
    """

    class_names: tuple[str, ...] = SHAPE_CLASS_NAMES
    num_classes: int = len(SHAPE_CLASS_NAMES)

    def __init__(self, num_samples: int = 2048, image_size: int = 64, seed: int = 0, grayscale: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
        self.num_samples = int(num_samples)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.grayscale = bool(grayscale)
        # Pixel-centre coordinates, shared by every sample.
        coords = np.arange(self.image_size, dtype=np.float32) + 0.5
        self._ys, self._xs = np.meshgrid(coords, coords, indexing="ij")

    def __len__(self) -> int:
        return self.num_samples

    @property
    def labels(self) -> np.ndarray:
        """Class of every sample (the main shape cycles through the classes, so classes are balanced)."""
        return np.arange(self.num_samples, dtype=np.int64) % self.num_classes

    def _background(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Smooth colour gradient + oriented colour stripes; returns the float image [S, S, 3] and its mean colour."""
        size = self.image_size
        base = rng.uniform(30, 225, size=3).astype(np.float32)
        gradient_direction = rng.uniform(0, 2 * math.pi)
        gradient = (math.cos(gradient_direction) * self._xs + math.sin(gradient_direction) * self._ys) / size - 0.5
        stripe_direction = rng.uniform(0, math.pi)
        stripe_frequency = 2 * math.pi / (rng.uniform(0.08, 0.3) * size)
        stripes = np.sin(
            (math.cos(stripe_direction) * stripe_frequency) * self._xs
            + (math.sin(stripe_direction) * stripe_frequency) * self._ys
        )
        # One small matrix product mixes the three fields with their colours (faster than broadcasting).
        fields = np.stack([np.ones_like(gradient), gradient, stripes]).reshape(3, -1)
        colours = np.stack([base, rng.uniform(-50, 50, size=3), rng.uniform(-25, 25, size=3)]).astype(np.float32)
        return (fields.T @ colours).reshape(size, size, 3), base

    def _shape_colour(self, rng: np.random.Generator, background_colour: np.ndarray) -> np.ndarray:
        """A random colour far enough from the background's mean colour to stay visible (in grey levels when the
        images are grey)."""
        candidates = rng.uniform(0, 255, size=(16, 3)).astype(np.float32)
        if self.grayscale:
            distance = np.abs((candidates - background_colour) @ _LUMA)
            far_enough = distance > 60.0
        else:
            distance = np.sqrt(((candidates - background_colour) ** 2).sum(axis=1))
            far_enough = distance > 110.0
        return candidates[int(np.argmax(far_enough))] if far_enough.any() else candidates[distance.argmax()]

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for SyntheticShapes of length {self.num_samples}")
        rng = np.random.default_rng((self.seed, int(index)))
        size = self.image_size
        image, background_colour = self._background(rng)
        instance_map = np.full((size, size), -1, dtype=np.int16)

        main_class = int(index % self.num_classes)
        num_distractors = int(rng.integers(0, 3))
        classes = [int(c) for c in rng.integers(0, self.num_classes, size=num_distractors)] + [main_class]
        # Distractors are clearly smaller than the main shape, so the label is the largest shape.
        radii = [rng.uniform(0.09, 0.16) * size for _ in range(num_distractors)] + [rng.uniform(0.24, 0.36) * size]

        for instance, (shape_class, radius) in enumerate(zip(classes, radii, strict=True)):
            is_main = instance == len(classes) - 1
            margin = radius if is_main else 0.0  # the main shape stays fully inside the image
            centre_x, centre_y = rng.uniform(margin, size - margin, size=2)
            angle = rng.uniform(-math.pi / 12, math.pi / 12)
            stretch = rng.uniform(0.85, 1.15)
            # Only the window around the shape is evaluated: the shape lies in the unit disc of (u, v), which is
            # at most radius * 1.18 pixels from the centre after the aspect stretch.
            half = radius * 1.2 + 1
            top, bottom = max(int(centre_y - half), 0), min(int(centre_y + half) + 1, size)
            left, right = max(int(centre_x - half), 0), min(int(centre_x + half) + 1, size)
            dx = (self._xs[top:bottom, left:right] - centre_x) / radius
            dy = (self._ys[top:bottom, left:right] - centre_y) / radius
            cos_a, sin_a = math.cos(angle), math.sin(angle)
            u = (cos_a * dx + sin_a * dy) * stretch
            v = (-sin_a * dx + cos_a * dy) / stretch
            inside = _shape_inside(shape_class, u, v)
            colour = self._shape_colour(rng, background_colour)
            light = _surface_pattern(shape_class, u[inside], v[inside], phase=rng.uniform(0, 2 * math.pi))
            # Two tones of the shape's colour, with slight shading across the shape.
            tone = np.where(light, 1.0, 0.35) * (1.0 + 0.15 * u[inside])
            image[top:bottom, left:right][inside] = colour * tone[:, None]
            instance_map[top:bottom, left:right][inside] = instance

        # Luminance noise, one value per pixel for all three channels (cheaper than per-channel noise).
        image += rng.standard_normal((size, size, 1), dtype=np.float32) * 10.0
        if self.grayscale:
            image = np.repeat(image @ _LUMA, 3).reshape(size, size, 3)
        image = np.clip(image, 0, 255).astype(np.uint8)

        mask = np.zeros((size, size), dtype=np.uint8)
        boxes, box_labels = [], []
        for instance, shape_class in enumerate(classes):
            visible = instance_map == instance
            if not visible.any():
                continue
            mask[visible] = shape_class + 1
            rows = np.flatnonzero(visible.any(axis=1))
            cols = np.flatnonzero(visible.any(axis=0))
            boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
            box_labels.append(shape_class)
        return {
            "image": image,
            "label": main_class,
            "mask": mask,
            "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "box_labels": np.asarray(box_labels, dtype=np.int64),
        }


# --------------------------------------------------------------------------------------------------------------------
# FashionMNIST
# --------------------------------------------------------------------------------------------------------------------

FASHION_MNIST_DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE_MAGIC = {1: 0x00000801, 3: 0x00000803}


def default_fashion_mnist_root() -> str | None:
    """The Debian ``dataset-fashion-mnist`` folder if its files are installed, else ``None``."""
    root = FASHION_MNIST_DEBIAN_ROOT
    names = [name for pair in _FASHION_MNIST_FILES.values() for name in pair]
    return str(root) if all((root / f"{name}.gz").is_file() for name in names) else None


def read_idx_ubyte(path: str | Path, expected_ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes (gzipped or not) into a numpy array, checking magic number and size."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path}: corrupt gzip data ({error})") from error
    header_bytes = 4 + 4 * expected_ndim
    if len(raw) < header_bytes:
        raise ValueError(f"{path}: file too short for an idx header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_UBYTE_MAGIC[expected_ndim]:
        raise ValueError(
            f"{path}: bad idx magic number 0x{magic:08x}, expected 0x{_IDX_UBYTE_MAGIC[expected_ndim]:08x} "
            f"(unsigned bytes, {expected_ndim} dimension(s))"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=expected_ndim, offset=4))
    expected_bytes = int(np.prod(shape))
    if len(raw) - header_bytes != expected_bytes:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected_bytes} bytes) but the file holds "
            f"{len(raw) - header_bytes} data bytes (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(shape)


def _find_fashion_mnist_file(root: Path, name: str) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw"):
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    return None


class FashionMNIST(Dataset):
    """Fashion-MNIST read from the original idx files in ``root`` (or ``root/FashionMNIST/raw``).

    ``root=None`` reads the Debian package's copy (``apt-get install dataset-fashion-mnist``). ``download=True``
    fetches the files with torchvision into ``root`` first. ``train`` picks the 60k train or the 10k test split.
    Images are 28x28 grayscale, returned replicated to 3 channels. Attributes ``images`` (uint8 [N, 28, 28]),
    ``labels`` (int64 [N]).
    """

    class_names: tuple[str, ...] = FASHION_MNIST_CLASS_NAMES
    num_classes: int = 10

    def __init__(self, root: str | Path | None = None, train: bool = True, download: bool = False) -> None:
        if root is None:
            if download:
                raise ValueError("FashionMNIST(download=True) needs root=<folder to download into>")
            root = default_fashion_mnist_root()
            if root is None:
                raise FileNotFoundError(
                    "Fashion-MNIST not found: pass root=<folder with the idx .gz files>, install the Debian package "
                    "(`apt-get install dataset-fashion-mnist`) or pass root and download=True to fetch it with "
                    "torchvision"
                )
        self.root = Path(root)
        self.train = bool(train)
        image_name, label_name = _FASHION_MNIST_FILES[self.train]
        if download and (
            _find_fashion_mnist_file(self.root, image_name) is None
            or _find_fashion_mnist_file(self.root, label_name) is None
        ):
            import torchvision

            torchvision.datasets.FashionMNIST(str(self.root), train=self.train, download=True)
        image_path = _find_fashion_mnist_file(self.root, image_name)
        label_path = _find_fashion_mnist_file(self.root, label_name)
        if image_path is None or label_path is None:
            debian = default_fashion_mnist_root()
            hint = f" The Debian package's copy is at {debian}." if debian else ""
            raise FileNotFoundError(
                f"Fashion-MNIST {'train' if self.train else 'test'} files not found in {self.root} or "
                f"{self.root / 'FashionMNIST' / 'raw'}: expected {image_name}.gz and {label_name}.gz. "
                f"Install them with `apt-get install dataset-fashion-mnist` (files in {FASHION_MNIST_DEBIAN_ROOT}) "
                f"or pass download=True to fetch them with torchvision.{hint}"
            )
        self.images = read_idx_ubyte(image_path, expected_ndim=3)
        self.labels = read_idx_ubyte(label_path, expected_ndim=1).astype(np.int64)
        if self.images.shape[1:] != (28, 28):
            raise ValueError(f"{image_path}: expected 28x28 images, got {self.images.shape[1:]}")
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"Fashion-MNIST image/label count mismatch: {image_path} has {len(self.images)} images, "
                f"{label_path} has {len(self.labels)} labels"
            )
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ValueError(f"{label_path}: labels outside 0..{self.num_classes - 1}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        image = np.repeat(self.images[index][:, :, None], 3, axis=2)
        return {"image": image, "label": int(self.labels[index])}


# --------------------------------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------------------------------


def _image_extensions() -> set[str]:
    from PIL import Image

    return {extension.lower() for extension in Image.registered_extensions()}


class ImageFolder(Dataset):
    """All images below ``root`` (recursive, any PIL-readable format), decoded to uint8 RGB by
    :func:`~dinov3_pl.data.decode.read_rgb` (16-bit scaled, EXIF orientation applied, alpha composited over white).

    With ``with_labels=True`` the label is the index of the image's top-level sub-folder in sorted order
    (``class_names`` lists them). A corrupt, truncated or empty file, or one with more than ``max_image_pixels``
    pixels (``None``: no limit), gives ``None`` with ``on_bad_image="skip"`` (the multi-crop collate drops and
    counts it; a warning names the file and the reason) or raises an error naming the file with ``"raise"``.

    ``draft_min_pixels`` (``None``: full size), set on a copy by ``MultiCropDataModule(jpeg_draft=True)``: JPEGs are
    decoded at the largest 1/2, 1/4, 1/8 reduction keeping that many pixels (see :func:`read_rgb`).
    """

    draft_min_pixels: int | None = None

    def __init__(
        self,
        root: str | Path,
        with_labels: bool = False,
        on_bad_image: Literal["skip", "raise"] = "skip",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if on_bad_image not in ("skip", "raise"):
            raise ValueError(f"on_bad_image must be 'skip' or 'raise', got {on_bad_image!r}")
        if max_image_pixels is not None and (
            isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int | float) or max_image_pixels <= 0
        ):
            raise ValueError(f"max_image_pixels must be a positive number of pixels or None, got {max_image_pixels!r}")
        self.max_image_pixels = None if max_image_pixels is None else int(max_image_pixels)
        self.root = Path(root)
        self.with_labels = bool(with_labels)
        self.on_bad_image = on_bad_image
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        extensions = _image_extensions()
        paths = []
        for directory, subdirectories, files in os.walk(self.root, followlinks=True):
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            for file_name in sorted(files):
                if not file_name.startswith(".") and os.path.splitext(file_name)[1].lower() in extensions:
                    paths.append(Path(directory) / file_name)
        if not paths:
            raise ValueError(
                f"image folder {self.root} contains no image files (searched recursively for extensions such as "
                ".jpg, .jpeg, .png, .webp, .bmp, .tif)"
            )
        self.paths: list[Path] = paths
        self.class_names: tuple[str, ...] = ()
        self.labels = np.full(len(paths), -1, dtype=np.int64)
        if self.with_labels:
            relative_parts = [path.relative_to(self.root).parts for path in paths]
            loose = [str(p) for p, parts in zip(paths, relative_parts, strict=True) if len(parts) < 2]
            if loose:
                raise ValueError(
                    f"with_labels=True needs every image in a class sub-folder of {self.root}, but "
                    f"{len(loose)} image(s) are at the top level, e.g. {loose[0]}"
                )
            self.class_names = tuple(sorted({parts[0] for parts in relative_parts}))
            class_index = {name: i for i, name in enumerate(self.class_names)}
            self.labels = np.asarray([class_index[parts[0]] for parts in relative_parts], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample | None:
        path = self.paths[index]
        try:
            image = read_rgb(path, max_image_pixels=self.max_image_pixels, draft_min_pixels=self.draft_min_pixels)
        except ImageTooLargeError as error:
            if self.on_bad_image == "raise":
                raise
            warnings.warn(f"skipping image file {error}", RuntimeWarning, stacklevel=2)
            return None
        except (OSError, ValueError, SyntaxError) as error:
            if self.on_bad_image == "raise":
                raise ValueError(f"cannot decode image file {path}: {error}") from error
            # Once per file and process (the warnings registry de-duplicates identical messages).
            warnings.warn(f"skipping undecodable image file {path}: {error}", RuntimeWarning, stacklevel=2)
            return None
        return {"image": image, "label": int(self.labels[index]), "path": str(path)}
