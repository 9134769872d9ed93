"""BankQueryEvaluation: the base of evaluations that compare queries with a bank of frozen features.

kNN classification, image retrieval (revisited Oxford/Paris) and video label propagation (DAVIS) share one workflow:
features of a bank (dataloader 0) and of queries (dataloader 1) are collected over an evaluation epoch, brought
together across DDP ranks, scored once at the end and logged. This module owns that workflow; a task implements
``update`` (what to keep of each batch) and ``compute`` (the scores), or only ``compute`` when the ready store —
features and labels of every sample, gathered in dataset order on every rank — is what it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from dinov3_pl.modules.frozen import FeatureType, FrozenBackboneModule

__all__ = ["BankQueryEvaluation", "IndexedRows"]

BANK, QUERIES = 0, 1


class IndexedRows:
    """Per-sample rows (features, labels, ...) keyed by their dataset index, gathered from every rank in dataset
    order.

    ``add(indices, features=..., labels=...)`` keeps a batch's rows on this rank (detached, on their device). The
    columns are fixed by the first ``add``. ``gather(all_gather)`` returns every rank's rows concatenated, sorted by
    index, each index once: evaluation loaders with ``ShardedEvalSampler`` hand each sample to exactly one rank, and
    the repeats torch's ``DistributedSampler`` pads shards with are the same samples, so they are dropped.
    """

    def __init__(self) -> None:
        self._columns: dict[str, list[Tensor]] = {}

    def __len__(self) -> int:
        return sum(part.shape[0] for part in self._columns.get("indices", []))

    def add(self, indices: Tensor | Sequence[int], **columns: Tensor) -> None:
        """Keeps one batch: ``indices`` [B] (dataset positions) and columns of ``B`` rows each."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.ndim != 1:
            raise ValueError(f"indices must be one index per sample, shape [B]; got shape {tuple(indices.shape)}")
        names = {"indices", *columns}
        if self._columns and names != set(self._columns):
            raise ValueError(f"rows were kept with columns {sorted(self._columns)}; got {sorted(names)}")
        for name, column in columns.items():
            if column.ndim == 0 or column.shape[0] != indices.shape[0]:
                raise ValueError(
                    f"column {name!r} has shape {tuple(column.shape)}; it needs one row per index ({indices.shape[0]})"
                )
        for name, column in {"indices": indices, **columns}.items():
            self._columns.setdefault(name, []).append(column.detach())

    def reset(self) -> None:
        self._columns = {}

    def local(self) -> dict[str, Tensor]:
        """This rank's rows, in the order they were added (``{}`` when none were)."""
        return {name: torch.cat([part.to(parts[0].device) for part in parts]) for name, parts in self._columns.items()}

    def gather(self, all_gather: Callable[[Tensor], Tensor], device: torch.device | None = None) -> dict[str, Tensor]:
        """Every rank's rows, sorted by ``"indices"`` without repeats; ``{}`` when no rank kept any.

        ``all_gather`` has ``LightningModule.all_gather``'s contract: same-shaped tensors in, ``[world, ...]`` out
        under DDP, its input unchanged in a single process. Ranks hold different row counts, so each column is
        padded to the longest shard, gathered and trimmed. Collective: call it on every rank, with the same columns.
        """
        rows = self.local()
        if device is None:
            device = rows["indices"].device if rows else torch.device("cpu")
        rows = {name: column.to(device) for name, column in rows.items()}
        counts = all_gather(torch.tensor([len(self)], device=device))
        if counts.ndim > 1:  # several processes
            counts = counts.reshape(-1).tolist()
            if not any(counts):
                return {}
            if 0 in counts:
                # Every rank sees the same counts, so every rank stops here alike (no rank left waiting).
                empty = [rank for rank, count in enumerate(counts) if count == 0]
                raise ValueError(
                    f"processes {empty} kept no rows while others did; each needs at least one sample of the bank "
                    "and of the queries (evaluate on fewer devices or with more samples)"
                )
            longest = max(counts)
            shards = {}
            for name in sorted(rows):  # the same order on every rank: the collectives pair up
                column = rows[name]
                padding = column.new_zeros((longest - column.shape[0], *column.shape[1:]))
                gathered = all_gather(torch.cat([column, padding]))
                shards[name] = torch.cat([part[:count] for part, count in zip(gathered, counts, strict=True)])
            rows = shards
        if not rows:
            return {}
        order = rows["indices"].argsort(stable=True)
        rows = {name: column[order] for name, column in rows.items()}
        indices = rows["indices"]
        first = torch.ones_like(indices, dtype=torch.bool)
        first[1:] = indices[1:] != indices[:-1]
        return {name: column[first] for name, column in rows.items()}


class BankQueryEvaluation(FrozenBackboneModule):
    """Evaluation of queries against a bank of frozen features: the base of ``KNN``, retrieval and label propagation.

    Run it with ``dinov3-pl validate`` or ``test``; it trains nothing. The evaluation loaders come as a pair
    ``[bank, queries]``: dataloader 0 the bank (e.g. the labelled train split, eval transform), dataloader 1 the
    queries, as ``ClassificationDataModule(knn_mode=True)`` returns them; any other number of loaders is an error
    before the first batch. Each batch's features (``self.batch_features``: the module's ``feature_type``, cached
    with ``cache_eval_features``) go to ``update``; at the end of the epoch ``compute()`` runs on every rank and its
    values are logged as ``<metric_prefix>/<name>``. Lightning's sanity-check pass (a few batches before ``fit``)
    is skipped: scores of a partial bank mean nothing.

    A task implements:

    - ``compute() -> dict[str, Tensor]``: scalar scores. Called on every rank, so it may use collectives; the
      values must be the same on every rank (they are logged with ``reduce_fx="max"``, which keeps identical values
      exact where a mean over ranks can round them).
    - ``update(features, batch, is_bank)`` (optional): what to keep of a batch. The default keeps ``features`` and
      the batch entries named in ``kept_batch_keys`` (``"labels"``) in ``self.bank_rows`` / ``self.query_rows``,
      keyed by ``batch["indices"]``; ``gathered_bank()`` / ``gathered_queries()`` then return every rank's rows in
      dataset order (retrieval ranks the whole bank for each query). A task that keeps other state (``KNN`` feeds
      a sharded ``KNNAccuracy``) overrides ``update`` and ``reset``. ``update`` runs per batch, and ranks may run
      different numbers of batches: no collectives there.
    - ``reset()`` (when it keeps its own state; call ``super().reset()``): forget the epoch's state. Called after
      every ``compute()``, also a failed one.

    Under DDP, give both loaders ``dinov3_pl.data.samplers.ShardedEvalSampler`` (``ClassificationDataModule``
    does): each sample is then seen once, by one rank. Subclasses that override ``on_validation_epoch_start`` /
    ``_end`` (or the test ones) must call ``super()``.

    Args:
        arch, weights, backbone_kwargs, feature_type, n_last_blocks, cache_eval_features: see
            ``FrozenBackboneModule``.
    """

    metric_prefix: ClassVar[str] = "eval"
    kept_batch_keys: ClassVar[tuple[str, ...]] = ("labels",)

    def __init__(
        self,
        arch: str | None = "vit_small_patch16_dinov3",
        weights: str | None = None,
        backbone_kwargs: dict | None = None,
        feature_type: FeatureType = "cls",
        n_last_blocks: int = 1,
        cache_eval_features: bool = False,
    ) -> None:
        super().__init__(
            arch=arch,
            weights=weights,
            backbone_kwargs=backbone_kwargs,
            feature_type=feature_type,
            n_last_blocks=n_last_blocks,
            cache_eval_features=cache_eval_features,
        )
        self.bank_rows = IndexedRows()
        self.query_rows = IndexedRows()
        self._loaders_seen: set[int] = set()

    # ------------------------------------------------------------------------------------ the hooks of a task
    def update(self, features: Tensor, batch: dict[str, Any], is_bank: bool) -> None:
        """Keeps ``features`` [B, F] and ``batch[key]`` for ``key`` in ``kept_batch_keys``, keyed by the batch's
        dataset ``"indices"``, in ``bank_rows`` (``is_bank``) or ``query_rows``."""
        name = type(self).__name__
        if "indices" not in batch:
            raise ValueError(
                f"{name} keeps features by dataset index: batches need an 'indices' entry (the dataset's position of "
                "each sample, as ClassificationDataModule gives), or override update()"
            )
        missing = [key for key in self.kept_batch_keys if key not in batch]
        if missing:
            raise ValueError(
                f"{name} keeps the batch entries {list(self.kept_batch_keys)} (kept_batch_keys); this batch has no "
                f"{missing}: set kept_batch_keys to the entries your task needs"
            )
        kept = {key: torch.as_tensor(batch[key], device=features.device) for key in self.kept_batch_keys}
        indices = torch.as_tensor(batch["indices"], device=features.device)
        (self.bank_rows if is_bank else self.query_rows).add(indices, features=features, **kept)

    def compute(self) -> dict[str, Tensor]:
        """The epoch's scores, ``{name: scalar}``, logged as ``<metric_prefix>/<name>``; runs on every rank."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute() -> dict[str, Tensor]")

    def reset(self) -> None:
        """Forgets the epoch's rows."""
        self.bank_rows.reset()
        self.query_rows.reset()

    # ------------------------------------------------------------------------------------ the ready store
    def gathered_bank(self) -> dict[str, Tensor]:
        """Every rank's bank rows in dataset order: ``{"indices": [N], "features": [N, F], "labels": [N], ...}``.
        Collective (call it on every rank, from ``compute``)."""
        return self.bank_rows.gather(self._all_gather(), self.device)

    def gathered_queries(self) -> dict[str, Tensor]:
        """Every rank's query rows in dataset order, as ``gathered_bank``."""
        return self.query_rows.gather(self._all_gather(), self.device)

    def _all_gather(self) -> Callable[[Tensor], Tensor]:
        # Without a trainer (a task driven by hand) there is one process: nothing to gather.
        return self.all_gather if self._trainer is not None else (lambda tensor: tensor)

    # ------------------------------------------------------------------------------------ the workflow
    def _sanity_checking(self) -> bool:
        return self._trainer is not None and self._trainer.sanity_checking

    def _loader_count_error(self, count: int) -> ValueError:
        got = "a single evaluation loader" if count == 1 else f"{count} evaluation loaders"
        return ValueError(
            f"{type(self).__name__} got {got}; it needs two, [bank, queries] (bank = labelled train split). "
            "Use ClassificationDataModule(knn_mode=True) or return a list of two loaders."
        )

    def _start_epoch(self, batches_per_loader: Sequence[int | float]) -> None:
        self._loaders_seen = set()
        self.reset()
        # Checked before the first batch: a wrong data setup should not cost a pass over the bank.
        if len(batches_per_loader) != 2:
            raise self._loader_count_error(len(batches_per_loader))

    def _evaluation_step(self, batch: dict[str, Any], stage: str, dataloader_idx: int) -> None:
        if self._sanity_checking():
            return
        if dataloader_idx not in (BANK, QUERIES):
            raise ValueError(
                f"{type(self).__name__} expects two loaders [bank, queries]; got a batch from dataloader "
                f"{dataloader_idx}"
            )
        self._loaders_seen.add(dataloader_idx)
        features = self.batch_features(batch, stage, dataloader_idx)
        self.update(features, batch, is_bank=dataloader_idx == BANK)

    def _finish_epoch(self) -> None:
        if self._sanity_checking():
            self.reset()
            return
        seen, self._loaders_seen = self._loaders_seen, set()
        try:
            if QUERIES not in seen:  # hooks driven by hand, or an empty query loader
                raise self._loader_count_error(len(seen))
            results = self.compute()
        finally:
            self.reset()
        logged = {f"{self.metric_prefix}/{name}": torch.as_tensor(value) for name, value in results.items()}
        # Every rank computed the same global values. sync_dist only silences Lightning's DDP warning; "max" keeps
        # them exact where the default mean over, e.g., 3 ranks can round them by an ulp.
        self.log_dict(logged, sync_dist=True, reduce_fx="max")

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, "val", dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, "test", dataloader_idx)

    def on_validation_epoch_start(self) -> None:
        self._start_epoch(self.trainer.num_val_batches)

    def on_test_epoch_start(self) -> None:
        self._start_epoch(self.trainer.num_test_batches)

    def on_validation_epoch_end(self) -> None:
        self._finish_epoch()

    def on_test_epoch_end(self) -> None:
        self._finish_epoch()

    def configure_optimizers(self) -> None:
        name = type(self).__name__
        raise RuntimeError(f"{name} trains nothing; run it with `dinov3-pl validate` or `dinov3-pl test`, not `fit`")
