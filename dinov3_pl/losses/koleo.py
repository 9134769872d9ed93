"""KoLeo regulariser (Kozachenko-Leonenko differential entropy estimator, Sablayrolles et al. 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dinov3_pl.losses.centering import fp32_no_autocast

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """``-mean_i log(||x_i - x_{nn(i)}|| + eps)`` over the L2-normalised rows of a per-GPU batch, ``nn(i)`` being the
    nearest other row; spreads features uniformly on the sphere.

    Matches upstream ``KoLeoLoss`` numerics: rows are normalised with ``F.normalize(eps=eps)``, the neighbour is the
    row of largest dot product, the distance is ``torch.nn.PairwiseDistance(p=2, eps=1e-8)`` (which adds ``eps`` to
    the difference vector before the norm), and ``eps`` is added again inside the log. Unlike upstream (which only
    disables CUDA autocast and keeps the input dtype) we always compute in fp32.

    Args:
        eps: the small constant of the normalisation, the pairwise distance and the log (1e-8 upstream).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: Tensor) -> Tensor:
        """``[B, D]`` features (B >= 2) -> fp32 scalar."""
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"features must be [B, D] with B >= 2, got shape {tuple(features.shape)}")
        with fp32_no_autocast(features.device):
            normalized = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
            with torch.no_grad():
                similarities = normalized @ normalized.t()
                similarities.fill_diagonal_(-1.0)  # cosine >= -1, so a row never picks itself unless tied
                neighbour = similarities.argmax(dim=1)
            distances = F.pairwise_distance(normalized, normalized[neighbour], p=2, eps=self.eps)  # [B]
            return -torch.log(distances + self.eps).mean()
