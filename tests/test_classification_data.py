"""ClassificationDataModule takes its datasets as objects (``class_path`` in YAML): a user's in-memory dataset of PIL
images through kNN, the YAML form through the CLI, the default synthetic splits, and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import Dataset

from dinov3_pl.cli import main
from dinov3_pl.data import ClassificationDataModule, ImageFolder, SyntheticShapes
from dinov3_pl.modules import KNN, LinearProbe

TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "img_size": 16}


class TwoTones(Dataset):
    """A user's own in-memory dataset: noisy dark (class 0) and bright (class 1) squares as greyscale PIL images."""

    num_classes = 2
    class_names = ("dark", "bright")

    def __init__(self, num_samples: int = 16, seed: int = 0, as_pil: bool = True) -> None:
        rng = np.random.default_rng(seed)
        self.labels = np.arange(num_samples) % 2
        brightness = np.where(self.labels == 1, 190.0, 60.0)[:, None, None]
        self.pixels = np.clip(brightness + rng.normal(0, 20, (num_samples, 16, 16)), 0, 255).astype(np.uint8)
        self.as_pil = as_pil

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        grey = self.pixels[index]
        image = Image.fromarray(grey) if self.as_pil else np.repeat(grey[:, :, None], 3, axis=2)
        return {"image": image, "label": int(self.labels[index])}


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    return L.Trainer(**{**defaults, **kwargs})


def _knn_data(train: Dataset, val: Dataset, **kwargs) -> ClassificationDataModule:
    options = dict(image_size=16, eval_crop_ratio=1.0, batch_size=8, knn_mode=True)
    return ClassificationDataModule(train=train, val=val, **{**options, **kwargs})


# ------------------------------------------------------------------------------------------- a user's dataset
def test_in_memory_pil_dataset_runs_knn_validate_like_its_numpy_arrays():
    torch.manual_seed(0)
    model = KNN(backbone_kwargs=TINY, feature_type="cls_meanpatch", ks=(1, 3))
    from_pil = _trainer().validate(model, _knn_data(TwoTones(16), TwoTones(8, seed=1)))[0]
    # The same pixels as the contract's uint8 [H, W, 3] arrays: PIL greyscale -> RGB must change nothing.
    arrays = _knn_data(TwoTones(16, as_pil=False), TwoTones(8, seed=1, as_pil=False))
    assert _trainer().validate(model, arrays)[0] == from_pil
    assert (from_pil["knn/bank_size"], from_pil["knn/num_queries"]) == (16, 8)
    assert from_pil["knn/top1_k1"] == 1.0  # dark vs bright: separable even by a random-init backbone


def test_default_splits_are_the_embedded_synthetic_shapes_and_subsets_stay_seeded():
    data = ClassificationDataModule(seed=5, max_train_samples=5, max_eval_samples=3)
    assert [(d.num_samples, d.image_size, d.seed) for d in data.datasets.values()] == [
        (2048, 64, 5),
        (512, 64, 6),
        (512, 64, 7),
    ]
    data.setup()
    for offset, split in enumerate(("train", "val", "test")):
        size, limit = (2048, 5) if split == "train" else (512, 3)
        expected = torch.randperm(size, generator=torch.Generator().manual_seed(5 + offset))[:limit].sort().values
        assert data.split(split).base.indices == expected.tolist(), split
    assert data.num_classes == 8 and data.class_names == SyntheticShapes.class_names


def test_test_defaults_to_val_and_num_classes_can_be_given():
    train, val = TwoTones(4), TwoTones(4, seed=1)
    data = ClassificationDataModule(train=train, val=val, num_classes=5, image_size=16)
    assert data.datasets["test"] is val
    data.setup()
    assert data.num_classes == 5 and "num_classes" not in data.hparams  # the model's num_classes may differ


class Plain(Dataset):
    """Labelled samples but no num_classes attribute."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        return {"image": np.full((16, 16, 3), 40 * index, dtype=np.uint8), "label": index % 2}


def test_a_dataset_without_num_classes_needs_the_argument():
    with pytest.raises(ValueError, match=r"train split \(Plain\) has no num_classes attribute: pass num_classes"):
        ClassificationDataModule(train=Plain(), val=Plain())
    data = ClassificationDataModule(train=Plain(), val=Plain(), num_classes=2, image_size=16, batch_size=4)
    batch = next(iter(data.val_dataloader()))
    assert batch["labels"].tolist() == [0, 1, 0, 1] and batch["images"].shape == (4, 3, 16, 16)


class Preparing(TwoTones):
    """Builds its files in prepare(), reads them lazily afterwards (the contract of a dataset that downloads)."""

    def __init__(self, num_samples: int = 4, seed: int = 0) -> None:
        super().__init__(num_samples, seed)
        self.prepare_calls = 0

    def prepare(self) -> None:
        self.prepare_calls += 1


def test_prepare_data_prepares_each_dataset_once():
    train, val = Preparing(), Preparing(seed=1)
    data = ClassificationDataModule(train=train, val=val)  # test is val: prepared once
    data.prepare_data()
    assert (train.prepare_calls, val.prepare_calls) == (1, 1)


class HoldsALambda(TwoTones):
    def __init__(self, num_samples: int = 8, seed: int = 0) -> None:
        super().__init__(num_samples, seed)
        self.augment = lambda image: image  # cannot be pickled


def test_datasets_stay_out_of_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    data = ClassificationDataModule(train=HoldsALambda(), val=HoldsALambda(seed=1), image_size=16, batch_size=8)
    probe = LinearProbe(num_classes=2, backbone_kwargs=TINY, learning_rates=[0.1])
    trainer = _trainer(max_steps=1, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(probe, datamodule=data)
    trainer.save_checkpoint(tmp_path / "probe.ckpt")
    saved = torch.load(tmp_path / "probe.ckpt", map_location="cpu", weights_only=False)
    assert not {"train", "val", "test"} & set(saved["datamodule_hyper_parameters"])
    assert saved["datamodule_hyper_parameters"]["image_size"] == 16


# ------------------------------------------------------------------------------------------- YAML through the CLI
def _write_config(tmp_path, splits: str) -> str:
    config = tmp_path / "knn.yaml"
    config.write_text(
        f"""
seed_everything: 0
trainer:
  accelerator: cpu
  enable_progress_bar: false
  logger: {{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {tmp_path}}}}}
model:
  class_path: dinov3_pl.modules.KNN
  init_args:
    num_classes: 2
    backbone_kwargs: {TINY}
    feature_type: cls_meanpatch
    ks: [1, 3]
data:
  class_path: dinov3_pl.data.ClassificationDataModule
  init_args:
{splits}
    knn_mode: true
    image_size: 16
    eval_crop_ratio: 1.0
    batch_size: 8
"""
    )
    return str(config)


SPLITS = f"""    train: {{class_path: {__name__}.TwoTones, init_args: {{num_samples: 16}}}}
    val: {{class_path: {__name__}.TwoTones, init_args: {{num_samples: 8, seed: 1}}}}"""


def test_class_path_datasets_parse_and_validate_through_the_cli(tmp_path, capsys):
    config = _write_config(tmp_path, SPLITS)
    with pytest.raises(SystemExit) as stop:
        main(["validate", "--config", config, "--print_config"])
    assert stop.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert printed["train"]["class_path"] == f"{__name__}.TwoTones"
    assert printed["train"]["init_args"] == {"num_samples": 16, "seed": 0, "as_pil": True}
    assert printed["test"] is None
    # A nested option from the command line: 6 queries instead of 8.
    cli = main(["validate", "--config", config, "--data.init_args.val.init_args.num_samples=6"])
    metrics = cli.trainer.callback_metrics
    assert (float(metrics["knn/bank_size"]), float(metrics["knn/num_queries"])) == (16, 6)
    assert float(metrics["knn/top1_k1"]) == 1.0
    assert isinstance(cli.datamodule.datasets["train"], TwoTones) and cli.datamodule.datasets["test"].as_pil
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())["data"]["init_args"]
    assert saved["val"]["init_args"]["num_samples"] == 6  # the run's record names its datasets


def test_a_missing_val_split_is_one_line_from_the_cli(tmp_path, capsys):
    config = _write_config(tmp_path, SPLITS.splitlines()[0])
    with pytest.raises(SystemExit) as stop:
        main(["validate", "--config", config])
    assert stop.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "got train (TwoTones) but no val split: pass val" in lines[-1]
    assert not any(line.startswith("Traceback") for line in lines)


# ------------------------------------------------------------------------------------------- errors
def _write_folder(root, classes: list[str]) -> ImageFolder:
    for name in classes:
        (root / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / name / "0.png")
    return ImageFolder(root, with_labels=True)


def test_splits_with_other_class_names_are_refused(tmp_path):
    train = _write_folder(tmp_path / "train", ["a", "b"])
    val = _write_folder(tmp_path / "val", ["a", "c"])
    with pytest.raises(ValueError) as error:
        ClassificationDataModule(train=train, val=val).setup()
    assert str(error.value) == (
        f"the val split (ImageFolder at {tmp_path / 'val'}) has classes ['a', 'c'], the train split (ImageFolder at "
        f"{tmp_path / 'train'}) ['a', 'b']: labels would not match; give every split the same classes"
    )
    good_val, test = _write_folder(tmp_path / "val2", ["a", "b"]), _write_folder(tmp_path / "test", ["b", "c"])
    with pytest.raises(ValueError, match=r"the test split \(ImageFolder at .*test\) has classes \['b', 'c'\]"):
        ClassificationDataModule(train=train, val=good_val, test=test).setup()
    unlabelled = ImageFolder(tmp_path / "train")
    with pytest.raises(ValueError, match="num_classes=0: classification needs labelled data .*with_labels: true"):
        ClassificationDataModule(train=unlabelled, val=good_val).setup()


class WithStrayLabel(TwoTones):
    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        return {**sample, "label": 2} if index == 3 else sample


class Tuples(TwoTones):
    def __getitem__(self, index: int) -> tuple:
        sample = super().__getitem__(index)
        return sample["image"], sample["label"]


class FloatImages(TwoTones):
    def __getitem__(self, index: int) -> dict:
        return {"image": np.zeros((16, 16, 3)), "label": 0}


def test_bad_splits_and_samples_are_one_clear_error():
    with pytest.raises(ValueError, match=r"got train \(TwoTones\) but no val split: pass val"):
        ClassificationDataModule(train=TwoTones())
    with pytest.raises(ValueError, match="got val and test but no train split: pass train too"):
        ClassificationDataModule(val=TwoTones(), test=TwoTones())
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        ClassificationDataModule(train=TwoTones(), val=TwoTones(), num_classes=1)
    with pytest.raises(ValueError, match="max_train_samples must be at least 1"):
        ClassificationDataModule(max_train_samples=0)

    def first_val_batch(val: Dataset) -> dict:
        return next(iter(_knn_data(TwoTones(), val, knn_mode=False).val_dataloader()))

    message = r"val split \(WithStrayLabel\) sample 3 has label 2, outside \[0, 2\) \(num_classes=2;"
    with pytest.raises(ValueError, match=message):
        first_val_batch(WithStrayLabel(8))
    with pytest.raises(TypeError, match=r"val split \(Tuples\) sample 0 is tuple; samples must be dicts with 'image'"):
        first_val_batch(Tuples(8))
    with pytest.raises(TypeError, match=r"sample 0 has a float64 array \(16, 16, 3\) image; expected a PIL image"):
        first_val_batch(FloatImages(8))
