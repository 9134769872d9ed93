"""The lean pretraining data path: uint8 crops normalised after the transfer, and reduced-size JPEG decoding.

- ``crops_dtype="uint8"`` must give the training step and the kNN monitor exactly (bit for bit) the tensors the
  float32 path gives, under a real Trainer.
- ``jpeg_draft=True`` decodes JPEGs at 1/2, 1/4 or 1/8 size; the crops must agree with the full decode in
  distribution (crop scale, aspect, mean intensity, per-channel colour, sharpness) and a PNG must be unaffected.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp

from dinov3_pl.data.datasets import ImageFolder, SyntheticShapes
from dinov3_pl.data.decode import jpeg_reduction, read_rgb
from dinov3_pl.data.multicrop import MultiCropDataModule
from dinov3_pl.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiCropTransform,
    normalise_uint8,
    sample_crop_box,
)

TINY = dict(patch_size=4, global_size=16, local_size=8, num_local_crops=2, blur_kernel_size=3, num_workers=0)
IMAGE_KEYS = ("global_crops", "local_crops", "gram_crops")


def _data(crops_dtype: str, **kwargs) -> MultiCropDataModule:
    return MultiCropDataModule(
        train=SyntheticShapes(16, image_size=24, seed=0),
        knn_bank=SyntheticShapes(6, image_size=24, seed=1),
        knn_queries=SyntheticShapes(4, image_size=24, seed=2),
        knn_monitor=True,
        gram_size=32,
        batch_size=8,
        crops_dtype=crops_dtype,
        **{**TINY, **kwargs},
    )


def test_normalise_uint8_is_the_imagenet_normalisation():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    independent = (images.double() / 255 - mean.double()) / std.double()
    normalised = normalise_uint8(images)
    assert normalised.dtype == torch.float32 and normalised.shape == images.shape
    torch.testing.assert_close(normalised.double(), independent, atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="expects uint8 images, got torch.float32"):
        normalise_uint8(images.float())
    with pytest.raises(ValueError, match="crops_dtype must be 'uint8' .* or 'float32' .*got 'float16'"):
        MultiCropDataModule(crops_dtype="float16")


def test_transforms_in_uint8_then_normalised_equal_the_float_path_bit_for_bit():
    image = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    options = dict(global_size=16, local_size=8, num_local_crops=2, gram_size=32, blur_kernel_size=3)
    as_float = MultiCropTransform(**options)(image, np.random.default_rng(3))
    as_uint8 = MultiCropTransform(**options, crops_dtype="uint8")(image, np.random.default_rng(3))
    for key in IMAGE_KEYS:
        for reference, crop in zip(as_float[key], as_uint8[key], strict=True):
            assert crop.dtype == torch.uint8 and crop.is_contiguous()
            assert torch.equal(normalise_uint8(crop), reference), key
    evaluated = EvalTransform(16, crops_dtype="uint8")(image)
    assert evaluated.dtype == torch.uint8 and torch.equal(normalise_uint8(evaluated), EvalTransform(16)(image))


class _RecordBatches(pl.LightningModule):
    """Keeps every batch Lightning hands to the training and validation steps."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.train_batches: list[dict] = []
        self.val_batches: list[dict] = []

    def training_step(self, batch, batch_idx):
        self.train_batches.append({key: batch[key].clone() for key in IMAGE_KEYS})
        return self.layer(batch["global_crops"].mean(dim=(2, 3))).mean()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.val_batches.append(batch["images"].clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_training_and_knn_steps_receive_the_float_path_tensors_exactly():
    """Through a real Trainer.fit (Lightning calls the DataModule's on_after_batch_transfer on the device)."""
    received = {}
    for crops_dtype in ("float32", "uint8"):
        module = _RecordBatches()
        trainer = pl.Trainer(
            max_steps=2, limit_val_batches=1, accelerator="cpu", logger=False, enable_progress_bar=False
        )
        trainer.fit(module, datamodule=_data(crops_dtype))
        assert len(module.train_batches) == 2 and len(module.val_batches) >= 2  # bank and query loaders
        received[crops_dtype] = module
    for float_batch, uint8_batch in zip(received["float32"].train_batches, received["uint8"].train_batches):
        for key in IMAGE_KEYS:
            assert uint8_batch[key].dtype == torch.float32 and torch.equal(uint8_batch[key], float_batch[key]), key
    for float_images, uint8_images in zip(received["float32"].val_batches, received["uint8"].val_batches):
        assert torch.equal(uint8_images, float_images)


def test_uint8_batches_are_a_quarter_of_the_bytes():
    def sent_bytes(crops_dtype: str) -> int:
        data = _data(crops_dtype)
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        return sum(batch[key].numel() * batch[key].element_size() for key in IMAGE_KEYS)

    assert sent_bytes("float32") == 4 * sent_bytes("uint8")
