"""DAVIS 2017 semi-supervised video object segmentation metrics: region similarity J, boundary F-measure F, J&F.

The definitions are those of the DAVIS benchmark (davis2017-evaluation, ``davis2017/metrics.py`` and
``evaluation.py``), re-implemented here:

- **J** of one object in one frame: IoU of the predicted and the ground-truth object masks; 1 when both are empty.
- **F** of one object in one frame: F-measure of the two masks' one-pixel boundaries, a boundary pixel counting as
  matched when the other boundary lies within ``ceil(0.008 · image diagonal)`` pixels (a disk dilation). An empty
  boundary on both sides is a perfect 1; an empty boundary on one side only gives 0.
- Per video, the frames scored are those strictly between the first (given) and the last; J and F of an object are
  their means over those frames. Objects are the ids ``1..max(first ground-truth frame)``; void pixels (255) count as
  background, as the semi-supervised evaluation reads them.
- The benchmark numbers are means over all objects of all videos (not over videos): ``J_mean``, ``F_mean`` and
  ``JF_mean = (J_mean + F_mean) / 2``.

:class:`DavisJF` accumulates per-object sums and the object count as a torchmetrics ``Metric`` whose states are summed
across DDP ranks, so videos may be scored on different processes.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from skimage.morphology import disk
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "DAVIS_BOUNDARY_FRACTION",
    "DAVIS_VOID",
    "DavisJF",
    "boundary_f_measure",
    "boundary_map",
    "region_similarity",
    "video_object_scores",
]

DAVIS_BOUNDARY_FRACTION = 0.008  # boundary match tolerance, as a fraction of the image diagonal
DAVIS_VOID = 255


def region_similarity(ground_truth: np.ndarray, prediction: np.ndarray) -> float:
    """J: IoU of two binary masks ``[H, W]``; 1.0 when both are empty (nothing to find, nothing found)."""
    if ground_truth.shape != prediction.shape:
        raise ValueError(f"masks differ in size: ground truth {ground_truth.shape}, prediction {prediction.shape}")
    ground_truth, prediction = ground_truth.astype(bool), prediction.astype(bool)
    union = np.count_nonzero(ground_truth | prediction)
    if union == 0:
        return 1.0
    return np.count_nonzero(ground_truth & prediction) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary of a binary mask ``[H, W]``: pixels whose right, lower or lower-right neighbour differs
    from them (the boundary sits half a pixel towards the origin), as the Berkeley ``seg2bmap`` DAVIS uses. The last
    row compares right neighbours only, the last column lower neighbours only, and the corner is never a boundary."""
    mask = mask.astype(bool)
    right = np.zeros_like(mask)
    below = np.zeros_like(mask)
    below_right = np.zeros_like(mask)
    right[:, :-1] = mask[:, 1:]
    below[:-1, :] = mask[1:, :]
    below_right[:-1, :-1] = mask[1:, 1:]
    boundary = (mask ^ right) | (mask ^ below) | (mask ^ below_right)
    boundary[-1, :] = mask[-1, :] ^ right[-1, :]
    boundary[:, -1] = mask[:, -1] ^ below[:, -1]
    boundary[-1, -1] = False
    return boundary


def boundary_f_measure(
    ground_truth: np.ndarray, prediction: np.ndarray, bound_fraction: float = DAVIS_BOUNDARY_FRACTION
) -> float:
    """F: boundary F-measure of two binary masks ``[H, W]`` with DAVIS's tolerance (``bound_fraction`` of the image
    diagonal, rounded up to whole pixels; a value >= 1 is taken as pixels)."""
    if ground_truth.shape != prediction.shape:
        raise ValueError(f"masks differ in size: ground truth {ground_truth.shape}, prediction {prediction.shape}")
    radius = bound_fraction if bound_fraction >= 1 else math.ceil(bound_fraction * np.linalg.norm(ground_truth.shape))
    kernel = disk(radius).astype(np.uint8)
    predicted_boundary = boundary_map(prediction)
    true_boundary = boundary_map(ground_truth)
    predicted_count = np.count_nonzero(predicted_boundary)
    true_count = np.count_nonzero(true_boundary)
    # DAVIS's conventions when a boundary is empty: precision of nothing predicted is 1, recall of nothing to find 1.
    if predicted_count == 0 or true_count == 0:
        precision = 1.0 if predicted_count == 0 else 0.0
        recall = 1.0 if true_count == 0 else 0.0
    else:
        true_near = cv2.dilate(true_boundary.astype(np.uint8), kernel).astype(bool)
        predicted_near = cv2.dilate(predicted_boundary.astype(np.uint8), kernel).astype(bool)
        precision = np.count_nonzero(predicted_boundary & true_near) / predicted_count
        recall = np.count_nonzero(true_boundary & predicted_near) / true_count
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def video_object_scores(
    ground_truth: np.ndarray | Tensor, prediction: np.ndarray | Tensor, name: str = "video"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-object J and F means of one video, DAVIS semi-supervised style.

    Args:
        ground_truth: ``[T, H, W]`` object ids per frame (0 background, 255 void = background here).
        prediction: ``[T, H, W]`` predicted ids (frame 0 is ignored, as is the last frame).
        name: the video, for error messages.

    Returns:
        ``(J, F)``, each ``[K]`` for the objects ``1..K`` of the first ground-truth frame.
    """
    ground_truth = np.asarray(ground_truth.cpu() if isinstance(ground_truth, Tensor) else ground_truth)
    prediction = np.asarray(prediction.cpu() if isinstance(prediction, Tensor) else prediction)
    if ground_truth.ndim != 3 or ground_truth.shape != prediction.shape:
        raise ValueError(
            f"{name}: ground truth {ground_truth.shape} and prediction {prediction.shape} must both be [T, H, W]"
        )
    if ground_truth.shape[0] < 3:
        raise ValueError(
            f"{name} has {ground_truth.shape[0]} frames; DAVIS scores the frames between the first and the last, "
            "so a video needs at least 3"
        )
    ground_truth = np.where(ground_truth == DAVIS_VOID, 0, ground_truth)
    num_objects = int(ground_truth[0].max())
    extra = int(prediction.max()) if prediction.size else 0
    if extra > num_objects:
        raise ValueError(f"{name}: the prediction holds object id {extra}, but the first frame has {num_objects}")
    frames = range(1, ground_truth.shape[0] - 1)
    region = np.zeros((num_objects, len(frames)))
    boundary = np.zeros((num_objects, len(frames)))
    for k in range(num_objects):
        for column, t in enumerate(frames):
            true_mask, predicted_mask = ground_truth[t] == k + 1, prediction[t] == k + 1
            region[k, column] = region_similarity(true_mask, predicted_mask)
            boundary[k, column] = boundary_f_measure(true_mask, predicted_mask)
    return region.mean(axis=1), boundary.mean(axis=1)


class DavisJF(Metric):
    """J&F over a set of videos: sums of the per-object J and F means and the object count, summed across processes.

    ``update(ground_truth, prediction)`` scores one video (:func:`video_object_scores`); ``compute()`` returns
    ``{"J_mean", "F_mean", "JF_mean"}`` (means over objects, as the DAVIS benchmark reports them).
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("region_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("boundary_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("objects", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ground_truth: np.ndarray | Tensor, prediction: np.ndarray | Tensor, name: str = "video") -> None:
        region, boundary = video_object_scores(ground_truth, prediction, name)
        self.region_sum += float(region.sum())
        self.boundary_sum += float(boundary.sum())
        self.objects += len(region)

    def compute(self) -> dict[str, Tensor]:
        if int(self.objects) == 0:
            raise ValueError("no objects were scored: every video's first frame was empty (no ids 1..K)")
        region = self.region_sum / self.objects
        boundary = self.boundary_sum / self.objects
        return {"J_mean": region, "F_mean": boundary, "JF_mean": (region + boundary) / 2}
