"""Retrieval: image retrieval with frozen backbone features (run with ``dinov3-pl validate|test``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from dinov3_pl.metrics.retrieval import (
    PROTOCOLS,
    mean_scores,
    per_query_scores,
    rank_by_cosine,
    relevance_from_labels,
)
from dinov3_pl.modules.bank_query import BankQueryEvaluation
from dinov3_pl.modules.frozen import FeatureType

__all__ = ["Retrieval"]


class Retrieval(BankQueryEvaluation):
    """Every query ranks the whole database by cosine similarity of L2-normalised frozen features; scored with the
    revisited Oxford / Paris protocol (``dinov3_pl.metrics.retrieval``: revisitop's mAP and mP@k).

    The loaders are ``[database, queries]`` (``dinov3_pl.data.retrieval.RetrievalDataModule``). Two kinds of queries:

    - with a ``relevance`` row over the database (``RevisitedDataset``): logs ``retrieval/mAP_easy``,
      ``retrieval/mAP_medium``, ``retrieval/mAP_hard`` and ``retrieval/mP@<k>_<protocol>`` for each k in ``ks``;
      Medium and Hard are the numbers papers report (DINOv3's model card: Oxford-Hard mAP);
    - labelled (``label`` >= 0, any labelled dataset): a database image is a positive when it has the query's
      label; logs ``retrieval/mAP`` and ``retrieval/mP@<k>``.

    Rows are gathered from every rank in dataset order by the base class, so every rank ranks alike. A database
    shorter than the relevance rows (``limit_val_batches``, ``fast_dev_run``) is scored over the images it has.

    Args:
        arch, weights, backbone_kwargs, feature_type, n_last_blocks, cache_eval_features: see
            ``FrozenBackboneModule``. The DINO family's retrieval evaluations use the class token (``"cls"``).
        ks: cut-offs of the mean precision at k (revisitop: 1, 5, 10).
        query_chunk_size: queries ranked at once (memory: ``query_chunk_size × database`` similarities).
        scales: image scales whose features are averaged (before the L2 normalisation). ``[1]`` is one scale;
            ``[1, 0.7071, 0.5]`` is the multi-scale descriptor of facebookresearch/dino's retrieval script (its
            ``--multiscale 1``): each scale bilinearly resized (``align_corners=False``, sides floored), the pixels
            past the last whole patch left out, as that ViT's patch embedding leaves them.
    """

    metric_prefix = "retrieval"

    def __init__(
        self,
        arch: str | None = "vit_small_patch16_dinov3",
        weights: str | None = None,
        backbone_kwargs: dict | None = None,
        feature_type: FeatureType = "cls",
        n_last_blocks: int = 1,
        cache_eval_features: bool = False,
        ks: Sequence[int] = (1, 5, 10),
        query_chunk_size: int = 1024,
        scales: Sequence[float] = (1.0,),
    ) -> None:
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"ks must be a non-empty list of cut-offs >= 1, got {list(ks)}")
        if query_chunk_size < 1:
            raise ValueError(f"query_chunk_size must be at least 1, got {query_chunk_size}")
        if not scales or any(not 0 < float(scale) <= 1 for scale in scales):
            raise ValueError(f"scales must be a non-empty list of factors in (0, 1], got {list(scales)}")
        super().__init__(
            arch=arch,
            weights=weights,
            backbone_kwargs=backbone_kwargs,
            feature_type=feature_type,
            n_last_blocks=n_last_blocks,
            cache_eval_features=cache_eval_features,
        )
        self.save_hyperparameters()
        self.ks = tuple(int(k) for k in ks)
        self.query_chunk_size = int(query_chunk_size)
        self.scales = tuple(float(scale) for scale in scales)

    def features(self, images: Tensor, feature_type: str | None = None, n_last_blocks: int | None = None) -> Tensor:
        """The base class's features, averaged over ``scales``."""
        if self.scales == (1.0,):
            return super().features(images, feature_type, n_last_blocks)
        total = None
        for scale in self.scales:
            resized = images
            if scale != 1.0:
                resized = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
            height, width = (side - side % self.patch_size for side in resized.shape[-2:])
            if not height or not width:
                raise ValueError(
                    f"scale {scale} makes the {tuple(images.shape[-2:])} image smaller than one "
                    f"{self.patch_size}-pixel patch"
                )
            features = super().features(resized[..., :height, :width], feature_type, n_last_blocks)
            total = features if total is None else total + features
        return total / len(self.scales)

    def batch_features(self, batch: dict[str, Any], stage: str, dataloader_idx: int = 0) -> Tensor:
        height, width = batch["images"].shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"a {height}x{width} image is not made of whole {self.patch_size}-pixel patches: set the data's "
                f"size_multiple to the backbone's patch size ({self.patch_size})"
            )
        return super().batch_features(batch, stage, dataloader_idx)

    def update(self, features: Tensor, batch: dict[str, Any], is_bank: bool) -> None:
        """Keeps features and labels of the database, features and ``relevance`` (else labels) of the queries."""
        if "indices" not in batch:
            raise ValueError("Retrieval keeps features by dataset index: batches need an 'indices' entry")
        key = "relevance" if not is_bank and "relevance" in batch else "labels"
        if key not in batch:
            split = "database" if is_bank else "queries"
            raise ValueError(
                f"Retrieval needs 'labels' in the {split} batches (or 'relevance' in the queries'); this batch has "
                f"{sorted(batch)}"
            )
        indices = torch.as_tensor(batch["indices"], device=features.device)
        kept = {key: torch.as_tensor(batch[key], device=features.device)}
        (self.bank_rows if is_bank else self.query_rows).add(indices, features=features, **kept)

    def compute(self) -> dict[str, Tensor]:
        bank, queries = self.gathered_bank(), self.gathered_queries()
        with_ground_truth = "relevance" in queries
        if with_ground_truth:
            if int(bank["indices"].max()) >= queries["relevance"].shape[1]:
                raise ValueError(
                    f"the database has {len(bank['indices'])} images with indices up to {int(bank['indices'].max())}, "
                    f"but the queries' relevance rows cover {queries['relevance'].shape[1]}: database and queries "
                    "must come from the same ground truth"
                )
        else:
            for name, labels in (("database", bank["labels"]), ("queries", queries["labels"])):
                if bool((labels < 0).any()):
                    raise ValueError(
                        f"the {name} has unlabelled images (label -1): labelled retrieval needs a label on every "
                        "image, or queries with a 'relevance' ground truth (RevisitedDataset)"
                    )
        protocols = tuple(PROTOCOLS) if with_ground_truth else ("easy",)
        bank_features = torch.nn.functional.normalize(bank["features"].float(), dim=1)
        parts: dict[str, list[Tensor]] = {}
        # Chunks of queries: only query_chunk_size x database similarities and ranks live at once.
        for start in range(0, len(queries["indices"]), self.query_chunk_size):
            chunk = slice(start, start + self.query_chunk_size)
            ranking = rank_by_cosine(queries["features"][chunk], bank_features)
            if with_ground_truth:
                # Columns are database indices; the gathered rows may be a part of the database (limited batches).
                relevance = queries["relevance"][chunk].index_select(1, bank["indices"])
            else:
                relevance = relevance_from_labels(queries["labels"][chunk], bank["labels"])
            for name, values in per_query_scores(ranking, relevance, protocols, self.ks).items():
                parts.setdefault(name, []).append(values)
        scores = mean_scores({name: torch.cat(values) for name, values in parts.items()})
        if with_ground_truth:
            return scores
        return {name.removesuffix("_easy"): value for name, value in scores.items()}
