"""iBOT patch loss: cross-entropy on the masked patch tokens, each crop weighted equally."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dinov3_pl.losses.centering import fp32_no_autocast

__all__ = ["IBOTPatchLoss", "masked_patch_weights", "soft_cross_entropy_rows"]

# Rows per chunk when ``chunk_size`` is automatic: 2^24 elements, a 64 MiB fp32 block whatever K is (256 rows at
# K = 65536), small next to the [M, K] logits and big enough to keep a GPU busy.
AUTO_CHUNK_ELEMENTS = 1 << 24


def masked_patch_weights(masks: Tensor) -> Tensor:
    """``[C, N]`` bool masks -> ``[M]`` weights ``1 / (masked patches of the row's crop)`` of the masked patches, in
    the order of ``masks.flatten().nonzero()``. Can be computed on CPU in the collate function to avoid a host sync.
    """
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor [C, N], got {masks.dtype} {tuple(masks.shape)}")
    per_crop = 1.0 / masks.sum(dim=-1).clamp(min=1).float()  # [C]
    return per_crop.unsqueeze(-1).expand_as(masks)[masks]


def _row_chunks(num_rows: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, num_rows)) for start in range(0, num_rows, chunk_size)]


class _ChunkedSoftCrossEntropy(torch.autograd.Function):
    """Per-row ``-sum_k t[k] log softmax(s / T)[k]`` computed ``chunk_size`` rows at a time.

    Forward saves only its inputs; backward recomputes each chunk's log-softmax, so no fp32 ``[M, K]`` tensor exists
    except the gradient itself (in the student's dtype). Backward performs the ops autograd would run on the
    unchunked formula (neg -> sum -> mul -> log_softmax -> div), row by row, so the values are the same.
    """

    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher_probs: Tensor, student_temp: float, chunk_size: int) -> Tensor:
        ctx.save_for_backward(student_logits, teacher_probs)
        ctx.student_temp, ctx.chunk_size = student_temp, chunk_size
        losses = student_logits.new_empty(student_logits.shape[0], dtype=torch.float32)
        for start, end in _row_chunks(student_logits.shape[0], chunk_size):
            scaled = student_logits[start:end].to(torch.float32, copy=True).div_(student_temp)
            log_probs = F.log_softmax(scaled, dim=-1)
            del scaled
            losses[start:end] = -log_probs.mul_(teacher_probs[start:end].float()).sum(dim=-1)  # t * log p, in place
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor) -> tuple[Tensor | None, None, None, None]:
        student_logits, teacher_probs = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        student_temp = ctx.student_temp
        chunks = _row_chunks(student_logits.shape[0], ctx.chunk_size)
        # One chunk: its gradient is the whole gradient (no separate [M, K] buffer to copy it into).
        grad_student = torch.empty_like(student_logits) if len(chunks) != 1 else None
        with fp32_no_autocast(student_logits.device):
            for start, end in chunks:
                # A fresh fp32 copy divided in place: one temporary whether the logits are fp32 or bf16.
                scaled = student_logits[start:end].to(torch.float32, copy=True).div_(student_temp)
                log_probs = F.log_softmax(scaled, dim=-1)
                del scaled
                grad_log_probs = (-grad_losses[start:end]).unsqueeze(-1) * teacher_probs[start:end].float()
                grad_scaled = torch._log_softmax_backward_data(grad_log_probs, log_probs, -1, torch.float32)
                # Freed before the next chunk: at most three chunk-sized fp32 temporaries are alive at once.
                del log_probs, grad_log_probs
                grad_scaled.div_(student_temp)
                if grad_student is None:
                    return grad_scaled.to(student_logits.dtype), None, None, None
                grad_student[start:end] = grad_scaled  # the copy casts to the student's dtype
                del grad_scaled
        return grad_student, None, None, None


def soft_cross_entropy_rows(
    student_logits: Tensor, teacher_probs: Tensor, student_temp: float, chunk_size: int | None = None
) -> Tensor:
    """``[M, K]`` student logits and teacher probabilities -> ``[M]`` fp32 ``-sum_k t[k] log softmax(s / T)[k]``.

    ``chunk_size`` rows are processed at a time (``None``: as many rows as fit in 2^24 elements), in the forward
    and again in the backward, which recomputes the log-softmax instead of keeping it: the fp32 ``[M, K]``
    log-probabilities, products and gradients of the plain formula are never materialised. The gradient flows to
    ``student_logits`` only; a ``teacher_probs`` that requires grad uses the plain formula (which also
    differentiates it). Computed in fp32 with autocast disabled.
    """
    if student_logits.ndim != 2 or student_logits.shape != teacher_probs.shape:
        raise ValueError(
            "student_logits and teacher_probs must both be [M, K], got shapes "
            f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    if chunk_size is None:
        chunk_size = max(1, AUTO_CHUNK_ELEMENTS // max(1, student_logits.shape[1]))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (rows per chunk) or None (automatic), got {chunk_size}")
    with fp32_no_autocast(student_logits.device):
        if teacher_probs.requires_grad:
            log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
            return -(teacher_probs.float() * log_probs).sum(dim=-1)
        return _ChunkedSoftCrossEntropy.apply(student_logits, teacher_probs, student_temp, chunk_size)


class IBOTPatchLoss(nn.Module):
    """iBOT masked-image-modelling loss (upstream ``iBOTPatchLoss.forward_masked``).

    ``loss = -(1 / C) · sum_i w_i · sum_k t_i[k] log softmax(s_i / student_temp)[k]`` over the ``M`` masked patches
    ``i``, where ``w_i = 1 / (masked patches of the crop of i)``: every masked crop contributes its mean patch loss,
    and the sum is divided by the number of crops ``C`` *including* crops without any mask (as upstream does), so
    the loss scales with the fraction of masked crops. Computed in fp32 with autocast disabled.

    Memory: with ``chunked=True`` (default) the per-patch cross-entropy runs ``chunk_size`` rows at a time (see
    :func:`soft_cross_entropy_rows`); the plain formula (``chunked=False``) peaks at three fp32 ``[M, K]`` tensors in
    the backward (2 GB each for 7.5k masked patches and K = 65536), the chunked one at the gradient plus three
    chunks. Both give the same values.
    With ``masks_weight`` precomputed (the collate's ``ibot_weights``) the loss has no data-dependent shape and no
    host sync, and compiles with ``torch.compile(fullgraph=True)``.

    Args:
        student_temp: student softmax temperature (0.1 upstream).
        chunked: compute the cross-entropy in row chunks with a recomputing backward.
        chunk_size: rows per chunk; ``None``: as many rows as fit in 2^24 elements (64 MiB fp32).
    """

    def __init__(self, student_temp: float = 0.1, chunked: bool = True, chunk_size: int | None = None) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (rows per chunk) or None (automatic), got {chunk_size}")
        self.student_temp = student_temp
        self.chunked = chunked
        self.chunk_size = chunk_size

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
            masks: ``[C, N]`` bool iBOT masks of the global crops (crop-major), ``M = masks.sum()``; with
                ``masks_weight`` given only ``C`` is read from it.
            masks_weight: optional precomputed ``masked_patch_weights(masks)`` ``[M]`` (the collate's
                ``ibot_weights``; saves a host sync on GPU).

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
            if self.chunked:
                patch_losses = soft_cross_entropy_rows(
                    student_logits_masked, teacher_probs_masked, self.student_temp, self.chunk_size
                )
            else:
                student_log_probs = F.log_softmax(student_logits_masked.float() / self.student_temp, dim=-1)
                patch_losses = -(teacher_probs_masked.float() * student_log_probs).sum(dim=-1)  # [M]
            return (patch_losses * masks_weight.float()).sum() / masks.shape[0]
