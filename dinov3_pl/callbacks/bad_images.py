"""BadImageCount: how many unreadable images an evaluation skipped, so a score over fewer images does not pass
unnoticed.

The DataModules drop undecodable samples and count them in each batch's ``num_bad_images`` (one ``RuntimeWarning``
per file from the loader). This callback adds the counts up per stage and epoch over every process and, when some
were skipped, logs ``data/bad_images_<stage>`` and warns once per epoch with the number. Frozen-backbone evaluations
install it (``FrozenBackboneModule.configure_callbacks``); pretraining counts its own (``data/bad_images_epoch``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["BadImageCount"]


class BadImageCount(L.Callback):
    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def _add(self, stage: str, batch: Any) -> None:
        if isinstance(batch, dict):
            self._counts[stage] = self._counts.get(stage, 0) + int(batch.get("num_bad_images", 0))

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        count = self._counts.pop(stage, 0)
        if trainer.sanity_checking:
            return
        # Every process calls this (a collective): the total is the same everywhere, so is the decision to log.
        total = int(trainer.strategy.reduce(torch.tensor(float(count), device=pl_module.device), reduce_op="sum"))
        if total:
            pl_module.log(f"data/bad_images_{stage}", float(total), rank_zero_only=True)
            rank_zero_warn(
                f"{stage}: {total} unreadable image(s) were skipped this epoch, so it saw that many images fewer (the "
                "loader's warnings name the files)"
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._add("train", batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._add("val", batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._add("test", batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "test")
