"""Gram anchoring loss (DINOv3): MSE between patch-similarity (Gram) matrices of student and Gram teacher."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from dinov3_pl.losses.centering import fp32_no_autocast

__all__ = ["GramLoss"]


class GramLoss(nn.Module):
    """``mean((G_student - G_teacher)^2)`` with ``G = X Xᵀ`` of the L2-normalised patch features ``X``.

    With ``img_level=True`` there is one ``N×N`` Gram matrix per image (the MSE averages over ``B·N·N`` entries);
    with ``img_level=False`` one ``BN×BN`` matrix over all tokens of the batch. ``remove_neg`` sets negative
    similarities to 0 in both matrices before the MSE. Matches upstream ``GramLoss`` (whose recipes use
    ``remove_neg=False``; note upstream's constructor default is ``remove_neg=True`` and its ``img_level`` is a
    ``forward`` argument). Computed in fp32 with autocast disabled.

    Args:
        remove_neg: zero the negative similarities of both Gram matrices.
        img_level: one Gram matrix per image (True) or one over the whole batch (False).
        normalize: L2-normalise the features first (upstream ``gram.normalized``, True in every recipe).
    """

    def __init__(self, remove_neg: bool = False, img_level: bool = True, normalize: bool = True) -> None:
        super().__init__()
        self.remove_neg = remove_neg
        self.img_level = img_level
        self.normalize = normalize

    def _gram(self, features: Tensor) -> Tensor:
        features = features.float()
        if self.normalize:
            features = F.normalize(features, dim=-1)
        if not self.img_level and features.ndim == 3:
            features = features.flatten(0, 1)  # [B*N, D]
        gram = features @ features.transpose(-1, -2)
        return gram.clamp(min=0.0) if self.remove_neg else gram

    def forward(self, student_patch: Tensor, teacher_patch: Tensor) -> Tensor:
        """
        Args:
            student_patch: ``[B, N, D]`` student patch features (``[B·N, D]`` also accepted when ``img_level=False``).
            teacher_patch: same shape, Gram-teacher patch features (normally detached).

        Returns:
            fp32 scalar.
        """
        if student_patch.shape != teacher_patch.shape:
            raise ValueError(
                f"student_patch {tuple(student_patch.shape)} and teacher_patch {tuple(teacher_patch.shape)} differ"
            )
        allowed_ndims = (3,) if self.img_level else (2, 3)
        if student_patch.ndim not in allowed_ndims:
            raise ValueError(
                f"patch features must be [B, N, D]{'' if self.img_level else ' or [B*N, D]'}, "
                f"got shape {tuple(student_patch.shape)}"
            )
        with fp32_no_autocast(student_patch.device):
            return F.mse_loss(self._gram(student_patch), self._gram(teacher_patch))
