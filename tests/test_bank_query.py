"""BankQueryEvaluation: the [bank, queries] workflow, the gathered store in dataset order, and a toy task on hand-made
features with a known answer (one process and simulated ranks; the 2-process run is in tests/test_ddp_eval.py)."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dinov3_pl.data.samplers import ShardedEvalSampler
from dinov3_pl.modules.bank_query import BankQueryEvaluation, IndexedRows
from dinov3_pl.modules.knn import KNN

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "img_size": 32}
# Neither a multiple of 2 processes nor of the batch size: padding samplers would repeat samples.
BANK_SIZE, QUERY_SIZE, BATCH_SIZE, DIM = 37, 23, 8, 64


def bank_vectors() -> torch.Tensor:
    # Random unit vectors in 64 dimensions are far apart (|cosine| < 0.6 here), so a slightly moved copy of one is
    # nearest to it.
    return nn.functional.normalize(torch.randn(BANK_SIZE, DIM, generator=torch.Generator().manual_seed(0)), dim=1)


def query_targets() -> torch.Tensor:
    """The bank index each query is a noisy copy of: the known answer."""
    return torch.randperm(BANK_SIZE, generator=torch.Generator().manual_seed(1))[:QUERY_SIZE]


class HandMadeVectors(Dataset):
    """Samples carrying a hand-made feature vector; ``labels`` is what a task keeps with it."""

    def __init__(self, is_bank: bool) -> None:
        bank = bank_vectors()
        if is_bank:
            self.vectors, self.labels = bank, torch.arange(BANK_SIZE) % 5
        else:
            noise = 0.05 * torch.randn(QUERY_SIZE, DIM, generator=torch.Generator().manual_seed(2))
            self.vectors, self.labels = bank[query_targets()] + noise, query_targets()

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, index: int) -> dict:
        return {"vectors": self.vectors[index], "labels": self.labels[index], "indices": index}


class NearestBankIndex(BankQueryEvaluation):
    """Toy task: the dataset index of each query's most similar bank row, scored against the query's label (the
    index it was made from). Features are the samples' hand-made vectors instead of the backbone's."""

    metric_prefix = "toy"

    def __init__(self, record_dir: str | None = None, trainable: bool = False) -> None:
        super().__init__(backbone_kwargs=TINY)
        self.save_hyperparameters()
        self.scale = nn.Parameter(torch.ones(())) if trainable else None
        self.feature_calls: list[tuple[str, int]] = []
        self.gathered: list[dict[str, dict[str, list]]] = []

    def batch_features(self, batch: dict, stage: str, dataloader_idx: int = 0) -> torch.Tensor:
        self.feature_calls.append((stage, dataloader_idx))
        return batch["vectors"]

    def compute(self) -> dict[str, torch.Tensor]:
        local_bank_rows = len(self.bank_rows)
        bank, queries = self.gathered_bank(), self.gathered_queries()
        nearest = bank["indices"][(queries["features"] @ bank["features"].T).argmax(dim=1)]
        record = {
            name: {key: value.tolist() for key, value in rows.items()}
            for name, rows in (("bank", bank), ("queries", queries))
        }
        record["local"] = {"bank_rows": local_bank_rows}
        self.gathered.append(record)
        if self.hparams.record_dir is not None:
            Path(self.hparams.record_dir, f"rank{self.global_rank}.json").write_text(json.dumps(record))
        return {
            "found": (nearest == queries["labels"]).float().mean(),
            "bank_size": torch.tensor(float(len(bank["indices"]))),
            "num_queries": torch.tensor(float(len(queries["indices"]))),
        }

    # Only for the sanity-check test: a parameter to train, so that fit runs.
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.scale**2

    def configure_optimizers(self):
        if self.scale is None:
            return super().configure_optimizers()
        return torch.optim.SGD([self.scale], lr=0.1)


class BankQueryData(L.LightningDataModule):
    """``[bank, queries]`` loaders. ``padded_bank``: the bank loader has no sampler, so under DDP Lightning gives it
    torch's ``DistributedSampler``, which repeats a sample to even the shards; the queries shard without repeats."""

    def __init__(self, num_loaders: int = 2, padded_bank: bool = False) -> None:
        super().__init__()
        self.num_loaders, self.padded_bank = num_loaders, padded_bank

    def train_dataloader(self) -> DataLoader:
        return DataLoader(HandMadeVectors(is_bank=True), batch_size=BATCH_SIZE)

    def _loader(self, dataset: Dataset, shard: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=BATCH_SIZE, sampler=ShardedEvalSampler(dataset) if shard else None)

    def val_dataloader(self) -> list[DataLoader]:
        bank = self._loader(HandMadeVectors(is_bank=True), shard=not self.padded_bank)
        queries = self._loader(HandMadeVectors(is_bank=False), shard=True)
        return [bank, queries, queries][: self.num_loaders]

    test_dataloader = val_dataloader


def trainer(**kwargs) -> L.Trainer:
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    return L.Trainer(enable_model_summary=False, enable_checkpointing=False, **{**options, **kwargs})


def check_gathered(record: dict) -> None:
    """The gathered rows are the whole dataset in its order, each sample once, columns aligned."""
    assert record["bank"]["indices"] == list(range(BANK_SIZE))
    assert torch.tensor(record["bank"]["features"]).equal(bank_vectors())
    assert record["bank"]["labels"] == (torch.arange(BANK_SIZE) % 5).tolist()
    assert record["queries"]["indices"] == list(range(QUERY_SIZE))
    assert record["queries"]["labels"] == query_targets().tolist()


# ------------------------------------------------------------------------------------------- one process
def test_toy_task_finds_the_known_nearest_rows_in_validate_and_test():
    model = NearestBankIndex()
    validated = trainer().validate(model, datamodule=BankQueryData())[0]
    tested = trainer().test(model, datamodule=BankQueryData())[0]
    assert validated == tested == {"toy/found": 1.0, "toy/bank_size": BANK_SIZE, "toy/num_queries": QUERY_SIZE}
    assert len(model.gathered) == 2
    for record in model.gathered:
        check_gathered(record)

    def one_epoch(stage: str) -> list[tuple[str, int]]:
        return [(stage, 0)] * math.ceil(BANK_SIZE / BATCH_SIZE) + [(stage, 1)] * math.ceil(QUERY_SIZE / BATCH_SIZE)

    assert model.feature_calls == one_epoch("val") + one_epoch("test")
    # State is forgotten after each epoch.
    assert len(model.bank_rows) == len(model.query_rows) == 0


class CountSanityBatches(L.Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            self.count += 1


def test_lightning_sanity_check_is_skipped_in_fit():
    model, sanity_batches = NearestBankIndex(trainable=True), CountSanityBatches()
    fit = trainer(max_epochs=1, limit_train_batches=1, num_sanity_val_steps=2, callbacks=[sanity_batches])
    fit.fit(model, datamodule=BankQueryData())
    assert sanity_batches.count == 4  # the sanity pass ran 2 batches of each loader through validation_step ...
    # ... which used none of them: one compute, over the whole data of the real validation epoch.
    assert len(model.gathered) == 1
    check_gathered(model.gathered[0])
    assert len(model.feature_calls) == math.ceil(BANK_SIZE / BATCH_SIZE) + math.ceil(QUERY_SIZE / BATCH_SIZE)
    assert float(fit.callback_metrics["toy/found"]) == 1.0


@pytest.mark.parametrize("num_loaders, got", [(1, "a single evaluation loader"), (3, "3 evaluation loaders")])
def test_other_than_two_loaders_is_an_error_before_the_first_batch(num_loaders, got):
    model = NearestBankIndex()
    with pytest.raises(ValueError, match=rf"NearestBankIndex got {got}; it needs two, \[bank, queries\]"):
        trainer().validate(model, datamodule=BankQueryData(num_loaders=num_loaders))
    assert model.feature_calls == []  # no pass over the bank was wasted


def test_fit_without_anything_to_train_is_refused_and_knn_is_a_bank_query_evaluation():
    with pytest.raises(RuntimeError, match=r"NearestBankIndex trains nothing; run it with `dinov3-pl validate`"):
        trainer(max_steps=1).fit(NearestBankIndex(), datamodule=BankQueryData())
    knn = KNN(backbone_kwargs=TINY, ks=(1,))
    assert isinstance(knn, BankQueryEvaluation) and knn.metric_prefix == "knn"


def test_default_update_needs_indices_and_the_kept_entries():
    model = NearestBankIndex()
    features = torch.randn(2, DIM)
    with pytest.raises(ValueError, match="batches need an 'indices' entry"):
        model.update(features, {"labels": torch.tensor([0, 1])}, is_bank=True)
    with pytest.raises(ValueError, match=r"this batch has no \['labels'\]: set kept_batch_keys"):
        model.update(features, {"indices": torch.tensor([0, 1])}, is_bank=True)
    model.update(features, {"indices": torch.tensor([4, 2]), "labels": torch.tensor([1, 0])}, is_bank=False)
    assert len(model.query_rows) == 2 and len(model.bank_rows) == 0


# ------------------------------------------------------------------------------------------- IndexedRows
def test_indexed_rows_sorts_by_index_drops_repeats_and_checks_columns():
    rows = IndexedRows()
    assert rows.gather(lambda tensor: tensor) == {}
    rows.add(torch.tensor([3, 0]), features=torch.tensor([[3.0], [0.0]]), labels=torch.tensor([13, 10]))
    rows.add([2, 1, 3], features=torch.tensor([[2.0], [1.0], [3.0]]), labels=torch.tensor([12, 11, 13]))
    gathered = rows.gather(lambda tensor: tensor)
    assert gathered["indices"].tolist() == [0, 1, 2, 3]
    assert gathered["features"].flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    assert gathered["labels"].tolist() == [10, 11, 12, 13]
    assert len(rows) == 5  # the local rows stay as added until reset
    with pytest.raises(ValueError, match=r"columns \['features', 'indices', 'labels'\]; got \['features', 'indices'\]"):
        rows.add([5], features=torch.zeros(1, 1))
    with pytest.raises(ValueError, match="column 'labels' has shape \\(2,\\); it needs one row per index \\(1\\)"):
        rows.add([5], features=torch.zeros(1, 1), labels=torch.tensor([1, 2]))
    rows.reset()
    assert len(rows) == 0 and rows.local() == {}


def simulate_ranks(world: int, work: Callable[[int, Callable], object]) -> list:
    """Runs ``work(rank, all_gather)`` on ``world`` threads whose ``all_gather`` behaves as
    ``LightningModule.all_gather`` under DDP: same-shaped tensors in, ``[world, ...]`` out. Returns each rank's
    result, or the exception it raised."""
    barrier = threading.Barrier(world, timeout=20)  # a rank that skips a collective breaks the barrier
    slots: list = [None] * world
    results: list = [None] * world

    def all_gather_of(rank: int) -> Callable:
        def all_gather(tensor: torch.Tensor) -> torch.Tensor:
            barrier.wait()
            slots[rank] = tensor.clone()
            barrier.wait()
            stacked = torch.stack(slots)  # unequal shapes fail here, where torch.distributed would hang
            barrier.wait()
            return stacked

        return all_gather

    def run(rank: int) -> None:
        try:
            results[rank] = work(rank, all_gather_of(rank))
        except Exception as error:  # noqa: BLE001 - handed back to the test
            results[rank] = error

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("padded", [False, True], ids=["ShardedEvalSampler", "DistributedSampler"])
def test_indexed_rows_gather_every_rank_gets_the_dataset_in_order(padded):
    """3 simulated ranks. ShardedEvalSampler: uneven shards (4, 3, 3); torch's DistributedSampler: even shards of
    4, padded with repeats of samples 0 and 1. Every rank gets each sample once, in dataset order."""
    size, world = 10, 3
    features = torch.randn(size, 5, generator=torch.Generator().manual_seed(0))

    def work(rank: int, all_gather: Callable) -> dict:
        rows = IndexedRows()
        # Shards handed out in reverse, so sample 0 is on the last rank, behind the other ranks' zero padding (index
        # 0 too) in the gathered order: only trimming the padding keeps it out.
        shard_rank = world - 1 - rank
        if padded:
            sampler = DistributedSampler(range(size), num_replicas=world, rank=shard_rank, shuffle=False)
        else:
            sampler = ShardedEvalSampler(range(size), num_replicas=world, rank=shard_rank)
        shard = torch.tensor(list(sampler))
        for batch in shard.split(2):
            rows.add(batch, features=features[batch], labels=batch % 4)
        return {"local_rows": len(rows), **rows.gather(all_gather)}

    results = simulate_ranks(world, work)
    assert sum(result["local_rows"] for result in results) == (12 if padded else 10)
    for result in results:
        assert result["indices"].tolist() == list(range(size))
        assert result["features"].equal(features)
        assert result["labels"].tolist() == [index % 4 for index in range(size)]


def test_indexed_rows_gather_with_an_empty_rank_fails_alike_on_every_rank():
    def work(rank: int, all_gather: Callable) -> dict:
        rows = IndexedRows()
        if rank != 1:
            rows.add([rank], features=torch.zeros(1, 3))
        return rows.gather(all_gather)

    results = simulate_ranks(3, work)
    assert all(isinstance(result, ValueError) for result in results), results
    assert all("processes [1] kept no rows while others did" in str(result) for result in results)
    assert simulate_ranks(2, lambda rank, all_gather: IndexedRows().gather(all_gather)) == [{}, {}]


# The 2-process run (padded bank sampler, gathered in dataset order): tests/test_ddp_eval.py, which shares its
# processes with the other evaluations.
