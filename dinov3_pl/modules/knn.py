"""KNN: k-nearest-neighbour classification of frozen backbone features (run with ``dinov3-pl validate|test``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dinov3_pl.metrics import KNNAccuracy
from dinov3_pl.modules.bank_query import BankQueryEvaluation
from dinov3_pl.modules.frozen import FeatureType

__all__ = ["KNN"]


class KNN(BankQueryEvaluation):
    """Weighted kNN evaluation (DINO/DINOv3 protocol): L2-normalised CLS features, k in {10, 20, 100, 200}, T=0.07.

    Nothing is trained. The evaluation loaders come as a pair ``[bank, queries]`` (``BankQueryEvaluation``):
    dataloader 0 is the bank (the labelled train split, eval transform) and dataloader 1 the queries (val or test
    split), as ``ClassificationDataModule(knn_mode=True)`` returns them. Logs ``knn/top1_k10``, ``knn/top5_k10``,
    ... at the end of ``validate`` / ``test``, and ``knn/bank_size`` / ``knn/num_queries``, the numbers of rows that
    voted and were classified (over all processes).

    The bank is never gathered (the base's gathered store stays empty): under DDP each rank keeps its shard of the
    bank and the search is sharded (see ``KNNAccuracy``). Give both loaders a sampler that splits the data without
    padding (``dinov3_pl.data.samplers.ShardedEvalSampler``, as ``ClassificationDataModule`` does), or Lightning's
    ``DistributedSampler`` repeats samples to even the shards and the repeats count twice.

    Args:
        arch, weights, backbone_kwargs, n_last_blocks, cache_eval_features: see ``FrozenBackboneModule``.
        feature_type: ``"cls"`` (upstream) or ``"cls_meanpatch"``; the vector is L2-normalised as a whole.
        ks: numbers of neighbours, each reported.
        temperature: vote temperature.
        num_classes: number of classes (``None``: inferred from the labels seen).
    """

    metric_prefix = "knn"

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

    def update(self, features: Tensor, batch: dict[str, Any], is_bank: bool) -> None:
        self.knn.update(features, batch["labels"], bank=is_bank)

    def compute(self) -> dict[str, Tensor]:
        results = self.knn.compute()
        # How many rows the vote used, over all ranks: the dataset sizes exactly (no DDP padding duplicates).
        results["bank_size"] = torch.tensor(float(self.knn.bank_size))
        results["num_queries"] = torch.tensor(float(self.knn.num_queries))
        return results

    def reset(self) -> None:
        super().reset()
        self.knn.reset()
