"""PCA feature maps to TensorBoard: the first 3 principal components of the patch features, shown as RGB.

The classic DINO picture: as pretraining progresses, object parts get consistent colours across images. The
callback keeps a fixed set of images (the first validation batch, else the first training batch's global crops)
so the maps are comparable from epoch to epoch.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchvision.utils import make_grid

from dinov3_pl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["PCAFeatureMaps", "pca_rgb"]


def pca_rgb(patch_features: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """[B, N, D] patch features -> [B, 3, h, w] images in [0, 1]: one PCA fitted on all B·N patches (so colours
    mean the same thing in every image), each component min-max scaled."""
    batch, _, dim = patch_features.shape
    flat = patch_features.float().reshape(-1, dim)
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, _, components = torch.pca_lowrank(flat, q=min(3, dim), center=False)
    projected = flat @ components[:, :3]
    if projected.shape[1] < 3:  # fewer than 3 feature dims: pad with zeros
        projected = torch.nn.functional.pad(projected, (0, 3 - projected.shape[1]))
    low, high = projected.amin(dim=0), projected.amax(dim=0)
    projected = (projected - low) / (high - low).clamp_min(1e-8)
    return projected.reshape(batch, *grid_hw, 3).permute(0, 3, 1, 2)


class PCAFeatureMaps(L.Callback):
    """Logs ``images | PCA(patch features)`` grids of a fixed image set every ``every_n_epochs`` epochs.

    Works with any LightningModule that has an ``eval_backbone`` (the EMA teacher of ``DINOSSLModule``) or a
    ``backbone`` (the frozen backbone of the evaluation modules), a ``DINOv3Backbone`` either way.
    The images are shown un-normalised with ``mean``/``std``; ``None`` takes the DataModule's ``mean``/``std``
    hyper-parameters (ImageNet's when it has none).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 8,
        tag: str = "pca_patch_features",
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
    ) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.tag = tag
        self.mean, self.std = mean, std
        self._images: Tensor | None = None

    def _normalisation(self, trainer: L.Trainer) -> tuple[Tensor, Tensor]:
        hparams = getattr(getattr(trainer, "datamodule", None), "hparams", {})
        mean = self.mean if self.mean is not None else hparams.get("mean", IMAGENET_MEAN)
        std = self.std if self.std is not None else hparams.get("std", IMAGENET_STD)
        return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._images is None and isinstance(batch, dict):
            images = batch.get("images", batch.get("global_crops"))
            if images is not None:
                self._images = images[: self.num_images].detach().cpu()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(batch, dict) and "images" in batch and dataloader_idx == 0 and batch_idx == 0:
            self._images = batch["images"][: self.num_images].detach().cpu()  # prefer fixed, un-augmented images

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._images is None or (trainer.current_epoch + 1) % self.every_n_epochs or not trainer.is_global_zero:
            return
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None:
            return
        backbone = getattr(pl_module, "eval_backbone", None) or pl_module.backbone
        images = self._images.to(pl_module.device)
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            patch = backbone(images)["patch"]
        backbone.train(was_training)
        grid_hw = (images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size)
        maps = torch.nn.functional.interpolate(pca_rgb(patch, grid_hw), size=images.shape[-2:], mode="nearest")
        mean, std = self._normalisation(trainer)
        shown = (images * std.to(images.device) + mean.to(images.device)).clamp(0, 1)
        panel = make_grid(torch.cat([shown, maps]).cpu(), nrow=len(images), padding=2)
        logger.experiment.add_image(self.tag, panel, global_step=trainer.global_step)
