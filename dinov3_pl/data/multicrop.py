"""Multi-crop batches for DINOv3 pretraining: collate, seeding sampler and the LightningDataModule.

Train batches (crop-major: all images' crop 0, then all images' crop 1, ...; see notes/CONTRACTS.md):
  ``global_crops`` float [2B, 3, G, G], ``local_crops`` float [nB, 3, L, L] (absent when n = 0),
  ``masks`` bool [2B, (G/p)^2] (iBOT, upstream statistics), ``gram_crops`` float [2B, 3, Gg, Gg] (when enabled),
  ``labels`` long [B] (-1 unknown), ``num_bad_images`` int (undecodable images dropped from this batch),
  ``epoch`` int (the sampler epoch the batch was drawn from; it tells the DataModule where training stands).

Randomness: the sampler yields ``(epoch, index)`` keys, each sample's crops come from a generator seeded with
``(seed, epoch, index)`` and each batch's masks from ``(seed, epoch, indices of the batch)``. Workers therefore draw
different crops, and a run is reproducible given the seed whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from dinov3_pl.data.datasets import FashionMNIST, ImageFolder, SyntheticShapes, default_fashion_mnist_root
from dinov3_pl.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from dinov3_pl.data.masking import IBOTMaskCollator
from dinov3_pl.data.samplers import ShardedEvalSampler
from dinov3_pl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MultiCropTransform

__all__ = [
    "EpochSeedSampler",
    "MultiCropDataset",
    "MultiCropCollate",
    "EvalDataset",
    "collate_eval",
    "MultiCropDataModule",
]


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
        crops = self.transform(sample["image"], np.random.default_rng((self.seed, epoch, index)))
        return {**crops, "label": int(sample.get("label", -1)), "index": index, "epoch": epoch}


class MultiCropCollate:
    """Stacks multi-crop samples crop-major, drops ``None`` samples (counted) and adds the iBOT masks."""

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
        return self.transform(sample["image"]), int(sample.get("label", -1))


def collate_eval(samples: Sequence[tuple[torch.Tensor, int] | None]) -> dict[str, torch.Tensor]:
    """``{"images": float [B, 3, S, S], "labels": long [B]}``; undecodable samples are dropped."""
    good = [sample for sample in samples if sample is not None]
    if not good:
        raise RuntimeError(f"all {len(samples)} images of an evaluation batch failed to decode")
    return {
        "images": torch.stack([image for image, _ in good]),
        "labels": torch.tensor([label for _, label in good], dtype=torch.long),
    }


class MultiCropDataModule(LightningDataModule):
    """DINOv3 pretraining data: multi-crop train batches and, optionally, kNN-monitor validation loaders.

    ``dataset``: ``"synthetic"`` (embedded :class:`SyntheticShapes`, ``num_samples`` images of ``image_size``),
    ``"fashion_mnist"`` (``root`` or the Debian copy; ``download`` fetches it with torchvision) or ``"folder"``
    (:class:`ImageFolder` below ``root``; undecodable files are skipped and counted, or raise with
    ``on_bad_image="raise"``; images over ``max_image_pixels`` pixels are refused, ``None`` lifts the limit).
    Transform arguments are those of :class:`MultiCropTransform` (upstream defaults); mask arguments those of
    :class:`IBOTMaskCollator`.

    With ``knn_monitor=True`` and labelled data, ``val_dataloader()`` returns ``[bank_loader, query_loader]``
    (``{"images", "labels"}`` batches, resize + centre crop to ``eval_size``): synthetic uses two fresh sample sets
    (seeds ``seed + 1`` and ``seed + 2``, disjoint from training); Fashion-MNIST a train subset as bank and a test
    subset as queries; a folder with class sub-folders a seeded disjoint split.
    """

    def __init__(
        self,
        dataset: Literal["synthetic", "fashion_mnist", "folder"] = "synthetic",
        root: str | None = None,
        download: bool = False,
        num_samples: int = 2048,
        image_size: int = 64,
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
        on_bad_image: Literal["skip", "raise"] = "skip",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        knn_monitor: bool = False,
        knn_bank_size: int = 2048,
        knn_query_size: int = 1024,
        eval_size: int | None = None,
        eval_resize_size: int | None = None,
        val_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if dataset not in ("synthetic", "fashion_mnist", "folder"):
            raise ValueError(f"dataset must be 'synthetic', 'fashion_mnist' or 'folder', got {dataset!r}")
        if dataset == "folder" and not root:
            raise ValueError("dataset='folder' needs root=<folder of images>")
        for name, size in (("global_size", global_size), ("gram_size", gram_size)):
            if size is not None and size % patch_size:
                raise ValueError(f"{name} ({size}) must be divisible by patch_size ({patch_size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy SeedSequences), got {seed}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
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
            eval_size, resize_size=eval_size if eval_resize_size is None else eval_resize_size, mean=mean, std=std
        )
        self.train_dataset: Dataset | None = None
        self.knn_bank_dataset: Dataset | None = None
        self.knn_query_dataset: Dataset | None = None
        # (sampler epoch, batches of it trained): restored from a checkpoint, then advanced by every trained batch.
        self._position: tuple[int, int] | None = None

    # ----------------------------------------------------------------------------------------------------------------
    def _fashion_root(self) -> str:
        root = self.hparams.root or default_fashion_mnist_root()
        if root is None:
            if self.hparams.download:
                raise ValueError("dataset='fashion_mnist' with download=True needs root=<folder to download into>")
            raise FileNotFoundError(
                "Fashion-MNIST not found: give root=<folder with the idx .gz files>, install the Debian package "
                "(`apt-get install dataset-fashion-mnist`) or set download=True with a root"
            )
        return root

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.train_dataset is not None:
            return
        if hp.dataset == "synthetic":
            base = SyntheticShapes(hp.num_samples, hp.image_size, seed=hp.seed)
            if hp.knn_monitor:
                self.knn_bank_dataset = SyntheticShapes(hp.knn_bank_size, hp.image_size, seed=hp.seed + 1)
                self.knn_query_dataset = SyntheticShapes(hp.knn_query_size, hp.image_size, seed=hp.seed + 2)
        elif hp.dataset == "fashion_mnist":
            root = self._fashion_root()
            base = FashionMNIST(root, train=True, download=hp.download)
            if hp.knn_monitor:
                test = FashionMNIST(root, train=False, download=hp.download)
                generator = np.random.default_rng(hp.seed)
                bank_indices = generator.permutation(len(base))[: hp.knn_bank_size]
                query_indices = generator.permutation(len(test))[: hp.knn_query_size]
                self.knn_bank_dataset = Subset(base, bank_indices.tolist())
                self.knn_query_dataset = Subset(test, query_indices.tolist())
        else:
            base = self._image_folder()
            if hp.knn_monitor:
                if base.num_classes < 2:
                    raise ValueError(
                        f"knn_monitor: true needs >= 2 class sub-folders in {hp.root} (found {base.num_classes}) for "
                        "the kNN bank and queries; set data.init_args.knn_monitor=false to pretrain without labels"
                    )
                order = np.random.default_rng(hp.seed).permutation(len(base))
                num_bank = min(hp.knn_bank_size, len(base) // 2)
                self.knn_bank_dataset = Subset(base, order[:num_bank].tolist())
                self.knn_query_dataset = Subset(base, order[num_bank : num_bank + hp.knn_query_size].tolist())
        self.train_dataset = MultiCropDataset(base, self.transform, seed=hp.seed)

    def _image_folder(self) -> ImageFolder:
        hp = self.hparams
        try:
            return ImageFolder(
                hp.root,
                with_labels=hp.knn_monitor,
                on_bad_image=hp.on_bad_image,
                max_image_pixels=hp.max_image_pixels,
            )
        except ValueError as error:
            if not hp.knn_monitor or "with_labels" not in str(error):
                raise
            # The folder is fine for pretraining; only the online kNN monitor needs labels.
            raise ValueError(
                f"knn_monitor: true needs labelled images (class sub-folders of {hp.root}) for the kNN bank and "
                f"queries ({error}). Set data.init_args.knn_monitor=false to pretrain on an unlabelled folder"
            ) from None

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
        """Advances the data position by each training batch, just before it is trained. The position is read
        from the batch's own ``epoch``, not from Lightning's epoch counter, which runs ahead of the data at some
        checkpoint moments (see ``dinov3_pl.callbacks.ExactResume``)."""
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, dict) and "epoch" in batch:
            epoch = int(batch["epoch"])
            same_epoch = self._position is not None and self._position[0] == epoch
            self._position = (epoch, self._position[1] + 1 if same_epoch else 1)
        return batch
