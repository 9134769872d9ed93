"""The per-process side of the sharded-kNN test (tests/test_ddp_eval.py), kept apart so that each spawned process
imports only torch and the metric, not Lightning and the models."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torchmetrics.utilities.distributed import gather_all_tensors

from dinov3_pl.metrics import KNNAccuracy

# Per-rank slices of a 61-row bank and 29 queries: uneven, one rank without bank rows, one without queries.
BANK_SLICES = [(0, 40), (40, 40), (40, 61)]
QUERY_SLICES = [(0, 10), (10, 29), (29, 29)]
METRIC_OPTIONS = {"ks": (1, 5, 20, 100), "query_chunk_size": 7, "bank_chunk_size": 9}  # k=100 > bank: clipped
FEATURE_DIM = 16


def clustered(num: int, seed: int, num_classes: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(num_classes, FEATURE_DIM, generator=torch.Generator().manual_seed(99))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num,), generator=generator)
    return centres[labels] + 1.5 * torch.randn(num, FEATURE_DIM, generator=generator), labels


def _recording_gather(log: list[tuple[int, ...]], tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    log.append(tuple(tensor.shape))
    return gather_all_tensors(tensor, group=group)


def sharded_metric_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Feeds this rank's slices to a KNNAccuracy, computes it and writes the result and what it gathered."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bank, bank_labels = clustered(61, seed=0)
        queries, query_labels = clustered(29, seed=1)
        gathered_shapes: list[tuple[int, ...]] = []
        metric = KNNAccuracy(**METRIC_OPTIONS, dist_sync_fn=partial(_recording_gather, gathered_shapes))
        (b0, b1), (q0, q1) = BANK_SLICES[rank], QUERY_SLICES[rank]
        for start in range(b0, b1, 16):  # several updates per rank, as in an epoch
            end = min(start + 16, b1)
            metric.update(bank[start:end], bank_labels[start:end], bank=True)
        if q1 > q0:
            metric.update(queries[q0:q1], query_labels[q0:q1], bank=False)
        result = {name: value.item() for name, value in metric.compute().items()}
        report = {
            "result": result,
            "bank_size": metric.bank_size,
            "num_queries": metric.num_queries,
            "local_bank_rows": sum(t.shape[0] for t in metric.bank_features),  # the shard survives compute()
            "gathered_shapes": gathered_shapes,
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()
