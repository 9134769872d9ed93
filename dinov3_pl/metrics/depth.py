"""Monocular depth metrics as upstream DINOv3 computes them (``dinov3/eval/depth/{eval,metrics}.py``).

Per image: ground-truth pixels outside ``(min_depth, max_depth)`` (and 0 = no measurement) are ignored, the
evaluation crop (NYU: Eigen's crop, rows 45:471 and columns 41:601 of the 480×640 frame, scaled to the image size)
keeps the rest, the prediction is clamped to ``[min_depth, max_depth]``, and RMSE, AbsRel, log10 and δ1/δ2/δ3 are
computed over that image's valid pixels. The dataset value is the **mean over images** (upstream averages the
per-image values with ``nanmean``; an image without a valid pixel is left out), not a pool of all pixels.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["DEPTH_METRIC_NAMES", "NYU_EIGEN_CROP", "DepthMetrics", "depth_valid_mask", "per_image_depth_metrics"]

EvalCrop = Literal["nyu_eigen", "full"]
DEPTH_METRIC_NAMES: tuple[str, ...] = ("rmse", "abs_rel", "log10", "delta1", "delta2", "delta3")
# Eigen et al.'s evaluation crop of the 480×640 NYU frame: (top, bottom, left, right), bottom/right exclusive.
NYU_EIGEN_CROP: tuple[int, int, int, int] = (45, 471, 41, 601)
_NYU_FRAME = (480, 640)


def _as_maps(depth: Tensor) -> Tensor:
    """``[B, H, W]`` from ``[B, H, W]`` or ``[B, 1, H, W]``."""
    if depth.ndim == 4 and depth.shape[1] == 1:
        return depth[:, 0]
    if depth.ndim != 3:
        raise ValueError(f"depth maps must be [B, H, W] or [B, 1, H, W], got {list(depth.shape)}")
    return depth


def depth_valid_mask(target: Tensor, min_depth: float, max_depth: float, eval_crop: EvalCrop = "full") -> Tensor:
    """Pixels that count: ``min_depth < target < max_depth`` (so 0 = no measurement and NaN drop out) inside the
    evaluation crop. ``target`` ``[B, H, W]`` (or ``[B, 1, H, W]``) in metres; returns bool ``[B, H, W]``.

    ``"nyu_eigen"`` scales Eigen's crop of the 480×640 frame to the map size, truncating as upstream's
    ``make_valid_mask`` does (``int(45 / 480 · H)``, ...)."""
    target = _as_maps(target)
    valid = (target > min_depth) & (target < max_depth)
    if eval_crop == "nyu_eigen":
        height, width = target.shape[-2:]
        top, bottom, left, right = NYU_EIGEN_CROP
        crop = torch.zeros_like(valid)
        rows = slice(int(top / _NYU_FRAME[0] * height), int(bottom / _NYU_FRAME[0] * height))
        cols = slice(int(left / _NYU_FRAME[1] * width), int(right / _NYU_FRAME[1] * width))
        crop[:, rows, cols] = True
        valid &= crop
    elif eval_crop != "full":
        raise ValueError(f"eval_crop must be 'nyu_eigen' or 'full', got {eval_crop!r}")
    return valid


def per_image_depth_metrics(prediction: Tensor, target: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """``{name: [B]}`` for ``DEPTH_METRIC_NAMES`` over each image's ``valid`` pixels (NaN for an image with none).

    ``prediction`` must be positive where ``valid`` (clamp it first); computed in float64."""
    prediction, target = _as_maps(prediction).double(), _as_maps(target).double()
    valid = _as_maps(valid).bool()
    if prediction.shape != target.shape or valid.shape != target.shape:
        raise ValueError(
            f"prediction {list(prediction.shape)}, target {list(target.shape)} and valid {list(valid.shape)} differ"
        )
    weights = valid.double()
    count = weights.sum(dim=(1, 2))
    # Invalid pixels get the ratio 1 so that no 0/0 or log(0) reaches the masked sums.
    safe_target = torch.where(valid, target, torch.ones_like(target))
    safe_prediction = torch.where(valid, prediction, torch.ones_like(prediction))

    def mean(values: Tensor) -> Tensor:
        return (values * weights).sum(dim=(1, 2)) / count  # NaN where count == 0

    ratio = torch.maximum(safe_target / safe_prediction, safe_prediction / safe_target)
    error = safe_target - safe_prediction
    return {
        "rmse": mean(error**2).sqrt(),
        "abs_rel": mean(error.abs() / safe_target),
        "log10": mean((torch.log10(safe_target) - torch.log10(safe_prediction)).abs()),
        "delta1": mean((ratio < 1.25).double()),
        "delta2": mean((ratio < 1.25**2).double()),
        "delta3": mean((ratio < 1.25**3).double()),
    }


class DepthMetrics(Metric):
    """RMSE, AbsRel, log10 and δ1/δ2/δ3 of a dataset, each the mean of its per-image values (upstream's reduction).

    ``update(prediction, target)``: depth maps in metres, ``[B, H, W]`` or ``[B, 1, H, W]``; a prediction of another
    size is resized bilinearly to the target's first, as upstream does. ``compute()`` returns ``{name: value}``
    (NaN when no image had a valid pixel). States are sums, so DDP reduction is exact.
    """

    full_state_update = False

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0, eval_crop: EvalCrop = "full") -> None:
        super().__init__()
        if not 0 <= min_depth < max_depth:
            raise ValueError(f"need 0 <= min_depth < max_depth, got min_depth={min_depth}, max_depth={max_depth}")
        if eval_crop not in ("nyu_eigen", "full"):
            raise ValueError(f"eval_crop must be 'nyu_eigen' or 'full', got {eval_crop!r}")
        self.min_depth, self.max_depth, self.eval_crop = float(min_depth), float(max_depth), eval_crop
        for name in DEPTH_METRIC_NAMES:
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, prediction: Tensor, target: Tensor) -> None:
        prediction, target = _as_maps(prediction), _as_maps(target)
        if prediction.shape[-2:] != target.shape[-2:]:
            prediction = torch.nn.functional.interpolate(
                prediction[:, None], size=target.shape[-2:], mode="bilinear", align_corners=False
            )[:, 0]
        valid = depth_valid_mask(target, self.min_depth, self.max_depth, self.eval_crop)
        values = per_image_depth_metrics(prediction.clamp(self.min_depth, self.max_depth), target, valid)
        counted = valid.flatten(1).any(dim=1)
        for name in DEPTH_METRIC_NAMES:
            setattr(self, name, getattr(self, name) + values[name][counted].sum())
        self.images = self.images + counted.sum()

    def compute(self) -> dict[str, Tensor]:
        return {name: (getattr(self, name) / self.images).float() for name in DEPTH_METRIC_NAMES}
