"""Samplers for evaluation loaders under DDP."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DistributedSampler

__all__ = ["ShardedEvalSampler"]


class ShardedEvalSampler(DistributedSampler):
    """Splits an evaluation set over the DDP ranks without padding or dropping: every sample is seen exactly once.

    Strided, in dataset order: rank ``r`` of ``W`` takes indices ``r, r + W, r + 2W, ...``, so shard sizes differ
    by at most one (the first ``len(dataset) % W`` ranks take one more). torch's ``DistributedSampler`` instead pads
    the last shard with repeated samples so every rank has the same count, and those duplicates are counted twice by
    dataset-level metrics. It is a ``DistributedSampler`` subclass so that Lightning (``use_distributed_sampler``)
    keeps it instead of wrapping the loader in its own padded sampler.

    Ranks may therefore run different numbers of batches: code that runs per evaluation step must not use
    collectives (``all_gather``, ``self.log(..., on_step=True, sync_dist=True)``); torchmetrics' epoch-end sync is
    fine. Without an initialised process group (or with ``num_replicas=1``) it yields ``0 .. len(dataset) - 1``.

    Args:
        dataset: the evaluation dataset (only its length is used).
        num_replicas, rank: the world size and this process's rank; default: from ``torch.distributed``.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        size = len(dataset)
        if size < self.num_replicas:
            # An empty shard would leave its rank out of the epoch-end metric sync, which then waits forever.
            raise ValueError(
                f"an evaluation set of {size} samples cannot be split over {self.num_replicas} processes with at "
                "least one sample each; evaluate on fewer devices or with more samples"
            )
        self.total_size = size
        self.num_samples = len(range(self.rank, size, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
