"""Helpers shared by the tests: a one-epoch CPU fit logging to TensorBoard, the image tags it logged, the project's
CLI, and a tiny dinov3-pl pretraining checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger


def fit_one_epoch(
    model: L.LightningModule,
    data: L.LightningDataModule,
    log_dir: Path,
    name: str,
    callbacks: Sequence[L.Callback] = (),
) -> tuple[L.Trainer, TensorBoardLogger]:
    """Fits ``model`` on ``data`` for one epoch on the CPU, logging to TensorBoard under ``log_dir/name``."""
    logger = TensorBoardLogger(log_dir, name=name)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=logger,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    return trainer, logger


def logged_image_tags(logger: TensorBoardLogger) -> list[str]:
    """Tags of the images written to ``logger``'s event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(logger.log_dir)).Reload().Tags()["images"]


def logged_scalars(logger: TensorBoardLogger) -> dict[str, list[float]]:
    """Every scalar written to ``logger``'s event files, by tag, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logger.log_dir)).Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run_cli(args: list[str]):
    """The project's CLI (dinov3_pl.cli); without a subcommand it only instantiates model and DataModule."""
    from dinov3_pl.cli import DINOv3CLI

    return DINOv3CLI(args=args, run=args[0] == "fit")


def save_tiny_ssl_checkpoint(path: Path, timm_overrides: dict, arch: str = "vit_small_patch16_dinov3") -> Path:
    """A seeded random teacher saved the way ``DINOSSLModule`` checkpoints it: the EMA teacher's backbone under
    ``teacher.backbone.*`` and the architecture under ``backbone_config`` (all that evaluation reads)."""
    from dinov3_pl.models.backbone import DINOv3Backbone

    torch.manual_seed(0)
    teacher = DINOv3Backbone(arch, **timm_overrides)
    checkpoint = {
        "state_dict": {f"teacher.backbone.{key}": value for key, value in teacher.state_dict().items()},
        "backbone_config": {"arch": arch, "timm_overrides": timm_overrides},
    }
    torch.save(checkpoint, path)
    return path
