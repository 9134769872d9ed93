"""ImageFolderPredictDataModule: every image below a folder, resized and centre-cropped, for feature extraction."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from dinov3_pl.data.datasets import ImageFolder
from dinov3_pl.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from dinov3_pl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

__all__ = ["ImageFolderPredictDataModule", "collate_predict"]


class _IndexedImages(Dataset):
    """ImageFolder samples turned into (index, normalised CHW tensor or None for an unreadable file, path)."""

    def __init__(self, folder: ImageFolder, transform: EvalTransform) -> None:
        self.folder = folder
        self.transform = transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        sample = self.folder[index]
        path = str(self.folder.paths[index])
        return index, None if sample is None else self.transform(sample["image"]), path


def collate_predict(items: list[tuple[int, torch.Tensor | None, str]]) -> dict[str, Any]:
    """Stacks readable images; unreadable ones are dropped and listed under ``"skipped_paths"``."""
    kept = [item for item in items if item[1] is not None]
    return {
        "images": torch.stack([image for _, image, _ in kept]) if kept else torch.empty(0, 3, 0, 0),
        "paths": [path for _, _, path in kept],
        "indices": torch.tensor([index for index, _, _ in kept], dtype=torch.long),
        "skipped_paths": [path for _, image, path in items if image is None],
    }


class ImageFolderPredictDataModule(L.LightningDataModule):
    """Prediction batches ``{"images": [B, 3, S, S], "paths": list[str], "indices": [B], "skipped_paths": list}``.

    Images are found recursively below ``root`` (any PIL-readable format, decoded by
    :func:`~dinov3_pl.data.decode.read_rgb`: 16-bit, EXIF orientation, alpha over white), resized bicubically so
    the shorter side is ``resize_size`` (default ``image_size * 256 / 224``), centre-cropped to ``image_size`` and
    normalised with ImageNet statistics. ``image_size`` must be a multiple of the backbone's ``patch_size``.

    Args:
        root: folder with the images.
        image_size: side of the square crop fed to the backbone.
        resize_size: shorter side before cropping; ``image_size`` keeps the whole (square) image.
        patch_size: the backbone's patch size, to check ``image_size`` against.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        on_bad_image: ``"skip"`` drops unreadable files (listed in the output), ``"raise"`` stops with an error.
        max_image_pixels: larger images count as unreadable (their message says so); ``None``: no limit.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 224,
        resize_size: int | None = None,
        patch_size: int = 16,
        batch_size: int = 64,
        num_workers: int = 4,
        on_bad_image: Literal["skip", "raise"] = "skip",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        super().__init__()
        if image_size <= 0 or image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} must be a positive multiple of the patch size {patch_size} "
                f"(e.g. {max(patch_size, round(image_size / patch_size) * patch_size)})"
            )
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.save_hyperparameters()
        self.transform = EvalTransform(size=image_size, resize_size=resize_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.dataset: _IndexedImages | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            folder = ImageFolder(
                self.hparams.root,
                with_labels=False,
                on_bad_image=self.hparams.on_bad_image,
                max_image_pixels=self.hparams.max_image_pixels,
            )
            self.dataset = _IndexedImages(folder, self.transform)

    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        return DataLoader(
            self.dataset,
            batch_size=self.hparams.batch_size,
            shuffle=False,
            num_workers=self.hparams.num_workers,
            collate_fn=collate_predict,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )
