"""ExactResume: checkpoints whose loop state Lightning restores exactly, wherever the checkpoint was written.

Lightning (checked with 2.6) restores a checkpoint written at the end of a training batch correctly, but not every
checkpoint written later in the same step: when ``max_steps`` ends a run on the last batch of an epoch with
validation off, the ``last.ckpt`` written at ``on_train_epoch_end`` resumes *inside* the finished epoch (one batch
past ``limit_train_batches``, every later epoch shifted by one batch), and after any checkpoint written when a
``max_steps`` run ends, Lightning passes the next epoch's index + 1 to ``sampler.set_epoch``. Both were measured
against uninterrupted runs (tests/test_exact_resume.py).

This callback records the fit loop's state at the end of every training batch and writes that state into every
checkpoint, whatever hook triggers the save: the model, optimizer and data state of a checkpoint are those after
the last trained batch anyway, and now the loop state says so too. Validation that ran after that batch is not
repeated on resume. ``DINOSSLModule`` installs it (``configure_callbacks``); add it to the Trainer's callbacks for
other modules.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L

__all__ = ["ExactResume"]


class ExactResume(L.Callback):
    """Writes the fit-loop state of the last finished training batch into every checkpoint (see module doc)."""

    def __init__(self) -> None:
        self._fit_loop_state: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # A few hundred bytes of counters per step; the copy keeps later increments out of the snapshot.
        self._fit_loop_state = copy.deepcopy(trainer.fit_loop.state_dict())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_loop_state = None  # a fresh fit (or a resumed one) records its own batches

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._fit_loop_state is not None and "loops" in checkpoint:
            checkpoint["loops"]["fit_loop"] = copy.deepcopy(self._fit_loop_state)
