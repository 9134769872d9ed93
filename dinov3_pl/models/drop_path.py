"""Stochastic depth on a batch subset, as upstream DINOv3 trains (``dinov3/layers/block.py``).

timm's ``DropPath`` computes every sample's residual branch and multiplies the dropped ones by zero: at rate 0.3
about 30% of the block compute is thrown away. Upstream instead runs each branch (attention, MLP) on a random subset
of ``max(int(B * (1 - rate)), 1)`` samples, drawn afresh for each branch, and adds it back scaled by ``B / subset``.
Both are unbiased: every sample's expected output is ``x + branch(x)``. They differ in what varies: timm drops each
sample independently (the number kept varies), the subset keeps a fixed number (each sample's chance is
``subset / B``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["subset_drop_path_block", "subset_residual"]


def subset_residual(x: Tensor, branch: Callable[[Tensor], Tensor], rate: float) -> Tensor:
    """``x`` plus ``branch`` computed on a random subset of the batch, scaled so that the expectation is exact."""
    batch = x.shape[0]
    subset = max(int(batch * (1 - rate)), 1)
    index = torch.randperm(batch, device=x.device)[:subset]
    return torch.index_add(x, 0, index, branch(x[index]).to(x.dtype), alpha=batch / subset)


def subset_drop_path_block(block: nn.Module, x: Tensor, rope: Tensor | None, rate: float) -> Tensor:
    """A timm EVA block (the DINOv3 ViT's) with subset stochastic depth on both residual branches.

    ``rope`` is shared by every sample (one patch grid per forward), so it needs no indexing.
    """

    def attention(tokens: Tensor) -> Tensor:
        out = block.attn(block.norm1(tokens), rope=rope)
        return out if block.gamma_1 is None else block.gamma_1 * out

    def mlp(tokens: Tensor) -> Tensor:
        out = block.mlp(block.norm2(tokens))
        return out if block.gamma_2 is None else block.gamma_2 * out

    x = subset_residual(x, attention, rate)
    return subset_residual(x, mlp, rate)
