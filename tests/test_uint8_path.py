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

NO_PHOTOMETRIC = dict(
    color_jitter_probability=0.0,
    grayscale_probability=0.0,
    blur_probabilities=(0.0, 0.0, 0.0),
    solarize_probability=0.0,
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalising_on_cuda_is_bit_identical_to_the_workers_float_path():
    """What training on a GPU does: the uint8 crop normalised on the device equals the float32 crop of the CPU path
    (a tensor divisor keeps torch's CUDA division IEEE-exact; a CPU-scalar one would become a reciprocal multiply)."""
    values = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, 16, 16).contiguous()
    image = values.permute(1, 2, 0).numpy()
    transform = EvalTransform(16, resize_size=16)
    assert torch.equal(normalise_uint8(values.cuda()).cpu(), transform(image))


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
    for float_batch, uint8_batch in zip(
        received["float32"].train_batches, received["uint8"].train_batches, strict=True
    ):
        for key in IMAGE_KEYS:
            assert uint8_batch[key].dtype == torch.float32 and torch.equal(uint8_batch[key], float_batch[key]), key
    for float_images, uint8_images in zip(received["float32"].val_batches, received["uint8"].val_batches, strict=True):
        assert torch.equal(uint8_images, float_images)


def test_uint8_batches_are_a_quarter_of_the_bytes():
    def sent_bytes(crops_dtype: str) -> int:
        data = _data(crops_dtype)
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        return sum(batch[key].numel() * batch[key].element_size() for key in IMAGE_KEYS)

    assert sent_bytes("float32") == 4 * sent_bytes("uint8")


# ------------------------------------------------------------------------------------------- reduced-size JPEGs
def _photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A colour image with a photo's mix of scales: smooth colour fields at three frequencies plus sharp-edged
    discs (so crop sharpness tells a full-resolution crop from an upsampled one)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 128.0, dtype=np.float32)
    for cells, amplitude in ((4, 60.0), (16, 30.0), (64, 15.0)):
        field = rng.normal(0.0, 1.0, (max(2, height * cells // width), cells, 3))
        field = ((field - field.min()) / np.ptp(field) * 255).astype(np.uint8)
        field = np.asarray(Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC), np.float32)
        image += (field - 127.5) * amplitude / 127.5
    ys, xs = np.mgrid[0:height, 0:width]
    for _ in range(30):
        y, x, radius = rng.integers(0, height), rng.integers(0, width), rng.integers(5, height // 4)
        image[(ys - y) ** 2 + (xs - x) ** 2 < radius**2] += rng.normal(0.0, 40.0, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def test_min_source_pixels_keeps_the_smallest_crop_box_at_its_output_size():
    transform = MultiCropTransform(global_size=32, local_size=16, num_local_crops=2)
    # Local crops decide: 16^2 / (0.05 * 3/4) = 6826.7 > 32^2 / (0.32 * 3/4) = 4266.7.
    assert transform.min_source_pixels == 6827
    assert MultiCropTransform(global_size=32, local_size=16, gram_size=64).min_source_pixels == math.ceil(64**2 / 0.24)
    assert MultiCropTransform(global_size=32, num_local_crops=0).min_source_pixels == math.ceil(32**2 / 0.24)
    # Independently, with the crop sampler: in an 83 x 83 image (>= 6827 pixels) the smallest local box at either
    # extreme aspect is still 16 px on its short side; in an 80 x 80 image (fewer pixels) it is not.
    for side, fits in ((83, True), (80, False)):
        for ratio in (3 / 4, 4 / 3):
            _, _, box_height, box_width = sample_crop_box(
                side, side, (0.05, 0.05), (ratio, ratio), np.random.default_rng()
            )
            assert (min(box_height, box_width) >= 16) == fits, (side, ratio)


def test_jpeg_draft_picks_the_largest_reduction_and_leaves_other_formats_alone(tmp_path):
    image = _photo_like(96, 128)
    Image.fromarray(image).save(tmp_path / "photo.jpg", quality=90)
    Image.fromarray(image).save(tmp_path / "photo.png")
    assert [jpeg_reduction(128, 96, pixels) for pixels in (192, 193, 768, 769, 3072, 3073)] == [8, 4, 4, 2, 2, 1]
    assert read_rgb(tmp_path / "photo.jpg", draft_min_pixels=700).shape == (24, 32, 3)
    assert read_rgb(tmp_path / "photo.jpg", draft_min_pixels=3073).shape == (96, 128, 3)
    full_png = read_rgb(tmp_path / "photo.png")
    assert np.array_equal(read_rgb(tmp_path / "photo.png", draft_min_pixels=1), full_png)
    assert np.array_equal(full_png, image)


def _crop_statistics(image: np.ndarray, transform: MultiCropTransform, seeds: range) -> dict[str, np.ndarray]:
    """Per crop: mean intensity, mean of each channel, sharpness (mean absolute neighbour difference)."""
    rows: dict[str, list[float]] = {}
    for seed in seeds:
        crops = transform(image, np.random.default_rng(seed))
        for kind in ("global_crops", "local_crops"):
            for crop in crops[kind]:
                crop = crop.float()
                values = {"mean": crop.mean(), "red": crop[0].mean(), "green": crop[1].mean(), "blue": crop[2].mean()}
                values["sharpness"] = crop.diff(dim=1).abs().mean() + crop.diff(dim=2).abs().mean()
                for name, value in values.items():
                    rows.setdefault(f"{kind} {name}", []).append(float(value))
    return {name: np.asarray(values) for name, values in rows.items()}


def _box_statistics(height: int, width: int, scale: tuple[float, float], seeds: range) -> dict[str, np.ndarray]:
    boxes = [sample_crop_box(height, width, scale, (3 / 4, 4 / 3), np.random.default_rng(seed)) for seed in seeds]
    return {
        "scale": np.asarray([h * w / (height * width) for _, _, h, w in boxes]),
        "log aspect": np.asarray([math.log(w / h) for _, _, h, w in boxes]),
    }


def test_draft_decoded_crops_match_the_full_decode_in_distribution(tmp_path):
    """Two-sample KS tests over independent draws, full decode vs. the 1/4 draft decode, of crop scale, aspect,
    mean intensity, per-channel colour and sharpness (global and local crops). Each test at p > 0.001: the 14
    statistics then give a family-wise false-alarm rate below 1.4% if the distributions agree (the draws are
    seeded, so the outcome is fixed). Decoding one reduction too far (1/8, so the smallest crops are upsampled)
    fails on global-crop sharpness: p = 5e-5 with these draws."""
    Image.fromarray(_photo_like(384, 512)).save(tmp_path / "photo.jpg", quality=90)
    transform = MultiCropTransform(
        global_size=32, local_size=16, num_local_crops=2, crops_dtype="uint8", **NO_PHOTOMETRIC
    )
    full = read_rgb(tmp_path / "photo.jpg")
    drafted = read_rgb(tmp_path / "photo.jpg", draft_min_pixels=transform.min_source_pixels)
    assert drafted.shape == (96, 128, 3)  # 1/4: 96 x 128 = 12288 >= 6827 pixels, 1/8 would leave 3072
    draws = 200
    reference = _crop_statistics(full, transform, range(draws))
    candidate = _crop_statistics(drafted, transform, range(draws, 2 * draws))
    for scale in ((0.32, 1.0), (0.05, 0.32)):
        reference |= {f"{name} {scale}": v for name, v in _box_statistics(384, 512, scale, range(1000)).items()}
        candidate |= {f"{name} {scale}": v for name, v in _box_statistics(96, 128, scale, range(1000, 2000)).items()}
    p_values = {name: ks_2samp(reference[name], candidate[name]).pvalue for name in reference}
    assert min(p_values.values()) > 1e-3, p_values


def test_jpeg_draft_applies_to_the_training_copy_only(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for index in range(2):
            Image.fromarray(_photo_like(96, 128, seed=index)).save(tmp_path / label / f"{index}.jpg", quality=90)
    folder = ImageFolder(tmp_path, with_labels=True)
    data = MultiCropDataModule(
        train=folder, knn_monitor=True, jpeg_draft=True, batch_size=2, **{**TINY, "blur_kernel_size": 3}
    )
    data.setup("fit")
    # TINY crops need 8^2 / (0.05 * 3/4) = 1707 pixels: 1/2 (48 x 64 = 3072) keeps them, 1/4 (24 x 32) does not.
    assert data.transform.min_source_pixels == 1707
    assert data.train_dataset.dataset[0]["image"].shape == (48, 64, 3)
    assert data.knn_bank_dataset[0]["image"].shape == (96, 128, 3) and folder.draft_min_pixels is None
    assert next(iter(data.train_dataloader()))["global_crops"].shape == (4, 3, 16, 16)
    with pytest.warns(RuntimeWarning, match="jpeg_draft: true has no effect on SyntheticShapes"):
        MultiCropDataModule(train=SyntheticShapes(8, image_size=24), jpeg_draft=True, **TINY).setup("fit")
