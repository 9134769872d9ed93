"""The evaluation part of docs/extending.md, run for real: its Python examples are read from the page and executed
(a trained probe on FrozenBackboneModule with its YAML, and a retrieval evaluation on BankQueryEvaluation)."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchmetrics.retrieval import RetrievalMAP, RetrievalPrecision

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 8, "img_size": 32}
DOCS = Path(__file__).parents[1] / "docs" / "extending.md"


def docs_example(first_line: str) -> dict:
    """Executes the Python block of docs/extending.md that starts with ``first_line`` as code of this module (so its
    classes are importable as ``tests.test_extending.<name>``, for the CLI) and returns the names it defines."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    matching = [block for block in blocks if block.startswith(first_line + "\n")]
    assert len(matching) == 1, f"docs/extending.md has {len(matching)} python blocks starting with {first_line!r}"
    namespace: dict = {"__name__": __name__}
    exec(compile(matching[0], str(DOCS), "exec"), namespace)  # noqa: S102 - the documented code, as written
    return namespace


# ---------------------------------------------------------------------------- the user's code (from the docs)
CountingProbe = docs_example("# my_tasks/counting.py")["CountingProbe"]
LabelRetrieval = docs_example("# my_tasks/retrieval.py")["LabelRetrieval"]


class ShapeBatchItems(Dataset):
    """SyntheticShapes images as ``{"images", "indices"}`` plus a subclass's target entries."""

    def __init__(self, num_samples: int, seed: int) -> None:
        from dinov3_pl.data.datasets import SyntheticShapes

        self.shapes = SyntheticShapes(num_samples, image_size=32, seed=seed)

    def __len__(self) -> int:
        return len(self.shapes)

    def targets(self, sample: dict) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        sample = self.shapes[index]
        image = torch.from_numpy(sample["image"]).permute(2, 0, 1).float() / 255.0
        return {"images": image, "indices": index, **self.targets(sample)}


class ShapeCounts(ShapeBatchItems):
    """The number of visible shapes as the target."""

    def targets(self, sample: dict) -> dict:
        return {"counts": float(len(sample["boxes"]))}


class ShapeCountsData(L.LightningDataModule):
    def __init__(self, num_train: int = 64, num_val: int = 32, batch_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ShapeCounts(self.hparams.num_train, 0), batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ShapeCounts(self.hparams.num_val, 1), batch_size=self.hparams.batch_size)


# ---------------------------------------------------------------------------- the tests
def test_subclass_fits_and_only_its_head_learns():
    torch.manual_seed(0)
    model = CountingProbe(backbone_kwargs=TINY, lr=0.05)
    backbone_before = {name: value.clone() for name, value in model.backbone.state_dict().items()}
    head_before = model.head.weight.detach().clone()
    trainer = L.Trainer(
        max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu"
    )
    trainer.fit(model, datamodule=ShapeCountsData())
    assert not torch.equal(model.head.weight, head_before)
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[name]), name
    counts = np.array([ShapeCounts(32, 1)[i]["counts"] for i in range(32)])
    assert 1 <= counts.min() and counts.max() <= 3  # a meaningful target: 1-3 shapes per image
    assert torch.isfinite(trainer.callback_metrics["count/mae"])


def test_subclass_runs_from_yaml_through_the_cli(tmp_path):
    pytest.importorskip("dinov3_pl.cli")
    from dinov3_pl.cli import main

    config = tmp_path / "counting.yaml"
    config.write_text(
        f"""
seed_everything: 0
trainer:
  max_steps: 3
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
model:
  class_path: {__name__}.CountingProbe
  init_args:
    backbone_kwargs: {{depth: 2, embed_dim: 64, num_heads: 2, patch_size: 8, img_size: 32}}
    lr: 0.01
data:
  class_path: {__name__}.ShapeCountsData
  init_args:
    num_train: 32
    num_val: 16
"""
    )
    cli = main(["fit", "--config", str(config)])
    assert isinstance(cli.model, CountingProbe) and cli.model.hparams.lr == 0.01
    assert cli.trainer.global_step == 3
    assert "count/mae" in cli.trainer.callback_metrics


# ---------------------------------------------------------------------------- the retrieval example
class LabelledShapes(ShapeBatchItems):
    """The class (8 shapes) as ``labels``."""

    def targets(self, sample: dict) -> dict:
        return {"labels": int(sample["label"])}


class BankAndQueries(L.LightningDataModule):
    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(LabelledShapes(40, seed=0), batch_size=16), DataLoader(LabelledShapes(24, 1), batch_size=16)]


def reference_retrieval(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels):
    """mAP and precision@1 of the bank ranked by cosine similarity, by torchmetrics (one retrieval query per row)."""
    similarity = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    # torchmetrics counts a bank item with a score <= 0 as not retrieved; shifting cosines into [1, 3] keeps the
    # ranking and makes every item retrieved, as in the docs' mAP.
    similarity = similarity + 2
    relevant = query_labels[:, None] == bank_labels[None, :]
    query_ids = torch.arange(len(queries))[:, None].expand_as(similarity)
    arguments = (similarity.flatten(), relevant.flatten())
    mean_ap = RetrievalMAP()(*arguments, indexes=query_ids.flatten())
    precision_at_1 = RetrievalPrecision(top_k=1)(*arguments, indexes=query_ids.flatten())
    return mean_ap.item(), precision_at_1.item()


def test_retrieval_example_on_fixed_features_matches_torchmetrics():
    # Hand-made features: 6 classes of noisy clusters, the bank fed out of dataset order over several batches.
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 12, generator=generator)
    bank_labels, query_labels = torch.randint(0, 6, (50,), generator=generator), torch.arange(20) % 6
    bank = centres[bank_labels] + 1.2 * torch.randn(50, 12, generator=generator)
    queries = centres[query_labels] + 1.2 * torch.randn(20, 12, generator=generator)
    model = LabelRetrieval(backbone_kwargs=TINY)
    for part in torch.randperm(50, generator=generator).split(16):
        model.update(bank[part], {"labels": bank_labels[part], "indices": part}, is_bank=True)
    model.update(queries, {"labels": query_labels, "indices": torch.arange(20)}, is_bank=False)
    result = model.compute()
    expected_map, expected_precision = reference_retrieval(bank, bank_labels, queries, query_labels)
    assert result["mAP"].item() == pytest.approx(expected_map, abs=1e-6)
    assert result["precision_at_1"].item() == pytest.approx(expected_precision, abs=1e-6)
    assert 0.3 < expected_map < 0.95  # informative: well above chance (~1/6), not trivially perfect


def test_retrieval_example_validates_and_matches_torchmetrics_on_the_backbone_features():
    torch.manual_seed(0)
    model = LabelRetrieval(backbone_kwargs=TINY, feature_type="cls_meanpatch")
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    logged = trainer.validate(model, datamodule=BankAndQueries())[0]
    assert set(logged) == {"retrieval/mAP", "retrieval/precision_at_1"}
    # Independent computation from the same backbone's features.
    reference = []
    for dataset in (LabelledShapes(40, seed=0), LabelledShapes(24, seed=1)):
        samples = [dataset[i] for i in range(len(dataset))]
        with torch.no_grad():
            out = model.backbone(torch.stack([sample["images"] for sample in samples]))
        reference += [
            torch.cat([out["cls"], out["patch"].mean(1)], dim=1),
            torch.tensor([s["labels"] for s in samples]),
        ]
    expected_map, expected_precision = reference_retrieval(*reference)
    assert logged["retrieval/mAP"] == pytest.approx(expected_map, abs=1e-6)
    assert logged["retrieval/precision_at_1"] == pytest.approx(expected_precision, abs=1e-6)


# ---------------------------------------------------------------------------- the shipped classification configs
CONFIGS = ["knn_synthetic", "linear_synthetic", "knn_fashion_mnist", "linear_fashion_mnist"]


@pytest.mark.parametrize("name", CONFIGS)
def test_classification_configs_instantiate(name):
    from dinov3_pl.cli import DINOv3CLI
    from dinov3_pl.data.classification import ClassificationDataModule
    from dinov3_pl.data.datasets import default_fashion_mnist_root

    if "fashion_mnist" in name and default_fashion_mnist_root() is None:
        pytest.skip("the Fashion-MNIST datasets read their files when built: needs the Debian dataset-fashion-mnist")
    cli = DINOv3CLI(args=["--config", f"configs/eval/{name}.yaml"], run=False)
    assert isinstance(cli.datamodule, ClassificationDataModule)
    assert cli.datamodule.hparams.knn_mode == name.startswith("knn")
    assert cli.model.backbone.patch_size in (4, 8) and cli.model.backbone.depth in (2, 4)
    assert cli.datamodule.hparams.image_size % cli.model.backbone.patch_size == 0
    splits = cli.datamodule.datasets
    if "synthetic" in name:  # spelled out in the config, and exactly the module's default splits
        spelled = [(split.num_samples, split.image_size, split.seed) for split in splits.values()]
        default = [(s.num_samples, s.image_size, s.seed) for s in ClassificationDataModule().datasets.values()]
        assert spelled == default == [(2048, 64, 0), (512, 64, 1), (512, 64, 2)]
    else:
        assert splits["train"].train and not splits["val"].train and splits["test"] is splits["val"]


def test_knn_synthetic_config_validates_end_to_end(tmp_path):
    from dinov3_pl.cli import main

    overrides = [
        "--data.init_args.train.init_args.num_samples=64",
        "--data.init_args.val.init_args.num_samples=32",
        "--model.init_args.ks=[5, 10]",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]
    cli = main(["validate", "--config", "configs/eval/knn_synthetic.yaml", *overrides])
    metrics = cli.trainer.callback_metrics
    assert {"knn/top1_k5", "knn/top5_k10"} <= set(metrics)
    assert 0.0 <= float(metrics["knn/top1_k5"]) <= 1.0
