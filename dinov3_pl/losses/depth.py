"""Depth losses of upstream DINOv3's depth evaluation (``dinov3/eval/depth/loss.py``), pure PyTorch, in fp32.

- :class:`SigLoss`, the scale-invariant log loss its NYU linear recipe trains with (weight 1.0): with
  ``g = log(pred + ε) − log(target + ε)`` over the batch's valid pixels, ``sqrt(var(g) + 0.15 · mean(g)²)``; for the
  first ``warmup_steps`` (100) steps the variance term is left out, so the head first learns the scale.
- :class:`GradientLoss`, its gradient-matching loss (``GRADIENT_LOSS`` / ``GRADIENT_LOG_LOSS``, weight 0 in the NYU
  recipe): absolute differences two pixels apart of the (log) depth error, at strides 1, 2, 4 and 6, each scale
  divided by its number of valid pixels.

Invalid pixels (no measurement) are excluded by a ``valid`` mask. A batch without a valid pixel gives a zero loss that
still depends on the prediction (upstream would return NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GradientLoss", "SigLoss"]

_EPS = 1e-3  # upstream's offset inside the logs ("avoid grad explode")


def _as_maps(depth: Tensor) -> Tensor:
    return depth[:, 0] if depth.ndim == 4 and depth.shape[1] == 1 else depth


class SigLoss(nn.Module):
    """Scale-invariant log loss, ``sqrt(var(g) + mean_weight · mean(g)²)``, ``g`` the log error of valid pixels.

    ``var`` is the unbiased variance over all valid pixels of the batch (pooled, as upstream). ``step`` (the global
    training step) switches the variance on after ``warmup_steps``; upstream counts calls of the loss instead, which
    is the same while each training step calls it once, and also holds after a resume.
    """

    def __init__(self, mean_weight: float = 0.15, warmup_steps: int = 100, eps: float = _EPS) -> None:
        super().__init__()
        if mean_weight < 0 or warmup_steps < 0 or eps <= 0:
            raise ValueError(
                f"need mean_weight >= 0, warmup_steps >= 0, eps > 0; got {mean_weight}, {warmup_steps}, {eps}"
            )
        self.mean_weight, self.warmup_steps, self.eps = mean_weight, warmup_steps, eps

    def forward(self, prediction: Tensor, target: Tensor, valid: Tensor, step: int | None = None) -> Tensor:
        prediction, target, valid = _as_maps(prediction).float(), _as_maps(target).float(), _as_maps(valid).bool()
        if not valid.any():
            return prediction.sum() * 0.0
        log_error = torch.log(prediction[valid] + self.eps) - torch.log(target[valid] + self.eps)
        squared = self.mean_weight * log_error.mean() ** 2
        if step is None or step >= self.warmup_steps:
            # One valid pixel has no variance (upstream: NaN); it then counts for nothing.
            squared = squared + (log_error.var() if log_error.numel() > 1 else 0.0)
        # sqrt has an infinite slope at 0: upstream returns |0| there, which keeps the gradient finite.
        return squared.sqrt() if bool(squared > 0) else squared.abs()


class GradientLoss(nn.Module):
    """Multi-scale gradient-matching loss on the depth error (``log=False``) or the log-depth error (``log=True``).

    At each stride ``s`` of ``strides`` the maps are subsampled ``[::s, ::s]``; the error ``d`` (masked) is compared
    with its neighbour two pixels below and two to the right, ``|d[i] − d[i+2]|``, where both pixels are valid; the
    sum over both directions is divided by the valid pixels at that stride, and the scales are added up.
    """

    def __init__(self, log: bool = False, strides: tuple[int, ...] = (1, 2, 4, 6), eps: float = _EPS) -> None:
        super().__init__()
        if not strides or any(s < 1 for s in strides):
            raise ValueError(f"strides must be positive, got {strides}")
        self.log, self.strides, self.eps = log, tuple(strides), eps

    def forward(self, prediction: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        prediction, target, valid = _as_maps(prediction).float(), _as_maps(target).float(), _as_maps(valid)
        if self.log:
            error = torch.log(prediction + self.eps) - torch.log(target + self.eps)
        else:
            error = prediction - target
        weight = valid.to(error.dtype)
        error = error * weight  # invalid pixels (target 0: log would be finite but meaningless) carry no error
        total = prediction.sum() * 0.0
        for stride in self.strides:
            d, m = error[..., ::stride, ::stride], weight[..., ::stride, ::stride]
            vertical = (d[..., :-2, :] - d[..., 2:, :]).abs() * m[..., :-2, :] * m[..., 2:, :]
            horizontal = (d[..., :, :-2] - d[..., :, 2:]).abs() * m[..., :, :-2] * m[..., :, 2:]
            total = total + (vertical.sum() + horizontal.sum()) / m.sum().clamp(min=1.0)
        return total
