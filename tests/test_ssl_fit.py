"""DINOSSLModule under a real Trainer: smoke fit from the CLI, NaN guard, bad config keys (exact resume:
tests/test_exact_resume.py)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import Dataset

from dinov3_pl.cli import main as cli_main
from dinov3_pl.data.datasets import SyntheticShapes
from dinov3_pl.data.multicrop import MultiCropDataModule
from dinov3_pl.modules.ssl import DINOSSLModule
from dinov3_pl.modules.ssl_config import BackboneConfig, HeadConfig, OptimConfig

TINY = dict(depth=2, embed_dim=32, num_heads=2, patch_size=4, img_size=16)
STEPS_PER_EPOCH = 4


def tiny_module(**optim) -> DINOSSLModule:
    return DINOSSLModule(
        # Drop path and RoPE rescaling on: resume must also restore the random state they draw from.
        backbone=BackboneConfig(timm_overrides=TINY, drop_path_rate=0.1, rope_rescale=2.0),
        dino_head=HeadConfig(num_prototypes=64, hidden_dim=48, bottleneck_dim=16),
        ibot_head=HeadConfig(num_prototypes=64, hidden_dim=48, bottleneck_dim=16),
        optim=OptimConfig(
            **{"total_steps": 3 * STEPS_PER_EPOCH, "warmup_steps": 2, "freeze_last_layer_steps": 1, **optim}
        ),
    )


def tiny_data(train: Dataset | None = None, **kwargs) -> MultiCropDataModule:
    """Multi-crop batches of 8 from ``train`` (default: 32 embedded shapes of 24 px, 4 batches per epoch)."""
    options = dict(
        train=SyntheticShapes(8 * STEPS_PER_EPOCH, image_size=24, seed=0) if train is None else train,
        patch_size=4,
        global_size=16,
        local_size=8,
        num_local_crops=2,
        blur_kernel_size=3,
        batch_size=8,
        num_workers=0,
    )
    return MultiCropDataModule(**{**options, **kwargs})


def trainer(tmp_path, **kwargs) -> L.Trainer:
    options = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    return L.Trainer(**{**options, **kwargs})


def test_fit_reduces_the_loss_and_teacher_follows(tmp_path):
    L.seed_everything(0)
    module = tiny_module(lr=5e-3, lr_scaling="none")
    teacher_before = [p.clone() for p in module.teacher.parameters()]
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    fit = trainer(tmp_path, max_epochs=3, enable_checkpointing=False, callbacks=[Record()])
    fit.fit(module, tiny_data())
    assert len(losses) == 3 * STEPS_PER_EPOCH and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, module.teacher.parameters(), strict=True))


class InjectNaN(L.Callback):
    """Poisons the global crops of the given batches."""

    def __init__(self, batches: set[int]) -> None:
        self.batches = batches

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.batches or batch_idx in self.batches:
            batch["global_crops"][0, 0, 0, 0] = float("nan")


def test_nan_step_is_skipped_and_weights_untouched(tmp_path):
    L.seed_everything(0)
    module = tiny_module()
    snapshot = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                snapshot.update({k: v.clone() for k, v in pl_module.state_dict().items()})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:
                for key, value in pl_module.state_dict().items():
                    if key != "skipped_steps":
                        assert torch.equal(value, snapshot[key]), f"{key} changed on a skipped step"

    fit = trainer(tmp_path, max_epochs=1, enable_checkpointing=False, callbacks=[InjectNaN({2}), Snapshot()])
    fit.fit(module, tiny_data())
    assert int(module.skipped_steps) == 1 and module.consecutive_bad_steps == 0


def test_consecutive_nan_steps_stop_with_a_clear_error(tmp_path):
    L.seed_everything(0)
    module = DINOSSLModule(**{**tiny_module().hparams, "max_consecutive_bad_steps": 2})
    fit = trainer(tmp_path, max_epochs=1, enable_checkpointing=False, callbacks=[InjectNaN({0, 1, 2, 3})])
    with pytest.raises(FloatingPointError, match="2 consecutive optimizer steps skipped.*non-finite loss"):
        fit.fit(module, tiny_data())


def cli_args(tmp_path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        "configs/pretrain/demo_cpu.yaml",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.max_epochs=1",
        "--trainer.max_steps=3",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[]",
        "--data.init_args.train.init_args.num_samples=48",
        "--data.init_args.batch_size=16",
        "--data.init_args.num_workers=0",
        "--data.init_args.knn_bank_size=32",
        "--data.init_args.knn_query_size=16",
        "--model.init_args.optim.warmup_steps=1",
        "--model.init_args.optim.total_steps=3",
        f"--checkpoint.dirpath={tmp_path}/checkpoints",
        *extra,
    ]


def test_demo_config_fits_from_the_cli_and_checkpoint_rebuilds_the_backbone(tmp_path):
    from dinov3_pl.models.backbone import DINOv3Backbone

    cli = cli_main(cli_args(tmp_path))
    assert cli.trainer.global_step == 3
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["backbone_config"]["timm_overrides"]["patch_size"] == 8
    # The datasets are recorded by the run's config.yaml, not pickled into the checkpoint.
    assert not {"train", "knn_bank", "knn_queries"} & set(checkpoint["datamodule_hyper_parameters"])
    saved = (tmp_path / "config.yaml").read_text()
    assert "SyntheticShapes" in saved and "num_samples: 48" in saved
    backbone = DINOv3Backbone(
        weights=str(tmp_path / "checkpoints" / "last.ckpt"),
        arch="vit_small_patch16_dinov3",
        **checkpoint["backbone_config"]["timm_overrides"],
    )
    teacher = cli.model.teacher.backbone
    for key, value in teacher.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key


def test_unknown_config_key_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(cli_args(tmp_path, "--model.init_args.optim.learning_rate=0.1"))
    assert "learning_rate" in capsys.readouterr().err
