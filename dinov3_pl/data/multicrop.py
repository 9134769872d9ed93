"""Multi-crop batches for DINOv3 pretraining: collate, seeding sampler and the LightningDataModule.

Train batches (crop-major: all images' crop 0, then all images' crop 1, ...; see notes/CONTRACTS.md):
  ``global_crops`` float [2B, 3, G, G], ``local_crops`` float [nB, 3, L, L] (absent when n = 0),
  ``masks`` bool [2B, (G/p)^2] (iBOT, upstream statistics) with, made from them on CPU, ``mask_indices`` long [M]
  (flat indices of the M masked patches), ``ibot_weights`` float [M] and ``num_masked_patches`` int (see
  ``dinov3_pl.data.masking.ibot_mask_fields``), ``gram_crops`` float [2B, 3, Gg, Gg] (when enabled),
  ``labels`` long [B] (-1 unknown), ``num_bad_images`` int (undecodable images dropped from this batch),
  ``epoch`` int (the sampler epoch the batch was drawn from; it tells the DataModule where training stands).

Images come from datasets of the sample contract (``dataset[i]`` is a dict with ``"image"``, uint8 [H, W, 3] RGB or
a PIL image, and optionally ``"label"``, or ``None`` for an unreadable image), injected by ``class_path``:
``MultiCropDataModule(train=ImageFolder("/data/images"))`` or, in YAML,
``train: {class_path: dinov3_pl.data.ImageFolder, init_args: {root: /data/images}}``.

Randomness: the sampler yields ``(epoch, index)`` keys, each sample's crops come from a generator seeded with
``(seed, epoch, index)`` and each batch's masks from ``(seed, epoch, indices of the batch)``. Workers therefore draw
different crops, and a run is reproducible given the seed whatever the number of workers.

Crops leave the workers as uint8 (``crops_dtype="uint8"``, the default: 4x fewer bytes through worker IPC, pinned
memory and the host-to-device copy than float32) and :meth:`MultiCropDataModule.on_after_batch_transfer`, which
Lightning calls on the device, normalises them to the float tensors above, bit-identical to normalising in the
workers (``crops_dtype="float32"``). Code that iterates ``train_dataloader()`` / ``val_dataloader()`` itself passes
each batch through ``datamodule.on_after_batch_transfer(batch, 0)`` (after moving it to its device) to get them.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from dinov3_pl.data.datasets import ImageFolder, SyntheticShapes, describe_dataset, prepare_datasets
from dinov3_pl.data.masking import IBOTMaskCollator, ibot_mask_fields
from dinov3_pl.data.samplers import ShardedEvalSampler
from dinov3_pl.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiCropTransform,
    normalise_uint8,
)

__all__ = [
    "EpochSeedSampler",
    "MultiCropDataset",
    "MultiCropCollate",
    "EvalDataset",
    "collate_eval",
    "MultiCropDataModule",
]

# The embedded default training data (``train=None``), as the demo has always drawn it.
EMBEDDED_NUM_SAMPLES = 2048
EMBEDDED_IMAGE_SIZE = 64
# The batch entries that hold images (uint8 when crops_dtype="uint8", normalised after the transfer).
IMAGE_KEYS = ("global_crops", "local_crops", "gram_crops", "images")


def _declared_num_classes(dataset: Dataset) -> int | None:
    """The ``num_classes`` a dataset declares (looked up through ``Subset`` wrappers), ``None`` if it declares none."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    num_classes = getattr(dataset, "num_classes", None)
    return None if num_classes is None else int(num_classes)


def _labels_hint(dataset: Dataset) -> str:
    return (
        " (an ImageFolder reads its class sub-folders as labels with with_labels: true)"
        if isinstance(dataset, ImageFolder)
        else ""
    )


def _seeded_subset(dataset: Dataset, size: int, generator: np.random.Generator) -> Dataset:
    """``size`` samples of ``dataset`` drawn by ``generator``; the whole dataset, in its order, if not longer."""
    if len(dataset) <= size:
        return dataset
    return Subset(dataset, generator.permutation(len(dataset))[:size].tolist())


def _with_jpeg_draft(dataset: Dataset, min_pixels: int) -> Dataset | None:
    """A shallow copy of ``dataset`` (through ``Subset`` wrappers) that decodes JPEGs at reduced size keeping
    ``min_pixels``; ``None`` if it does not decode files itself (no ``draft_min_pixels`` attribute). A copy, so that
    the kNN sets taken from the same dataset keep decoding at full size."""
    if isinstance(dataset, Subset):
        inner = _with_jpeg_draft(dataset.dataset, min_pixels)
        return None if inner is None else Subset(inner, dataset.indices)
    if not hasattr(dataset, "draft_min_pixels"):
        return None
    drafted = copy.copy(dataset)
    drafted.draft_min_pixels = int(min_pixels)
    return drafted


def _check_sample(sample: Any, dataset: Dataset, index: int) -> None:
    if not isinstance(sample, Mapping) or "image" not in sample:
        got = f"a dict with keys {sorted(sample)}" if isinstance(sample, Mapping) else f"a {type(sample).__name__}"
        raise TypeError(
            f"{describe_dataset(dataset)} sample {index} is {got}; samples must be dicts with 'image' (uint8 "
            "[H, W, 3] RGB or a PIL image) and optionally 'label' (int class id, -1 unknown), or None for an "
            "unreadable image"
        )
    image = sample["image"]
    if not isinstance(image, np.ndarray | Image.Image):
        raise TypeError(
            f"{describe_dataset(dataset)} sample {index} has a {type(image).__name__} image; expected uint8 "
            "[H, W, 3] RGB (a numpy array) or a PIL image"
        )


class EpochSeedSampler(DistributedSampler):
    """Yields ``(epoch, index)`` keys in a (seed, epoch)-shuffled order, so samples can seed their augmentations.

    Distributed-aware (a ``DistributedSampler``, so Lightning uses it as it is): every rank takes
    ``order[rank::world]``, cut to the same length on every rank (no padding duplicates). Lightning calls
    ``set_epoch`` every epoch; without it the epoch advances by one per pass. ``resume_from(epoch, samples)``
    makes that epoch start after the ``samples`` keys this rank had already consumed, so a run restored from a
    mid-epoch checkpoint sees exactly the batches an uninterrupted run would.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if num_replicas is None or rank is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = torch.distributed.get_world_size() if distributed else 1
            rank = torch.distributed.get_rank() if distributed else 0
        self.num_samples_total = int(num_samples)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_from(self, epoch: int, samples_done: int) -> None:
        self._resume = (int(epoch), int(samples_done))

    def __len__(self) -> int:
        return self.num_samples_total // self.num_replicas

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1
        if self.shuffle:
            order = np.random.default_rng((self.seed, epoch)).permutation(self.num_samples_total)
        else:
            order = np.arange(self.num_samples_total)
        order = order[self.rank :: self.num_replicas][: len(self)]
        if self._resume is not None and self._resume[0] == epoch:
            order = order[self._resume[1] :]
            self._resume = None
        return iter([(epoch, int(index)) for index in order])


class MultiCropDataset(Dataset):
    """Applies a :class:`MultiCropTransform` to a sample dataset; ``None`` (bad image) passes through.

    Keys are ``(epoch, index)`` (from :class:`EpochSeedSampler`) or a plain index (epoch 0).
    """

    def __init__(self, dataset: Dataset, transform: MultiCropTransform, seed: int = 0) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample = self.dataset[index]
        if sample is None:
            return None
        _check_sample(sample, self.dataset, index)
        crops = self.transform(sample["image"], np.random.default_rng((self.seed, epoch, index)))
        return {**crops, "label": int(sample.get("label", -1)), "index": index, "epoch": epoch}


class MultiCropCollate:
    """Stacks multi-crop samples crop-major, drops ``None`` samples (counted) and adds the iBOT masks (with their
    indices, weights and count, so the step needs no host sync)."""

    def __init__(
        self,
        global_size: int,
        patch_size: int,
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        mask_random_circular_shift: bool = False,
        seed: int = 0,
    ) -> None:
        if global_size % patch_size:
            raise ValueError(f"global_size ({global_size}) must be divisible by patch_size ({patch_size})")
        self.masking = IBOTMaskCollator(
            global_size // patch_size,
            mask_probability=mask_probability,
            mask_ratio=mask_ratio,
            random_circular_shift=mask_random_circular_shift,
        )
        self.seed = int(seed)

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        good = [sample for sample in samples if sample is not None]
        num_bad = len(samples) - len(good)
        if not good:
            raise RuntimeError(
                f"all {len(samples)} images of a batch failed to decode; check the dataset for corrupt files "
                "(ImageFolder(on_bad_image='raise') names them)"
            )
        num_global = len(good[0]["global_crops"])
        num_local = len(good[0]["local_crops"])
        batch: dict[str, Any] = {
            "global_crops": torch.stack([s["global_crops"][i] for i in range(num_global) for s in good]),
        }
        if num_local:
            batch["local_crops"] = torch.stack([s["local_crops"][i] for i in range(num_local) for s in good])
        if "gram_crops" in good[0]:
            batch["gram_crops"] = torch.stack([s["gram_crops"][i] for i in range(num_global) for s in good])
        # The batch's masks are seeded by its samples, so they do not depend on which worker built it.
        epoch = int(good[0].get("epoch", 0))
        keys = [self.seed, epoch] + [int(s.get("index", 0)) for s in good]
        batch["masks"] = self.masking(num_global * len(good), np.random.default_rng(keys))
        batch.update(ibot_mask_fields(batch["masks"]))
        batch["labels"] = torch.tensor([int(s.get("label", -1)) for s in good], dtype=torch.long)
        batch["num_bad_images"] = num_bad
        batch["epoch"] = epoch
        return batch


class EvalDataset(Dataset):
    """Sample dataset -> ``(image tensor, label)`` with a deterministic :class:`EvalTransform` (None passes)."""

    def __init__(self, dataset: Dataset, transform: EvalTransform) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        sample = self.dataset[index]
        if sample is None:
            return None
        _check_sample(sample, self.dataset, index)
        return self.transform(sample["image"]), int(sample.get("label", -1))


def collate_eval(samples: Sequence[tuple[torch.Tensor, int] | None]) -> dict[str, torch.Tensor]:
    """``{"images": [B, 3, S, S] (as the transform gives them), "labels": long [B]}``; undecodable samples are
    dropped."""
    good = [sample for sample in samples if sample is not None]
    if not good:
        raise RuntimeError(f"all {len(samples)} images of an evaluation batch failed to decode")
    return {
        "images": torch.stack([image for image, _ in good]),
        "labels": torch.tensor([label for _, label in good], dtype=torch.long),
    }


class MultiCropDataModule(LightningDataModule):
    """DINOv3 pretraining data: multi-crop train batches and, optionally, kNN-monitor validation loaders.

    The images come from datasets given as objects (in YAML by ``class_path``), any ``torch.utils.data.Dataset``
    whose samples are dicts with ``"image"`` (uint8 [H, W, 3] RGB or a PIL image) and optionally ``"label"``, or
    ``None`` for an unreadable file (dropped from its batch and counted): :class:`SyntheticShapes`,
    :class:`FashionMNIST`, :class:`ImageFolder` (``on_bad_image``, ``max_image_pixels``) or a user's own class.

    Args:
        train: the pretraining images; labels are not needed. ``None``: the embedded :class:`SyntheticShapes`
            (2048 images of 64 px drawn with ``seed``).
        knn_bank, knn_queries: labelled datasets for the online kNN monitor (``knn_monitor=True``). Each one longer
            than ``knn_bank_size`` / ``knn_query_size`` is cut to a seeded random subset of that size (bank first,
            then queries, from one generator seeded with ``seed``). ``None``: taken from ``train`` if it is labelled
            (``num_classes >= 2``): a seeded disjoint split when both are ``None``, a seeded subset otherwise. With
            ``train=None`` and both ``None``: fresh embedded sets of ``knn_bank_size`` / ``knn_query_size`` images
            (seeds ``seed + 1`` and ``seed + 2``, disjoint from training).
        patch_size ... gram_size: the :class:`MultiCropTransform` (upstream defaults); mask arguments those of
            :class:`IBOTMaskCollator`.
        knn_monitor: ``val_dataloader()`` returns ``[bank_loader, query_loader]`` (``{"images", "labels"}``
            batches, resize + centre crop to ``eval_size``, ``eval_resize_size``); off: no validation.
        seed: seeds the crops, masks and sample order (see the module docstring), the kNN subsets and the embedded
            default data.
        crops_dtype: ``"uint8"``: the workers send uint8 crops (train and kNN loaders) and
            :meth:`on_after_batch_transfer` normalises them on the device; ``"float32"``: normalised in the workers.
            The normalised tensors are bit-identical either way.
        jpeg_draft: decode the training JPEGs at the largest reduction 1/2, 1/4 or 1/8 (PIL ``draft``, scaled in
            the DCT) that still holds ``MultiCropTransform.min_source_pixels`` pixels, so the smallest crop box of
            every kind still covers its output size; other formats and the kNN sets decode at full size. Off by
            default: the crops agree in distribution with the full decode (scale, aspect, colour) but not pixel
            for pixel. Needs a dataset that decodes files (``ImageFolder``).
    """

    def __init__(
        self,
        train: Dataset | None = None,
        knn_bank: Dataset | None = None,
        knn_queries: Dataset | None = None,
        patch_size: int = 16,
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
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        gram_size: int | None = None,
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        mask_random_circular_shift: bool = False,
        batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = True,
        knn_monitor: bool = False,
        knn_bank_size: int = 2048,
        knn_query_size: int = 1024,
        eval_size: int | None = None,
        eval_resize_size: int | None = None,
        val_batch_size: int | None = None,
        seed: int = 0,
        crops_dtype: str = "uint8",
        jpeg_draft: bool = False,
    ) -> None:
        super().__init__()
        # The datasets stay out of checkpoints (an in-memory set would bloat them, a lambda in one would fail to
        # pickle); the CLI's config.yaml records them.
        self.save_hyperparameters(ignore=["train", "knn_bank", "knn_queries"])
        for name, dataset in (("train", train), ("knn_bank", knn_bank), ("knn_queries", knn_queries)):
            is_map_style = hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
            if dataset is not None and (isinstance(dataset, str | bytes | os.PathLike) or not is_map_style):
                raise TypeError(
                    f"MultiCropDataModule {name} must be a map-style dataset (len() and dataset[i] -> dict with "
                    f"'image'), got {type(dataset).__name__}; for a folder of images use dinov3_pl.data.ImageFolder"
                )
        for name, size in (("global_size", global_size), ("gram_size", gram_size)):
            if size is not None and size % patch_size:
                raise ValueError(f"{name} ({size}) must be divisible by patch_size ({patch_size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy SeedSequences), got {seed}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for name, size in (("knn_bank_size", knn_bank_size), ("knn_query_size", knn_query_size)):
            if size <= 0:
                raise ValueError(f"{name} must be positive, got {size}")
        if train is None:
            train = SyntheticShapes(EMBEDDED_NUM_SAMPLES, EMBEDDED_IMAGE_SIZE, seed=seed)
            if knn_monitor and knn_bank is None and knn_queries is None:
                knn_bank = SyntheticShapes(knn_bank_size, EMBEDDED_IMAGE_SIZE, seed=seed + 1)
                knn_queries = SyntheticShapes(knn_query_size, EMBEDDED_IMAGE_SIZE, seed=seed + 2)
        self.datasets: dict[str, Dataset | None] = {"train": train, "knn_bank": knn_bank, "knn_queries": knn_queries}
        self.transform = MultiCropTransform(
            global_size=global_size,
            local_size=local_size,
            num_local_crops=num_local_crops,
            global_scale=global_scale,
            local_scale=local_scale,
            aspect_ratio=aspect_ratio,
            horizontal_flip_probability=horizontal_flip_probability,
            color_jitter=color_jitter,
            color_jitter_probability=color_jitter_probability,
            grayscale_probability=grayscale_probability,
            blur_kernel_size=blur_kernel_size,
            blur_sigma=blur_sigma,
            blur_probabilities=blur_probabilities,
            blur_as_upstream_trained=blur_as_upstream_trained,
            solarize_probability=solarize_probability,
            mean=mean,
            std=std,
            gram_size=gram_size,
            crops_dtype=crops_dtype,
        )
        self.collate = MultiCropCollate(
            global_size,
            patch_size,
            mask_probability=mask_probability,
            mask_ratio=mask_ratio,
            mask_random_circular_shift=mask_random_circular_shift,
            seed=seed,
        )
        eval_size = global_size if eval_size is None else eval_size
        self.eval_transform = EvalTransform(
            eval_size,
            resize_size=eval_size if eval_resize_size is None else eval_resize_size,
            mean=mean,
            std=std,
            crops_dtype=crops_dtype,
        )
        self.train_dataset: MultiCropDataset | None = None
        self.knn_bank_dataset: Dataset | None = None
        self.knn_query_dataset: Dataset | None = None
        # (sampler epoch, batches of it trained): restored from a checkpoint, then advanced by every trained batch.
        self._position: tuple[int, int] | None = None

    # ----------------------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        prepare_datasets(self.datasets.values())

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        train = self.datasets["train"]
        if self.hparams.knn_monitor:
            self.knn_bank_dataset, self.knn_query_dataset = self._knn_datasets(train)
        if self.hparams.jpeg_draft:
            drafted = _with_jpeg_draft(train, self.transform.min_source_pixels)
            if drafted is None:
                warnings.warn(
                    f"jpeg_draft: true has no effect on {describe_dataset(train)}, which does not decode image files "
                    "(it needs a dataset with a draft_min_pixels attribute, such as dinov3_pl.data.ImageFolder)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            train = train if drafted is None else drafted
        self.train_dataset = MultiCropDataset(train, self.transform, seed=self.hparams.seed)

    def _knn_datasets(self, train: Dataset) -> tuple[Dataset, Dataset]:
        """The kNN monitor's bank and queries: given, or taken from a labelled ``train`` (see the class docstring)."""
        hp = self.hparams
        bank, queries = self.datasets["knn_bank"], self.datasets["knn_queries"]
        for name, dataset in (("knn_bank", bank), ("knn_queries", queries)):
            num_classes = _declared_num_classes(dataset) if dataset is not None else None
            if num_classes is not None and num_classes < 2:
                raise ValueError(
                    f"data.init_args.{name} ({describe_dataset(dataset)}) has num_classes={num_classes}: the kNN "
                    f"monitor needs labelled images{_labels_hint(dataset)}"
                )
        if bank is None or queries is None:
            num_classes = _declared_num_classes(train)
            if num_classes is None or num_classes < 2:
                classes = "no num_classes attribute" if num_classes is None else f"num_classes={num_classes}"
                raise ValueError(
                    f"knn_monitor: true needs labelled images for the kNN bank and queries, and the training set "
                    f"({describe_dataset(train)}, {classes}) is unlabelled{_labels_hint(train)}: give "
                    "data.init_args.knn_bank and data.init_args.knn_queries (labelled datasets), or set "
                    "data.init_args.knn_monitor=false to pretrain without the kNN monitor"
                )
        generator = np.random.default_rng(hp.seed)
        if bank is None and queries is None:
            # Both from the training set: disjoint, so no query finds itself in the bank.
            order = generator.permutation(len(train))
            num_bank = min(hp.knn_bank_size, len(train) // 2)
            bank_indices, query_indices = order[:num_bank], order[num_bank : num_bank + hp.knn_query_size]
            return Subset(train, bank_indices.tolist()), Subset(train, query_indices.tolist())
        bank = _seeded_subset(train if bank is None else bank, hp.knn_bank_size, generator)
        queries = _seeded_subset(train if queries is None else queries, hp.knn_query_size, generator)
        return bank, queries

    def _loader_options(self) -> dict[str, Any]:
        workers = self.hparams.num_workers
        return {
            "num_workers": workers,
            "pin_memory": self.hparams.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.hparams.persistent_workers and workers > 0,
        }

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        sampler = EpochSeedSampler(len(self.train_dataset), seed=self.hparams.seed, shuffle=True)
        batch_size, world_size = self.hparams.batch_size, sampler.num_replicas
        if self.hparams.drop_last and len(sampler) < batch_size:
            raise ValueError(
                f"the training set has {len(self.train_dataset)} images, fewer than one batch of {batch_size}"
                + (f" on each of {world_size} processes" if world_size > 1 else "")
                + ": lower data.init_args.batch_size or add images"
            )
        if self._position is not None:
            epoch, batches_done = self._position
            sampler.resume_from(epoch, batches_done * batch_size)
        return DataLoader(
            self.train_dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            drop_last=self.hparams.drop_last,
            **self._loader_options(),
        )

    def val_dataloader(self) -> list[DataLoader]:
        """``[bank_loader, query_loader]`` for the online kNN monitor, or ``[]`` when it is off."""
        if not self.hparams.knn_monitor:
            return []
        if self.train_dataset is None:
            self.setup("validate")
        batch_size = self.hparams.val_batch_size or self.hparams.batch_size
        sources = (self.knn_bank_dataset, self.knn_query_dataset)
        datasets = [EvalDataset(source, self.eval_transform) for source in sources]
        return [
            DataLoader(
                dataset,
                batch_size=batch_size,
                sampler=ShardedEvalSampler(dataset),  # every sample once, also under DDP
                collate_fn=collate_eval,
                drop_last=False,
                **self._loader_options(),
            )
            for dataset in datasets
        ]

    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the data, saved in every checkpoint: the sampler epoch of the last trained
        batch and how many batches of that epoch were trained (see :meth:`load_state_dict`)."""
        if self._position is None:
            return {}
        epoch, batches_done = self._position
        return {"epoch": epoch, "batches_done": batches_done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A checkpoint taken inside an epoch resumes that epoch after the batches already trained (Lightning alone
        would restart the epoch's data from its first batch); after a finished epoch the next one starts whole."""
        if "epoch" in state_dict:
            self._position = (int(state_dict["epoch"]), int(state_dict["batches_done"]))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalises the uint8 images of every batch (train and kNN) on the device they were moved to, and
        advances the data position by each training batch, just before it is trained. The position is read
        from the batch's own ``epoch``, not from Lightning's epoch counter, which runs ahead of the data at some
        checkpoint moments (see ``dinov3_pl.callbacks.ExactResume``)."""
        if isinstance(batch, dict):
            hp = self.hparams
            for key in IMAGE_KEYS:
                images = batch.get(key)
                if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
                    batch[key] = normalise_uint8(images, hp.mean, hp.std)
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, dict) and "epoch" in batch:
            epoch = int(batch["epoch"])
            same_epoch = self._position is not None and self._position[0] == epoch
            self._position = (epoch, self._position[1] + 1 if same_epoch else 1)
        return batch
