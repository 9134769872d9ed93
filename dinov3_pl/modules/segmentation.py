"""Linear semantic segmentation on a frozen DINOv3 backbone (upstream DINOv3's linear segmentation protocol).

A trainable dropout + BatchNorm (SyncBatchNorm under multi-GPU DDP) + 1×1 conv head reads the last block's normed
patch tokens (optionally the last ``n`` blocks concatenated); its patch-resolution logits are bilinearly up-sampled
to the label size and trained with cross-entropy (ignore 255). Evaluation predicts each image on its own (whole, or
with a sliding window, ``inference="slide"``, as upstream's ADE20K eval: crop 512, stride 341), resizes the logits
bilinearly to the image's label map, which keeps its original resolution, and accumulates a dataset-level confusion
matrix (torchmetrics ``MulticlassJaccardIndex``; classes absent from both labels and predictions are left out of
the mean, as upstream's ``nanmean``), plus pixel accuracy.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from dinov3_pl.data.dense import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from dinov3_pl.models.dense_heads import LinearSegmentationHead, sliding_window_logits, upsample_logits
from dinov3_pl.modules.frozen import FrozenBackboneModule

__all__ = ["Segmentation", "colour_palette", "denormalise", "segmentation_overlay"]


def colour_palette(num_classes: int) -> Tensor:
    """``[num_classes + 1, 3]`` uint8 colours: class 0 black, others spread over hue; the last row (ignore) white."""
    colours = [torch.zeros(3)]
    for c in range(1, num_classes):
        hue = (c * 0.618033988749895) % 1.0  # golden-ratio steps keep neighbouring ids far apart in hue
        value = 1.0 if c % 2 else 0.7
        k = torch.tensor([5.0, 3.0, 1.0])
        rgb = value - value * torch.clamp(torch.minimum((k + hue * 6) % 6, 4 - (k + hue * 6) % 6), 0, 1)
        colours.append(rgb)
    colours.append(torch.ones(3))
    return (torch.stack(colours) * 255).round().to(torch.uint8)


def denormalise(images: Tensor) -> Tensor:
    """ImageNet-normalised float images → uint8 ``[B, 3, H, W]``."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def segmentation_overlay(images: Tensor, masks: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """``[3, B·H, 3·W]`` uint8 grid, one row per image: image | ground truth | prediction (palette colours)."""
    palette = colour_palette(num_classes).to(images.device)
    to_colour = lambda m: palette[torch.where(m == IGNORE_INDEX, num_classes, m.clamp(0, num_classes))]
    rows = [
        torch.cat([img, to_colour(gt).permute(2, 0, 1), to_colour(pr).permute(2, 0, 1)], dim=2)
        for img, gt, pr in zip(denormalise(images), masks, predictions, strict=True)
    ]
    return torch.cat(rows, dim=1)


class Segmentation(FrozenBackboneModule):
    """Frozen DINOv3 backbone + linear segmentation head.

    Args:
        num_classes: classes including background (label ids 0..num_classes-1, 255 ignored).
        n_layers: concatenate the normed patch maps of the last ``n_layers`` blocks (upstream "LAST": 1).
        dropout: Dropout2d on the features before the BatchNorm and the 1×1 conv (upstream 0.1).
        inference: ``"whole"`` (one forward per image, padded to a multiple of the patch size) or ``"slide"``.
        window_size, window_stride: sliding-window crop size and step in pixels (``window_size`` must be a
            multiple of the patch size).
        optimizer: ``"adamw"`` (upstream: lr 1e-3, wd 1e-3) or ``"sgd"`` (momentum 0.9).
        schedule: ``"cosine"`` or ``"poly"`` (power 0.9), both step-based after ``warmup_steps`` linear warm-up.
        log_images_every_n_epochs: log image | ground truth | prediction overlays of the first validation batch to
            TensorBoard every N validation epochs (0: never); at most ``num_log_images`` images.
    """

    def __init__(
        self,
        num_classes: int,
        arch: str | None = "vit_small_patch16_dinov3",
        weights: str | None = None,
        backbone_kwargs: dict | None = None,
        n_layers: int = 1,
        dropout: float = 0.1,
        inference: Literal["whole", "slide"] = "whole",
        window_size: int | None = None,
        window_stride: int | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        schedule: Literal["cosine", "poly", "constant"] = "cosine",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        log_images_every_n_epochs: int = 1,
        num_log_images: int = 4,
    ) -> None:
        super().__init__(arch=arch, weights=weights, backbone_kwargs=backbone_kwargs, n_last_blocks=n_layers)
        self.save_hyperparameters()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + one class), got {num_classes}")
        if inference == "slide":
            if not window_size or window_size % self.patch_size:
                raise ValueError(
                    f"inference='slide' needs window_size, a multiple of the patch size "
                    f"{self.patch_size}; got {window_size}"
                )
            if not window_stride or window_stride < 1:
                raise ValueError(f"inference='slide' needs window_stride >= 1, got {window_stride}")
        self.num_classes = num_classes
        self.n_layers = n_layers
        self.head = LinearSegmentationHead(self.patch_map_channels(n_layers), num_classes, dropout=dropout)
        self.val_miou = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE_INDEX, average="macro")
        self.val_pixel_accuracy = MulticlassAccuracy(num_classes, ignore_index=IGNORE_INDEX, average="micro")

    def setup(self, stage: str) -> None:
        self._synchronise_head_norm()

    def _synchronise_head_norm(self) -> None:
        """Under multi-GPU DDP the head's BatchNorm becomes a SyncBatchNorm (upstream's head), so its statistics
        cover the global batch; only the head's norm: the frozen backbone's norms stay as they are. Lightning's
        ``Trainer(sync_batchnorm=True)`` is not needed (it would convert the frozen backbone's norms too, which stay
        in eval() and then use their running statistics, unchanged). SyncBatchNorm needs GPUs: CPU processes keep
        a per-process BatchNorm."""
        trainer = self._trainer
        if trainer is None or trainer.world_size < 2 or isinstance(self.head.norm, nn.SyncBatchNorm):
            return
        if not isinstance(self.head.norm, nn.BatchNorm2d):
            return
        if trainer.strategy.root_device.type == "cpu":
            rank_zero_warn(
                "Segmentation: SyncBatchNorm needs GPUs; on CPU each process's head BatchNorm normalises its own batch"
            )
            return
        self.head.norm = nn.SyncBatchNorm.convert_sync_batchnorm(self.head.norm)

    # ------------------------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, C, H, W]`` at the image size. Sizes that are not multiples of the patch size are padded
        (bottom/right, zeros = the mean colour after normalisation) and the padding is cut off the logits."""
        height, width = images.shape[-2:]
        pad_h, pad_w = (-height) % self.patch_size, (-width) % self.patch_size
        padded = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
        logits = self.head(self.patch_maps(padded, self.n_layers))
        logits = upsample_logits(logits, tuple(padded.shape[-2:]))
        return logits[..., :height, :width]

    def predict_logits(self, images: Tensor) -> Tensor:
        """Evaluation logits at the image size: whole image or sliding window, as configured."""
        if self.hparams.inference == "slide":
            return sliding_window_logits(
                self, images, self.num_classes, self.hparams.window_size, self.hparams.window_stride
            )
        return self(images)

    # ------------------------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits = upsample_logits(self(batch["images"]), tuple(batch["masks"].shape[-2:]))
        loss = F.cross_entropy(logits, batch["masks"], ignore_index=IGNORE_INDEX)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["images"]))
        return loss

    def label_logits(self, images: Tensor, image_sizes: Tensor, mask_sizes: Tensor) -> list[Tensor]:
        """Evaluation logits ``[1, C, H, W]`` per image at its label map's size: each image is predicted without
        the batch's padding (``image_sizes``: its own size) and its logits are resized bilinearly to its label
        (``mask_sizes``), which keeps its original resolution, as upstream measures mIoU."""
        sizes = image_sizes.tolist()
        if all(tuple(size) == tuple(images.shape[-2:]) for size in sizes):  # no padding: one batched forward
            predicted = list(self.predict_logits(images)[:, None])
        else:
            predicted = [
                self.predict_logits(image[None, :, :h, :w]) for image, (h, w) in zip(images, sizes, strict=True)
            ]
        return [
            upsample_logits(logits, tuple(size)) for logits, size in zip(predicted, mask_sizes.tolist(), strict=True)
        ]

    def _evaluate(self, batch: dict, stage: str, batch_idx: int) -> None:
        images, masks = batch["images"], batch["masks"]
        full = lambda size: torch.tensor([list(size)] * len(images))
        image_sizes = batch.get("image_sizes", full(images.shape[-2:]))
        mask_sizes = batch.get("mask_sizes", full(masks.shape[-2:]))
        loss_sum = images.new_zeros(())
        predictions = torch.full_like(masks, IGNORE_INDEX)
        for i, logits in enumerate(self.label_logits(images, image_sizes, mask_sizes)):
            height, width = mask_sizes[i].tolist()
            mask = masks[i : i + 1, :height, :width]
            prediction = logits.argmax(dim=1)
            self.val_miou.update(prediction, mask)
            self.val_pixel_accuracy.update(prediction, mask)
            loss_sum = loss_sum + F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX, reduction="sum")
            predictions[i, :height, :width] = prediction[0]
        # Logged on every batch (every DDP rank must log the same keys); an all-ignore batch counts as loss 0.
        # Epoch-level only: the eval sampler gives ranks unequal numbers of batches, so a per-step sync_dist
        # (an all-reduce per batch) would wait forever on the rank that has one batch more.
        loss = loss_sum / masks.ne(IGNORE_INDEX).sum().clamp(min=1)
        self.log(f"{stage}/loss", loss, batch_size=len(masks), on_step=False, on_epoch=True, sync_dist=True)
        if stage == "val" and batch_idx == 0:
            self._log_overlay(images, image_sizes, mask_sizes, masks, predictions)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    def _log_epoch_metrics(self, stage: str) -> None:
        # compute() reduces the dataset-level confusion matrix across processes (torchmetrics); the value is global,
        # so sync_dist only silences Lightning's epoch-level DDP warning, and "max" of the identical values keeps
        # them exact (the default mean over, e.g., 3 ranks can round them by an ulp).
        self.log(f"{stage}/mIoU", self.val_miou.compute(), prog_bar=True, sync_dist=True, reduce_fx="max")
        self.log(f"{stage}/pixel_accuracy", self.val_pixel_accuracy.compute(), sync_dist=True, reduce_fx="max")
        self.val_miou.reset()
        self.val_pixel_accuracy.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def _log_overlay(
        self, images: Tensor, image_sizes: Tensor, mask_sizes: Tensor, masks: Tensor, predictions: Tensor
    ) -> None:
        experiment = self.image_writer(self.hparams.log_images_every_n_epochs)
        if experiment is None:
            return
        count = self.hparams.num_log_images
        # Drawn at the label's size: each (resized) image brought back to it, the batch padding left black.
        shown = images.new_zeros((min(count, len(images)), 3, *masks.shape[-2:]))
        for i, ((height, width), (label_height, label_width)) in enumerate(
            zip(image_sizes[:count].tolist(), mask_sizes[:count].tolist(), strict=True)
        ):
            image = upsample_logits(images[i : i + 1, :, :height, :width], (label_height, label_width))
            shown[i, :, :label_height, :label_width] = image[0]
        grid = segmentation_overlay(shown, masks[:count], predictions[:count], self.num_classes)
        experiment.add_image("val/segmentation", grid, global_step=self.global_step)

    # ------------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        return self.head_optimizer(hp.optimizer, hp.lr, hp.weight_decay, hp.schedule, hp.warmup_steps, hp.min_lr_ratio)
