"""The docs/extending.md recipe, run for real: a new frozen-backbone task as a small subclass plus a YAML file."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from dinov3_pl.modules.frozen import FrozenBackboneModule

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 8, "img_size": 32}


# ---------------------------------------------------------------------------- the user's code (as in the docs)
class CountingProbe(FrozenBackboneModule):
    """Predicts how many shapes an image holds from frozen [CLS, mean patch] features (a regression probe)."""

    def __init__(
        self,
        arch: str | None = "vit_small_patch16_dinov3",
        weights: str | None = None,
        backbone_kwargs: dict | None = None,
        feature_type: str = "cls_meanpatch",
        lr: float = 1e-2,
    ) -> None:
        super().__init__(arch=arch, weights=weights, backbone_kwargs=backbone_kwargs, feature_type=feature_type)
        self.save_hyperparameters()
        self.head = nn.Linear(self.feature_dim, 1)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.mse_loss(self.head(self.features(batch["images"])).squeeze(1), batch["counts"])
        self.log("count/train_mse", loss)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        predicted = self.head(self.batch_features(batch, "val")).squeeze(1)
        self.log("count/mae", (predicted - batch["counts"]).abs().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.hparams.lr)


class ShapeCounts(Dataset):
    """SyntheticShapes images with the number of visible shapes as the target."""

    def __init__(self, num_samples: int, seed: int) -> None:
        from dinov3_pl.data.datasets import SyntheticShapes

        self.shapes = SyntheticShapes(num_samples, image_size=32, seed=seed)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> dict:
        sample = self.shapes[index]
        image = torch.from_numpy(sample["image"]).permute(2, 0, 1).float() / 255.0
        return {"images": image, "counts": float(len(sample["boxes"])), "indices": index}


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


# ---------------------------------------------------------------------------- the shipped classification configs
CONFIGS = ["knn_synthetic", "linear_synthetic", "knn_fashion_mnist", "linear_fashion_mnist"]


@pytest.mark.parametrize("name", CONFIGS)
def test_classification_configs_instantiate(name):
    from dinov3_pl.cli import DINOv3CLI
    from dinov3_pl.data.classification import ClassificationDataModule

    cli = DINOv3CLI(args=["--config", f"configs/eval/{name}.yaml"], run=False)
    assert isinstance(cli.datamodule, ClassificationDataModule)
    assert cli.datamodule.hparams.knn_mode == name.startswith("knn")
    assert cli.model.backbone.patch_size in (4, 8) and cli.model.backbone.depth in (2, 4)
    assert cli.datamodule.hparams.image_size % cli.model.backbone.patch_size == 0


def test_knn_synthetic_config_validates_end_to_end(tmp_path):
    from dinov3_pl.cli import main

    overrides = [
        "--data.init_args.synthetic_train_samples=64",
        "--data.init_args.synthetic_eval_samples=32",
        "--model.init_args.ks=[5, 10]",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]
    cli = main(["validate", "--config", "configs/eval/knn_synthetic.yaml", *overrides])
    metrics = cli.trainer.callback_metrics
    assert {"knn/top1_k5", "knn/top5_k10"} <= set(metrics)
    assert 0.0 <= float(metrics["knn/top1_k5"]) <= 1.0
