"""DDP evaluation: eval loaders shard the data without padding duplicates, and the kNN bank stays sharded.

Multi-process tests run real gloo process groups on the CPU: the metric alone in spawned (not forked) processes,
the Lightning modules in one pair of torchrun-style processes (tests/ddp_eval_worker.py) shared by the tests below.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from dinov3_pl.data import SyntheticShapes
from dinov3_pl.data.classification import ClassificationDataModule
from dinov3_pl.data.dense import DetectionDataModule, SegmentationDataModule, SyntheticShapeMasks
from dinov3_pl.data.samplers import ShardedEvalSampler
from dinov3_pl.metrics import KNNAccuracy
from dinov3_pl.modules.knn import KNN
from dinov3_pl.modules.linear_probe import LinearProbe
from tests.ddp_knn_worker import (
    BANK_SLICES,
    FEATURE_DIM,
    METRIC_OPTIONS,
    QUERY_SLICES,
    clustered,
    sharded_metric_worker,
)

TINY_BACKBONE = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "img_size": 32}
# Neither a multiple of 2 processes nor of the batch size 8: DistributedSampler would pad both with duplicates.
BANK_SIZE, QUERY_SIZE, BATCH_SIZE = 37, 23, 8


# ------------------------------------------------------------------------------------------- the sampler alone
@pytest.mark.parametrize("size", [1, 2, 7, 23, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_sharded_eval_sampler_covers_the_dataset_exactly_once(size, world):
    if size < world:
        with pytest.raises(ValueError, match=f"{size} samples cannot be split over {world} processes"):
            ShardedEvalSampler(range(size), num_replicas=world, rank=0)
        return
    shards = [list(ShardedEvalSampler(range(size), num_replicas=world, rank=rank)) for rank in range(world)]
    flat = [index for shard in shards for index in shard]
    assert sorted(flat) == list(range(size))  # union = dataset, no duplicates, nothing dropped
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for rank, shard in enumerate(shards):
        sampler = ShardedEvalSampler(range(size), num_replicas=world, rank=rank)
        assert len(sampler) == len(shard) == sampler.num_samples
        assert shard == list(range(rank, size, world))  # strided, in dataset order


def test_sharded_eval_sampler_without_process_group_and_in_the_data_modules():
    assert not dist.is_initialized()
    assert list(ShardedEvalSampler(range(5))) == [0, 1, 2, 3, 4]
    # A DistributedSampler, so Lightning keeps it instead of injecting its padded one.
    assert isinstance(ShardedEvalSampler(range(5)), DistributedSampler)
    data = ClassificationDataModule(
        train=SyntheticShapes(BANK_SIZE, seed=0),
        val=SyntheticShapes(QUERY_SIZE, seed=1),
        batch_size=BATCH_SIZE,
        knn_mode=True,
    )
    loaders = [*data.val_dataloader(), *data.test_dataloader()]
    assert all(isinstance(loader.sampler, ShardedEvalSampler) for loader in loaders)
    assert [len(loader.sampler) for loader in loaders] == [BANK_SIZE, QUERY_SIZE, BANK_SIZE, QUERY_SIZE]
    assert not isinstance(data.train_dataloader().sampler, ShardedEvalSampler)  # training keeps shuffling
    dense_modules = (
        SegmentationDataModule(train=SyntheticShapeMasks(4, seed=0), val=SyntheticShapeMasks(3, seed=1)),
        DetectionDataModule(train=SyntheticShapes(4, seed=0), val=SyntheticShapes(3, seed=1)),
    )
    for dense in dense_modules:
        dense.setup("validate")
        assert isinstance(dense.val_dataloader().sampler, ShardedEvalSampler)
        assert isinstance(dense.test_dataloader().sampler, ShardedEvalSampler)
        assert not isinstance(dense.train_dataloader().sampler, ShardedEvalSampler)


# ------------------------------------------------------------------------------------------- KNNAccuracy sharded
def test_sharded_knn_accuracy_equals_single_process_and_never_gathers_the_bank(tmp_path):
    """3 ranks with uneven shards (one holds no bank rows, one no queries): every rank gets the single-process
    result, keeps its bank shard, and only the queries are gathered as feature rows."""
    world = 3
    mp.spawn(sharded_metric_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]

    single = KNNAccuracy(**METRIC_OPTIONS)
    bank, bank_labels = clustered(61, seed=0)
    queries, query_labels = clustered(29, seed=1)
    single.update(bank, bank_labels, bank=True)
    single.update(queries, query_labels, bank=False)
    expected = {name: value.item() for name, value in single.compute().items()}
    assert 0.2 < expected["top1_k20"] < 1.0  # informative

    for rank, report in enumerate(reports):
        assert report["result"] == expected, rank
        assert (report["bank_size"], report["num_queries"]) == (61, 29)
        b0, b1 = BANK_SLICES[rank]
        assert report["local_bank_rows"] == b1 - b0
        # Only the queries travel as feature rows; the rest are row counts and [queries, max k] top-k candidates.
        shapes = report["gathered_shapes"]
        feature_gathers = [shape for shape in shapes if len(shape) == 2 and shape[1] == FEATURE_DIM]
        q0, q1 = QUERY_SLICES[rank]
        assert feature_gathers == [[q1 - q0, FEATURE_DIM]], shapes
        assert all(shape[0] <= 29 for shape in report["gathered_shapes"])


# ------------------------------------------------------------------------------------------- Lightning, 2 processes
class RecordSeenIndices(L.Callback):
    """Writes, per rank, the dataset indices every evaluation dataloader handed to the module."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.seen: dict[int, list[int]] = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen.setdefault(dataloader_idx, []).extend(batch["indices"].tolist())

    def on_validation_end(self, trainer, pl_module):
        Path(self.out_dir, f"indices_rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


def _validate_one_process(model: L.LightningModule, data: L.LightningDataModule) -> dict:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return {name: float(value) for name, value in trainer.validate(model, datamodule=data)[0].items()}


def classification_data(knn_mode: bool) -> ClassificationDataModule:
    return ClassificationDataModule(
        train=SyntheticShapes(BANK_SIZE, image_size=32, seed=0),
        val=SyntheticShapes(QUERY_SIZE, image_size=32, seed=1),
        image_size=32,
        batch_size=BATCH_SIZE,
        knn_mode=knn_mode,
        eval_crop_ratio=1.0,
    )


def knn_model() -> KNN:
    torch.manual_seed(0)
    return KNN(backbone_kwargs=TINY_BACKBONE, feature_type="cls_meanpatch", ks=(1, 5, 20))


def linear_probe_model() -> LinearProbe:
    torch.manual_seed(0)
    # Untrained heads: enough to compare the metric; 3 learning rates are 3 independently initialised heads.
    return LinearProbe(num_classes=8, backbone_kwargs=TINY_BACKBONE, learning_rates=(0.1, 0.01, 0.001))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """Runs tests/ddp_eval_worker.py on 2 ranks (KNN, LinearProbe and BankQueryEvaluation validations); its folder."""
    out = tmp_path_factory.mktemp("ddp_eval")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.ddp_eval_worker", str(out)],
            env={**environment, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            cwd=Path(__file__).resolve().parents[1],
        )
        for rank in range(2)
    ]
    assert [process.wait(timeout=600) for process in ranks] == [0, 0]
    return out


def two_process_results(out: Path, run: str) -> dict[str, float]:
    results = [json.loads((out / f"results_rank{rank}.json").read_text())[run] for rank in range(2)]
    assert results[0] == results[1], f"{run}: ranks logged different values"
    return results[0]


def test_knn_validate_on_two_processes_equals_one_process_and_counts_each_sample_once(two_processes):
    single = _validate_one_process(knn_model(), classification_data(knn_mode=True))
    double = two_process_results(two_processes, "knn")
    assert single["knn/bank_size"] == double["knn/bank_size"] == BANK_SIZE
    assert single["knn/num_queries"] == double["knn/num_queries"] == QUERY_SIZE
    assert double == single
    assert {"knn/top1_k5", "knn/top5_k5"} <= set(single)
    seen = [json.loads((two_processes / f"indices_rank{rank}.json").read_text()) for rank in range(2)]
    for loader, size in (("0", BANK_SIZE), ("1", QUERY_SIZE)):
        assert sorted(seen[0][loader] + seen[1][loader]) == list(range(size)), loader  # each sample exactly once


def test_linear_probe_validate_on_two_processes_equals_one_process(two_processes):
    single = _validate_one_process(linear_probe_model(), classification_data(knn_mode=False))
    double = two_process_results(two_processes, "linear_probe")
    per_head = [name for name in single if name.startswith("linear/lr_")]
    assert len(per_head) == 3
    assert double == pytest.approx(single, abs=1e-7)
    # A duplicated query would move an accuracy off the k / 23 grid; check the values are not all trivial.
    assert {round(single[name] * QUERY_SIZE, 4) % 1 for name in per_head} == {0.0}
    assert any(0.0 < single[name] < 1.0 for name in per_head)


def test_bank_query_gathers_the_bank_in_dataset_order_without_repeats_on_two_processes(two_processes):
    """The bank goes through torch's padded DistributedSampler (38 rows for 37 samples), the queries through
    ShardedEvalSampler; both ranks get the whole dataset in order, once (tests/test_bank_query.py's toy task)."""
    from tests.test_bank_query import BANK_SIZE as TOY_BANK
    from tests.test_bank_query import QUERY_SIZE as TOY_QUERIES
    from tests.test_bank_query import BankQueryData, NearestBankIndex, check_gathered

    single = _validate_one_process(NearestBankIndex(), BankQueryData(padded_bank=True))
    double = two_process_results(two_processes, "bank_query")
    assert double == single == {"toy/found": 1.0, "toy/bank_size": TOY_BANK, "toy/num_queries": TOY_QUERIES}
    records = [json.loads((two_processes / f"rank{rank}.json").read_text()) for rank in range(2)]
    for record in records:
        check_gathered(record)
    assert sum(record["local"]["bank_rows"] for record in records) == TOY_BANK + 1  # the repeat was there
