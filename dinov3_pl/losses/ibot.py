"""iBOT patch loss: cross-entropy on the masked patch tokens, each crop weighted equally."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dinov3_pl.losses.centering import fp32_no_autocast

__all__ = ["IBOTPatchLoss", "masked_patch_weights"]


def masked_patch_weights(masks: Tensor) -> Tensor:
    """``[C, N]`` bool masks -> ``[M]`` weights ``1 / (masked patches of the row's crop)`` of the masked patches, in
    the order of ``masks.flatten().nonzero()``. Can be computed on CPU in the collate function to avoid a host sync.
    """
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor [C, N], got {masks.dtype} {tuple(masks.shape)}")
    per_crop = 1.0 / masks.sum(dim=-1).clamp(min=1).float()  # [C]
    return per_crop.unsqueeze(-1).expand_as(masks)[masks]


class IBOTPatchLoss(nn.Module):
    """iBOT masked-image-modelling loss (upstream ``iBOTPatchLoss.forward_masked``).

    ``loss = -(1 / C) · sum_i w_i · sum_k t_i[k] log softmax(s_i / student_temp)[k]`` over the ``M`` masked patches
    ``i``, where ``w_i = 1 / (masked patches of the crop of i)``: every masked crop contributes its mean patch loss,
    and the sum is divided by the number of crops ``C`` *including* crops without any mask (as upstream does), so
    the loss scales with the fraction of masked crops. Computed in fp32 with autocast disabled.

    Args:
        student_temp: student softmax temperature (0.1 upstream).
    """

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.student_temp = student_temp

    def forward(
        self,
        student_logits_masked: Tensor,
        teacher_probs_masked: Tensor,
        masks: Tensor,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            student_logits_masked: ``[M, K]`` student logits of the masked patches, rows in the order of
                ``masks.flatten().nonzero()``.
            teacher_probs_masked: ``[M, K]`` teacher probabilities of the same patches (rows sum to 1).
            masks: ``[C, N]`` bool iBOT masks of the global crops (crop-major), ``M = masks.sum()``.
            masks_weight: optional precomputed ``masked_patch_weights(masks)`` ``[M]`` (saves a host sync on GPU).

        Returns:
            fp32 scalar.
        """
        if student_logits_masked.ndim != 2 or student_logits_masked.shape != teacher_probs_masked.shape:
            raise ValueError(
                "student_logits_masked and teacher_probs_masked must both be [M, K], got shapes "
                f"{tuple(student_logits_masked.shape)} and {tuple(teacher_probs_masked.shape)}"
            )
        if masks.ndim != 2 or masks.shape[0] == 0:
            raise ValueError(f"masks must be [C, N] with C >= 1, got shape {tuple(masks.shape)}")
        if masks_weight is None:
            masks_weight = masked_patch_weights(masks)
        num_masked = student_logits_masked.shape[0]
        if masks_weight.shape != (num_masked,):
            raise ValueError(
                f"masks select {masks_weight.shape[0]} patches but student_logits_masked has {num_masked} rows"
            )
        with fp32_no_autocast(student_logits_masked.device):
            student_log_probs = F.log_softmax(student_logits_masked.float() / self.student_temp, dim=-1)
            patch_losses = -(teacher_probs_masked.float() * student_log_probs).sum(dim=-1)  # [M]
            return (patch_losses * masks_weight.float()).sum() / masks.shape[0]
