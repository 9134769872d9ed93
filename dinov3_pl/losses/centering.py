"""Teacher centering: Sinkhorn-Knopp (the DINOv3 default) and DINOv1/v2-style softmax centering.

Both turn teacher logits into target probabilities for the DINO and iBOT cross-entropies and are
distributed-aware: under an initialised ``torch.distributed`` process group every statistic that spans the batch
(per-prototype sums, sample counts, batch means) is all-reduced, so the result equals the single-process result on
the concatenated global batch. All computation is in fp32 with autocast disabled.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["SoftmaxCenter", "sinkhorn_knopp"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, group=None) -> Tensor:
    """In-place all-reduce when a process group is initialised, a no-op otherwise."""
    if _distributed():
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def fp32_no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Context that turns autocast off on ``device`` so the losses stay in fp32 under bf16 mixed precision."""
    return torch.autocast(device_type=device.type, enabled=False)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, temperature: float, n_iterations: int = 3, group=None) -> Tensor:
    """Sinkhorn-Knopp teacher targets (SwAV / DINOv2 / DINOv3).

    Finds ``Q = diag(u) exp(logits / T) diag(v)`` whose prototype marginals are uniform (each prototype gets total
    weight ``1/K``) and whose sample marginals are ``1/M``, alternating ``n_iterations`` prototype and sample
    normalisations; the last one is over samples, so every returned row sums to exactly 1.

    Args:
        teacher_logits: ``[M, K]`` teacher logits of this process (``M`` may differ between processes and may be 0,
            e.g. the masked patches of iBOT).
        temperature: teacher temperature ``T``.
        n_iterations: number of (prototype, sample) normalisation rounds; upstream uses 3.
        group: process group to reduce over (``None``: the default group).

    Returns:
        ``[M, K]`` fp32 probabilities, each row sums to 1.

    Distributed: the per-prototype maxima, the total sum, the per-prototype sums and the sample count are
    all-reduced, so every process gets its rows of the single-process result on the concatenated rows. A process
    with ``M = 0`` still joins every collective (no deadlock) and returns ``[0, K]``.

    Numerics: upstream exponentiates ``logits / T`` directly, which overflows fp32 once a logit exceeds ``88·T``
    (3.5 at ``T = 0.04``). The first prototype normalisation cancels any per-prototype factor, so we subtract the
    global per-prototype maximum before ``exp``: identical in exact arithmetic, equal to upstream up to rounding,
    and no prototype row can overflow or underflow to all zeros.

    Memory: one fp32 ``[M, K]`` buffer (the result) is allocated and every step after the copy runs in place on it,
    so the peak is one ``[M, K]`` block (upstream and earlier versions held three at once: ~2 GB each for the 7.5k
    masked patches x 65536 prototypes of 64 images/GPU). The in-place ops are the same ops in the same order, so the
    values are bit-identical to the out-of-place formulation. No host sync: the row count is made on the device.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must be [M, K], got shape {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    num_rows, num_prototypes = teacher_logits.shape
    device = teacher_logits.device
    with fp32_no_autocast(device):
        q = teacher_logits.to(torch.float32, copy=True)  # [M, K]: the only [M, K] buffer, updated in place below
        q.div_(temperature)
        if num_rows > 0:
            prototype_max = q.amax(dim=0)  # [K]
        else:
            prototype_max = torch.full((num_prototypes,), float("-inf"), device=device)
        _all_reduce(prototype_max, dist.ReduceOp.MAX, group)
        q.sub_(prototype_max).exp_()
        q = q.t()  # [K, M]: K-by-M as in the SwAV/DINO papers (a view)

        # torch.full fills on the device; torch.tensor([M], device=cuda) would be a blocking host-to-device copy.
        total_rows = torch.full((1,), num_rows, dtype=torch.long, device=device)
        _all_reduce(total_rows, group=group)
        total_rows = total_rows.float()

        # Make the whole matrix sum to 1 (cancelled by the first prototype normalisation; kept for upstream parity).
        total = q.sum()
        _all_reduce(total, group=group)
        q /= total
        for _ in range(n_iterations):
            # Each prototype (row of q) gets total weight 1/K over the global batch.
            prototype_sums = q.sum(dim=1, keepdim=True)  # [K, 1]
            _all_reduce(prototype_sums, group=group)
            q /= prototype_sums
            q /= num_prototypes
            # Each sample (column of q) gets total weight 1/M_global; columns are local, no reduce needed.
            q /= q.sum(dim=0, keepdim=True)
            q /= total_rows
        q *= total_rows  # columns sum to 1: an assignment per sample
        return q.t()


class SoftmaxCenter(nn.Module):
    """DINOv1/v2-style centering: ``softmax((logits - center) / T)`` with an EMA ``center`` of the teacher logits.

    Use ``probs`` to get the targets of this step, then ``update`` with the same logits: the targets use the
    centre from before this batch, as in upstream (whose asynchronous all-reduce is applied lazily just before the
    next ``probs``; we reduce synchronously, which gives the same values). ``center`` is a buffer, so it is saved in
    checkpoints and moved with the module.

    Args:
        num_prototypes: ``K``, the size of the last logit dimension.
        momentum: EMA momentum; ``center <- momentum * center + (1 - momentum) * batch_mean``.
    """

    center: Tensor

    def __init__(self, num_prototypes: int, momentum: float = 0.9) -> None:
        super().__init__()
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.num_prototypes = num_prototypes
        self.momentum = momentum
        # Upstream starts from NaN and zeroes it in init_weights(); the effective start value is 0.
        self.register_buffer("center", torch.zeros(num_prototypes))

    def _check(self, teacher_logits: Tensor) -> None:
        if teacher_logits.ndim < 1 or teacher_logits.shape[-1] != self.num_prototypes:
            raise ValueError(
                f"teacher_logits must be [..., {self.num_prototypes}], got shape {tuple(teacher_logits.shape)}"
            )

    @torch.no_grad()
    def probs(self, teacher_logits: Tensor, temperature: float) -> Tensor:
        """``[..., K]`` logits -> ``[..., K]`` fp32 probabilities ``softmax((logits - center) / temperature)``."""
        self._check(teacher_logits)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        with fp32_no_autocast(teacher_logits.device):
            return F.softmax((teacher_logits.float() - self.center.float()) / temperature, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor, group=None) -> None:
        """EMA update of ``center`` with the mean of the ``[..., K]`` logits over all rows of the global batch.

        The row sum and the row count are all-reduced, so processes may hold different numbers of rows. For iBOT
        patch logits ``[B, N, K]`` this is the mean over all B·N tokens (upstream: mean over images of the
        per-image patch mean, the same value when every image has N patches). If the global batch is empty the
        centre is left unchanged.
        """
        self._check(teacher_logits)
        with fp32_no_autocast(teacher_logits.device):
            rows = teacher_logits.float().reshape(-1, self.num_prototypes)
            row_sum = rows.sum(dim=0)  # [K]
            row_count = torch.full((1,), rows.shape[0], dtype=torch.float32, device=rows.device)  # no H2D sync
            _all_reduce(row_sum, group=group)
            _all_reduce(row_count, group=group)
            batch_mean = row_sum / row_count.clamp(min=1.0)
            # Momentum 1 (no change) for an empty global batch, decided on device to avoid a host sync.
            momentum = torch.where(row_count > 0, self.momentum, 1.0)
            self.center.mul_(momentum).add_((1.0 - momentum) * batch_mean)
