"""Object detection on a frozen DINOv3 backbone: ViT → simple feature pyramid → torchvision Faster R-CNN.

**This protocol is our own.** Upstream DINOv3 evaluates detection with Plain-DETR on a frozen backbone (COCO); we
use the lighter ViTDet-style recipe (a simple feature pyramid from the last-layer patch map) with torchvision's
Faster R-CNN, which trains on a CPU at toy scale and needs no custom CUDA ops. Numbers are therefore not
comparable with the DINOv3 paper's detection numbers.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.utils import draw_bounding_boxes

from dinov3_pl.models.dense_heads import SimpleFeaturePyramid
from dinov3_pl.modules.frozen import FrozenBackboneModule
from dinov3_pl.modules.segmentation import denormalise

__all__ = ["Detection", "PyramidBackbone", "detection_overlay", "to_original_coordinates"]


class _NoResizeTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform (normalise, pad to a multiple of ``size_divisible``) without the resize."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        return image, target


class PyramidBackbone(nn.Module):
    """The ``backbone`` torchvision's ``FasterRCNN`` calls: frozen-ViT patch map → ``SimpleFeaturePyramid``.

    ``patch_map`` (images → ``[B, D, h, w]``) is a plain callable, not a submodule, so the frozen ViT is owned (and
    saved) once, by the Lightning module, and not a second time inside the detector.
    """

    def __init__(self, pyramid: SimpleFeaturePyramid, patch_map: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.pyramid = pyramid
        self.out_channels = pyramid.out_channels
        self.patch_map = patch_map

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return self.pyramid(self.patch_map(images))


def _draw(image: Tensor, boxes: Tensor, labels: list[str], colour: str) -> Tensor:
    # torchvision warns on an empty box list; an image without boxes is drawn as is.
    return draw_bounding_boxes(image, boxes, labels, colors=colour) if len(boxes) else image.clone()


def detection_overlay(
    images: Tensor,
    targets: Sequence[dict],
    predictions: Sequence[dict],
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.5,
) -> Tensor:
    """``[3, B·H, 2·W]`` uint8 grid, one row per image: ground-truth boxes (green) | predictions above
    ``score_threshold`` (red, with scores). Labels are 0-based class indices."""
    name = lambda label: class_names[int(label)] if class_names is not None else str(int(label))
    rows = []
    for image, target, prediction in zip(denormalise(images).cpu(), targets, predictions, strict=True):
        gt = _draw(image, target["boxes"].cpu(), [name(lab) for lab in target["labels"]], "lime")
        keep = prediction["scores"] >= score_threshold
        labels = [
            f"{name(lab)} {score:.2f}"
            for lab, score in zip(prediction["labels"][keep], prediction["scores"][keep], strict=True)
        ]
        pred = _draw(image, prediction["boxes"][keep].cpu(), labels, "red")
        rows.append(torch.cat([gt, pred], dim=2))
    return torch.cat(rows, dim=1)


def _xyxy_factors(scale: Tensor) -> Tensor:
    """(height factor, width factor) -> the factors of an xyxy box's four coordinates."""
    return scale[[1, 0, 1, 0]].float()


def to_original_coordinates(
    predictions: Sequence[dict[str, Tensor]], scales: Tensor, original_sizes: Tensor
) -> list[dict[str, Tensor]]:
    """Boxes predicted on resized evaluation images (``scales``: each image's (height, width) resize factors) mapped
    back to the original image and clipped to its size (``original_sizes``: (height, width)), where COCO's
    evaluation (areas, crowd regions) takes place."""
    mapped = []
    for prediction, scale, (height, width) in zip(predictions, scales, original_sizes.tolist(), strict=True):
        boxes = prediction["boxes"] / _xyxy_factors(scale).to(prediction["boxes"])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        mapped.append({**prediction, "boxes": boxes})
    return mapped


class Detection(FrozenBackboneModule):
    """Frozen DINOv3 backbone + simple feature pyramid + Faster R-CNN (RPN and RoI heads). Our own protocol:
    upstream DINOv3's detection protocol is Plain-DETR (see the module docstring).

    Only the pyramid, RPN and RoI heads train; the ViT stays frozen and in ``eval()``. Batches are
    ``{"images": [B,3,H,W] (ImageNet-normalised), "targets": [{"boxes": xyxy pixels, "labels": 0..C-1}]}``
    (``DetectionDataModule``); torchvision's background class is added internally (``num_classes + 1``) and
    predictions come back with labels 0..C-1. Evaluation batches carry their targets in original image pixels (with
    ``iscrowd`` and COCO's ``area``) and each image's resize factors: predictions are mapped back to the original
    image before the metric, crowd regions are ignored and the size split reads COCO's areas, as COCO's own
    evaluation (checked against pycocotools' COCOeval). Metrics: COCO mAP@[.5:.95], mAP50, mAP75, mAR100 and mAP
    by object size (``mAP_small`` / ``_medium`` / ``_large``, logged for the sizes present) (torchmetrics
    ``MeanAveragePrecision``, ``faster_coco_eval`` backend, falling back to ``pycocotools``).

    Args:
        num_classes: object classes, without background.
        min_size, max_size: torchvision's internal resize (short side to ``min_size``, long side at most
            ``max_size``). ``None`` (default) turns it off: images reach the backbone at the DataModule's size, so
            small images are not blown up to torchvision's 800 px default. Give both to resize on purpose.
        layers: the backbone features the pyramid reads: the normed patch maps of the last ``n`` blocks (int) or of
            these block indices, concatenated along channels. ViTDet reads the last block (1, the default);
            upstream DINOv3's Plain-DETR detector reads four intermediate blocks.
        pyramid_channels, pyramid_strides, top_pool: the ``SimpleFeaturePyramid`` (ViTDet: 256, 4–32, pool).
        anchor_scale: anchor side = ``anchor_scale`` × level stride (torchvision's FPN default is 8; small images
            want smaller anchors); ``aspect_ratios`` per location.
        representation_size: width of the RoI box head's two MLP layers (torchvision default 1024).
        rpn_post_nms_top_n_train, rpn_post_nms_top_n_test, box_batch_size_per_image: torchvision's proposal and
            RoI sampling counts (COCO defaults). Small images with few objects need far fewer, and on a CPU the
            RoIAlign backward pass, linear in the sampled RoIs, dominates the step time.
        log_images_every_n_epochs: log box overlays of the first validation batch every N validation epochs.
    """

    def __init__(
        self,
        num_classes: int,
        arch: str | None = "vit_small_patch16_dinov3",
        weights: str | None = None,
        backbone_kwargs: dict | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        layers: int | list[int] = 1,
        pyramid_channels: int = 256,
        pyramid_strides: Sequence[int] = (4, 8, 16, 32),
        top_pool: bool = True,
        anchor_scale: float = 4.0,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        representation_size: int = 1024,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        box_batch_size_per_image: int = 512,
        box_detections_per_img: int = 100,
        box_score_thresh: float = 0.05,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        schedule: Literal["cosine", "poly", "constant"] = "cosine",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        gradient_clip: float | None = None,
        log_images_every_n_epochs: int = 1,
        num_log_images: int = 4,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__(arch=arch, weights=weights, backbone_kwargs=backbone_kwargs)
        self.save_hyperparameters()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (object classes, background excluded), got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.layers = layers if isinstance(layers, int) else list(layers)
        num_layers = layers if isinstance(layers, int) else len(layers)
        if num_layers < 1:
            raise ValueError(f"layers must name at least one block, got {layers!r}")
        in_channels = self.patch_map_channels(layers)
        pyramid = SimpleFeaturePyramid(in_channels, self.patch_size, pyramid_channels, pyramid_strides, top_pool)
        sizes = tuple((int(round(anchor_scale * stride)),) for stride in pyramid.output_strides)
        anchors = AnchorGenerator(sizes=sizes, aspect_ratios=(tuple(aspect_ratios),) * len(sizes))
        roi_pool = MultiScaleRoIAlign(featmap_names=pyramid.level_names, output_size=7, sampling_ratio=2)
        # Padding to a multiple of the patch size and of the coarsest stride keeps every level's grid aligned.
        size_divisible = math.lcm(self.patch_size, *pyramid.output_strides)
        if (min_size is None) != (max_size is None):
            raise ValueError(f"give both min_size and max_size, or neither (no resizing); got {min_size}, {max_size}")
        self.detector = self._build_detector(pyramid, anchors, roi_pool, size_divisible)
        if min_size is None:
            self.detector.transform = _NoResizeTransform(1, 1, [0.0] * 3, [1.0] * 3, size_divisible=size_divisible)
        self.val_map = self._new_map_metric()

    def _build_detector(
        self, pyramid: SimpleFeaturePyramid, anchors: AnchorGenerator, roi_pool: MultiScaleRoIAlign, size_divisible: int
    ) -> FasterRCNN:
        hp = self.hparams
        box_head = TwoMLPHead(pyramid.out_channels * 7 * 7, hp.representation_size)
        return FasterRCNN(
            PyramidBackbone(pyramid, self._patch_map),
            num_classes=None,  # given by box_predictor
            min_size=hp.min_size or 1,  # placeholder when resizing is off (transform replaced below)
            max_size=hp.max_size or 1,
            image_mean=[0.0, 0.0, 0.0],  # the DataModule already normalises
            image_std=[1.0, 1.0, 1.0],
            rpn_anchor_generator=anchors,
            box_roi_pool=roi_pool,
            box_head=box_head,
            box_predictor=FastRCNNPredictor(hp.representation_size, self.num_classes + 1),
            rpn_post_nms_top_n_train=hp.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=hp.rpn_post_nms_top_n_test,
            box_batch_size_per_image=hp.box_batch_size_per_image,
            box_detections_per_img=hp.box_detections_per_img,
            box_score_thresh=hp.box_score_thresh,
            size_divisible=size_divisible,
        )

    @staticmethod
    def _new_map_metric() -> MeanAveragePrecision:
        try:
            return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval")
        except (ImportError, ModuleNotFoundError):
            return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")

    def _patch_map(self, images: Tensor) -> Tensor:
        return self.patch_maps(images, self.layers)

    # ------------------------------------------------------------------------------------ forward
    def forward(self, images: Tensor | Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image ``{"boxes": xyxy, "labels": 0..C-1, "scores"}`` (call in eval mode)."""
        detections = self.detector(list(images))
        return [{**d, "labels": d["labels"] - 1} for d in detections]

    @staticmethod
    def _torchvision_targets(targets: Sequence[dict]) -> list[dict[str, Tensor]]:
        return [{"boxes": t["boxes"].float(), "labels": t["labels"].long() + 1} for t in targets]

    # ------------------------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self.detector(list(batch["images"]), self._torchvision_targets(batch["targets"]))
        loss = sum(losses.values())
        batch_size = len(batch["images"])
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def _evaluate(self, batch: dict, batch_idx: int, stage: str) -> None:
        # float32 boxes/scores for the COCO evaluator, also under bf16 mixed precision.
        predictions = [
            {k: v.float() if v.is_floating_point() else v for k, v in p.items()} for p in self(batch["images"])
        ]
        targets = [{k: v.float() if k in ("boxes", "area") else v for k, v in t.items()} for t in batch["targets"]]
        scales = batch.get("scales")  # evaluation batches: targets in original pixels, images resized by these
        original = (
            predictions if scales is None else to_original_coordinates(predictions, scales, batch["original_sizes"])
        )
        self.val_map.update(original, targets)
        if stage == "val" and batch_idx == 0:
            if scales is not None:  # drawn on the resized image
                targets = [
                    {**t, "boxes": t["boxes"] * _xyxy_factors(scale).to(t["boxes"])}
                    for t, scale in zip(targets, scales, strict=True)
                ]
            self._log_overlay(batch["images"], targets, predictions)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def _log_epoch_metrics(self, stage: str) -> None:
        results = self.val_map.compute()
        self.val_map.reset()
        # The values are global (the metric gathers every rank's boxes) and identical on every rank: "max" keeps them
        # exact where sync_dist's default mean over, e.g., 3 ranks can round them.
        log = functools.partial(self.log, sync_dist=True, reduce_fx="max")
        log(f"{stage}/mAP", results["map"], prog_bar=True)
        log(f"{stage}/mAP50", results["map_50"], prog_bar=True)
        log(f"{stage}/mAP75", results["map_75"])
        log(f"{stage}/mAR100", results["mar_100"])
        # COCO's split by box area (small < 32^2 <= medium < 96^2 <= large px^2); -1 means no box of that size.
        for size in ("small", "medium", "large"):
            if results[f"map_{size}"] >= 0:
                log(f"{stage}/mAP_{size}", results[f"map_{size}"])

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def _log_overlay(self, images: Tensor, targets: list[dict], predictions: list[dict]) -> None:
        experiment = self.image_writer(self.hparams.log_images_every_n_epochs)
        if experiment is None:
            return
        count = self.hparams.num_log_images
        grid = detection_overlay(images[:count], targets[:count], predictions[:count], self.hparams.class_names)
        experiment.add_image("val/detection", grid, global_step=self.global_step)

    # ------------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        return self.head_optimizer(hp.optimizer, hp.lr, hp.weight_decay, hp.schedule, hp.warmup_steps, hp.min_lr_ratio)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = self.hparams.gradient_clip if self.hparams.gradient_clip is not None else gradient_clip_val
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
