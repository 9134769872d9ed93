"""DINO loss: cross-entropy between teacher probabilities and student softmax over pairs of crops of an image."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dinov3_pl.losses.centering import fp32_no_autocast

__all__ = ["DINOLoss"]


class DINOLoss(nn.Module):
    """Mean cross-entropy ``-sum_k p_t[k] log softmax(s / student_temp)[k]`` over all (student crop, teacher crop)
    pairs of every image.

    With ``ignore_diagonal`` (student and teacher both see the global crops) the pairs ``s == t`` (for
    ``s < min(S, T)``) are skipped: a crop is not its own target. The sum over the kept pairs and images is divided by
    their number, ``B·(S·T - min(S, T))``, exactly as upstream ``DINOLoss.forward``. Computed in fp32 with autocast
    disabled; ``teacher_probs`` is used as given (detach it if it requires grad).

    Args:
        student_temp: student softmax temperature (0.1 upstream).
    """

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.student_temp = student_temp

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, ignore_diagonal: bool = False) -> Tensor:
        """
        Args:
            student_logits: ``[S, B, K]`` student logits, crop-major (S crops of the same B images).
            teacher_probs: ``[T, B, K]`` teacher probabilities (rows sum to 1), crop-major.
            ignore_diagonal: skip the pairs where student crop index == teacher crop index.

        Returns:
            fp32 scalar.
        """
        if student_logits.ndim != 3 or teacher_probs.ndim != 3:
            raise ValueError(
                "student_logits must be [S, B, K] and teacher_probs [T, B, K], got shapes "
                f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
            )
        num_student_crops, batch_size, num_prototypes = student_logits.shape
        num_teacher_crops = teacher_probs.shape[0]
        if teacher_probs.shape[1:] != (batch_size, num_prototypes):
            raise ValueError(
                f"student_logits {tuple(student_logits.shape)} and teacher_probs {tuple(teacher_probs.shape)} "
                "must agree on batch size and number of prototypes"
            )
        num_diagonal = min(num_student_crops, num_teacher_crops) if ignore_diagonal else 0
        num_pairs = num_student_crops * num_teacher_crops - num_diagonal
        if num_pairs * batch_size == 0:
            raise ValueError(
                f"no (student, teacher) pairs to average over: S={num_student_crops}, T={num_teacher_crops}, "
                f"B={batch_size}, ignore_diagonal={ignore_diagonal}"
            )
        with fp32_no_autocast(student_logits.device):
            student_log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
            # [S, T]: cross-entropy summed over images, for every (student crop, teacher crop) pair.
            pair_losses = -torch.einsum("sbk,tbk->st", student_log_probs, teacher_probs.float())
            if num_diagonal:
                keep = ~torch.eye(num_student_crops, num_teacher_crops, dtype=torch.bool, device=pair_losses.device)
                pair_losses = pair_losses * keep
            return pair_losses.sum() / (batch_size * num_pairs)
