"""Tests for dinov3_pl.data.multicrop: crop-major collate, seeding, MultiCropDataModule loaders."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from dinov3_pl.data.masking import ibot_mask_counts
from dinov3_pl.data.multicrop import EpochSeedSampler, MultiCropCollate, MultiCropDataModule

TINY = dict(image_size=32, patch_size=4, global_size=32, local_size=16, num_local_crops=2, batch_size=4, num_workers=0)


def _fake_sample(index: int, num_local: int = 3, gram: bool = False) -> dict:
    sample = {
        "global_crops": [torch.full((3, 8, 8), 100.0 * i + index) for i in range(2)],
        "local_crops": [torch.full((3, 4, 4), 100.0 * (i + 2) + index) for i in range(num_local)],
        "label": index % 5,
        "index": index,
        "epoch": 0,
    }
    if gram:
        sample["gram_crops"] = [torch.full((3, 16, 16), 100.0 * i + index + 0.5) for i in range(2)]
    return sample


def test_collate_is_crop_major_drops_bad_samples_and_masks_globals():
    collate = MultiCropCollate(global_size=8, patch_size=2)
    samples = [_fake_sample(0, gram=True), None, _fake_sample(1, gram=True), _fake_sample(2, gram=True), None]
    batch = collate(samples)
    assert batch["num_bad_images"] == 2
    assert batch["global_crops"].shape == (6, 3, 8, 8) and batch["local_crops"].shape == (9, 3, 4, 4)
    assert batch["gram_crops"].shape == (6, 3, 16, 16)
    # Crop-major: all images' crop 0, then all images' crop 1, ...
    assert batch["global_crops"][:, 0, 0, 0].tolist() == [0, 1, 2, 100, 101, 102]
    assert batch["local_crops"][:, 0, 0, 0].tolist() == [200, 201, 202, 300, 301, 302, 400, 401, 402]
    assert batch["gram_crops"][:, 0, 0, 0].tolist() == [0.5, 1.5, 2.5, 100.5, 101.5, 102.5]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1, 2]
    masks = batch["masks"]
    assert masks.dtype == torch.bool and masks.shape == (6, 16)
    assert sorted(masks.sum(1).tolist()) == [0, 0, 0] + ibot_mask_counts(6, 16)
    # Same samples -> same masks (seeded by the samples), other samples -> other masks.
    assert torch.equal(collate(samples)["masks"], masks)
    no_local = collate([_fake_sample(3, num_local=0), _fake_sample(4, num_local=0)])
    assert "local_crops" not in no_local and "gram_crops" not in no_local
    with pytest.raises(RuntimeError, match="all 2 images"):
        collate([None, None])
    with pytest.raises(ValueError, match="divisible"):
        MultiCropCollate(global_size=10, patch_size=4)


def test_epoch_seed_sampler():
    sampler = EpochSeedSampler(10, seed=3)
    first, second = list(sampler), list(sampler)
    assert {epoch for epoch, _ in first} == {0} and {epoch for epoch, _ in second} == {1}
    assert sorted(i for _, i in first) == list(range(10)) and [i for _, i in first] != [i for _, i in second]
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_epoch_seed_sampler_under_lightning_distributed_wrapper():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    keys = []
    for rank in range(2):
        sampler = EpochSeedSampler(10, seed=0)
        wrapper = DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=False)
        keys += list(wrapper)
    # Each rank gets half of the same epoch's permutation: together every index exactly once.
    assert {epoch for epoch, _ in keys} == {0} and sorted(index for _, index in keys) == list(range(10))


def _first_batch(**kwargs) -> dict:
    datamodule = MultiCropDataModule(**{**TINY, **kwargs})
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def test_synthetic_train_batch_format():
    batch = _first_batch(dataset="synthetic", num_samples=16, gram_size=64)
    assert batch["global_crops"].shape == (8, 3, 32, 32) and batch["global_crops"].dtype == torch.float32
    assert batch["local_crops"].shape == (8, 3, 16, 16)
    assert batch["gram_crops"].shape == (8, 3, 64, 64)
    assert batch["masks"].shape == (8, 64) and sorted(batch["masks"].sum(1).tolist()) == [0] * 4 + ibot_mask_counts(
        8, 64
    )
    assert batch["labels"].shape == (4,) and batch["labels"].min() >= 0 and batch["labels"].max() < 8
    assert batch["num_bad_images"] == 0
    # ImageNet-normalised crops of uint8 images lie in [-2.2, 2.7].
    assert batch["global_crops"].min() >= -2.2 and batch["global_crops"].max() <= 2.7


def test_reproducible_given_seed_and_independent_of_workers():
    reference = _first_batch(num_samples=16, seed=5)
    same = _first_batch(num_samples=16, seed=5)
    with_workers = _first_batch(num_samples=16, seed=5, num_workers=2, persistent_workers=False)
    other_seed = _first_batch(num_samples=16, seed=6)
    for key in ("global_crops", "local_crops", "masks", "labels"):
        assert torch.equal(reference[key], same[key]), key
        assert torch.equal(reference[key], with_workers[key]), key
    assert not torch.equal(reference["global_crops"], other_seed["global_crops"])


def test_each_epoch_draws_new_crops():
    datamodule = MultiCropDataModule(**{**TINY, "num_samples": 8, "batch_size": 8})
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    epoch0, epoch1 = next(iter(loader)), next(iter(loader))
    assert not torch.equal(epoch0["global_crops"], epoch1["global_crops"])
    loader.sampler.set_epoch(0)
    assert torch.equal(next(iter(loader))["global_crops"], epoch0["global_crops"])


def _image_folder(root: Path, num_good: int = 6, corrupt: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for index in range(num_good):
        folder = root / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24 + index, 30, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    if corrupt:
        (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


def test_folder_with_corrupt_file_is_skipped_and_counted(tmp_path):
    root = _image_folder(tmp_path / "images")
    datamodule = MultiCropDataModule(**{**TINY, "dataset": "folder", "root": str(root), "batch_size": 7})
    datamodule.setup("fit")
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        batch = next(iter(datamodule.train_dataloader()))
    assert batch["num_bad_images"] == 1 and batch["global_crops"].shape == (12, 3, 32, 32)
    assert batch["labels"].tolist() == [-1] * 6

    raising = MultiCropDataModule(**{**TINY, "dataset": "folder", "root": str(root), "batch_size": 7})
    raising.hparams.on_bad_image = "raise"
    raising.setup("fit")
    with pytest.raises(ValueError, match="broken.jpg"):
        next(iter(raising.train_dataloader()))


def test_dataset_smaller_than_one_batch_is_a_clear_error():
    datamodule = MultiCropDataModule(**{**TINY, "num_samples": 5, "batch_size": 8})
    datamodule.setup("fit")
    with pytest.raises(ValueError, match="5 images, fewer than one batch of 8: lower data.init_args.batch_size"):
        datamodule.train_dataloader()


def test_knn_monitor_on_an_unlabelled_folder_names_the_option_to_change(tmp_path):
    root = tmp_path / "unlabelled"
    root.mkdir()
    for index in range(4):
        Image.fromarray(np.full((24, 24, 3), 40 * index, dtype=np.uint8)).save(root / f"{index}.png")
    datamodule = MultiCropDataModule(**{**TINY, "dataset": "folder", "root": str(root), "knn_monitor": True})
    with pytest.raises(ValueError, match="knn_monitor: true needs labelled images.*knn_monitor=false"):
        datamodule.setup("fit")
    MultiCropDataModule(**{**TINY, "dataset": "folder", "root": str(root)}).setup("fit")  # fine without the monitor


def test_setup_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        MultiCropDataModule(dataset="folder", root=str(tmp_path / "empty")).setup("fit")
    with pytest.raises(ValueError, match="root"):
        MultiCropDataModule(dataset="folder")
    with pytest.raises(FileNotFoundError, match="download=True"):
        MultiCropDataModule(dataset="fashion_mnist", root=str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match="divisible by patch_size"):
        MultiCropDataModule(global_size=30, patch_size=4)
    with pytest.raises(ValueError, match="dataset must be"):
        MultiCropDataModule(dataset="imagenet")


def test_knn_val_loaders_synthetic():
    datamodule = MultiCropDataModule(**TINY, knn_monitor=True, knn_bank_size=12, knn_query_size=6, val_batch_size=5)
    datamodule.setup("fit")
    bank_loader, query_loader = datamodule.val_dataloader()
    bank = [batch for batch in bank_loader]
    assert [len(b["labels"]) for b in bank] == [5, 5, 2] and len(query_loader.dataset) == 6
    assert bank[0]["images"].shape == (5, 3, 32, 32) and bank[0]["labels"].dtype == torch.long
    # Bank, query and train images are different samples.
    train_first = datamodule.train_dataset.dataset[0]["image"]
    assert not np.array_equal(datamodule.knn_bank_dataset[0]["image"], train_first)
    assert not np.array_equal(datamodule.knn_bank_dataset[0]["image"], datamodule.knn_query_dataset[0]["image"])
    # Eval transform keeps the whole image (resize 32 -> 32): exactly the normalised sample.
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (torch.from_numpy(datamodule.knn_bank_dataset[0]["image"]).float() / 255 - mean) / std
    torch.testing.assert_close(bank[0]["images"][0], expected.permute(2, 0, 1), atol=1e-5, rtol=0)
    assert MultiCropDataModule(**TINY).val_dataloader() == []


def _write_fashion(root: Path, train: bool, count: int) -> None:
    prefix = "train" if train else "t10k"
    rng = np.random.default_rng(count)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = (np.arange(count) % 10).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    for name, array, magic in (("images-idx3", images, 0x803), ("labels-idx1", labels, 0x801)):
        header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
        (root / f"{prefix}-{name}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))


def test_fashion_mnist_datamodule_with_knn(tmp_path):
    _write_fashion(tmp_path, True, 20)
    _write_fashion(tmp_path, False, 10)
    settings = {**TINY, "dataset": "fashion_mnist", "root": str(tmp_path), "knn_monitor": True}
    datamodule = MultiCropDataModule(**settings, knn_bank_size=8, knn_query_size=4)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["global_crops"].shape == (8, 3, 32, 32) and batch["labels"].max() <= 9
    bank_loader, query_loader = datamodule.val_dataloader()
    assert len(bank_loader.dataset) == 8 and len(query_loader.dataset) == 4
    assert datamodule.knn_bank_dataset.dataset.train and not datamodule.knn_query_dataset.dataset.train
    assert next(iter(query_loader))["images"].shape == (4, 3, 32, 32)


def test_folder_knn_split_is_disjoint(tmp_path):
    root = _image_folder(tmp_path / "images", num_good=10, corrupt=False)
    datamodule = MultiCropDataModule(
        **{**TINY, "dataset": "folder", "root": str(root)}, knn_monitor=True, knn_bank_size=6, knn_query_size=6
    )
    datamodule.setup("fit")
    bank, query = datamodule.knn_bank_dataset, datamodule.knn_query_dataset
    assert len(bank) == 5 and len(query) == 5 and not set(bank.indices) & set(query.indices)
    labels = next(iter(datamodule.val_dataloader()[0]))["labels"]
    assert set(labels.tolist()) <= {0, 1}


class _ConsumeBatches(pl.LightningModule):
    """Minimal module that checks the batches Lightning hands over."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.val_batches: list[int] = []

    def training_step(self, batch, batch_idx):
        assert batch["global_crops"].shape[0] == 2 * batch["labels"].shape[0]
        assert batch["masks"].shape == (batch["global_crops"].shape[0], 64)
        return self.layer(batch["global_crops"].mean(dim=(2, 3))).mean()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.val_batches.append(dataloader_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("knn_monitor", [False, True])
def test_trainer_fit_fast_dev_run(knn_monitor):
    module = _ConsumeBatches()
    datamodule = MultiCropDataModule(**TINY, num_samples=8, knn_monitor=knn_monitor, knn_bank_size=4, knn_query_size=4)
    trainer = pl.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=datamodule)
    assert sorted(set(module.val_batches)) == ([0, 1] if knn_monitor else [])


def test_hyperparameters_map_from_yaml_like_config():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MultiCropDataModule, "data")
    config = parser.parse_args(
        ["--data.dataset=synthetic", "--data.global_scale=[0.4, 1.0]", "--data.gram_size=64", "--data.patch_size=4"]
    )
    datamodule = MultiCropDataModule(**config.data.as_dict())
    assert datamodule.hparams.global_scale == (0.4, 1.0) and datamodule.transform.gram_size == 64
