"""One rank of the 2-process evaluation tests (tests/test_ddp_eval.py), launched as torchrun launches it: the rank and
rendezvous come from the environment and Lightning's ``ddp`` strategy joins them. The KNN, LinearProbe and
BankQueryEvaluation validations all run in the same two processes, which saves two interpreter starts per run.
Each rank writes ``results_rank<r>.json`` (the logged metrics of every run) into OUT_DIR.

Usage: ``python -m tests.ddp_eval_worker OUT_DIR`` with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L

from tests.test_bank_query import BankQueryData, NearestBankIndex
from tests.test_ddp_eval import RecordSeenIndices, classification_data, knn_model, linear_probe_model


def validate(model: L.LightningModule, data: L.LightningDataModule, callbacks=()) -> dict[str, float]:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=list(callbacks),
    )
    metrics = trainer.validate(model, datamodule=data)[0]
    assert trainer.world_size == 2, "the processes did not join one DDP group"
    return {name: float(value) for name, value in metrics.items()}


def main(out_dir: str) -> None:
    out = Path(out_dir)
    # Models are built here exactly as the single-process runs of the tests build them (same seeds, same weights).
    runs: dict[str, Callable[[], dict[str, float]]] = {
        "knn": lambda: validate(knn_model(), classification_data(knn_mode=True), [RecordSeenIndices(str(out))]),
        "linear_probe": lambda: validate(linear_probe_model(), classification_data(knn_mode=False)),
        "bank_query": lambda: validate(NearestBankIndex(record_dir=str(out)), BankQueryData(padded_bank=True)),
    }
    results = {name: run() for name, run in runs.items()}
    (out / f"results_rank{os.environ['RANK']}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
