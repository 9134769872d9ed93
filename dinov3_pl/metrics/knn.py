"""kNN classification metrics, shared by the evaluation modules and the SSL module's online monitor."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

__all__ = ["KNNAccuracy", "knn_class_scores", "knn_predict"]


class KNNAccuracy(Metric):
    """Weighted k-nearest-neighbour classification accuracy of features, the DINO/DINOv3 kNN protocol.

    Feed bank (train) features with ``update(features, labels, bank=True)`` and query features with
    ``bank=False``; ``compute()`` classifies every query by its ``k`` most cosine-similar bank features, each
    neighbour voting for its label with weight ``softmax(similarity / temperature)`` over the ``max(ks)`` nearest
    (upstream ``dinov3/eval/knn.py``; the common normaliser does not change the ranking, so this is the same vote
    as ``exp(similarity / T)``). Several ``k`` share one neighbour search.

    Features are L2-normalised in ``compute()``; the search is chunked over queries and bank so a bank of millions
    of vectors fits in memory (at most ``query_chunk_size × bank_chunk_size`` similarities live at once).

    Under DDP the bank stays sharded: each rank keeps the bank rows it was fed; ``compute()`` gathers the queries
    (the small side) to every rank, each rank finds every query's ``max(ks)`` nearest rows of its own shard, and
    those candidates (similarities and labels, ``world × max(ks)`` per query) are gathered and merged into the
    global nearest neighbours. Ties in the merge go to the lower rank, then to the earlier candidate, so every rank
    computes the same result; up to the order of exactly tied similarities it equals the single-process result.
    ``compute()`` must then be called on every rank (it uses collectives). ``bank_size`` and ``num_queries`` hold
    the global numbers of rows the last ``compute()`` used.

    Returns ``{"top1_k10": ..., "top5_k10": ..., "top1_k20": ...}``: the fraction of queries whose label is the
    top-scoring class (top-1) or among the 5 top-scoring classes (top-5, only if there are more than 5 classes;
    a class that got no vote never counts, so ties among zero scores cannot decide it),
    i.e. micro-averaged accuracy as ``torchmetrics.MulticlassAccuracy(average="micro", top_k=...)``. A ``k`` larger
    than the bank is clipped to the bank size (the key keeps the requested ``k``).

    Args:
        ks: numbers of neighbours to evaluate.
        temperature: vote temperature T (0.07 upstream).
        num_classes: number of classes; ``None`` infers ``max(label) + 1`` over bank and queries.
        query_chunk_size, bank_chunk_size: sizes of the similarity blocks.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        ks: Sequence[int] = (10, 20, 100, 200),
        temperature: float = 0.07,
        num_classes: int | None = None,
        query_chunk_size: int = 1024,
        bank_chunk_size: int = 65536,
        **metric_kwargs,
    ) -> None:
        super().__init__(**metric_kwargs)
        ks = tuple(int(k) for k in ks)
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.ks = ks
        self.temperature = float(temperature)
        self.num_classes = num_classes
        self.query_chunk_size = query_chunk_size
        self.bank_chunk_size = bank_chunk_size
        for name in ("bank_features", "bank_labels", "query_features", "query_labels"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.bank_size = self.num_queries = 0
        # Set by _sync_dist for the compute() that follows it: the group and per-rank row counts of a sharded bank.
        self._shards: _ShardInfo | None = None

    def update(self, features: Tensor, labels: Tensor, bank: bool) -> None:
        """Adds ``features`` [B, D] with integer ``labels`` [B] to the bank (``bank=True``) or to the queries."""
        if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected features [B, D] and labels [B], got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError("kNN needs labelled samples; got a negative label (-1 marks unlabelled samples)")
        if self.num_classes is not None and labels.numel() and int(labels.max()) >= self.num_classes:
            raise ValueError(f"label {int(labels.max())} is out of range for num_classes={self.num_classes}")
        features, labels = features.detach().float(), labels.detach().long()
        if bank:
            self.bank_features.append(features)
            self.bank_labels.append(labels)
        else:
            self.query_features.append(features)
            self.query_labels.append(labels)

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None) -> None:
        """Gathers the queries (and the per-rank row counts) to every rank; the bank stays a local shard."""
        group = process_group or self.process_group
        self._shards = None
        if torch.distributed.get_world_size(group) == 1:
            return
        gather = dist_sync_fn or gather_all_tensors
        device = self.device
        local_features = [t for t in (*self.query_features, *self.bank_features) if t.numel()]
        local_labels = [t for t in (*self.query_labels, *self.bank_labels) if t.numel()]
        summary = torch.tensor(
            [
                _num_rows(self.query_features),
                _num_rows(self.bank_features),
                local_features[0].shape[1] if local_features else 0,
                max((int(t.max()) for t in local_labels), default=-1),
            ],
            dtype=torch.long,
            device=device,
        )
        summary = torch.stack(gather(summary, group=group)).cpu()
        dims = set(summary[:, 2].tolist()) - {0}
        if len(dims) > 1:
            raise ValueError(f"KNNAccuracy got features of different sizes {sorted(dims)} on different processes")
        dim = dims.pop() if dims else 0
        queries = _cat_rows(self.query_features, dim, device)
        query_labels = _cat_rows(self.query_labels, None, device)
        self.query_features = torch.cat(gather(queries, group=group))
        self.query_labels = torch.cat(gather(query_labels, group=group))
        self._shards = _ShardInfo(group, gather, summary[:, 1].tolist(), int(summary[:, 3].max()))

    def compute(self) -> dict[str, Tensor]:
        shards, self._shards = self._shards, None
        if shards is not None and self._is_synced:
            return self._compute_sharded(shards)
        # One process (or no DDP sync): every bank and query row is local.
        if _num_rows(self.bank_features) == 0:
            raise ValueError("KNNAccuracy has an empty bank: call update(..., bank=True) with train features first")
        if _num_rows(self.query_features) == 0:
            raise ValueError("KNNAccuracy has no queries: call update(..., bank=False) with evaluation features")
        bank = F.normalize(dim_zero_cat(self.bank_features), dim=1)
        bank_labels = dim_zero_cat(self.bank_labels)
        queries = F.normalize(dim_zero_cat(self.query_features), dim=1)
        query_labels = dim_zero_cat(self.query_labels)
        num_classes = self.num_classes or int(max(bank_labels.max(), query_labels.max())) + 1
        top5 = num_classes > 5
        correct = {(top, k): torch.zeros((), device=bank.device) for k in self.ks for top in (1, 5)}
        chunks = knn_class_scores(
            queries,
            bank,
            bank_labels,
            self.ks,
            self.temperature,
            num_classes,
            self.query_chunk_size,
            self.bank_chunk_size,
        )
        for start, scores_by_k in chunks:
            _count_hits(scores_by_k, query_labels[start : start + self.query_chunk_size], correct, top5)
        self.bank_size, self.num_queries = bank.shape[0], queries.shape[0]
        return self._accuracies(correct, queries.shape[0], top5)

    def _compute_sharded(self, shards: _ShardInfo) -> dict[str, Tensor]:
        """Global kNN accuracy over a bank split across ranks (called on every rank, after ``_sync_dist``)."""
        bank_size = sum(shards.bank_rows)
        if bank_size == 0:
            raise ValueError("KNNAccuracy has an empty bank: call update(..., bank=True) with train features first")
        if self.query_features.shape[0] == 0:
            raise ValueError("KNNAccuracy has no queries: call update(..., bank=False) with evaluation features")
        device = self.device
        queries = F.normalize(self.query_features.to(device), dim=1)
        query_labels = self.query_labels.to(device)
        bank = F.normalize(_cat_rows(self.bank_features, queries.shape[1], device), dim=1)
        bank_labels = _cat_rows(self.bank_labels, None, device)
        num_classes = self.num_classes or shards.max_label + 1
        top5 = num_classes > 5
        correct = {(top, k): torch.zeros((), device=device) for k in self.ks for top in (1, 5)}
        max_k = min(max(self.ks), bank_size)
        for start in range(0, queries.shape[0], self.query_chunk_size):
            chunk = queries[start : start + self.query_chunk_size]
            # Fixed width max_k on every rank (padded with -inf) so the gathered candidates line up per query.
            sims = torch.full((chunk.shape[0], max_k), float("-inf"), device=device)
            labels = torch.zeros((chunk.shape[0], max_k), dtype=torch.long, device=device)
            if bank.shape[0]:
                local_sims, local_idx = _nearest(chunk, bank, min(max_k, bank.shape[0]), self.bank_chunk_size)
                sims[:, : local_sims.shape[1]] = local_sims
                labels[:, : local_idx.shape[1]] = bank_labels[local_idx]
            sims = torch.cat(shards.gather(sims, group=shards.group), dim=1)
            labels = torch.cat(shards.gather(labels, group=shards.group), dim=1)
            # Stable: equal similarities keep rank order, then each rank's own order; every rank merges alike.
            order = sims.sort(dim=1, descending=True, stable=True).indices[:, :max_k]
            scores_by_k = _vote(sims.gather(1, order), labels.gather(1, order), self.ks, self.temperature, num_classes)
            _count_hits(scores_by_k, query_labels[start : start + self.query_chunk_size], correct, top5)
        self.bank_size, self.num_queries = bank_size, queries.shape[0]
        return self._accuracies(correct, queries.shape[0], top5)

    def _accuracies(self, correct: dict[tuple[int, int], Tensor], total: int, top5: bool) -> dict[str, Tensor]:
        result = {}
        for k in self.ks:
            result[f"top1_k{k}"] = correct[(1, k)] / total
            if top5:
                result[f"top5_k{k}"] = correct[(5, k)] / total
        return result


class _ShardInfo(NamedTuple):
    group: Any
    gather: Callable
    bank_rows: list[int]
    max_label: int


def _cat_rows(state: list[Tensor] | Tensor, dim: int | None, device: torch.device) -> Tensor:
    """A list state as one tensor on ``device``; empty: ``[0, dim]`` features or ``[0]`` labels (``dim=None``)."""
    if isinstance(state, Tensor):
        return state.to(device)
    if state:
        return torch.cat(state).to(device)
    if dim is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.zeros(0, dim, device=device)


def _count_hits(
    scores_by_k: dict[int, Tensor], labels: Tensor, correct: dict[tuple[int, int], Tensor], top5: bool
) -> None:
    for k, scores in scores_by_k.items():
        best = scores.topk(5 if top5 else 1, dim=1)
        # A class without a single vote is never a hit, whatever order topk gives tied zero scores.
        hits = (best.indices == labels[:, None]) & (best.values > 0)
        correct[(1, k)] += hits[:, 0].sum()
        if top5:
            correct[(5, k)] += hits.any(dim=1).sum()


def _num_rows(state: list[Tensor] | Tensor) -> int:
    return sum(t.shape[0] for t in state) if isinstance(state, list) else state.shape[0]


def _nearest(queries: Tensor, bank: Tensor, max_k: int, bank_chunk_size: int) -> tuple[Tensor, Tensor]:
    """Top-``max_k`` similarities [Q, k] and bank indices for ``queries``, merged over chunks of the bank."""
    best_sims = best_idx = None
    for start in range(0, bank.shape[0], bank_chunk_size):
        sims = queries @ bank[start : start + bank_chunk_size].T
        sims, idx = sims.topk(min(max_k, sims.shape[1]), dim=1)
        idx = idx + start
        if best_sims is not None:
            sims, idx = torch.cat([best_sims, sims], dim=1), torch.cat([best_idx, idx], dim=1)
            sims, order = sims.topk(min(max_k, sims.shape[1]), dim=1)
            idx = idx.gather(1, order)
        best_sims, best_idx = sims, idx
    return best_sims, best_idx


def knn_class_scores(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    query_chunk_size: int = 1024,
    bank_chunk_size: int = 65536,
) -> Iterator[tuple[int, dict[int, Tensor]]]:
    """Yields ``(first query index, {k: class scores [chunk, C]})`` per chunk of L2-normalised ``queries``.

    ``bank`` must be L2-normalised too. The score of class c is the sum, over the ``k`` nearest bank vectors with
    label c, of ``softmax(similarity / temperature)`` taken over the ``min(max(ks), len(bank))`` nearest.
    """
    max_k = min(max(ks), bank.shape[0])
    for start in range(0, queries.shape[0], query_chunk_size):
        sims, idx = _nearest(queries[start : start + query_chunk_size], bank, max_k, bank_chunk_size)
        yield start, _vote(sims, bank_labels[idx], ks, temperature, num_classes)


def _vote(
    sims: Tensor, neighbour_labels: Tensor, ks: Sequence[int], temperature: float, num_classes: int
) -> dict[int, Tensor]:
    """Class scores [Q, C] per ``k`` from the nearest neighbours' similarities and labels [Q, max_k], best first."""
    max_k = sims.shape[1]
    votes = torch.softmax(sims / temperature, dim=1)
    scores_by_k = {}
    for k in ks:
        kk = min(k, max_k)
        scores = torch.zeros(sims.shape[0], num_classes, device=sims.device, dtype=votes.dtype)
        scores_by_k[k] = scores.scatter_add_(1, neighbour_labels[:, :kk], votes[:, :kk])
    return scores_by_k


def knn_predict(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict[int, Tensor]:
    """Top-1 kNN predictions [Q] per ``k`` for raw (not yet normalised) features; same vote as ``KNNAccuracy``."""
    queries, bank = F.normalize(queries.float(), dim=1), F.normalize(bank.float(), dim=1)
    num_classes = num_classes or int(bank_labels.max()) + 1
    predictions: dict[int, list[Tensor]] = {k: [] for k in ks}
    for _, scores_by_k in knn_class_scores(queries, bank, bank_labels.long(), ks, temperature, num_classes):
        for k, scores in scores_by_k.items():
            predictions[k].append(scores.argmax(dim=1))
    return {k: torch.cat(parts) for k, parts in predictions.items()}
