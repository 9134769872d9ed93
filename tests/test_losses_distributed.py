"""Distributed centering for real: 2 CPU processes (gloo) must reproduce the single-process result on the
concatenated batch, also with a different number of rows per process and with 0 rows on one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov3_pl.losses.centering import SoftmaxCenter, sinkhorn_knopp

WORLD_SIZE = 2
NUM_PROTOTYPES = 12
TEMPERATURE = 0.1


def _sinkhorn_cases() -> dict[str, list[torch.Tensor]]:
    """Per-rank teacher logits, identical in every process (seeded)."""
    generator = torch.Generator().manual_seed(123)

    def logits(rows: int) -> torch.Tensor:
        return torch.randn(rows, NUM_PROTOTYPES, generator=generator) * 0.5

    return {
        "equal_rows": [logits(6), logits(6)],
        "different_rows": [logits(3), logits(9)],  # e.g. masked patches: M differs per GPU
        "zero_rows_on_rank1": [logits(7), logits(0)],
    }


def _center_batches() -> list[list[torch.Tensor]]:
    """Two steps of per-rank teacher logits: different row counts, then 0 rows on rank 0 (patch-shaped on rank 1)."""
    generator = torch.Generator().manual_seed(7)
    return [
        [torch.randn(3, NUM_PROTOTYPES, generator=generator), torch.randn(5, NUM_PROTOTYPES, generator=generator)],
        [torch.zeros(0, NUM_PROTOTYPES), torch.randn(2, 4, NUM_PROTOTYPES, generator=generator)],
    ]


def _worker(rank: int, tmp_dir: str) -> None:
    """Runs both checks in one spawn (starting a process that imports torch is most of the test's time)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_dir}/rdzv", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {
            f"sinkhorn/{name}": sinkhorn_knopp(parts[rank], TEMPERATURE) for name, parts in _sinkhorn_cases().items()
        }
        center = SoftmaxCenter(NUM_PROTOTYPES, momentum=0.7)
        for step, parts in enumerate(_center_batches()):
            results[f"probs{step}"] = center.probs(parts[rank], TEMPERATURE)
            center.update(parts[rank])
            results[f"center{step}"] = center.center.clone()
        torch.save(results, Path(tmp_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    """Results of the two gloo processes, one dict per rank."""
    tmp_dir = tmp_path_factory.mktemp("losses_distributed")
    mp.spawn(_worker, args=(str(tmp_dir),), nprocs=WORLD_SIZE, join=True)
    return [torch.load(tmp_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def test_sinkhorn_knopp_two_processes_match_concatenated_batch(per_rank):
    for name, parts in _sinkhorn_cases().items():
        expected = sinkhorn_knopp(torch.cat(parts), TEMPERATURE)
        for rank in range(WORLD_SIZE):
            assert per_rank[rank][f"sinkhorn/{name}"].shape == parts[rank].shape, name
        got = torch.cat([per_rank[rank][f"sinkhorn/{name}"] for rank in range(WORLD_SIZE)])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7, msg=name)
        # The reduction matters: each rank alone would give a different answer.
        if all(len(part) for part in parts):
            alone = torch.cat([sinkhorn_knopp(part, TEMPERATURE) for part in parts])
            assert not torch.allclose(alone, expected, rtol=1e-3, atol=1e-4), name


def test_softmax_center_two_processes_match_concatenated_batch(per_rank):
    center = SoftmaxCenter(NUM_PROTOTYPES, momentum=0.7)
    for step, parts in enumerate(_center_batches()):
        for rank in range(WORLD_SIZE):
            torch.testing.assert_close(per_rank[rank][f"probs{step}"], center.probs(parts[rank], TEMPERATURE))
        center.update(torch.cat([part.reshape(-1, NUM_PROTOTYPES) for part in parts]))
        for rank in range(WORLD_SIZE):
            torch.testing.assert_close(per_rank[rank][f"center{step}"], center.center, rtol=1e-6, atol=1e-7)
    # The global mean differs from either rank's own mean (the all-reduce is exercised).
    first_step = _center_batches()[0]
    local_only = 0.3 * first_step[0].mean(dim=0)
    assert not torch.allclose(per_rank[0]["center0"], local_only, atol=1e-3)
