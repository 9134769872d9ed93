"""Video label propagation on a frozen backbone: DAVIS 2017 semi-supervised video object segmentation, scored by J&F.

The protocol is DINO's (facebookresearch/dino ``eval_video_segmentation.py``, after Jabri et al.'s space-time
random walk), which upstream dinov3 ships no code for:

- every frame (resized: short side 480, long side floored to a multiple of 64) gives its last-layer patch tokens after
  the final norm, L2-normalised;
- the first frame's ground truth, nearest-resized to the patch grid and one-hot, is the only label given;
- each later frame is labelled from a context of the first frame and the ``n_last_frames`` (7) frames before it, with
  their own predicted soft labels: for every target patch, the affinities ``exp(cos / temperature)`` (temperature
  0.1) to the context patches within ``neighbourhood_size`` (12) patches in both grid directions, the ``topk`` (5)
  largest kept (ties included) and normalised, weight the context labels;
- the soft labels are bilinearly up-sampled by the patch size, each channel min-max normalised, arg-maxed and
  nearest-resized to the annotation size, where J and F are computed (``dinov3_pl.metrics.video``).

Nothing is trained: ``validate`` / ``test`` only. Under DDP each process takes whole videos and the per-object score
sums are added across processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from dinov3_pl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinov3_pl.metrics.video import DAVIS_VOID, DavisJF
from dinov3_pl.modules.frozen import FrozenBackboneModule

__all__ = [
    "VideoLabelPropagation",
    "davis_palette",
    "neighbourhood_mask",
    "normalise_channels",
    "propagate_labels",
    "propagation_weights",
    "resize_ids",
]


def neighbourhood_mask(height: int, width: int, size: int, device: torch.device | None = None) -> Tensor | None:
    """``[N, N]`` bool over the ``height × width`` patch grid: True where two patches lie within ``size`` patches of
    each other along both axes (a square window). ``size`` 0: no restriction (None)."""
    if size <= 0:
        return None
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return ((rows[:, None] - rows[None, :]).abs() <= size) & ((cols[:, None] - cols[None, :]).abs() <= size)


def propagation_weights(
    target: Tensor, context: Tensor, neighbourhood: Tensor | None, topk: int, temperature: float
) -> Tensor:
    """``[S·N, N]`` weights of the context patches (rows: context frame-major) for each target patch (columns).

    ``target`` ``[N, D]`` and ``context`` ``[S, N, D]`` are L2-normalised features. A column holds
    ``exp(cos / temperature)`` for the context patches inside the target patch's neighbourhood whose affinity is at
    least the ``topk``-th largest (ties kept), divided by their sum; the rest are 0.
    """
    frames, patches, _ = context.shape
    logits = torch.einsum("snd,qd->snq", context, target) / temperature
    if neighbourhood is not None:
        logits = logits.masked_fill(~neighbourhood[None], float("-inf"))
    logits = logits.reshape(frames * patches, -1)
    kth = torch.topk(logits, k=min(topk, logits.shape[0]), dim=0).values[-1]
    logits = logits.masked_fill(logits < kth[None], float("-inf"))
    # softmax = exp / sum over the kept entries, without overflowing exp(1 / temperature).
    return torch.softmax(logits, dim=0)


def propagate_labels(
    features: Tensor,
    first_labels: Tensor,
    grid: tuple[int, int],
    n_last_frames: int = 7,
    neighbourhood_size: int = 12,
    topk: int = 5,
    temperature: float = 0.1,
) -> Tensor:
    """Soft labels ``[T, C, N]`` of every frame from the first frame's labels, frame by frame.

    Args:
        features: ``[T, N, D]`` patch features of the frames (normalised here).
        first_labels: ``[C, N]`` labels of frame 0 (one-hot over the ``C`` ids, or soft).
        grid: ``(h, w)`` patch grid, ``h · w = N``.
        n_last_frames: previous frames (with their predicted labels) in the context besides the first frame.
        neighbourhood_size, topk, temperature: see :func:`propagation_weights`.
    """
    frames, patches, _ = features.shape
    if grid[0] * grid[1] != patches:
        raise ValueError(f"grid {grid} has {grid[0] * grid[1]} patches, features have {patches}")
    # float32 even under bf16-mixed validation: bf16's 3 significant digits, divided by the temperature and
    # exponentiated, would reorder and tie the top-k affinities.
    with torch.autocast(features.device.type, enabled=False):
        features = F.normalize(features.float(), dim=-1)
        neighbourhood = neighbourhood_mask(*grid, neighbourhood_size, device=features.device)
        labels = [first_labels.float()]
        for t in range(1, frames):
            context_ids = [0, *range(max(1, t - n_last_frames), t)]
            weights = propagation_weights(features[t], features[context_ids], neighbourhood, topk, temperature)
            context_labels = torch.cat([labels[i] for i in context_ids], dim=1)  # [C, S·N], frame-major as the rows
            labels.append(context_labels @ weights)
        return torch.stack(labels)


def resize_ids(ids: Tensor, size: tuple[int, int]) -> Tensor:
    """Object ids ``[H, W]`` resized to ``size`` by nearest neighbour at pixel centres, as DINO resizes annotations
    and predictions (PIL's nearest filter; torch's plain "nearest" would take each cell's top-left pixel)."""
    return F.interpolate(ids[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()


def normalise_channels(scores: Tensor) -> Tensor:
    """Min-max normalises each channel of ``[C, H, W]`` that has a positive maximum (DINO's ``norm_mask``), so a
    small object's weak but peaked label map competes with the background's; a constant channel becomes 0."""
    out = scores.clone()
    for channel in out:
        if channel.max() > 0:
            channel -= channel.min()
            peak = channel.max()
            if peak > 0:
                channel /= peak
    return out


def davis_palette() -> list[int]:
    """The 256-colour palette of DAVIS annotations (Pascal VOC's bit-interleaved colour map), flat RGB."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette += [red, green, blue]
    return palette


class VideoLabelPropagation(FrozenBackboneModule):
    """Label propagation through videos on frozen patch features; logs ``davis/J_mean``, ``davis/F_mean`` and
    ``davis/JF_mean`` (means over all objects of all videos) after each validation or test epoch.

    Args:
        arch, weights, backbone_kwargs: the backbone (see ``FrozenBackboneModule``).
        n_last_frames: previous frames in the context besides the first (DINO: 7).
        neighbourhood_size: context patches farther than this many patches along either axis are ignored (DINO: 12;
            0: no limit).
        topk: affinities kept per target patch (DINO: 5).
        temperature: of the affinities ``exp(cos / temperature)`` (DINO: 0.1).
        frame_batch_size: frames per backbone forward.
        output_dir: also write each prediction as DAVIS results, ``<output_dir>/<video>/<frame:05d>.png`` palette
            PNGs, which the official davis2017-evaluation reads (None: none written).

    Batches are one video each (``VideoDataModule``): ``frames`` uint8 ``[T, H, W, 3]`` at the propagation size
    (multiples of the patch size), ``masks`` ``[T, H0, W0]`` at the annotation size, ``name``.
    """

    def __init__(
        self,
        arch: str | None = "vit_small_patch16_dinov3",
        weights: str | None = None,
        backbone_kwargs: dict | None = None,
        n_last_frames: int = 7,
        neighbourhood_size: int = 12,
        topk: int = 5,
        temperature: float = 0.1,
        frame_batch_size: int = 8,
        output_dir: str | None = None,
    ) -> None:
        super().__init__(arch=arch, weights=weights, backbone_kwargs=backbone_kwargs)
        self.save_hyperparameters()
        for name, value, least in (
            ("n_last_frames", n_last_frames, 0),
            ("neighbourhood_size", neighbourhood_size, 0),
            ("topk", topk, 1),
            ("frame_batch_size", frame_batch_size, 1),
        ):
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.davis = DavisJF()

    # ------------------------------------------------------------------------------------ propagation
    def frame_features(self, frames: Tensor) -> Tensor:
        """``[T, N, D]`` last-layer patch tokens (after the final norm) of uint8 frames ``[T, H, W, 3]``."""
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        parts = []
        # Normalised a few frames at a time: a whole 480p video in float32 would take ~5 MB per frame at once.
        for chunk in frames.split(self.hparams.frame_batch_size):
            images = (chunk.to(self.device).permute(0, 3, 1, 2).float() / 255 - mean) / std
            parts.append(self.extract(images)["patch"])
        return torch.cat(parts)

    def predict_video(self, frames: Tensor, first_mask: Tensor, mask_size: tuple[int, int] | None = None) -> Tensor:
        """Object ids ``[T, H0, W0]`` (uint8) of every frame of one video from its first frame's ``first_mask``
        ``[H0, W0]`` (ids, 255 void = background); ``frames`` uint8 ``[T, H, W, 3]``. Frame 0's answer is its own
        ground truth (void as background)."""
        height, width = frames.shape[1:3]
        patch = self.patch_size
        if height % patch or width % patch:
            raise ValueError(
                f"frames are {width}x{height}, not multiples of the patch size {patch}: set the data's short_side and "
                f"size_multiple to multiples of {patch}"
            )
        grid = (height // patch, width // patch)
        mask_size = mask_size or tuple(first_mask.shape)
        first = first_mask.to(self.device).long()
        first = torch.where(first == DAVIS_VOID, 0, first)
        num_ids = int(first.max()) + 1
        small = resize_ids(first, grid)  # DINO's first annotation at patch resolution
        first_labels = F.one_hot(small.flatten(), num_ids).T.float()  # [C, N]
        features = self.frame_features(frames)
        hp = self.hparams
        soft = propagate_labels(
            features, first_labels, grid, hp.n_last_frames, hp.neighbourhood_size, hp.topk, hp.temperature
        )
        predictions = [first.to(torch.uint8)]
        for labels in soft[1:]:
            scores = F.interpolate(
                labels.reshape(1, num_ids, *grid), scale_factor=patch, mode="bilinear", align_corners=False
            )[0]
            ids = normalise_channels(scores).argmax(dim=0)
            predictions.append(resize_ids(ids, mask_size).to(torch.uint8))
        return torch.stack(predictions)

    # ------------------------------------------------------------------------------------ steps
    def _evaluate(self, batch: dict[str, Any]) -> None:
        masks = batch["masks"]
        predictions = self.predict_video(batch["frames"], masks[0], tuple(masks.shape[1:]))
        name = str(batch.get("name", "video"))
        self.davis.update(masks.cpu().numpy(), predictions.cpu().numpy(), name)
        if self.hparams.output_dir:
            self._write_results(name, predictions.cpu().numpy())

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch)

    def _log_scores(self) -> None:
        # compute() sums the per-object scores of every process (torchmetrics); the values are global, so "max" of the
        # identical values keeps them exact and sync_dist only silences Lightning's epoch-level DDP warning.
        for name, value in self.davis.compute().items():
            self.log(f"davis/{name}", value.float(), prog_bar=name == "JF_mean", sync_dist=True, reduce_fx="max")
        self.davis.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_scores()

    def on_test_epoch_end(self) -> None:
        self._log_scores()

    def configure_optimizers(self) -> None:
        return None  # nothing trains

    def _write_results(self, name: str, predictions: np.ndarray) -> None:
        folder = Path(self.hparams.output_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        palette = davis_palette()
        for t, ids in enumerate(predictions):
            image = Image.fromarray(ids)
            image.putpalette(palette)  # makes it a palette image, as DAVIS annotations are
            image.save(folder / f"{t:05d}.png")
