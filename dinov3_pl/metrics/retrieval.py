"""Image retrieval metrics: the revisited Oxford / Paris protocol (Radenović et al., CVPR 2018).

Every query ranks the whole database. The ground truth marks each (query, database image) pair with a
``relevance`` code: ``NEGATIVE`` (0), ``EASY`` (1), ``HARD`` (2) or ``JUNK`` (3). The three protocols read them as
revisitop's ``example_evaluate.py`` does:

======== ============== ==================================================
protocol positives      ignored (removed from the ranking before scoring)
======== ============== ==================================================
easy     easy           junk, hard
medium   easy + hard    junk
hard     hard           junk, easy
======== ============== ==================================================

Average precision is revisitop's (``python/evaluate.py: compute_ap``): the area under the precision-recall curve by
trapezoids, ``sum_j ((j / r_j) + (j + 1) / (r_j + 1)) / 2 / n`` over the ``n`` positives at their 0-based ranks ``r_j``
in the ranking without ignored images (``j / r_j`` read as 1 at ``r_j = 0``). It is not the non-interpolated AP of
torchmetrics (``sum_j (j + 1) / (r_j + 1) / n``); the two differ by at most ``1 / (2n)``. A query without positives
in a protocol is left out of that protocol's mean, also as revisitop does. Precision at k is revisitop's too: the
fraction of positives among the first ``min(k, rank of the last positive)`` images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "EASY",
    "HARD",
    "JUNK",
    "NEGATIVE",
    "PROTOCOLS",
    "average_precision",
    "mean_scores",
    "per_query_scores",
    "precision_at_k",
    "rank_by_cosine",
    "relevance_from_labels",
    "revisited_scores",
]

NEGATIVE, EASY, HARD, JUNK = 0, 1, 2, 3
# protocol -> (codes that are positives, codes that are ignored)
PROTOCOLS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "easy": ((EASY,), (JUNK, HARD)),
    "medium": ((EASY, HARD), (JUNK,)),
    "hard": ((HARD,), (JUNK, EASY)),
}


def _positive_ranks(ranked_positive: Tensor, ranked_ignored: Tensor) -> Tensor:
    """0-based rank of every ranked entry after the ignored ones are taken out (meaningful at positives)."""
    kept = (~ranked_ignored).long()
    return kept.cumsum(dim=1) - kept


def average_precision(ranked_positive: Tensor, ranked_ignored: Tensor | None = None) -> Tensor:
    """Per-query revisitop average precision [Q] from ranked masks [Q, N] (column 0 = best match); NaN for a query
    without positives. ``ranked_ignored`` marks junk, which is taken out of the ranking first."""
    ranked_positive = ranked_positive.bool()
    if ranked_ignored is None:
        ranked_ignored = torch.zeros_like(ranked_positive)
    ranked_ignored = ranked_ignored.bool() & ~ranked_positive
    rank = _positive_ranks(ranked_positive, ranked_ignored).double()
    found_before = (ranked_positive.long().cumsum(dim=1) - ranked_positive.long()).double()  # j: positives above
    precision_before = torch.where(rank > 0, found_before / rank.clamp(min=1), torch.ones_like(rank))
    precision_after = (found_before + 1) / (rank + 1)
    num_positives = ranked_positive.sum(dim=1).double()
    area = torch.where(ranked_positive, (precision_before + precision_after) / 2, torch.zeros_like(rank)).sum(dim=1)
    return torch.where(num_positives > 0, area / num_positives.clamp(min=1), torch.full_like(area, float("nan")))


def precision_at_k(ranked_positive: Tensor, ranked_ignored: Tensor | None, k: int) -> Tensor:
    """Per-query revisitop precision at ``k`` [Q]: positives among the first ``min(k, last positive's 1-based rank)``
    images of the ranking without ignored images, divided by that number; NaN for a query without positives."""
    if k < 1:
        raise ValueError(f"precision at k needs k >= 1, got {k}")
    ranked_positive = ranked_positive.bool()
    if ranked_ignored is None:
        ranked_ignored = torch.zeros_like(ranked_positive)
    ranked_ignored = ranked_ignored.bool() & ~ranked_positive
    rank = _positive_ranks(ranked_positive, ranked_ignored) + 1  # 1-based
    last = torch.where(ranked_positive, rank, torch.zeros_like(rank)).amax(dim=1)
    cutoff = last.clamp(max=k)
    within = (ranked_positive & (rank <= cutoff[:, None])).sum(dim=1).double()
    return torch.where(last > 0, within / cutoff.clamp(min=1), torch.full_like(within, float("nan")))


def rank_by_cosine(queries: Tensor, bank: Tensor, chunk_size: int = 1024) -> Tensor:
    """Bank indices of every query, most cosine-similar first [Q, N] (L2-normalised features; exact ties keep the
    bank order, so every process ranks alike). Queries go in chunks of ``chunk_size`` to bound memory."""
    queries = torch.nn.functional.normalize(queries.float(), dim=1)
    bank = torch.nn.functional.normalize(bank.float(), dim=1)
    rankings = []
    for chunk in queries.split(chunk_size):
        similarity = chunk @ bank.T
        rankings.append(similarity.argsort(dim=1, descending=True, stable=True))
    return torch.cat(rankings) if rankings else torch.empty(0, bank.shape[0], dtype=torch.long, device=bank.device)


def relevance_from_labels(query_labels: Tensor, bank_labels: Tensor) -> Tensor:
    """Relevance codes [Q, N] of labelled data: a bank image with the query's label is ``EASY`` (a positive in the
    easy and medium protocols), every other one ``NEGATIVE``; nothing is junk or hard."""
    same = query_labels[:, None] == bank_labels[None, :]
    return torch.where(same, EASY, NEGATIVE).to(torch.uint8)


def per_query_scores(
    ranking: Tensor,
    relevance: Tensor,
    protocols: Sequence[str] = ("easy", "medium", "hard"),
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, Tensor]:
    """Per-query AP and precision at each k of the revisited protocols, ``{"AP_medium": [Q], "P@5_hard": [Q], ...}``
    (NaN for a query without positives in that protocol).

    ``ranking`` [Q, N]: bank indices per query, best first (every bank index once). ``relevance`` [Q, N]: codes per
    (query, bank index).
    """
    if ranking.shape != relevance.shape:
        raise ValueError(
            f"ranking {tuple(ranking.shape)} and relevance {tuple(relevance.shape)} must both be [queries, bank]"
        )
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"unknown protocols {unknown}; choose among {sorted(PROTOCOLS)}")
    ranked = relevance.long().gather(1, ranking.long())
    scores = {}
    for name in protocols:
        positive_codes, ignored_codes = PROTOCOLS[name]
        positive = torch.isin(ranked, torch.tensor(positive_codes, device=ranked.device))
        ignored = torch.isin(ranked, torch.tensor(ignored_codes, device=ranked.device))
        scores[f"AP_{name}"] = average_precision(positive, ignored)
        for k in ks:
            scores[f"P@{k}_{name}"] = precision_at_k(positive, ignored, k)
    return scores


def mean_scores(per_query: dict[str, Tensor]) -> dict[str, Tensor]:
    """``per_query_scores`` averaged over the queries that have positives: ``{"mAP_medium": ..., "mP@5_hard": ...}``
    (NaN when no query has any)."""
    return {f"m{name}": values.nanmean() for name, values in per_query.items()}


def revisited_scores(
    ranking: Tensor,
    relevance: Tensor,
    protocols: Sequence[str] = ("easy", "medium", "hard"),
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, Tensor]:
    """mAP and mean precision at each k of the revisited protocols: ``{"mAP_medium": ..., "mP@5_hard": ...}``,
    means over the queries that have positives in that protocol (NaN when none has); arguments as
    ``per_query_scores``."""
    return mean_scores(per_query_scores(ranking, relevance, protocols, ks))
