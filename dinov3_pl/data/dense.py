"""Shared parts of the dense evaluations' data (segmentation, detection, and tasks built on them such as depth).

:class:`DenseDataModule` takes the splits as dataset objects (``train``, ``val``, ``test``; in YAML by
``class_path``), resolves ``num_classes`` and the class names, checks that the splits agree and builds the loaders
(evaluation sharded over DDP ranks without duplicates). The task files subclass it: ``dinov3_pl.data.segmentation``
(``SegmentationDataModule``, ``SegmentationFolder``, ``SyntheticShapeMasks``) and ``dinov3_pl.data.detection``
(``DetectionDataModule``, ``CocoDetectionDataset``). Their names are still importable from here, as before the
split.

Label conventions: segmentation masks hold a class id per pixel, **255 = ignore** (``IGNORE_INDEX``); detection
boxes are ``xyxy`` pixels with labels ``0..C-1``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dinov3_pl.data.datasets import prepare_datasets
from dinov3_pl.data.decode import image_to_rgb
from dinov3_pl.data.samplers import ShardedEvalSampler
from dinov3_pl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CheckedSplit",
    "DenseDataModule",
    "positive_count",
    "readable",
    "rgb_image",
    "to_chw",
]

IGNORE_INDEX = 255

# Names that lived here before the task files were split off; `from dinov3_pl.data.dense import X` and configs'
# `class_path: dinov3_pl.data.dense.X` (saved runs have them) keep working.
_MOVED = {
    "SegmentationDataModule": "segmentation",
    "SegmentationFolder": "segmentation",
    "SyntheticShapeMasks": "segmentation",
    "segmentation_collate": "segmentation",
    "DetectionDataModule": "detection",
    "CocoDetectionDataset": "detection",
    "detection_collate": "detection",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(f"dinov3_pl.data.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def positive_count(value: object, what: str) -> int:
    """``value`` as a class count (a positive int), else one error naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{what} must be a positive number of classes, got {value!r}")
    return int(value)


def rgb_image(sample: dict, where: str) -> np.ndarray:
    """The sample's ``"image"`` as uint8 [H, W, 3]: PIL images converted as files are decoded (16 bit scaled, alpha
    over white); anything else one error naming the sample."""
    image = sample.get("image")
    if isinstance(image, Image.Image):
        image = image_to_rgb(image)
    image = None if image is None else np.asarray(image)
    if image is None or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = "no 'image'" if image is None else f"{image.dtype} {list(image.shape)}"
        raise ValueError(f"{where}: 'image' must be uint8 [H, W, 3] RGB or a PIL image, got {got}")
    return image


def to_chw(image: np.ndarray) -> Tensor:
    """[H, W, 3] array -> float [3, H, W] tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()


def readable(samples: Sequence[dict | None]) -> list[dict]:
    """The samples a dataset could read (``None`` marks an unreadable one)."""
    kept = [sample for sample in samples if sample is not None]
    if not kept:
        # The dense modules have no empty-batch step; a whole batch of unreadable files is worth stopping for.
        raise ValueError(f"all {len(samples)} samples of a batch were unreadable (the dataset returned None)")
    return kept


class CheckedSplit(Dataset):
    """One split of a dense task: reads a sample, passes ``None`` (unreadable) through for the collate to drop, and
    hands the others to ``convert(sample, where)``, which checks them against the task's sample contract and
    applies the transform. ``where`` names the sample in errors (its path, else the split and index)."""

    def __init__(self, dataset: Dataset, convert: Callable[[dict, str], dict], name: str) -> None:
        if len(dataset) == 0:
            raise ValueError(f"the {name} is empty")
        self.dataset, self.convert, self.name = dataset, convert, name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        sample = self.dataset[index]
        if sample is None:
            return None
        return self.convert(sample, sample.get("path") or f"{self.name} sample {index}")


# ------------------------------------------------------------------------------------------------ datamodules
# Size and seeds of the synthetic default (no datasets given); the validation seed keeps its images disjoint from
# the training ones. Unchanged from the earlier num_train/num_val defaults, so the numbers measured with them hold.
SYNTHETIC_TRAIN_SAMPLES, SYNTHETIC_VAL_SAMPLES, SYNTHETIC_VAL_SEED_OFFSET = 512, 128, 1_000_003
# Datasets stay out of the hyper-parameters: an in-memory one would bloat every checkpoint (the CLI's config.yaml
# records those given by class_path). num_classes too: the model records the count, and Lightning refuses to log a
# model and a DataModule whose hyper-parameters of one name differ, as the CLI's (the config as given: None when
# the datasets state the count) would.
_NOT_HYPERPARAMETERS = ["train", "val", "test", "num_classes"]


def _names(dataset: Dataset) -> tuple[str, ...]:
    return tuple(str(name) for name in (getattr(dataset, "class_names", None) or ()))


class DenseDataModule(pl.LightningDataModule):
    """Datasets, checks and loaders shared by the dense DataModules (public: other dense tasks subclass it).

    A subclass sets ``kind`` (a word for messages), ``collate`` and ``synthetic_dataset``, implements
    ``_transforms`` (train, eval), calls ``save_hyperparameters(ignore=_NOT_HYPERPARAMETERS)`` (the loaders read
    ``batch_size``, ``val_batch_size`` and ``num_workers`` from it) and passes its datasets to ``_take_datasets`` in
    ``__init__``, and implements ``transformed_dataset`` (one split with its transform applied and its samples
    checked; ``CheckedSplit`` with a task's ``convert`` is the usual answer)."""

    kind: str
    collate: Callable[[Sequence[dict]], dict]
    synthetic_dataset: type[Dataset]  # the embedded default data when no datasets are given

    def _take_datasets(
        self,
        train: Dataset | None,
        val: Dataset | None,
        test: Dataset | None,
        num_classes: int | None,
        image_size: int,
        seed: int,
    ) -> None:
        """Keeps the splits (the synthetic default when none is given), resolves ``num_classes`` and
        ``class_names`` and checks that the splits agree. Reads dataset attributes only: files are read in
        ``setup``, after ``prepare_data`` has let datasets that build their files do so."""
        owner = type(self).__name__
        if train is None and val is None and test is None:
            train, val = self._synthetic_default(image_size, seed)
        elif train is None or val is None:
            missing = "train" if train is None else "val"
            raise ValueError(
                f"{owner}: {missing} is missing; give train and val datasets (test is optional and falls back to "
                f"val), or none of them for the embedded synthetic shapes"
            )
        self.datasets: dict[str, Dataset] = {"train": train, "val": val, "test": val if test is None else test}
        described = {split: f"{split} dataset {type(data).__name__}" for split, data in self.datasets.items()}

        stated = {
            split: positive_count(count, f"the {described[split]}'s num_classes")
            for split, data in self.datasets.items()
            if (count := getattr(data, "num_classes", None)) is not None
        }
        if len(set(stated.values())) > 1:
            counts = ", ".join(f"{described[split]}: {count}" for split, count in stated.items())
            raise ValueError(f"{owner}: the splits state different num_classes ({counts}); they must label alike")
        if num_classes is not None:
            self.num_classes = positive_count(num_classes, f"{owner} num_classes")
        elif stated:
            self.num_classes = next(iter(stated.values()))
        else:
            counted = (
                "classes of the mask ids, background included" if self.kind == "segmentation" else "object classes"
            )
            raise ValueError(
                f"{owner}: the {described['train']} has no num_classes attribute; pass num_classes ({counted}; "
                f"YAML: data.init_args.num_classes) or give the dataset a num_classes attribute"
            )

        categories = {split: getattr(data, "category_ids", None) for split, data in self.datasets.items()}
        names = {split: _names(data) for split, data in self.datasets.items()}
        for split in ("val", "test"):
            if categories["train"] is not None and categories[split] is not None:
                if list(categories[split]) != list(categories["train"]):
                    raise ValueError(
                        f"{owner}: train and {split} annotations have different categories: "
                        f"{list(categories['train'])} vs {list(categories[split])}"
                    )
            if names["train"] and names[split] and names[split] != names["train"]:
                raise ValueError(
                    f"{owner}: the {described[split]} names its classes {list(names[split])}, the "
                    f"{described['train']} {list(names['train'])}; labels would not match"
                )
        class_names = next((found for found in names.values() if found), ())
        if class_names and len(class_names) != self.num_classes:
            raise ValueError(
                f"{owner}: num_classes={self.num_classes} but the datasets name {len(class_names)} classes "
                f"{list(class_names)}; leave num_classes out to use theirs"
            )
        self.class_names: list[str] | None = list(class_names) if class_names else None
        self.train_set = self.val_set = self.test_set = None

    def _synthetic_default(self, image_size: int, seed: int) -> tuple[Dataset, Dataset]:
        return (
            self.synthetic_dataset(SYNTHETIC_TRAIN_SAMPLES, image_size, seed),
            self.synthetic_dataset(SYNTHETIC_VAL_SAMPLES, image_size, seed + SYNTHETIC_VAL_SEED_OFFSET),
        )

    def _transforms(self) -> tuple[Callable, Callable]:
        """(train, eval) transforms; the train one ``ProcessSeeded`` so that it follows torch's seed."""
        raise NotImplementedError(f"{type(self).__name__} must implement _transforms")

    def prepare_data(self) -> None:
        prepare_datasets(self.datasets.values())

    def setup(self, stage: str | None = None) -> None:
        self._check_model_classes()
        if self.train_set is not None:
            return
        train_tf, eval_tf = self._transforms()
        wrapped: dict[tuple[int, int], Dataset] = {}

        def wrap(split: str, transform: Callable) -> Dataset:
            dataset = self.datasets[split]
            key = (id(dataset), id(transform))
            if key not in wrapped:  # test = val: one wrapper, its dataset read and checked once
                name = f"{split} dataset {type(dataset).__name__}"
                wrapped[key] = self.transformed_dataset(dataset, transform, name)
            return wrapped[key]

        self.train_set = wrap("train", train_tf)
        self.val_set = wrap("val", eval_tf)
        self.test_set = wrap("test", eval_tf)

    def transformed_dataset(self, dataset: Dataset, transform: Callable, name: str) -> Dataset:
        """One split with its transform applied and its samples checked (``name`` for the error messages)."""
        raise NotImplementedError(f"{type(self).__name__} must implement transformed_dataset")

    def _check_model_classes(self) -> None:
        """The model's head must have the data's classes: nothing links the two in a config, and a mismatch would
        otherwise fail deep in a loss (too few) or lower mIoU/mAP silently (too many)."""
        trainer = getattr(self, "trainer", None)
        model = getattr(trainer, "lightning_module", None) if trainer is not None else None
        model_classes = getattr(model, "num_classes", None)
        if isinstance(model_classes, int) and model_classes != self.num_classes:
            sources = sorted({type(data).__name__ for data in self.datasets.values()})
            raise ValueError(
                f"{type(model).__name__} has num_classes={model_classes} but the {self.kind} data have "
                f"{self.num_classes} ({', '.join(sources)}); set model.init_args.num_classes: {self.num_classes}"
            )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, self.hparams.val_batch_size or self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, self.hparams.val_batch_size or self.hparams.batch_size)

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int) -> DataLoader:
        # Evaluation loaders shard over DDP ranks without padding duplicates (mIoU / mAP count each image once).
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=None if shuffle else ShardedEvalSampler(dataset),
            num_workers=self.hparams.num_workers,
            collate_fn=self.collate,
            drop_last=shuffle and len(dataset) > batch_size,
            persistent_workers=self.hparams.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
