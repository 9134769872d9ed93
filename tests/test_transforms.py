"""Tests for dinov3_pl.data.transforms: multi-crop augmentation, Gram crops, evaluation transform."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinov3_pl.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiCropTransform,
    sample_crop_box,
)

NO_PHOTOMETRIC = dict(
    color_jitter_probability=0.0,
    grayscale_probability=0.0,
    blur_probabilities=(0.0, 0.0, 0.0),
    solarize_probability=0.0,
)


def _normalise(image: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    return (tensor - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def _denormalise(tensor: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (tensor * std + mean) * 255


def _smooth_unique_image(size: int) -> np.ndarray:
    """Each pixel has a unique, smoothly varying colour (x ramp, y ramp, a smooth mix)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    channels = [xs / size * 255, ys / size * 255, 127.5 + 100 * np.sin(xs / 9.0) * np.cos(ys / 11.0)]
    return np.clip(np.stack(channels, axis=2), 0, 255).astype(np.uint8)


def test_output_shapes_dtypes_and_determinism():
    transform = MultiCropTransform(global_size=32, local_size=16, num_local_crops=3)
    image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    out = transform(image, np.random.default_rng(1))
    assert set(out) == {"global_crops", "local_crops"}
    assert [tuple(t.shape) for t in out["global_crops"]] == [(3, 32, 32)] * 2
    assert [tuple(t.shape) for t in out["local_crops"]] == [(3, 16, 16)] * 3
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in out["global_crops"] + out["local_crops"])
    again = transform(image, np.random.default_rng(1))
    other = transform(image, np.random.default_rng(2))
    for a, b in zip(
        out["global_crops"] + out["local_crops"], again["global_crops"] + again["local_crops"], strict=True
    ):
        assert torch.equal(a, b)
    assert not torch.equal(out["global_crops"][0], other["global_crops"][0])
    assert (
        "local_crops" in MultiCropTransform(num_local_crops=0)(image)
        and not transform(image)["global_crops"][0].isnan().any()
    )


def test_identity_geometry_gives_exact_imagenet_normalisation():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    transform = MultiCropTransform(
        global_size=32, num_local_crops=0, global_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0),
        horizontal_flip_probability=0.0, **NO_PHOTOMETRIC,
    )  # fmt: skip
    out = transform(image, np.random.default_rng(0))
    for crop in out["global_crops"]:
        torch.testing.assert_close(crop, _normalise(image), atol=1e-5, rtol=0)


def test_grayscale_input_becomes_three_channels():
    gray = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
    transform = MultiCropTransform(global_size=24, local_size=12, num_local_crops=2, **NO_PHOTOMETRIC)
    for image in (gray, gray[:, :, None], Image.fromarray(gray, mode="L")):
        out = transform(image, np.random.default_rng(0))
        for crop in out["global_crops"] + out["local_crops"]:
            pixels = _denormalise(crop)
            assert crop.shape[0] == 3
            torch.testing.assert_close(pixels[0], pixels[1], atol=1e-3, rtol=0)
            torch.testing.assert_close(pixels[1], pixels[2], atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        transform(gray.astype(np.float32))


def test_gram_crops_share_global_geometry_without_photometric_augmentation():
    image = _smooth_unique_image(96)
    plain = MultiCropTransform(global_size=32, local_size=16, num_local_crops=2, gram_size=64, **NO_PHOTOMETRIC)
    augmented = MultiCropTransform(
        global_size=32, local_size=16, num_local_crops=2, gram_size=64, color_jitter_probability=1.0,
        grayscale_probability=0.5, blur_probabilities=(1.0, 1.0, 1.0), solarize_probability=1.0,
    )  # fmt: skip
    flips_seen = set()
    for seed in range(8):
        out = plain(image, np.random.default_rng(seed))
        assert [tuple(t.shape) for t in out["gram_crops"]] == [(3, 64, 64)] * 2
        for global_crop, gram_crop, other in zip(
            out["global_crops"], out["gram_crops"], out["global_crops"][::-1], strict=True
        ):
            downsampled = F.avg_pool2d(_denormalise(gram_crop)[None], 2)[0]
            error = (downsampled - _denormalise(global_crop)).abs().mean()
            assert error < 2.0, error  # same box and flip: only interpolation differences (pixels 0..255)
            mirrored = (downsampled.flip(-1) - _denormalise(global_crop)).abs().mean()
            if (downsampled - _denormalise(other)).abs().mean() > 10:
                assert error < (downsampled - _denormalise(other)).abs().mean() / 5
            assert mirrored > 5 * error  # a flip mismatch would be detected
            red = _denormalise(global_crop)[0]  # red channel is an x ramp: decreasing when flipped
            flips_seen.add(bool(red[:, -1].mean() < red[:, 0].mean()))
        # Photometric augmentation changes the global crops but never the Gram crops (same geometry draws).
        out_augmented = augmented(image, np.random.default_rng(seed))
        for gram_plain, gram_aug in zip(out["gram_crops"], out_augmented["gram_crops"], strict=True):
            assert torch.equal(gram_plain, gram_aug)
        assert not torch.equal(out["global_crops"][1], out_augmented["global_crops"][1])
    assert flips_seen == {True, False}  # both flipped and unflipped crops occurred and matched


def test_blur_probabilities_intended_vs_upstream_trained():
    intended = MultiCropTransform()
    as_trained = MultiCropTransform(blur_as_upstream_trained=True)
    assert intended.blur_probabilities == (1.0, 0.1, 0.5)
    assert as_trained.blur_probabilities == pytest.approx((0.0, 0.9, 0.5))
    assert as_trained.intended_blur_probabilities == (1.0, 0.1, 0.5)
    # Observable effect on global crop 1 of a noise image: blurred always vs never.
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    settings = dict(global_size=32, num_local_crops=0, global_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0))
    settings |= dict(horizontal_flip_probability=0.0, color_jitter_probability=0.0, grayscale_probability=0.0)
    settings |= dict(solarize_probability=0.0, blur_sigma=(1.5, 1.5))
    blurred = MultiCropTransform(**settings)(image, np.random.default_rng(0))["global_crops"][0]
    unblurred = MultiCropTransform(**settings, blur_as_upstream_trained=True)(image, np.random.default_rng(0))
    torch.testing.assert_close(unblurred["global_crops"][0], _normalise(image), atol=1e-5, rtol=0)
    expected = cv2.GaussianBlur(image, (9, 9), sigmaX=1.5, sigmaY=1.5, borderType=cv2.BORDER_REFLECT_101)
    assert (_denormalise(blurred) - torch.from_numpy(expected).permute(2, 0, 1).float()).abs().max() <= 1.01


def test_solarize_only_on_second_global_crop_and_grayscale():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    settings = dict(global_size=32, local_size=32, num_local_crops=2, global_scale=(1.0, 1.0))
    settings |= dict(local_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0), horizontal_flip_probability=0.0)
    settings |= dict(color_jitter_probability=0.0, grayscale_probability=0.0, blur_probabilities=(0.0, 0.0, 0.0))
    out = MultiCropTransform(**settings, solarize_probability=1.0)(image, np.random.default_rng(0))
    solarized = np.where(image >= 128, 255 - image, image)
    torch.testing.assert_close(out["global_crops"][1], _normalise(solarized), atol=1e-5, rtol=0)
    for crop in [out["global_crops"][0], *out["local_crops"]]:
        torch.testing.assert_close(crop, _normalise(image), atol=1e-5, rtol=0)
    settings["grayscale_probability"] = 1.0
    gray = MultiCropTransform(**settings, solarize_probability=0.0)(image, np.random.default_rng(0))
    for crop in gray["global_crops"] + gray["local_crops"]:
        pixels = _denormalise(crop)
        torch.testing.assert_close(pixels[0], pixels[2], atol=1e-3, rtol=0)
        luminance = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        assert (pixels[0] - torch.from_numpy(luminance)).abs().max() <= 1.01


def test_sample_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    fractions, ratios = [], []
    for _ in range(500):
        top, left, height, width = sample_crop_box(60, 80, (0.05, 0.32), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + height <= 60 and 0 <= left and left + width <= 80
        fractions.append(height * width / (60 * 80))
        ratios.append(width / height)
    assert 0.04 < min(fractions) and max(fractions) < 0.35 and abs(np.mean(fractions) - 0.185) < 0.02
    assert 0.7 < min(ratios) and max(ratios) < 1.43
    # Impossible aspect range for a very wide image: falls back to a centred crop with a clamped ratio.
    assert sample_crop_box(10, 200, (0.9, 1.0), (1.0, 1.0), rng) == (0, 95, 10, 10)


def test_transform_argument_validation():
    with pytest.raises(ValueError, match="global_scale"):
        MultiCropTransform(global_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="odd"):
        MultiCropTransform(blur_kernel_size=8)
    with pytest.raises(ValueError, match="probabilities"):
        MultiCropTransform(solarize_probability=1.5)
    with pytest.raises(ValueError, match="gram_size"):
        MultiCropTransform(gram_size=0)


def test_eval_transform_resize_and_centre_crop():
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = EvalTransform(size=32, resize_size=36)(image)
    resized = np.asarray(Image.fromarray(image).resize((54, 36), Image.Resampling.BICUBIC))
    expected = resized[2:34, 11:43]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, _normalise(expected), atol=1e-5, rtol=0)
    square = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    torch.testing.assert_close(
        EvalTransform(size=28, resize_size=28)(square),
        _normalise(np.repeat(square[:, :, None], 3, 2)),
        atol=1e-5,
        rtol=0,
    )
    assert EvalTransform(224).resize_size == 256
    with pytest.raises(ValueError, match="resize_size"):
        EvalTransform(size=32, resize_size=16)
