"""KNN: k-nearest-neighbour classification of frozen backbone features (run with ``dinov3-pl validate|test``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dinov3_pl.metrics import KNNAccuracy
from dinov3_pl.modules.frozen import FeatureType, FrozenBackboneModule

__all__ = ["KNN"]


class KNN(FrozenBackboneModule):
    """Weighted kNN evaluation (DINO/DINOv3 protocol): L2-normalised CLS features, k in {10, 20, 100, 200}, T=0.07.

    Nothing is trained. The evaluation loaders must come as a pair ``[bank, queries]``: dataloader 0 is the bank
    (the labelled train split, eval transform) and dataloader 1 the queries (val or test split), as
    ``ClassificationDataModule(knn_mode=True)`` returns them. Logs ``knn/top1_k10``, ``knn/top5_k10``, ... at the
    end of ``validate`` / ``test``, and ``knn/bank_size`` / ``knn/num_queries``, the numbers of rows that voted
    and were classified (over all processes).

    Under DDP each rank keeps only its shard of the bank and the search is sharded (see ``KNNAccuracy``); give both
    loaders a sampler that splits the data without padding (``dinov3_pl.data.samplers.ShardedEvalSampler``, as
    ``ClassificationDataModule`` does), or Lightning's ``DistributedSampler`` repeats samples to even the shards.

    Args:
        arch, weights, backbone_kwargs, n_last_blocks, cache_eval_features: see ``FrozenBackboneModule``.
        feature_type: ``"cls"`` (upstream) or ``"cls_meanpatch"``; the vector is L2-normalised as a whole.
        ks: numbers of neighbours, each reported.
        temperature: vote temperature.
        num_classes: number of classes (``None``: inferred from the labels seen).
    """

    def __init__(
        self,
        arch: str | None = "vit_small_patch16_dinov3",
        weights: str | None = None,
        backbone_kwargs: dict | None = None,
        feature_type: FeatureType = "cls",
        n_last_blocks: int = 1,
        ks: Sequence[int] = (10, 20, 100, 200),
        temperature: float = 0.07,
        num_classes: int | None = None,
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
        self.save_hyperparameters()
        self.knn = KNNAccuracy(ks=ks, temperature=temperature, num_classes=num_classes)

    def _update(self, batch: dict[str, Any], stage: str, dataloader_idx: int) -> None:
        if dataloader_idx not in (0, 1):
            raise ValueError(f"KNN expects two loaders [bank, queries]; got a batch from dataloader {dataloader_idx}")
        if dataloader_idx == 1:
            self._saw_queries = True
        features = self.batch_features(batch, stage, dataloader_idx)
        self.knn.update(features, batch["labels"], bank=dataloader_idx == 0)

    def _report(self) -> None:
        if not getattr(self, "_saw_queries", False):
            self.knn.reset()
            raise ValueError(
                "KNN got a single evaluation loader; it needs two, [bank, queries] (bank = labelled train split). "
                "Use ClassificationDataModule(knn_mode=True) or return a list of two loaders."
            )
        results = self.knn.compute()
        # How many rows the vote used, over all ranks: the dataset sizes exactly (no DDP padding duplicates).
        results["bank_size"] = torch.tensor(float(self.knn.bank_size))
        results["num_queries"] = torch.tensor(float(self.knn.num_queries))
        self.knn.reset()
        self._saw_queries = False
        # Every rank computed the same global values. sync_dist only silences Lightning's DDP warning; "max" keeps
        # them exact where the default mean over, e.g., 3 ranks can round them by an ulp.
        self.log_dict({f"knn/{name}": value for name, value in results.items()}, sync_dist=True, reduce_fx="max")

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(batch, "val", dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(batch, "test", dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._report()

    def on_test_epoch_end(self) -> None:
        self._report()

    def configure_optimizers(self) -> None:
        raise RuntimeError("KNN trains nothing; run it with `dinov3-pl validate` or `dinov3-pl test`, not `fit`")
