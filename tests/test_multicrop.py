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
from torch.utils.data import Dataset

from dinov3_pl.data.datasets import FashionMNIST, ImageFolder, SyntheticShapes
from dinov3_pl.data.masking import ibot_mask_counts
from dinov3_pl.data.multicrop import EpochSeedSampler, MultiCropCollate, MultiCropDataModule

TINY = dict(patch_size=4, global_size=32, local_size=16, num_local_crops=2, batch_size=4, num_workers=0)


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


def shapes(num_samples: int, seed: int = 0) -> SyntheticShapes:
    return SyntheticShapes(num_samples, image_size=32, seed=seed)


def _first_batch(transfer: bool = True, **kwargs) -> dict:
    """The first training batch as the workers send it, and with ``transfer`` as the training step receives it
    (the DataModule's ``on_after_batch_transfer`` normalises the uint8 crops)."""
    datamodule = MultiCropDataModule(**{**TINY, **kwargs})
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    return datamodule.on_after_batch_transfer(batch, 0) if transfer else batch


def test_synthetic_train_batch_format():
    sent = _first_batch(transfer=False, train=shapes(16), gram_size=64)
    assert all(sent[key].dtype == torch.uint8 for key in ("global_crops", "local_crops", "gram_crops"))
    batch = _first_batch(train=shapes(16), gram_size=64)
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
    reference = _first_batch(train=shapes(16, seed=5), seed=5)
    same = _first_batch(train=shapes(16, seed=5), seed=5)
    with_workers = _first_batch(train=shapes(16, seed=5), seed=5, num_workers=2, persistent_workers=False)
    other_seed = _first_batch(train=shapes(16, seed=5), seed=6)  # the same images, other order and crops
    for key in ("global_crops", "local_crops", "masks", "labels"):
        assert torch.equal(reference[key], same[key]), key
        assert torch.equal(reference[key], with_workers[key]), key
    assert not torch.equal(reference["global_crops"], other_seed["global_crops"])


def test_each_epoch_draws_new_crops():
    datamodule = MultiCropDataModule(**{**TINY, "train": shapes(8), "batch_size": 8})
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
    datamodule = MultiCropDataModule(**{**TINY, "train": ImageFolder(root), "batch_size": 7})
    datamodule.setup("fit")
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        batch = next(iter(datamodule.train_dataloader()))
    assert batch["num_bad_images"] == 1 and batch["global_crops"].shape == (12, 3, 32, 32)
    assert batch["labels"].tolist() == [-1] * 6

    raising = MultiCropDataModule(**{**TINY, "train": ImageFolder(root, on_bad_image="raise"), "batch_size": 7})
    raising.setup("fit")
    with pytest.raises(ValueError, match="broken.jpg"):
        next(iter(raising.train_dataloader()))


def test_dataset_smaller_than_one_batch_is_a_clear_error():
    datamodule = MultiCropDataModule(**{**TINY, "train": shapes(5), "batch_size": 8})
    datamodule.setup("fit")
    with pytest.raises(ValueError, match="5 images, fewer than one batch of 8: lower data.init_args.batch_size"):
        datamodule.train_dataloader()


class PILImages(Dataset):
    """A user's own images held in memory: PIL images of several sizes and modes, no labels, and a lambda (which a
    checkpoint that pickled the dataset could not hold)."""

    def __init__(self, count: int) -> None:
        rng = np.random.default_rng(0)
        self.images = [
            Image.fromarray(rng.integers(0, 256, (20 + index % 3, 24, 3), dtype=np.uint8)).convert(
                "L" if index % 2 else "RGB"
            )
            for index in range(count)
        ]
        self.describe = lambda index: f"image {index}"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index]}


def test_an_in_memory_dataset_of_pil_images_without_labels_pretrains_through_the_python_api(tmp_path):
    from tests.test_ssl_fit import tiny_data, tiny_module, trainer

    data = tiny_data(PILImages(16))  # 2 batches of 8 per epoch
    batch = next(iter(data.train_dataloader()))
    assert batch["global_crops"].shape == (16, 3, 16, 16) and batch["labels"].tolist() == [-1] * 8
    fit = trainer(tmp_path, max_steps=2, enable_checkpointing=False)
    module = tiny_module()
    fit.fit(module, data)
    assert fit.global_step == 2 and int(module.skipped_steps) == 0
    # The dataset stays out of the checkpoint (pickling its lambda would fail); the DataModule's settings are in it.
    fit.save_checkpoint(tmp_path / "run.ckpt")
    saved = torch.load(tmp_path / "run.ckpt", map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    assert "train" not in saved and saved["batch_size"] == 8


def test_knn_monitor_on_an_unlabelled_training_set_names_the_options_to_change(tmp_path):
    root = tmp_path / "unlabelled"
    root.mkdir()
    for index in range(4):
        Image.fromarray(np.full((24, 24, 3), 40 * index, dtype=np.uint8)).save(root / f"{index}.png")
    datamodule = MultiCropDataModule(**TINY, train=ImageFolder(root), knn_monitor=True)
    with pytest.raises(ValueError) as raised:
        datamodule.setup("fit")
    assert str(raised.value) == (
        f"knn_monitor: true needs labelled images for the kNN bank and queries, and the training set (ImageFolder at "
        f"{root}, num_classes=0) is unlabelled (an ImageFolder reads its class sub-folders as labels with "
        "with_labels: true): give data.init_args.knn_bank and data.init_args.knn_queries (labelled datasets), or set "
        "data.init_args.knn_monitor=false to pretrain without the kNN monitor"
    )
    with pytest.raises(ValueError, match=r"training set \(PILImages, no num_classes attribute\) is unlabelled: give"):
        MultiCropDataModule(**TINY, train=PILImages(8), knn_monitor=True).setup("fit")
    with pytest.raises(ValueError, match="the training set .* is unlabelled"):  # the queries would come from train
        MultiCropDataModule(**TINY, train=ImageFolder(root), knn_bank=shapes(8), knn_monitor=True).setup("fit")
    with pytest.raises(ValueError, match=r"data.init_args.knn_bank \(ImageFolder at .*\) has num_classes=0: the kNN"):
        MultiCropDataModule(**TINY, train=shapes(8), knn_bank=ImageFolder(root), knn_monitor=True).setup("fit")
    # Fine without the monitor, and with labelled bank and queries given.
    MultiCropDataModule(**TINY, train=ImageFolder(root)).setup("fit")
    given = MultiCropDataModule(
        **TINY, train=ImageFolder(root), knn_bank=shapes(8, seed=1), knn_queries=shapes(4, seed=2), knn_monitor=True
    )
    given.setup("fit")
    assert len(given.knn_bank_dataset) == 8 and len(given.knn_query_dataset) == 4


def test_argument_and_sample_errors():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        MultiCropDataModule(global_size=30, patch_size=4)
    with pytest.raises(TypeError, match="train must be a map-style dataset .*got str; for a folder of images use"):
        MultiCropDataModule(train="/data/images")
    with pytest.raises(ValueError, match="knn_query_size must be positive, got 0"):
        MultiCropDataModule(knn_query_size=0)

    class Tuples(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int):
            return np.zeros((8, 8, 3), dtype=np.uint8), 0

    class Tensors(Tuples):
        def __getitem__(self, index: int):
            return {"image": torch.zeros(3, 8, 8)}

    with pytest.raises(TypeError, match=r"Tuples sample \d is a tuple; samples must be dicts with 'image'"):
        _first_batch(train=Tuples(), batch_size=2)
    with pytest.raises(TypeError, match=r"Tensors sample \d has a Tensor image; expected uint8 \[H, W, 3\] RGB"):
        _first_batch(train=Tensors(), batch_size=2)


def test_the_embedded_default_is_the_former_synthetic_default():
    """train=None: 2048 shapes of 64 px drawn with ``seed``; the kNN monitor on fresh sets (seeds + 1, + 2)."""
    datamodule = MultiCropDataModule(**TINY, knn_monitor=True, knn_bank_size=12, knn_query_size=6, seed=3)
    datamodule.setup("fit")
    train, bank, queries = datamodule.datasets["train"], datamodule.knn_bank_dataset, datamodule.knn_query_dataset
    for dataset, expected in ((train, SyntheticShapes(2048, 64, seed=3)), (bank, SyntheticShapes(12, 64, seed=4))):
        assert len(dataset) == len(expected)
        for index in (0, len(expected) - 1):
            assert np.array_equal(dataset[index]["image"], expected[index]["image"])
    assert len(queries) == 6 and np.array_equal(queries[5]["image"], SyntheticShapes(6, 64, seed=5)[5]["image"])
    assert MultiCropDataModule(**TINY).val_dataloader() == []


def test_knn_val_loaders_of_given_bank_and_queries():
    datamodule = MultiCropDataModule(
        **TINY,
        train=shapes(16),
        knn_bank=shapes(12, seed=1),
        knn_queries=shapes(6, seed=2),
        knn_monitor=True,
        val_batch_size=5,
    )
    datamodule.setup("fit")
    # Not longer than knn_bank_size / knn_query_size: used whole, in their order.
    assert datamodule.knn_bank_dataset is datamodule.datasets["knn_bank"]
    bank_loader, query_loader = datamodule.val_dataloader()
    bank = [datamodule.on_after_batch_transfer(batch, 0) for batch in bank_loader]
    assert [len(b["labels"]) for b in bank] == [5, 5, 2] and len(query_loader.dataset) == 6
    assert bank[0]["images"].shape == (5, 3, 32, 32) and bank[0]["labels"].dtype == torch.long
    # Eval transform keeps the whole image (resize 32 -> 32): exactly the normalised sample.
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (torch.from_numpy(shapes(12, seed=1)[0]["image"]).float() / 255 - mean) / std
    torch.testing.assert_close(bank[0]["images"][0], expected.permute(2, 0, 1), atol=1e-5, rtol=0)
    assert bank[1]["labels"].tolist() == [5, 6, 7, 0, 1]  # SyntheticShapes cycles through its 8 classes


def _write_fashion(root: Path, train: bool, count: int) -> None:
    prefix = "train" if train else "t10k"
    rng = np.random.default_rng(count)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = (np.arange(count) % 10).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    for name, array, magic in (("images-idx3", images, 0x803), ("labels-idx1", labels, 0x801)):
        header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
        (root / f"{prefix}-{name}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))


def test_fashion_mnist_bank_from_train_and_queries_from_test_are_seeded_subsets(tmp_path):
    _write_fashion(tmp_path, True, 20)
    _write_fashion(tmp_path, False, 10)
    train, test = FashionMNIST(tmp_path, train=True), FashionMNIST(tmp_path, train=False)
    datamodule = MultiCropDataModule(
        **TINY, train=train, knn_queries=test, knn_monitor=True, knn_bank_size=8, knn_query_size=4, seed=7
    )
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["global_crops"].shape == (8, 3, 32, 32) and batch["labels"].max() <= 9
    # As the former dataset="fashion_mnist" drew them: one generator seeded with `seed` gives the bank's permutation
    # of train, then the queries' permutation of test (the Fashion-MNIST recipes keep their kNN numbers).
    generator = np.random.default_rng(7)
    bank, queries = datamodule.knn_bank_dataset, datamodule.knn_query_dataset
    assert bank.dataset is train and bank.indices == generator.permutation(20)[:8].tolist()
    assert queries.dataset is test and queries.indices == generator.permutation(10)[:4].tolist()
    bank_loader, query_loader = datamodule.val_dataloader()
    assert len(bank_loader.dataset) == 8 and next(iter(query_loader))["images"].shape == (4, 3, 32, 32)


def test_folder_knn_split_is_disjoint(tmp_path):
    root = _image_folder(tmp_path / "images", num_good=10, corrupt=False)
    datamodule = MultiCropDataModule(
        **TINY, train=ImageFolder(root, with_labels=True), knn_monitor=True, knn_bank_size=6, knn_query_size=6
    )
    datamodule.setup("fit")
    bank, query = datamodule.knn_bank_dataset, datamodule.knn_query_dataset
    order = np.random.default_rng(0).permutation(10).tolist()  # half for the bank at most, the rest for queries
    assert bank.indices == order[:5] and query.indices == order[5:]
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
    datamodule = MultiCropDataModule(
        **TINY, train=shapes(8), knn_monitor=knn_monitor, knn_bank_size=4, knn_query_size=4
    )
    trainer = pl.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=datamodule)
    assert sorted(set(module.val_batches)) == ([0, 1] if knn_monitor else [])


def test_hyperparameters_and_datasets_map_from_yaml_like_config():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MultiCropDataModule, "data")
    config = parser.parse_args(
        [
            "--data.train={class_path: dinov3_pl.data.SyntheticShapes, init_args: {num_samples: 8, image_size: 32}}",
            "--data.global_scale=[0.4, 1.0]",
            "--data.gram_size=64",
            "--data.patch_size=4",
        ]
    )
    datamodule = parser.instantiate(config).data
    assert datamodule.hparams.global_scale == (0.4, 1.0) and datamodule.transform.gram_size == 64
    train = datamodule.datasets["train"]
    assert isinstance(train, SyntheticShapes) and (len(train), train.image_size) == (8, 32)
    assert not {"train", "knn_bank", "knn_queries"} & set(datamodule.hparams)


def test_class_path_datasets_parse_and_build_through_the_cli(tmp_path, capsys):
    from dinov3_pl.cli import DINOv3CLI
    from dinov3_pl.cli import main as cli_main

    root = _image_folder(tmp_path / "images", num_good=6, corrupt=False)
    config = tmp_path / "folder.yaml"
    config.write_text(
        "data:\n  class_path: dinov3_pl.data.MultiCropDataModule\n  init_args:\n"
        f"    train: {{class_path: dinov3_pl.data.ImageFolder, init_args: {{root: {root}, with_labels: true}}}}\n"
        "    knn_bank: null\n    knn_queries: null\n    knn_bank_size: 2\n    knn_query_size: 2\n"
    )
    # The demo's synthetic sets replaced by a labelled folder: the kNN monitor splits it.
    args = ["--config=configs/pretrain/demo_cpu.yaml", f"--config={config}", "--trainer.logger=false"]
    with pytest.raises(SystemExit):
        cli_main(["fit", *args, "--print_config"])
    printed = capsys.readouterr().out
    assert "ImageFolder" in printed and f"root: {root}" in printed and "knn_bank: null" in printed
    data = DINOv3CLI(args=[*args, f"--trainer.default_root_dir={tmp_path}"], run=False).datamodule
    data.setup("fit")
    assert isinstance(data.datasets["train"], ImageFolder) and data.datasets["train"].root == root
    assert len(data.knn_bank_dataset) == len(data.knn_query_dataset) == 2
    # A folder recipe's root from the command line, under the new key.
    with pytest.raises(SystemExit):
        cli_main(
            [
                "fit",
                "--config=configs/pretrain/vits16_imagenet.yaml",
                f"--data.init_args.train.init_args.root={root}",
                "--print_config",
            ]
        )
    assert f"root: {root}" in capsys.readouterr().out


def test_the_demo_config_spells_out_the_embedded_default():
    """configs/pretrain/demo_cpu.yaml gives its datasets by class_path; they are the embedded default data, so the
    demo draws the batches and kNN sets it drew when they were chosen by dataset: synthetic."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    spec = yaml.safe_load(Path("configs/pretrain/demo_cpu.yaml").read_text())["data"]
    spec["init_args"].update(batch_size=8, val_batch_size=8, num_workers=0)
    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    from_config = parser.instantiate(parser.parse_object({"data": spec})).data
    settings = {k: v for k, v in spec["init_args"].items() if k not in ("train", "knn_bank", "knn_queries")}
    embedded = MultiCropDataModule(**settings, knn_bank_size=1024, knn_query_size=512)
    for datamodule in (from_config, embedded):
        datamodule.setup("fit")
    first = [next(iter(loader)) for loader in (from_config.train_dataloader(), *from_config.val_dataloader())]
    second = [next(iter(loader)) for loader in (embedded.train_dataloader(), *embedded.val_dataloader())]
    for got, expected in zip(first, second, strict=True):
        for key in expected:
            if isinstance(expected[key], torch.Tensor):
                assert torch.equal(got[key], expected[key]), key
