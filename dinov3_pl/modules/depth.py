"""Linear monocular depth on a frozen DINOv3 backbone: upstream DINOv3's linear depth protocol (NYU Depth v2).

Upstream (``dinov3/eval/depth``, ``configs/config-nyu.yaml``) trains a *linear* head: BatchNorm + 1×1 conv on the
last block's normed patch tokens (no class token) to 256 logits per patch, read as weights of 256 depth bins spread
linearly over ``[min_depth, max_depth] = [0.001, 10]`` m (AdaBins' "linear" normalisation: ``relu(x) + 0.1``, divided
by the sum). The patch-resolution depth is resized bilinearly to the label and trained with the scale-invariant log
loss (:class:`~dinov3_pl.losses.depth.SigLoss`, variance term after 100 steps). AdamW (lr 3e-4, betas 0.9/0.99, wd
1e-4) under upstream's ``WarmupOneCycleLR`` (:class:`WarmupOneCycle`), gradients clipped at 35. Evaluation: the full
image, flip test-time augmentation (test only), metrics of :mod:`dinov3_pl.metrics.depth` (Eigen crop, per image).
Images are centre-padded to a multiple of the patch size, as upstream's ``CenterPadding``; the padding is cut off
the up-sampled depth (upstream resizes the padded prediction onto the label instead, the same for NYU's 480×640 and
416×544, which are multiples of 16).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dinov3_pl.losses.depth import GradientLoss, SigLoss
from dinov3_pl.metrics.depth import DEPTH_METRIC_NAMES, DepthMetrics
from dinov3_pl.modules.frozen import FrozenBackboneModule, lr_factor
from dinov3_pl.modules.segmentation import denormalise

__all__ = [
    "LinearDepth",
    "LinearDepthHead",
    "WarmupOneCycle",
    "bins_to_depth",
    "depth_overlay",
    "one_cycle_lr_and_beta1",
]

BinSpacing = Literal["linear", "log"]


def bins_to_depth(logits: Tensor, min_depth: float, max_depth: float, spacing: BinSpacing = "linear") -> Tensor:
    """``[B, K, h, w]`` head outputs → ``[B, 1, h, w]`` depth in metres.

    ``K > 1``: the depth is the weighted mean of ``K`` bin centres spread linearly (or log-uniformly) over
    ``[min_depth, max_depth]``, the weights ``relu(x) + 0.1`` normalised to sum 1 (upstream's default
    ``norm_strategy="linear"``, from AdaBins). ``K == 1``: direct regression, ``relu(x) + min_depth``."""
    if logits.shape[1] == 1:
        return torch.relu(logits) + min_depth
    num_bins = logits.shape[1]
    if spacing == "linear":
        bins = torch.linspace(min_depth, max_depth, num_bins, device=logits.device, dtype=logits.dtype)
    elif spacing == "log":
        bins = torch.linspace(math.log(min_depth), math.log(max_depth), num_bins, device=logits.device).exp()
        bins = bins.to(logits.dtype)
    else:
        raise ValueError(f"spacing must be 'linear' or 'log', got {spacing!r}")
    weights = torch.relu(logits) + 0.1
    weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.einsum("bkhw,k->bhw", weights, bins).unsqueeze(1)


class LinearDepthHead(nn.Module):
    """BatchNorm + 1×1 conv from patch features to ``num_bins`` per-patch outputs, read as depth by
    :func:`bins_to_depth`; conv weights drawn from N(0, 0.01²), zero bias (upstream's ``LinearHead``)."""

    def __init__(
        self,
        in_channels: int,
        num_bins: int = 256,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        bin_spacing: BinSpacing = "linear",
        use_batchnorm: bool = True,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_bins < 1:
            raise ValueError(f"in_channels and num_bins must be >= 1, got {in_channels}, {num_bins}")
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        if bin_spacing not in ("linear", "log"):
            raise ValueError(f"bin_spacing must be 'linear' or 'log', got {bin_spacing!r}")
        self.min_depth, self.max_depth, self.bin_spacing = min_depth, max_depth, bin_spacing
        self.norm = nn.BatchNorm2d(in_channels) if use_batchnorm else nn.Identity()
        self.conv = nn.Conv2d(in_channels, num_bins, kernel_size=1)
        nn.init.normal_(self.conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, patch_map: Tensor) -> Tensor:
        """``[B, C, h, w]`` → depth ``[B, 1, h, w]`` (metres, at patch resolution)."""
        return bins_to_depth(self.conv(self.norm(patch_map)), self.min_depth, self.max_depth, self.bin_spacing)


# ------------------------------------------------------------------------------------------------ schedule
def one_cycle_lr_and_beta1(
    step: int,
    total_steps: int,
    warmup_steps: int,
    div_factor: float = 25.0,
    final_div_factor: float = 1000.0,
    base_beta1: float = 0.85,
    max_beta1: float = 0.95,
) -> tuple[float, float]:
    """(LR multiplier of the peak, AdamW β1) at ``step`` under upstream's ``WarmupOneCycleLR`` (its NYU settings).

    Warm-up (``step < warmup_steps``): ``1/final_div_factor + cos_decay(step / total) · step / warmup`` and β1 = 0
    (upstream only sets its momentum after the warm-up, and writes it into β1 from the first step on). After it: the
    cosine from 1 to ``1 / (div_factor · final_div_factor)`` over the *whole* run, at ``(step + 1) / total``, while β1
    rises along a cosine from ``base_beta1`` to ``max_beta1`` over the steps after the warm-up."""
    if step < warmup_steps:
        decay = (1 + math.cos(math.pi * step / total_steps)) / 2
        return 1 / final_div_factor + decay * step / warmup_steps, 0.0
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    beta1 = max_beta1 + (base_beta1 - max_beta1) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2
    floor = 1 / (div_factor * final_div_factor)
    factor = floor + (1 - floor) * (1 + math.cos(math.pi * min((step + 1) / total_steps, 1.0))) / 2
    return factor, beta1


class WarmupOneCycle(torch.optim.lr_scheduler.LRScheduler):
    """Upstream's ``WarmupOneCycleLR`` for Adam-type optimisers: sets each group's LR (its initial LR is the peak)
    and β1 per step by :func:`one_cycle_lr_and_beta1`. Step it after every optimiser step."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, **shape: float) -> None:
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got {total_steps}, {warmup_steps}"
            )
        self.total_steps, self.warmup_steps, self.shape = total_steps, warmup_steps, shape
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        factor, beta1 = one_cycle_lr_and_beta1(self.last_epoch, self.total_steps, self.warmup_steps, **self.shape)
        for group in self.optimizer.param_groups:
            group["betas"] = (beta1, group["betas"][1])
        return [base * factor for base in self.base_lrs]


# ------------------------------------------------------------------------------------------------ module
def depth_overlay(images: Tensor, depths: Tensor, predictions: Tensor, max_depth: float) -> Tensor:
    """``[3, B·H, 3·W]`` uint8 grid, one row per image: image | ground truth | prediction (grey, near = bright;
    pixels without a measurement black)."""
    to_grey = lambda d: ((1 - (d / max_depth).clamp(0, 1)) * 255 * (d > 0)).round().to(torch.uint8).expand(3, -1, -1)
    rows = [
        torch.cat([img, to_grey(gt[None]), to_grey(pr)], dim=2)
        for img, gt, pr in zip(denormalise(images), depths, predictions, strict=True)
    ]
    return torch.cat(rows, dim=1)


class LinearDepth(FrozenBackboneModule):
    """Frozen DINOv3 backbone + linear depth head (upstream DINOv3's linear depth evaluation).

    Batches: ``{"images": float [B, 3, H, W] (ImageNet-normalised), "depths": float [B, H, W] metres, 0 = none}``
    (``dinov3_pl.data.depth.DepthDataModule``). Logs ``{val,test}/{rmse, abs_rel, log10, delta1, delta2, delta3}``.

    Args:
        n_layers: concatenate the normed patch maps of the last ``n_layers`` blocks (upstream "LAST": 1).
        num_bins: depth bins (upstream 256); 1 = direct regression (``relu(x) + min_depth``).
        min_depth, max_depth: range of the bins and of the evaluation (upstream NYU: 0.001 and 10 m).
        bin_spacing: ``"linear"`` (upstream) or ``"log"``.
        sigloss_weight, sigloss_warmup_steps: weight of the scale-invariant log loss and the steps before its
            variance term starts (upstream 1.0, 100).
        gradient_loss_weight: weight of the multi-scale gradient loss on the depth error (upstream NYU: 0).
        eval_crop: ``"nyu_eigen"`` (Eigen's crop, scaled to the image) or ``"full"``.
        flip_tta_val, flip_tta_test: average the prediction with that of the flipped image (upstream: test only).
        optimizer: AdamW with ``betas``; schedule ``"one_cycle"`` (upstream's :class:`WarmupOneCycle`, which also
            drives β1), or ``"cosine"`` / ``"poly"`` / ``"constant"`` after a linear warm-up (``min_lr_ratio``).
        log_images_every_n_epochs: image | ground truth | prediction of the first validation batch to TensorBoard.
    """

    def __init__(
        self,
        arch: str | None = "vit_small_patch16_dinov3",
        weights: str | None = None,
        backbone_kwargs: dict | None = None,
        n_layers: int = 1,
        num_bins: int = 256,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        bin_spacing: BinSpacing = "linear",
        use_batchnorm: bool = True,
        sigloss_weight: float = 1.0,
        sigloss_warmup_steps: int = 100,
        gradient_loss_weight: float = 0.0,
        eval_crop: Literal["nyu_eigen", "full"] = "full",
        flip_tta_val: bool = False,
        flip_tta_test: bool = True,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 1e-4,
        schedule: Literal["one_cycle", "cosine", "poly", "constant"] = "one_cycle",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        log_images_every_n_epochs: int = 1,
        num_log_images: int = 4,
    ) -> None:
        super().__init__(arch=arch, weights=weights, backbone_kwargs=backbone_kwargs, n_last_blocks=n_layers)
        self.save_hyperparameters()
        if sigloss_weight < 0 or gradient_loss_weight < 0 or sigloss_weight + gradient_loss_weight == 0:
            raise ValueError(
                f"the loss weights must be >= 0 and not both 0, got sigloss_weight={sigloss_weight}, "
                f"gradient_loss_weight={gradient_loss_weight}"
            )
        if schedule not in ("one_cycle", "cosine", "poly", "constant"):
            raise ValueError(f"schedule must be one_cycle, cosine, poly or constant, got {schedule!r}")
        self.n_layers = n_layers
        self.head = LinearDepthHead(
            self.patch_map_channels(n_layers), num_bins, min_depth, max_depth, bin_spacing, use_batchnorm
        )
        self.sigloss = SigLoss(warmup_steps=sigloss_warmup_steps)
        self.gradient_loss = GradientLoss()
        self.val_metrics = DepthMetrics(min_depth, max_depth, eval_crop)

    # ------------------------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> Tensor:
        """Depth ``[B, 1, H, W]`` in metres at the image size."""
        height, width = images.shape[-2:]
        pad_h, pad_w = (-height) % self.patch_size, (-width) % self.patch_size
        top, left = pad_h // 2, pad_w // 2
        padded = F.pad(images, (left, pad_w - left, top, pad_h - top)) if pad_h or pad_w else images
        depth = self.head(self.patch_maps(padded, self.n_layers))
        depth = F.interpolate(depth, size=tuple(padded.shape[-2:]), mode="bilinear", align_corners=False)
        return depth[..., top : top + height, left : left + width]

    def predict_depth(self, images: Tensor, flip: bool) -> Tensor:
        """Evaluation depth ``[B, 1, H, W]``; with ``flip`` the mean of the image's and its mirror's (mirrored back)."""
        depth = self(images)
        if flip:
            depth = (depth + self(images.flip(-1)).flip(-1)) / 2
        return depth

    # ------------------------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        depths = batch["depths"]
        prediction = self(batch["images"])[:, 0]
        valid = depths > 0  # upstream trains on every measured pixel (no range or crop)
        loss = prediction.new_zeros(())
        if self.hparams.sigloss_weight:
            loss = loss + self.hparams.sigloss_weight * self.sigloss(prediction, depths, valid, step=self.global_step)
        if self.hparams.gradient_loss_weight:
            loss = loss + self.hparams.gradient_loss_weight * self.gradient_loss(prediction, depths, valid)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(depths))
        return loss

    def _evaluate(self, batch: dict, stage: str, batch_idx: int) -> None:
        flip = self.hparams.flip_tta_test if stage == "test" else self.hparams.flip_tta_val
        prediction = self.predict_depth(batch["images"], flip)[:, 0]
        self.val_metrics.update(prediction, batch["depths"])
        if stage == "val" and batch_idx == 0:
            self._log_overlay(batch["images"], batch["depths"], prediction)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    def _log_epoch_metrics(self, stage: str) -> None:
        # compute() sums the per-image values over processes (torchmetrics): the values are global, and "max" of the
        # identical values keeps them exact where Lightning's default mean could round them.
        values = self.val_metrics.compute()
        for name in DEPTH_METRIC_NAMES:
            self.log(f"{stage}/{name}", values[name], prog_bar=name == "rmse", sync_dist=True, reduce_fx="max")
        self.val_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def _log_overlay(self, images: Tensor, depths: Tensor, predictions: Tensor) -> None:
        experiment = self.image_writer(self.hparams.log_images_every_n_epochs)
        if experiment is None:
            return
        count = self.hparams.num_log_images
        grid = depth_overlay(images[:count], depths[:count], predictions[:count, None], self.hparams.max_depth)
        experiment.add_image("val/depth", grid, global_step=self.global_step)

    # ------------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            list(self.trainable_parameters()), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if hp.schedule == "one_cycle":
            scheduler = WarmupOneCycle(optimizer, total, min(hp.warmup_steps, total))
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: lr_factor(step, total, hp.warmup_steps, hp.schedule, hp.min_lr_ratio)
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
