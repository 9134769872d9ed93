"""ClassificationDataModule: labelled images for kNN and linear evaluation (synthetic shapes, Fashion-MNIST, folders).

Batches are ``{"images": float [B, 3, S, S], "labels": long [B], "indices": long [B], "num_bad_images": int}``;
``indices`` are positions in the split (used by the eval feature cache). With ``knn_mode=True`` the val and test
loaders come as ``[bank, queries]``: the train split with the eval transform, then the evaluation split. Under DDP
every val/test loader (bank included) is split over the ranks by ``ShardedEvalSampler``: each sample once, no padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dinov3_pl.data.samplers import ShardedEvalSampler
from dinov3_pl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

__all__ = ["ClassificationDataModule", "classification_collate", "eval_transform", "train_transform"]


def train_transform(
    image_size: int, scale: Sequence[float], mean: Sequence[float], std: Sequence[float]
) -> Callable[[np.ndarray], Tensor]:
    """Linear-probe training augmentation (upstream): bicubic random resized crop, horizontal flip, normalise.

    Returns a callable ``uint8 [H, W, 3] -> float [3, S, S]`` like ``EvalTransform``.
    """
    pipeline = A.Compose(
        [
            A.RandomResizedCrop(size=(image_size, image_size), scale=tuple(scale), interpolation=cv2.INTER_CUBIC),
            A.HorizontalFlip(p=0.5),
            A.Normalize(mean=mean, std=std),
        ]
    )

    def transform(image: np.ndarray) -> Tensor:
        augmented = pipeline(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(augmented.transpose(2, 0, 1)))

    return transform


def eval_transform(image_size: int, crop_ratio: float, mean: Sequence[float], std: Sequence[float]) -> EvalTransform:
    """Resize the short side to ``image_size / crop_ratio`` (bicubic), centre-crop ``image_size``, normalise.

    ``crop_ratio=0.875`` is upstream's 256 → 224; ``1.0`` resizes the whole (square) image to ``image_size``. The same
    transform as the SSL module's online kNN monitor (``dinov3_pl.data.transforms.EvalTransform``).
    """
    return EvalTransform(size=image_size, resize_size=round(image_size / crop_ratio), mean=tuple(mean), std=tuple(std))


class _Labelled(Dataset):
    """Applies an albumentations transform to a contract dataset and checks its labels."""

    def __init__(self, base: Dataset, transform: Callable, num_classes: int, name: str) -> None:
        self.base, self.transform, self.num_classes, self.name = base, transform, num_classes, name

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.base[index]
        if sample is None:  # unreadable file skipped by ImageFolder(on_bad_image="skip")
            return None
        label = int(sample["label"])
        if not 0 <= label < self.num_classes:
            raise ValueError(
                f"{self.name} sample {index} has label {label}, outside [0, {self.num_classes}) "
                f"(num_classes={self.num_classes}; -1 means unlabelled, which classification cannot use)"
            )
        return {"image": self.transform(sample["image"]), "label": label, "index": index}


def classification_collate(samples: Sequence[dict[str, Any] | None]) -> dict[str, Tensor | int]:
    """Stacks samples into a batch, dropping (and counting) ``None`` samples from unreadable files."""
    kept = [sample for sample in samples if sample is not None]
    batch: dict[str, Tensor | int] = {"num_bad_images": len(samples) - len(kept)}
    if not kept:
        batch.update(images=torch.empty(0), labels=torch.empty(0, dtype=torch.long), indices=torch.empty(0).long())
        return batch
    batch["images"] = torch.stack([sample["image"] for sample in kept]).float()
    batch["labels"] = torch.tensor([sample["label"] for sample in kept], dtype=torch.long)
    batch["indices"] = torch.tensor([sample["index"] for sample in kept], dtype=torch.long)
    return batch


class ClassificationDataModule(L.LightningDataModule):
    """Labelled train / val / test splits for linear probing and kNN.

    Args:
        dataset: ``"synthetic"`` (embedded ``SyntheticShapes``: train seed ``seed``, val ``seed + 1``, test
            ``seed + 2``), ``"fashion_mnist"`` (train split = train; val and test = the official test split) or
            ``"folder"`` (``root/train``, ``root/val`` and optionally ``root/test``, each with one sub-folder per
            class; test falls back to val).
        root: data folder (Fashion-MNIST idx files; the folder layout above). Fashion-MNIST defaults to the Debian
            package's copy when it is installed.
        image_size: side of the square network input.
        batch_size, num_workers: loader settings (``batch_size`` per process; also used by ``LinearProbe`` to
            scale learning rates).
        knn_mode: val/test loaders are ``[bank (train split, eval transform), queries]``.
        train_augmentation: random resized crop + flip on the train split; ``False`` uses the eval transform.
        crop_scale: scale range of the random resized crop (upstream linear: 0.08–1).
        eval_crop_ratio: eval centre-crop fraction (0.875 upstream; 1.0 for small whole images).
        synthetic_train_samples, synthetic_eval_samples, synthetic_image_size: the synthetic set's sizes.
        max_train_samples, max_eval_samples: fixed random subsets (seeded) to keep runs short.
        mean, std: normalisation.
        seed: seed of the synthetic data and of the subsets.
    """

    def __init__(
        self,
        dataset: Literal["synthetic", "fashion_mnist", "folder"] = "synthetic",
        root: str | None = None,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        knn_mode: bool = False,
        train_augmentation: bool = True,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        eval_crop_ratio: float = 0.875,
        synthetic_train_samples: int = 2048,
        synthetic_eval_samples: int = 512,
        synthetic_image_size: int = 64,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if dataset not in ("synthetic", "fashion_mnist", "folder"):
            raise ValueError(f"dataset must be 'synthetic', 'fashion_mnist' or 'folder', got {dataset!r}")
        if dataset == "folder" and root is None:
            raise ValueError("dataset='folder' needs root (a folder with train/ and val/ class sub-folders)")
        if not 0 < eval_crop_ratio <= 1:
            raise ValueError(f"eval_crop_ratio must be in (0, 1], got {eval_crop_ratio}")
        self.batch_size = batch_size
        self.num_classes: int | None = None
        self.class_names: tuple[str, ...] | None = None
        self._splits: dict[str, Dataset] = {}

    # ------------------------------------------------------------------------------------ datasets
    def _raw_splits(self) -> dict[str, Dataset]:
        """The contract datasets (``dinov3_pl.data.datasets``) for train / val / test, untransformed."""
        from dinov3_pl.data import datasets

        hp = self.hparams
        if hp.dataset == "synthetic":
            sizes = {"train": hp.synthetic_train_samples, "val": hp.synthetic_eval_samples}
            sizes["test"] = hp.synthetic_eval_samples
            offsets = {"train": 0, "val": 1, "test": 2}
            return {
                split: datasets.SyntheticShapes(sizes[split], hp.synthetic_image_size, seed=hp.seed + offsets[split])
                for split in sizes
            }
        if hp.dataset == "fashion_mnist":
            root = hp.root or datasets.default_fashion_mnist_root()
            if root is None:
                raise FileNotFoundError(
                    "dataset='fashion_mnist' needs root (the idx .gz files); none given and the Debian package "
                    "dataset-fashion-mnist is not installed"
                )
            test = datasets.FashionMNIST(root, train=False)
            return {"train": datasets.FashionMNIST(root, train=True), "val": test, "test": test}
        root = Path(hp.root)
        folders = {split: root / split for split in ("train", "val", "test")}
        for split in ("train", "val"):
            if not folders[split].is_dir():
                raise FileNotFoundError(f"dataset='folder' expects {folders[split]} with one sub-folder per class")
        splits = {split: datasets.ImageFolder(folders[split], with_labels=True) for split in ("train", "val")}
        has_test = folders["test"].is_dir()
        splits["test"] = datasets.ImageFolder(folders["test"], with_labels=True) if has_test else splits["val"]
        names = splits["train"].class_names
        for split in ("val", "test"):
            if splits[split].class_names != names:
                raise ValueError(
                    f"class sub-folders of {folders[split] if split == 'val' or has_test else folders['val']} "
                    f"{list(splits[split].class_names)} differ from train's {list(names)}; labels would not match"
                )
        return splits

    def _subset(self, dataset: Dataset, limit: int | None, offset: int) -> Dataset:
        if limit is None or limit >= len(dataset):
            return dataset
        generator = torch.Generator().manual_seed(self.hparams.seed + offset)
        chosen = torch.randperm(len(dataset), generator=generator)[:limit].sort().values.tolist()
        return torch.utils.data.Subset(dataset, chosen)

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        hp = self.hparams
        raw = self._raw_splits()
        train_set = raw["train"]
        self.num_classes = int(train_set.num_classes)
        self.class_names = tuple(getattr(train_set, "class_names", ())) or None
        limits = {"train": hp.max_train_samples, "val": hp.max_eval_samples, "test": hp.max_eval_samples}
        raw = {split: self._subset(data, limits[split], offset) for offset, (split, data) in enumerate(raw.items())}
        for split, data in raw.items():
            if len(data) == 0:
                raise ValueError(f"the {split} split of dataset={hp.dataset!r} (root={hp.root}) is empty")
        eval_tf = eval_transform(hp.image_size, hp.eval_crop_ratio, hp.mean, hp.std)
        train_tf = train_transform(hp.image_size, hp.crop_scale, hp.mean, hp.std) if hp.train_augmentation else eval_tf

        def wrap(split: str, transform: Callable) -> Dataset:
            return _Labelled(raw[split], transform, self.num_classes, f"{hp.dataset} {split}")

        self._splits = {
            "train": wrap("train", train_tf),
            "bank": wrap("train", eval_tf),
            "val": wrap("val", eval_tf),
            "test": wrap("test", eval_tf),
        }

    def split(self, name: str) -> Dataset:
        """The transformed dataset of a split: ``train``, ``bank`` (train, eval transform), ``val`` or ``test``."""
        if not self._splits:
            self.setup()
        return self._splits[name]

    # ------------------------------------------------------------------------------------ loaders
    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        dataset = self.split(name)
        # Evaluation loaders shard over DDP ranks without padding duplicates (Lightning keeps this sampler); the
        # train loader is left to Lightning's DistributedSampler, where padding only repeats a few training samples.
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            sampler=None if shuffle else ShardedEvalSampler(dataset),
            num_workers=self.hparams.num_workers,
            collate_fn=classification_collate,
            persistent_workers=self.hparams.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.hparams.knn_mode:
            return [self._loader("bank", shuffle=False), self._loader("val", shuffle=False)]
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.hparams.knn_mode:
            return [self._loader("bank", shuffle=False), self._loader("test", shuffle=False)]
        return self._loader("test", shuffle=False)
