"""DINOSSLModule under a real Trainer: smoke fit from the CLI, exact resume, NaN guard, bad config keys."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dinov3_pl.cli import main as cli_main
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


def tiny_data(**kwargs) -> MultiCropDataModule:
    options = dict(
        dataset="synthetic",
        num_samples=8 * STEPS_PER_EPOCH,
        image_size=24,
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


def state(module: DINOSSLModule, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "student": {k: v.clone() for k, v in module.student.state_dict().items()},
        "teacher": {k: v.clone() for k, v in module.teacher.state_dict().items()},
        "optimizer": {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state_dict()["state"].items()},
    }


def assert_same(a: dict, b: dict) -> None:
    for part in ("student", "teacher"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for index in a["optimizer"]:
        for name, value in a["optimizer"][index].items():
            assert torch.equal(value, b["optimizer"][index][name]), f"optimizer state {index}.{name} differs"


def test_exact_resume_from_last_checkpoint(tmp_path):
    L.seed_everything(0)
    straight_module = tiny_module()
    straight = trainer(tmp_path / "straight", max_epochs=3, enable_checkpointing=False)
    straight.fit(straight_module, tiny_data())
    expected = state(straight_module, straight.optimizers[0])
    assert straight.global_step == 3 * STEPS_PER_EPOCH

    L.seed_everything(0)
    first = trainer(tmp_path / "resumed", max_epochs=1, callbacks=[ModelCheckpoint(save_last=True)])
    first.fit(tiny_module(), tiny_data())  # stops after epoch 1, saving last.ckpt
    L.seed_everything(123)  # a different process state: everything that matters must come from the checkpoint
    resumed_module = tiny_module()
    resumed = trainer(tmp_path / "resumed", max_epochs=3, callbacks=[ModelCheckpoint(save_last=True)])
    resumed.fit(resumed_module, tiny_data(), ckpt_path="last")
    assert resumed.fit_loop.epoch_progress.current.completed == 3
    assert resumed.global_step == 3 * STEPS_PER_EPOCH
    assert_same(state(resumed_module, resumed.optimizers[0]), expected)


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
    with pytest.raises(FloatingPointError, match="2 consecutive non-finite losses"):
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
        "--data.init_args.num_samples=48",
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


def test_exact_resume_from_a_mid_epoch_checkpoint(tmp_path):
    """Interrupted half-way through epoch 2 (checkpoint every 2 steps), resumed: the same weights as straight."""
    L.seed_everything(0)
    straight_module = tiny_module()
    straight = trainer(tmp_path / "straight", max_epochs=2, enable_checkpointing=False)
    straight.fit(straight_module, tiny_data())
    expected = state(straight_module, straight.optimizers[0])

    L.seed_everything(0)
    every_two = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer(tmp_path / "first", max_steps=STEPS_PER_EPOCH + 2, callbacks=[every_two]).fit(tiny_module(), tiny_data())
    middle = tmp_path / "ckpt" / f"epoch=1-step={STEPS_PER_EPOCH + 2}.ckpt"
    assert middle.exists()
    L.seed_everything(7)
    resumed_module = tiny_module()
    resumed = trainer(tmp_path / "resumed", max_epochs=2, enable_checkpointing=False)
    resumed.fit(resumed_module, tiny_data(), ckpt_path=middle)
    assert resumed.global_step == 2 * STEPS_PER_EPOCH
    assert_same(state(resumed_module, resumed.optimizers[0]), expected)
