"""ClassificationDataModule: labelled images for kNN and linear evaluation, from datasets given by class_path.

Batches are ``{"images": float [B, 3, S, S], "labels": long [B], "indices": long [B], "num_bad_images": int}``;
``indices`` are positions in the split (used by the eval feature cache). With ``knn_mode=True`` the val and test
loaders come as ``[bank, queries]``: the train split with the eval transform, then the evaluation split. Under DDP
every val/test loader (bank included) is split over the ranks by ``ShardedEvalSampler``: each sample once, no padding.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dinov3_pl.data.datasets import SyntheticShapes, describe_dataset, prepare_datasets
from dinov3_pl.data.decode import image_to_rgb
from dinov3_pl.data.samplers import ShardedEvalSampler
from dinov3_pl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, ProcessSeeded

__all__ = ["ClassificationDataModule", "classification_collate", "eval_transform", "train_transform"]


def train_transform(
    image_size: int, scale: Sequence[float], mean: Sequence[float], std: Sequence[float]
) -> Callable[[np.ndarray], Tensor]:
    """Linear-probe training augmentation (upstream): bicubic random resized crop, horizontal flip, normalise.

    Returns a callable ``uint8 [H, W, 3] -> float [3, S, S]`` like ``EvalTransform``.
    """
    pipeline = ProcessSeeded(
        A.Compose(
            [
                A.RandomResizedCrop(size=(image_size, image_size), scale=tuple(scale), interpolation=cv2.INTER_CUBIC),
                A.HorizontalFlip(p=0.5),
                A.Normalize(mean=mean, std=std),
            ]
        )
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
    """Applies an albumentations transform to a contract dataset and checks its samples.

    The one place where a sample's PIL image becomes the contract's uint8 [H, W, 3] array, so user datasets may
    return either.
    """

    def __init__(self, base: Dataset, transform: Callable, num_classes: int, name: str) -> None:
        self.base, self.transform, self.num_classes, self.name = base, transform, num_classes, name

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.base[index]
        if sample is None:  # unreadable file skipped by ImageFolder(on_bad_image="skip")
            return None
        if not isinstance(sample, Mapping) or "image" not in sample or "label" not in sample:
            got = f"a dict with keys {sorted(sample)}" if isinstance(sample, Mapping) else type(sample).__name__
            raise TypeError(
                f"{self.name} sample {index} is {got}; samples must be dicts with 'image' (PIL image or uint8 "
                "[H, W, 3]) and 'label' (int class id)"
            )
        image = sample["image"]
        if isinstance(image, Image.Image):
            image = image_to_rgb(image)  # as files are decoded: 16 bit scaled, alpha over white
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            got = f"{image.dtype} array {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise TypeError(f"{self.name} sample {index} has a {got} image; expected a PIL image or uint8 [H, W, 3]")
        label = int(sample["label"])
        if not 0 <= label < self.num_classes:
            raise ValueError(
                f"{self.name} sample {index} has label {label}, outside [0, {self.num_classes}) "
                f"(num_classes={self.num_classes}; -1 means unlabelled, which classification cannot use)"
            )
        return {"image": self.transform(image), "label": label, "index": index}


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
    """Labelled train / val / test splits for linear probing and kNN, from any datasets of the sample contract.

    A split is any ``torch.utils.data.Dataset`` whose samples are dicts with ``"image"`` (uint8 [H, W, 3] RGB or a
    PIL image) and ``"label"`` (int in ``[0, num_classes)``), or ``None`` for an unreadable file (skipped and counted):
    ``dinov3_pl.data.SyntheticShapes``, ``FashionMNIST``, ``ImageFolder(with_labels=True)`` or a user's own class. In
    YAML each split is a ``class_path`` (``train: {class_path: dinov3_pl.data.FashionMNIST, init_args: {train:
    true}}``); in Python ``ClassificationDataModule(train=my_train_set, val=my_val_set)``.

    Args:
        train, val, test: the splits. All ``None``: the embedded ``SyntheticShapes`` (2048 train images of 64 px with
            seed ``seed``, 512 val with ``seed + 1``, 512 test with ``seed + 2``). ``train`` needs ``val``; ``test``
            ``None`` evaluates on ``val``. With ``knn_mode`` the train split is the kNN bank.
        num_classes: number of classes; ``None`` reads the train dataset's ``num_classes`` attribute. Splits with
            ``class_names`` must list the same classes.
        image_size: side of the square network input.
        batch_size, num_workers: loader settings (``batch_size`` per process; also used by ``LinearProbe`` to
            scale learning rates).
        knn_mode: val/test loaders are ``[bank (train split, eval transform), queries]``.
        train_augmentation: random resized crop + flip on the train split; ``False`` uses the eval transform.
        crop_scale: scale range of the random resized crop (upstream linear: 0.08–1).
        eval_crop_ratio: eval centre-crop fraction (0.875 upstream; 1.0 for small whole images).
        max_train_samples, max_eval_samples: fixed random subsets (seeded) to keep runs short; val and test draw
            theirs with different seeds, also when test is val.
        mean, std: normalisation.
        seed: seed of the default synthetic splits and of the subsets.
    """

    def __init__(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        test: Dataset | None = None,
        num_classes: int | None = None,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        knn_mode: bool = False,
        train_augmentation: bool = True,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        eval_crop_ratio: float = 0.875,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # The datasets stay out of checkpoints (an in-memory set would bloat them); the CLI's config.yaml records them.
        # num_classes too: Lightning's logger refuses a key that model and data both hold with different values, and
        # KNN(num_classes=None) or LinearProbe(num_classes=10) next to the default None would be such a pair.
        self.save_hyperparameters(ignore=["train", "val", "test", "num_classes"])
        self.given_num_classes = num_classes
        if train is None and (val is not None or test is not None):
            given = " and ".join(split for split, data in (("val", val), ("test", test)) if data is not None)
            raise ValueError(
                f"ClassificationDataModule got {given} but no train split: pass train too (the kNN bank / the "
                "linear probe's training data), or no split at all for the embedded SyntheticShapes"
            )
        if train is not None and val is None:
            raise ValueError(
                f"ClassificationDataModule got train ({describe_dataset(train)}) but no val split: pass val (the kNN "
                "queries / the linear probe's validation data); test defaults to val"
            )
        if train is None:
            train, val, test = (
                SyntheticShapes(num_samples, image_size=64, seed=seed + offset)
                for offset, num_samples in enumerate((2048, 512, 512))
            )
        if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2 (or null: the train dataset's), got {num_classes}")
        # Static lookup: a dataset that reads its files lazily must not be made to read them here.
        if num_classes is None and inspect.getattr_static(train, "num_classes", None) is None:
            raise ValueError(
                f"the train split ({describe_dataset(train)}) has no num_classes attribute: pass num_classes to "
                "ClassificationDataModule or give the dataset a num_classes attribute"
            )
        for name, limit in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be at least 1 (or null for the whole split), got {limit}")
        if not 0 < eval_crop_ratio <= 1:
            raise ValueError(f"eval_crop_ratio must be in (0, 1], got {eval_crop_ratio}")
        self.datasets: dict[str, Dataset] = {"train": train, "val": val, "test": val if test is None else test}
        self.batch_size = batch_size
        self.num_classes: int | None = None
        self.class_names: tuple[str, ...] | None = None
        self._splits: dict[str, Dataset] = {}

    # ------------------------------------------------------------------------------------ datasets
    def prepare_data(self) -> None:
        prepare_datasets(self.datasets.values())

    def _read_num_classes(self) -> int:
        if self.given_num_classes is not None:
            return int(self.given_num_classes)
        train = self.datasets["train"]
        num_classes = int(train.num_classes)
        if num_classes < 2:
            raise ValueError(
                f"the train split ({describe_dataset(train)}) has num_classes={num_classes}: classification needs "
                "labelled data with at least 2 classes (an ImageFolder needs with_labels: true)"
            )
        return num_classes

    def _check_class_names(self) -> tuple[str, ...] | None:
        """The train split's class names, after checking that every split that names its classes names the same."""
        named = {split: tuple(getattr(data, "class_names", None) or ()) for split, data in self.datasets.items()}
        train_names = named["train"]
        for split in ("val", "test"):
            if train_names and named[split] and named[split] != train_names:
                raise ValueError(
                    f"the {split} split ({describe_dataset(self.datasets[split])}) has classes "
                    f"{list(named[split])}, the train split ({describe_dataset(self.datasets['train'])}) "
                    f"{list(train_names)}: labels would not match; give every split the same classes"
                )
        return train_names or None

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
        self.num_classes = self._read_num_classes()
        self.class_names = self._check_class_names()
        limits = {"train": hp.max_train_samples, "val": hp.max_eval_samples, "test": hp.max_eval_samples}
        subsets = {
            split: self._subset(self.datasets[split], limits[split], offset)
            for offset, split in enumerate(("train", "val", "test"))
        }
        for split, data in subsets.items():
            if len(data) == 0:
                raise ValueError(f"the {split} split ({describe_dataset(self.datasets[split])}) is empty")
        eval_tf = eval_transform(hp.image_size, hp.eval_crop_ratio, hp.mean, hp.std)
        train_tf = train_transform(hp.image_size, hp.crop_scale, hp.mean, hp.std) if hp.train_augmentation else eval_tf

        def wrap(split: str, transform: Callable) -> Dataset:
            name = f"{split} split ({describe_dataset(self.datasets[split])})"
            return _Labelled(subsets[split], transform, self.num_classes, name)

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
