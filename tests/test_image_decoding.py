"""Images as users have them: every kind decodes like an independent reference decode (dinov3_pl.data.decode).

References: OpenCV's decoder (``cv2.imread(..., IMREAD_UNCHANGED)``), a minimal PNG encoder written here (for
layouts neither PIL nor OpenCV write: 16-bit grey+alpha, 16-bit grey with a transparent colour), the original
arrays of lossless files, and the formulas (16-bit high byte, alpha compositing, CMYK, EXIF orientation) spelled
out in numpy from their specifications.
"""

from __future__ import annotations

import struct
import threading
import time
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dinov3_pl.data.datasets import ImageFolder
from dinov3_pl.data.decode import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLargeError, image_to_rgb, read_rgb
from dinov3_pl.data.predict import ImageFolderPredictDataModule
from dinov3_pl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MultiCropTransform

WHITE = np.array([255, 255, 255])


# ---------------------------------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path: Path, samples: np.ndarray, color_type: int, extra_chunks: bytes = b"") -> None:
    """PNG from the spec (filter 0 on every row): ``samples`` uint8 or uint16 [H, W] or [H, W, C]."""
    height, width = samples.shape[:2]
    bit_depth = 16 if samples.dtype == np.uint16 else 8
    big_endian = samples.astype(">u2" if bit_depth == 16 else "u1").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in big_endian)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + extra_chunks
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def cv2_unchanged_rgb(path: Path) -> np.ndarray:
    """OpenCV's decode, channels turned from BGR(A) to RGB(A)."""
    decoded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert decoded is not None, f"OpenCV cannot read {path}"
    if decoded.ndim == 3:
        decoded = decoded[..., [2, 1, 0, 3][: decoded.shape[2]]]
    return decoded


def grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values)[..., None], 3, axis=2)


def composite(rgb: np.ndarray, alpha: np.ndarray, background=WHITE) -> np.ndarray:
    """out = rgb * a + background * (1 - a), a = alpha / 255, rounded to the nearest level (float arithmetic)."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(rgb * a + np.asarray(background, dtype=np.float64) * (1.0 - a)).astype(np.uint8)


def displayed(stored: np.ndarray, orientation: int) -> np.ndarray:
    """The displayed image per EXIF 2.3 tag 274, pixel by pixel: where the stored 0th row and 0th column go."""
    height, width = stored.shape[:2]
    if orientation in (1, 2, 3, 4):
        rows, cols = np.indices((height, width))
        source = {
            1: (rows, cols),
            2: (rows, width - 1 - cols),  # 0th row top, 0th column right
            3: (height - 1 - rows, width - 1 - cols),  # 0th row bottom, 0th column right
            4: (height - 1 - rows, cols),  # 0th row bottom, 0th column left
        }[orientation]
    else:  # the display is width x height; display (i, j) reads stored (row, column) =
        i, j = np.indices((width, height))
        source = {
            5: (j, i),  # 0th row left, 0th column top
            6: (height - 1 - j, i),  # 0th row right, 0th column top
            7: (height - 1 - j, width - 1 - i),  # 0th row right, 0th column bottom
            8: (j, width - 1 - i),  # 0th row left, 0th column bottom
        }[orientation]
    return stored[source]


def fraction_white(image: np.ndarray) -> float:
    return float((image == 255).all(axis=-1).mean())


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------------------------------
# 16-bit, 32-bit integer and float images
# ---------------------------------------------------------------------------------------------------------------------


def test_16bit_greyscale_png_uses_the_full_range_like_opencv(tmp_path, rng):
    # A smooth 16-bit gradient over the full range, as a scanner or a medical/astro camera writes it.
    gradient = np.linspace(0, 65535, 40 * 50).round().astype(np.uint16).reshape(40, 50)
    path = tmp_path / "gradient16.png"
    assert cv2.imwrite(str(path), gradient)
    with Image.open(path) as opened:
        assert opened.mode == "I;16"
        assert fraction_white(np.asarray(opened.convert("RGB"))) > 0.99  # the reported bug: PIL's convert clips
    decoded = read_rgb(path)
    np.testing.assert_array_equal(decoded, grey(cv2_unchanged_rgb(path) >> 8))
    assert decoded.dtype == np.uint8 and decoded.min() == 0 and decoded.max() == 255
    assert fraction_white(decoded) < 0.01
    # v >> 8 is within one level of the exact rescaling v * 255 / 65535.
    assert np.abs(decoded[..., 0].astype(int) - np.round(gradient.astype(np.float64) * 255 / 65535)).max() <= 1


@pytest.mark.parametrize("kind", ["png_I;16", "tiff_I;16", "tiff_I;16B", "pgm_I"])
def test_16bit_greyscale_in_every_container_is_the_high_byte(tmp_path, rng, kind):
    values = rng.integers(0, 65536, size=(7, 9), dtype=np.uint16)
    values[0, :2] = (0, 65535)
    container, mode = kind.split("_")
    path = tmp_path / f"grey16.{container}"
    if container == "png":
        write_png(path, values, color_type=0)
    elif container == "pgm":  # PIL opens 16-bit PGM as 32-bit mode "I"
        path.write_bytes(b"P5\n9 7\n65535\n" + values.astype(">u2").tobytes())
    else:
        byte_order = ">u2" if mode.endswith("B") else "<u2"
        Image.frombytes(mode, (9, 7), values.astype(byte_order).tobytes()).save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode
    np.testing.assert_array_equal(read_rgb(path), grey(values >> 8))
    if container != "tiff" or mode == "I;16":
        np.testing.assert_array_equal(read_rgb(path), grey(cv2_unchanged_rgb(path) >> 8))


def test_16bit_rgb_and_rgba_png_and_tiff_match_opencv(tmp_path, rng):
    colour = rng.integers(0, 65536, size=(6, 10, 3), dtype=np.uint16)
    for suffix in ("png", "tif"):
        path = tmp_path / f"rgb16.{suffix}"
        assert cv2.imwrite(str(path), colour[..., ::-1])
        np.testing.assert_array_equal(read_rgb(path), cv2_unchanged_rgb(path) >> 8)
        np.testing.assert_array_equal(read_rgb(path), colour >> 8)
    rgba = rng.integers(0, 65536, size=(6, 10, 4), dtype=np.uint16)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 65535
    path = tmp_path / "rgba16.png"
    assert cv2.imwrite(str(path), rgba[..., [2, 1, 0, 3]])
    reference = cv2_unchanged_rgb(path) >> 8
    np.testing.assert_array_equal(read_rgb(path), composite(reference[..., :3], reference[..., 3]))


def test_16bit_grey_and_16bit_rgb_of_one_picture_decode_identically(tmp_path, rng):
    values = rng.integers(0, 65536, size=(5, 8), dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "grey.png"), values)
    assert cv2.imwrite(str(tmp_path / "rgb.png"), np.repeat(values[..., None], 3, axis=2))
    np.testing.assert_array_equal(read_rgb(tmp_path / "grey.png"), read_rgb(tmp_path / "rgb.png"))


def test_16bit_grey_alpha_png_is_composited(tmp_path, rng):
    grey_alpha = rng.integers(0, 65536, size=(5, 6, 2), dtype=np.uint16)
    grey_alpha[0, 0, 1], grey_alpha[0, 1, 1] = 0, 65535
    path = tmp_path / "la16.png"
    write_png(path, grey_alpha, color_type=4)
    high = grey_alpha >> 8
    np.testing.assert_array_equal(read_rgb(path), composite(grey(high[..., 0]), high[..., 1]))


def test_16bit_grey_png_with_a_transparent_value(tmp_path, rng):
    values = rng.integers(0, 65536, size=(4, 5), dtype=np.uint16)
    key = 40000
    values[1, 2] = values[3, 0] = key
    path = tmp_path / "grey16_trns.png"
    write_png(path, values, color_type=0, extra_chunks=_png_chunk(b"tRNS", struct.pack(">H", key)))
    expected = grey(values >> 8)
    expected[values == key] = 255
    np.testing.assert_array_equal(read_rgb(path), expected)


def test_32bit_integer_tiff_is_read_on_the_16bit_scale_and_clipped_with_a_warning(tmp_path, rng):
    values = rng.integers(0, 65536, size=(4, 6)).astype(np.int32)
    Image.fromarray(values).save(tmp_path / "int32.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_rgb(tmp_path / "int32.tif"), grey(values >> 8))
    values[0, 0], values[0, 1] = -5, 100_000
    Image.fromarray(values).save(tmp_path / "int32_wide.tif")
    with pytest.warns(RuntimeWarning, match=r"int32_wide.tif: 32-bit integer pixel values span -5..100000"):
        decoded = read_rgb(tmp_path / "int32_wide.tif")
    np.testing.assert_array_equal(decoded, grey(np.clip(values, 0, 65535) >> 8))


def test_float_tiff_is_read_as_0_to_1_intensities(tmp_path, rng):
    values = rng.random((5, 7)).astype(np.float32)
    values[0, :2] = (0.0, 1.0)
    Image.fromarray(values).save(tmp_path / "float.tif")
    with Image.open(tmp_path / "float.tif") as opened:
        assert opened.mode == "F"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = read_rgb(tmp_path / "float.tif")
    np.testing.assert_array_equal(decoded, grey(np.round(values.astype(np.float64) * 255).astype(np.uint8)))
    outside = values.copy()
    outside[1, 1], outside[1, 2], outside[1, 3] = -0.5, 3.0, np.nan
    Image.fromarray(outside).save(tmp_path / "float_outside.tif")
    with pytest.warns(RuntimeWarning, match=r"float_outside.tif: float pixel values span -0.5..3 \(with NaN/inf\)"):
        decoded = read_rgb(tmp_path / "float_outside.tif")
    assert decoded[1, 1, 0] == 0 and decoded[1, 2, 0] == 255 and decoded[1, 3, 0] == 0
    np.testing.assert_array_equal(decoded[2:], grey(np.round(values[2:].astype(np.float64) * 255).astype(np.uint8)))


# ---------------------------------------------------------------------------------------------------------------------
# EXIF orientation
# ---------------------------------------------------------------------------------------------------------------------


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png(tmp_path, rng, orientation):
    stored = rng.integers(0, 256, size=(3, 5, 3), dtype=np.uint8)  # not square: 90-degree turns change the shape
    path = tmp_path / f"orientation{orientation}.png"
    Image.fromarray(stored).save(path, exif=_exif(orientation))
    decoded = read_rgb(path)
    np.testing.assert_array_equal(decoded, displayed(stored, orientation))
    with Image.open(path) as opened:  # a second, independent implementation: PIL's own exif_transpose
        np.testing.assert_array_equal(decoded, np.asarray(ImageOps.exif_transpose(opened).convert("RGB")))
    np.testing.assert_array_equal(read_rgb(path, apply_exif_orientation=False), stored)  # for stored-pixel labels


@pytest.mark.parametrize("orientation", [3, 6, 8, 2])
def test_exif_orientation_camera_jpeg(tmp_path, rng, orientation):
    path = tmp_path / f"photo{orientation}.jpg"
    Image.fromarray(rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)).save(path, exif=_exif(orientation))
    with Image.open(path) as opened:
        stored = np.asarray(opened.convert("RGB"))  # the JPEG's pixels as stored (lossy, so decoded once here)
    np.testing.assert_array_equal(read_rgb(path), displayed(stored, orientation))
    assert read_rgb(path).shape == ((24, 16, 3) if orientation in (6, 8) else (16, 24, 3))


@pytest.mark.parametrize("mode", ["L", "I;16", "RGBA"])
@pytest.mark.parametrize("orientation", [6, 7])
def test_tiff_orientation_tag_uncompressed(tmp_path, rng, mode, orientation):
    """PIL turns TIFFs itself; given a path it memory-maps uncompressed ones and scrambles orientations 5-8."""
    if mode == "I;16":
        stored = rng.integers(0, 65536, size=(3, 5), dtype=np.uint16)
    else:
        stored = rng.integers(0, 256, size=(3, 5, 4) if mode == "RGBA" else (3, 5), dtype=np.uint8)
    if mode == "RGBA":
        stored[..., 3] = 255  # opaque, so the expected colours are the stored RGB values
    path = tmp_path / f"{mode.replace(';', '')}_{orientation}.tif"
    Image.fromarray(stored).save(path, tiffinfo={0x0112: orientation})
    expected = {"L": grey(stored), "I;16": grey(stored >> 8), "RGBA": stored[..., :3]}[mode]
    np.testing.assert_array_equal(read_rgb(path), displayed(expected, orientation))


def test_malformed_exif_does_not_make_the_image_unreadable(tmp_path, rng):
    pixels = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    path = tmp_path / "bad_exif.png"
    Image.fromarray(pixels).save(path, exif=b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xffgarbage")
    np.testing.assert_array_equal(read_rgb(path), pixels)


# ---------------------------------------------------------------------------------------------------------------------
# CMYK, palette, alpha
# ---------------------------------------------------------------------------------------------------------------------


def cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """R = (255 - C)(255 - K) / 255, rounded (likewise G from M, B from Y)."""
    cmyk = cmyk.astype(np.float64)
    return np.round((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255).astype(np.uint8)


def test_cmyk_tiff_and_jpeg(tmp_path, rng):
    cmyk = rng.integers(0, 256, size=(8, 12, 4), dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "cmyk.tif")
    np.testing.assert_array_equal(read_rgb(tmp_path / "cmyk.tif"), cmyk_to_rgb(cmyk))
    opencv = cv2.imread(str(tmp_path / "cmyk.tif"), cv2.IMREAD_COLOR)[..., ::-1]  # libtiff's own CMYK -> RGB
    assert np.abs(read_rgb(tmp_path / "cmyk.tif").astype(int) - opencv).max() <= 1
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "cmyk.jpg", quality=95)  # Adobe (inverted) CMYK JPEG
    with Image.open(tmp_path / "cmyk.jpg") as opened:
        assert opened.mode == "CMYK"
        stored_cmyk = np.asarray(opened)
    decoded = read_rgb(tmp_path / "cmyk.jpg")
    np.testing.assert_array_equal(decoded, cmyk_to_rgb(stored_cmyk))
    opencv = cv2.imread(str(tmp_path / "cmyk.jpg"), cv2.IMREAD_COLOR)[..., ::-1]  # libjpeg's own CMYK -> RGB
    assert np.abs(decoded.astype(int) - opencv).max() <= 2


def test_palette_images_without_and_with_transparency(tmp_path, rng):
    palette = rng.integers(0, 256, size=(16, 3), dtype=np.uint8)
    indices = rng.integers(0, 16, size=(6, 9), dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.tobytes())
    image.save(tmp_path / "palette.png")
    image.save(tmp_path / "palette.gif")
    for name in ("palette.png", "palette.gif"):
        with Image.open(tmp_path / name) as opened:
            assert opened.mode == "P"
        np.testing.assert_array_equal(read_rgb(tmp_path / name), palette[indices])
    # Per-entry alpha (PNG tRNS): entries 0..15 get alpha 0, 17, 34, ... 255.
    entry_alpha = np.arange(16, dtype=np.uint8) * 17
    image.save(tmp_path / "palette_alpha.png", transparency=entry_alpha.tobytes())
    np.testing.assert_array_equal(
        read_rgb(tmp_path / "palette_alpha.png"), composite(palette[indices], entry_alpha[indices])
    )
    # One transparent entry (GIF).
    image.save(tmp_path / "palette_transparent.gif", transparency=3)
    expected = palette[indices].copy()
    expected[indices == 3] = 255
    np.testing.assert_array_equal(read_rgb(tmp_path / "palette_transparent.gif"), expected)


def test_alpha_is_composited_over_white_not_dropped(tmp_path, rng):
    rgba = rng.integers(0, 256, size=(7, 8, 4), dtype=np.uint8)
    rgba[0, :, 3], rgba[1, :, 3] = 0, 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    decoded = read_rgb(tmp_path / "rgba.png")
    np.testing.assert_array_equal(decoded, composite(rgba[..., :3], rgba[..., 3]))
    opencv = cv2_unchanged_rgb(tmp_path / "rgba.png")
    np.testing.assert_array_equal(decoded, composite(opencv[..., :3], opencv[..., 3]))
    assert (decoded[0] == 255).all() and (decoded[1] == rgba[1, :, :3]).all()
    # The colour hidden under fully transparent pixels does not matter.
    hidden = rgba.copy()
    hidden[0, :, :3] = 0
    Image.fromarray(hidden, mode="RGBA").save(tmp_path / "rgba_hidden_black.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgba_hidden_black.png"), decoded)
    # Another background colour follows the same formula.
    black = (0, 0, 0)
    np.testing.assert_array_equal(
        read_rgb(tmp_path / "rgba.png", background=black), composite(rgba[..., :3], rgba[..., 3], black)
    )
    with pytest.raises(ValueError, match="background must be three values in 0..255"):
        read_rgb(tmp_path / "rgba.png", background=(0, 0, 300))
    # Grey + alpha.
    grey_alpha = rng.integers(0, 256, size=(5, 6, 2), dtype=np.uint8)
    Image.fromarray(grey_alpha, mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(
        read_rgb(tmp_path / "la.png"), composite(grey(grey_alpha[..., 0]), grey_alpha[..., 1])
    )
    # Fully opaque RGBA (alpha all 255) is its RGB exactly.
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "opaque.webp", lossless=True)
    np.testing.assert_array_equal(read_rgb(tmp_path / "opaque.webp"), rgba[..., :3])


def test_grey_and_rgb_png_with_a_transparent_colour(tmp_path, rng):
    values = rng.integers(0, 256, size=(4, 6), dtype=np.uint8)
    values[0, 0] = 77
    write_png(tmp_path / "grey_trns.png", values, 0, _png_chunk(b"tRNS", struct.pack(">H", 77)))
    expected = grey(values)
    expected[values == 77] = 255
    np.testing.assert_array_equal(read_rgb(tmp_path / "grey_trns.png"), expected)
    colour = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    colour[1, 1] = (10, 20, 30)
    write_png(tmp_path / "rgb_trns.png", colour, 2, _png_chunk(b"tRNS", struct.pack(">HHH", 10, 20, 30)))
    expected = colour.copy()
    expected[(colour == (10, 20, 30)).all(-1)] = 255
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgb_trns.png"), expected)


def test_bilevel_and_ycbcr_images(tmp_path, rng):
    bits = rng.integers(0, 2, size=(5, 9)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "bilevel.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "bilevel.png"), grey(bits.astype(np.uint8) * 255))
    image = Image.fromarray(rng.integers(0, 256, size=(5, 9, 3), dtype=np.uint8))
    ycbcr = image.convert("YCbCr")
    ycbcr.save(tmp_path / "ycbcr.tif")
    np.testing.assert_array_equal(read_rgb(tmp_path / "ycbcr.tif"), np.asarray(ycbcr.convert("RGB")))


def test_image_to_rgb_accepts_in_memory_images(rng):
    rgba = rng.integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
    np.testing.assert_array_equal(
        image_to_rgb(Image.fromarray(rgba, mode="RGBA")), composite(rgba[..., :3], rgba[..., 3])
    )


# ---------------------------------------------------------------------------------------------------------------------
# Tiny and very large images
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(1, 1), (2, 3), (3, 2), (1, 7)])
def test_tiny_images_decode_and_pass_the_transforms(tmp_path, rng, height, width):
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "tiny.png")
    Image.fromarray(pixels).save(tmp_path / "tiny.jpg")
    decoded = read_rgb(tmp_path / "tiny.png")
    np.testing.assert_array_equal(decoded, pixels)
    assert read_rgb(tmp_path / "tiny.jpg").shape == (height, width, 3)
    crops = MultiCropTransform(global_size=32, local_size=16, num_local_crops=2, gram_size=48, seed=0)(decoded)
    assert [tuple(c.shape) for c in crops["global_crops"]] == [(3, 32, 32)] * 2
    assert [tuple(c.shape) for c in crops["local_crops"]] == [(3, 16, 16)] * 2
    assert [tuple(c.shape) for c in crops["gram_crops"]] == [(3, 48, 48)] * 2
    assert all(torch.isfinite(c).all() for group in crops.values() for c in group)
    evaluated = EvalTransform(size=16)(decoded)
    assert evaluated.shape == (3, 16, 16) and torch.isfinite(evaluated).all()


def test_pil_pixel_guard_is_replaced_by_max_image_pixels(tmp_path, rng, monkeypatch):
    """PIL refuses images above 2 * Image.MAX_IMAGE_PIXELS; read_rgb decodes them and leaves the setting as it was."""
    pixels = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.png")
    Image.fromarray(pixels).save(tmp_path / "big.tif", tiffinfo={0x0112: 6})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "big.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        np.testing.assert_array_equal(read_rgb(tmp_path / "big.png"), pixels)
        np.testing.assert_array_equal(read_rgb(tmp_path / "big.tif"), displayed(pixels, 6))
    assert Image.MAX_IMAGE_PIXELS == 100
    # Overlapping calls from threads restore the setting once the last one is done.
    errors = []

    def decode_repeatedly():
        try:
            for _ in range(20):
                read_rgb(tmp_path / "big.png")
        except Exception as error:  # collected: an exception in a thread would not fail the test
            errors.append(error)

    threads = [threading.Thread(target=decode_repeatedly) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and Image.MAX_IMAGE_PIXELS == 100


def test_very_large_image_decodes(tmp_path):
    """The reported case: a 14000 x 14000 scan was "undecodable" (DecompressionBombError). 3-7 s on 2 CPU cores."""
    side = 14000
    assert side * side > 2 * Image.MAX_IMAGE_PIXELS  # above PIL's default refusal threshold
    Image.new("L", (side, side), 77).save(tmp_path / "scan.png", compress_level=1)
    start = time.perf_counter()
    decoded = read_rgb(tmp_path / "scan.png")
    seconds = time.perf_counter() - start
    assert decoded.shape == (side, side, 3) and decoded.dtype == np.uint8
    assert decoded[::997, ::997].min() == decoded[::997, ::997].max() == 77 and decoded[-1, -1, 2] == 77
    assert seconds < 30, f"decoding took {seconds:.1f} s"


def test_max_image_pixels_limit_names_the_option(tmp_path, rng):
    Image.fromarray(rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ImageTooLargeError, match=r"big.png: 50x40 = 2,000 pixels is more than max_image_pixels=1,999"):
        read_rgb(tmp_path / "big.png", max_image_pixels=1999)
    assert read_rgb(tmp_path / "big.png", max_image_pixels=2000).shape == (40, 50, 3)
    assert read_rgb(tmp_path / "big.png", max_image_pixels=None).shape == (40, 50, 3)
    assert DEFAULT_MAX_IMAGE_PIXELS >= 14000 * 14000

    skipping = ImageFolder(tmp_path, max_image_pixels=1999)
    by_name = {path.name: i for i, path in enumerate(skipping.paths)}
    with pytest.warns(RuntimeWarning, match=r"skipping image file .*big.png: .*raise the max_image_pixels option"):
        assert skipping[by_name["big.png"]] is None
    assert skipping[by_name["small.png"]]["image"].shape == (4, 5, 3)
    raising = ImageFolder(tmp_path, on_bad_image="raise", max_image_pixels=1999)
    with pytest.raises(ImageTooLargeError, match="max_image_pixels"):
        raising[by_name["big.png"]]
    for bad in (0, -5, True, "many"):
        with pytest.raises(ValueError, match="max_image_pixels must be a positive number of pixels or None"):
            ImageFolder(tmp_path, max_image_pixels=bad)


def test_truncated_and_corrupt_files_still_raise_os_errors(tmp_path, rng):
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    data = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(OSError, match="truncated"):
        read_rgb(tmp_path / "truncated.jpg")
    with pytest.raises(OSError, match="cannot identify image file"):
        read_rgb(tmp_path / "empty.png")


# ---------------------------------------------------------------------------------------------------------------------
# ImageFolder and the predict data module use the decoder
# ---------------------------------------------------------------------------------------------------------------------


def _users_folder(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A folder of awkward files and the RGB each should decode to."""
    root.mkdir(parents=True, exist_ok=True)
    values16 = rng.integers(0, 65536, size=(20, 24), dtype=np.uint16)
    assert cv2.imwrite(str(root / "scan16.png"), values16)
    photo = rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    Image.fromarray(photo).save(root / "rotated.png", exif=_exif(6))
    rgba = rng.integers(0, 256, size=(20, 20, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(root / "logo.png")
    return {
        "scan16.png": grey(values16 >> 8).astype(np.uint8),
        "rotated.png": displayed(photo, 6),
        "logo.png": composite(rgba[..., :3], rgba[..., 3]),
    }


def test_image_folder_decodes_with_read_rgb(tmp_path, rng):
    expected = _users_folder(tmp_path, rng)
    folder = ImageFolder(tmp_path)
    for index, path in enumerate(folder.paths):
        np.testing.assert_array_equal(folder[index]["image"], expected[path.name])


def test_predict_data_module_decodes_with_read_rgb(tmp_path, rng):
    expected = _users_folder(tmp_path / "images", rng)
    data = ImageFolderPredictDataModule(tmp_path / "images", image_size=16, resize_size=16, patch_size=8, num_workers=0)
    batch = next(iter(data.predict_dataloader()))
    transform = EvalTransform(size=16, resize_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert len(batch["paths"]) == 3 and batch["skipped_paths"] == []
    for image, path in zip(batch["images"], batch["paths"], strict=True):
        torch.testing.assert_close(image, transform(expected[Path(path).name]), atol=1e-6, rtol=0)
    # 24x20 and 20x20 pixels are over the limit, 16x24 is not.
    limited = ImageFolderPredictDataModule(
        tmp_path / "images", image_size=16, patch_size=8, num_workers=0, max_image_pixels=399
    )
    with pytest.warns(RuntimeWarning, match="max_image_pixels"):
        batch = next(iter(limited.predict_dataloader()))
    assert sorted(Path(p).name for p in batch["skipped_paths"]) == ["logo.png", "scan16.png"]
    assert [Path(p).name for p in batch["paths"]] == ["rotated.png"]
