"""Videos with per-frame object masks for label propagation (DAVIS 2017 semi-supervised video object segmentation).

A video dataset's item is one whole video, ``{"frames": uint8 [T, H, W, 3], "masks": uint8 [T, H, W], "name": str}``
(``frames`` may also be a list of PIL images or arrays): object ids per pixel, 0 = background, 255 = void (scored as
background, as DAVIS does). The first frame's mask is the one given to the propagation; the others are its answers.

- :class:`DAVIS2017`: the DAVIS 2017 download as it unpacks (``DAVIS/JPEGImages/480p/<video>/00000.jpg``,
  ``DAVIS/Annotations/480p/<video>/00000.png`` palette PNGs whose index is the object id,
  ``DAVIS/ImageSets/2017/{train,val}.txt``).
- :class:`SyntheticVideos`: embedded, generated from (seed, index): textured shapes moving over a textured
  background, later shapes occluding earlier ones; no files needed (the demo's and the tests' data).
- :class:`VideoDataModule`: evaluation loaders of one video per batch, frames resized as DINO's DAVIS evaluation
  does (short side to ``short_side``, the long side scaled and floored to a multiple of ``size_multiple``), masks kept
  at their stored size (scores are computed there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dinov3_pl.data.datasets import prepare_datasets
from dinov3_pl.data.decode import image_to_rgb, read_rgb
from dinov3_pl.data.samplers import ShardedEvalSampler

__all__ = ["DAVIS2017", "SyntheticVideos", "VideoDataModule", "resized_frame_size", "video_collate"]

DAVIS_VOID = 255
_DAVIS_WEB = "https://davischallenge.org/davis2017/code.html"


# ------------------------------------------------------------------------------------------------ DAVIS 2017
def _davis_root(root: Path) -> Path:
    """The folder holding ``JPEGImages/``, ``Annotations/`` and ``ImageSets/``: ``root`` or its ``DAVIS/``."""
    for candidate in (root, root / "DAVIS"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(
        f"DAVIS root {root} has no JPEGImages/ (nor DAVIS/JPEGImages/): pass the DAVIS folder of "
        f"DAVIS-2017-trainval-480p.zip ({_DAVIS_WEB}) or the folder holding it"
    )


class DAVIS2017(Dataset):
    """DAVIS 2017 semi-supervised video object segmentation, one item per video.

    Args:
        root: the ``DAVIS`` folder (``JPEGImages/``, ``Annotations/``, ``ImageSets/``) or the folder holding it.
        split: the video list ``ImageSets/2017/<split>.txt`` (``val``: 30 videos, the benchmark; ``train``: 60).
        resolution: ``480p`` (the benchmark) or ``Full-Resolution``.

    Every listed video must have its frames and one annotation per frame (train and val have them; the test sets'
    single first-frame annotations cannot be scored). Items: ``{"frames": uint8 [T, H, W, 3], "masks": uint8
    [T, H, W], "name": str, "path": str}``; frames are read in file-name order. Objects are the ids 1..K of the first
    frame's annotation.
    """

    def __init__(self, root: str | Path, split: str = "val", resolution: str = "480p") -> None:
        self.root = _davis_root(Path(root))
        listing = self.root / "ImageSets" / "2017" / f"{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(
                f"DAVIS video list {listing} not found: split {split!r} needs ImageSets/2017/{split}.txt "
                f"(in DAVIS-2017-trainval-480p.zip: train or val)"
            )
        self.names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not self.names:
            raise ValueError(f"DAVIS video list {listing} is empty")
        self.split = split
        image_root = self.root / "JPEGImages" / resolution
        mask_root = self.root / "Annotations" / resolution
        self.videos: list[tuple[list[Path], list[Path]]] = []
        for name in self.names:
            frames = sorted((image_root / name).glob("*.jpg"))
            if not frames:
                raise FileNotFoundError(
                    f"DAVIS video {name!r} (in {listing.name}) has no frames {image_root / name}/*.jpg"
                )
            masks = sorted((mask_root / name).glob("*.png"))
            if [p.stem for p in masks] != [p.stem for p in frames]:
                got = f"{len(masks)} annotations" if masks else "none"
                raise FileNotFoundError(
                    f"DAVIS video {name!r} has {len(frames)} frames but {got} in {mask_root / name}/; every frame "
                    f"needs <frame>.png to be scored (a test set with first-frame annotations only cannot be)"
                )
            self.videos.append((frames, masks))

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict[str, Any]:
        frame_paths, mask_paths = self.videos[index]
        frames = np.stack([read_rgb(path, apply_exif_orientation=False) for path in frame_paths])
        masks = np.stack([_read_object_ids(path, frames.shape[1:3]) for path in mask_paths])
        return {"frames": frames, "masks": masks, "name": self.names[index], "path": str(frame_paths[0].parent)}


def _read_object_ids(path: Path, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as annotation:
        if annotation.mode not in ("P", "L"):
            raise ValueError(f"annotation {path} has mode {annotation.mode}; DAVIS annotations are palette PNGs")
        ids = np.asarray(annotation, dtype=np.uint8)
    if ids.shape != tuple(size):
        raise ValueError(f"annotation {path} is {ids.shape[1]}x{ids.shape[0]} but its frame is {size[1]}x{size[0]}")
    return ids


# ------------------------------------------------------------------------------------------------ synthetic
def _smooth_noise(rng: np.random.Generator, size: int, cells: int, scale: float) -> np.ndarray:
    coarse = rng.normal(0, scale, size=(cells, cells, 3)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _shape_mask(kind: int, size: int, centre: np.ndarray, radius: float) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cx, cy = (int(round(v)) for v in centre)
    r = int(round(radius))
    if kind == 0:
        cv2.rectangle(mask, (cx - r, cy - r), (cx + r, cy + r), 1, thickness=-1)
    elif kind == 1:
        cv2.ellipse(mask, (cx, cy), (r, max(r * 2 // 3, 2)), 0, 0, 360, 1, thickness=-1)
    else:
        triangle = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
        cv2.fillPoly(mask, [triangle], 1)
    return mask.astype(bool)


class SyntheticVideos(Dataset):
    """Embedded videos: 1-3 textured shapes (square, ellipse, triangle) moving in straight lines over a textured
    background, generated from ``(seed, index)``; later shapes occlude earlier ones, and every shape keeps at least
    a quarter of its area visible in every frame, so each object can be followed.

    Items follow the video sample contract: ``frames`` uint8 ``[num_frames, image_size, image_size, 3]``, ``masks``
    (object ids 1..K, 0 background), ``name`` ``synthetic_<index>``.
    """

    def __init__(
        self, num_videos: int = 8, num_frames: int = 8, image_size: int = 96, max_objects: int = 3, seed: int = 0
    ) -> None:
        if num_frames < 3:
            raise ValueError(
                f"num_frames must be >= 3 (DAVIS scores the frames between the first and last), got {num_frames}"
            )
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32 for shapes that move visibly, got {image_size}")
        self.num_videos, self.num_frames, self.image_size = num_videos, num_frames, image_size
        self.max_objects, self.seed = max_objects, seed

    def __len__(self) -> int:
        return self.num_videos

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_videos:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        size, frames_count = self.image_size, self.num_frames
        background = 110 + _smooth_noise(rng, size, 5, 40)
        count = int(rng.integers(1, self.max_objects + 1))
        for _ in range(100):  # redraw the paths until every object stays visible
            objects = []
            for _ in range(count):
                radius = rng.uniform(0.12, 0.2) * size
                start, end = rng.uniform(radius, size - radius, size=(2, 2))
                colour = rng.uniform(20, 235, size=3)
                stripes = rng.uniform(0.15, 0.6), rng.uniform(0, math.pi)  # texture frequency and angle
                objects.append((int(rng.integers(3)), radius, start, end, colour, stripes))
            masks = np.zeros((frames_count, size, size), np.uint8)
            areas = np.zeros((frames_count, count))
            for t in range(frames_count):
                progress = t / (frames_count - 1)
                for k, (kind, radius, start, end, *_) in enumerate(objects):
                    shape = _shape_mask(kind, size, start + progress * (end - start), radius)
                    masks[t][shape] = k + 1
                    areas[t, k] = shape.sum()
            visible = np.stack([(masks == k + 1).sum(axis=(1, 2)) for k in range(count)], axis=1)
            if (visible >= 0.25 * areas).all():
                break
        rows, cols = np.mgrid[:size, :size].astype(np.float32)
        frames = np.empty((frames_count, size, size, 3), np.uint8)
        for t in range(frames_count):
            image = background + rng.normal(0, 4, size=(size, size, 3))
            progress = t / (frames_count - 1)
            for k, (_, _, start, end, colour, (frequency, angle)) in enumerate(objects):
                # The texture moves with its object, so patches of it match across frames.
                x0, y0 = start + progress * (end - start)
                phase = (cols - x0) * math.cos(angle) + (rows - y0) * math.sin(angle)
                texture = colour[None, None, :] * (0.75 + 0.25 * np.sin(frequency * phase))[..., None]
                inside = masks[t] == k + 1
                image[inside] = texture[inside]
            frames[t] = np.clip(image, 0, 255).astype(np.uint8)
        return {"frames": frames, "masks": masks, "name": f"synthetic_{index:03d}"}


# ------------------------------------------------------------------------------------------------ loading
def resized_frame_size(height: int, width: int, short_side: int | None, size_multiple: int) -> tuple[int, int]:
    """(height, width) of a frame in DINO's DAVIS evaluation: the short side becomes ``short_side``, the long side
    keeps the aspect ratio and is floored to a multiple of ``size_multiple`` (480p DAVIS 854x480 -> 832x480).
    ``short_side`` None keeps the frame size."""
    if short_side is None:
        return height, width
    if height > width:
        return max(int(short_side * height / width) // size_multiple * size_multiple, size_multiple), short_side
    return short_side, max(int(short_side * width / height) // size_multiple * size_multiple, size_multiple)


class _ResizedVideos(Dataset):
    """Checks a video dataset's items against the contract and resizes their frames (not their masks)."""

    def __init__(self, dataset: Dataset, short_side: int | None, size_multiple: int, name: str) -> None:
        if len(dataset) == 0:
            raise ValueError(f"the {name} is empty")
        self.dataset, self.short_side, self.size_multiple, self.name = dataset, short_side, size_multiple, name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        if not isinstance(sample, dict) or "frames" not in sample or "masks" not in sample:
            got = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
            raise ValueError(
                f"{self.name} item {index}: a video needs 'frames' (uint8 [T, H, W, 3]) and 'masks' (object ids "
                f"[T, H, W]); got {got}"
            )
        name = str(sample.get("name", f"video_{index}"))
        frames = sample["frames"]
        if not isinstance(frames, np.ndarray):
            frames = np.stack([image_to_rgb(f) if isinstance(f, Image.Image) else np.asarray(f) for f in frames])
        masks = np.asarray(sample["masks"])
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(
                f"{self.name} video {name}: 'frames' must be uint8 [T, H, W, 3], got "
                f"{frames.dtype} {list(frames.shape)}"
            )
        if masks.shape != frames.shape[:3]:
            raise ValueError(
                f"{self.name} video {name}: masks {list(masks.shape)} do not match frames {list(frames.shape[:3])}"
            )
        if len(frames) < 3:
            raise ValueError(
                f"{self.name} video {name} has {len(frames)} frames; DAVIS scores the frames between the first and "
                "the last, so a video needs at least 3"
            )
        if masks.min() < 0 or masks.max() > DAVIS_VOID:
            raise ValueError(
                f"{self.name} video {name}: object ids must lie in 0..255, got {masks.min()}..{masks.max()}"
            )
        height, width = resized_frame_size(*frames.shape[1:3], self.short_side, self.size_multiple)
        if (height, width) != frames.shape[1:3]:
            # cv2's bilinear resize of the uint8 frames, as DINO's DAVIS evaluation reads them.
            frames = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in frames])
        return {
            "frames": torch.from_numpy(np.ascontiguousarray(frames)),
            "masks": torch.from_numpy(masks.astype(np.uint8)),
            "name": name,
            "index": index,
        }


def video_collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One video per batch: the item itself (``frames`` uint8 ``[T, H, W, 3]``, ``masks`` uint8 ``[T, H0, W0]``,
    ``name``, ``index``)."""
    if len(samples) != 1:
        raise ValueError(f"video batches hold one video each, got {len(samples)}")
    return samples[0]


# Datasets stay out of the hyper-parameters (checkpoints); the CLI's config.yaml records those given by class_path.
_NOT_HYPERPARAMETERS = ["val", "test"]


class VideoDataModule(pl.LightningDataModule):
    """Evaluation data of whole videos for label propagation (``VideoLabelPropagation``): ``val`` and optional
    ``test`` (None: ``val``) video datasets (YAML: ``class_path``), e.g. :class:`DAVIS2017`; none of them: the
    embedded :class:`SyntheticVideos` (8 videos of 8 frames, 96 px).

    Args:
        val, test: the video datasets.
        short_side: frames are resized so their short side is this (DINO's DAVIS evaluation: 480); None keeps them.
        size_multiple: the long side is floored to a multiple of this (DINO: 64); it and ``short_side`` must suit the
            backbone's patch size, which the model checks.
        num_workers: DataLoader workers (each holds one decoded video).

    Under DDP each process takes whole videos (``ShardedEvalSampler``: every video once, no padding repeats).
    """

    def __init__(
        self,
        val: Dataset | None = None,
        test: Dataset | None = None,
        short_side: int | None = 480,
        size_multiple: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=_NOT_HYPERPARAMETERS)
        if short_side is not None and short_side < 1:
            raise ValueError(f"short_side must be a positive number of pixels or None, got {short_side}")
        if size_multiple < 1:
            raise ValueError(f"size_multiple must be >= 1, got {size_multiple}")
        if val is None and test is not None:
            raise ValueError("VideoDataModule: test is given without val; give val (test falls back to it)")
        if val is None:
            val = SyntheticVideos()
        self.datasets: dict[str, Dataset] = {"val": val, "test": val if test is None else test}
        self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        prepare_datasets(self.datasets.values())

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        hp = self.hparams
        wrap = lambda split: _ResizedVideos(
            self.datasets[split],
            hp.short_side,
            hp.size_multiple,
            f"{split} dataset {type(self.datasets[split]).__name__}",
        )
        self.val_set = wrap("val")
        self.test_set = self.val_set if self.datasets["test"] is self.datasets["val"] else wrap("test")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=1,
            sampler=ShardedEvalSampler(dataset),
            num_workers=self.hparams.num_workers,
            collate_fn=video_collate,
            persistent_workers=self.hparams.num_workers > 0,
        )
