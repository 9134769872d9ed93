"""One decoder for image files as users have them: :func:`read_rgb` returns uint8 [H, W, 3] for any PIL-readable file.

``PIL.Image.convert("RGB")`` alone, which upstream and torchvision use, gets several common files wrong; what
:func:`read_rgb` does instead:

- **16-bit greyscale** (PIL modes ``I;16``, ``I;16B``, ...): ``convert("RGB")`` clips the values at 255, so a
  16-bit photo comes out almost all white. Here the 8-bit value is the high byte (``v >> 8``). That is how PIL
  itself reduces 16-bit RGB, RGBA and grey+alpha PNGs and 16-bit RGB TIFFs (they open as 8-bit ``RGB``/``RGBA``),
  so a 16-bit grey file and the same picture saved as 16-bit RGB decode identically; it differs from
  ``round(v * 255 / 65535)`` by at most one level, and maps 65535 to 255 and 0 to 0.
- **32-bit integer** (mode ``I``: 16-bit PGM files, which PIL scales to 0..65535, and int32 TIFFs) is read on the
  same 0..65535 scale; values outside it are clipped, with a warning naming the file.
- **32-bit float** (mode ``F``, float TIFFs) is read as intensities in [0, 1] (the convention of scikit-image and
  OpenCV): ``round(255 * v)``. Values outside [0, 1] and NaN/inf are clipped, with a
  warning naming the file and its value range, rather than stretching each image to its own min..max (which
  would make the same value decode differently in different files).
- **EXIF orientation** (tag 274, set by phone and camera JPEGs) is applied, so pixels come out as viewers show
  them (PIL already turns TIFFs by their orientation tag while loading and then drops the tag, so nothing is
  turned twice). Malformed EXIF data is ignored (the pixels are still right) instead of making the file
  unreadable.
- **Transparency** (``RGBA``, ``LA``, ``PA``, palette or grey/RGB images with a ``tRNS`` transparent colour) is
  composited over a fixed background, white by default: transparent logos, icons, cut-outs and scans are made to
  be seen on a page, and viewers and browsers show them on white. Dropping alpha instead exposes whatever colour
  the encoder left under fully transparent pixels (often black, so black-on-transparent artwork becomes a black
  square). The formula is ``round((rgb * a + background * (255 - a)) / 255)`` in exact integer arithmetic.
- **CMYK** JPEG/TIFF: PIL's conversion ``R = round((255 - C) * (255 - K) / 255)`` (OpenCV's agrees within two
  levels); embedded ICC profiles are not applied.
- **Palette** images: palette lookup (with per-entry transparency as above).
- **Large images**: PIL refuses images above ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (179 MP) with a
  ``DecompressionBombError``, so a 14000 x 14000 scan was reported as undecodable. That process-wide guard is
  replaced by the explicit ``max_image_pixels`` argument (default 1e9 pixels, ~3 GB as uint8 RGB): an image
  above it raises :class:`ImageTooLargeError`, which names the option to raise. A limit stays because a small
  file can declare a canvas of billions of pixels, which PIL allocates before decoding, in every data-loader
  worker.
- **Reduced-size JPEG decoding** (``draft_min_pixels``, off by default): libjpeg can decode a JPEG at 1/2, 1/4 or
  1/8 of its size by scaling in the DCT domain, much faster than decoding it whole and shrinking it afterwards.
  :func:`read_rgb` picks the largest of these reductions whose image still has ``draft_min_pixels`` pixels; it
  changes nothing for other formats or when no reduction keeps enough pixels.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["read_rgb", "image_to_rgb", "jpeg_reduction", "ImageTooLargeError", "DEFAULT_MAX_IMAGE_PIXELS", "WHITE"]

DEFAULT_MAX_IMAGE_PIXELS = 1_000_000_000
WHITE = (255, 255, 255)

_EXIF_ORIENTATION_TAG = 0x0112
# Orientation value -> operation turning the stored pixels into the displayed ones (EXIF 2.3, tag 274: the value
# says where the stored 0th row and 0th column lie on screen).
_ORIENTATION_TO_DISPLAY: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: a[::-1].transpose(1, 0, 2),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: a[:, ::-1].transpose(1, 0, 2),
}
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_UINT16_MAX = 65535


class ImageTooLargeError(ValueError):
    """An image has more pixels than the ``max_image_pixels`` it was read with."""


# PIL checks its module-level MAX_IMAGE_PIXELS while opening and also while loading some formats (TIFF tiles, GIF
# frames). It has no per-call limit, so the guard is lifted for the duration of each read_rgb call; the count
# makes overlapping calls from several threads restore the user's value only when the last one finishes.
_guard_lock = threading.Lock()
_guard_users = 0
_saved_max_image_pixels: int | None = None


@contextmanager
def _pil_pixel_limit_lifted() -> Iterator[None]:
    global _guard_users, _saved_max_image_pixels
    with _guard_lock:
        if _guard_users == 0:
            _saved_max_image_pixels = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _guard_users += 1
    try:
        yield
    finally:
        with _guard_lock:
            _guard_users -= 1
            if _guard_users == 0:
                Image.MAX_IMAGE_PIXELS = _saved_max_image_pixels


def read_rgb(
    path: str | Path,
    *,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    background: Sequence[int] = WHITE,
    apply_exif_orientation: bool = True,
    draft_min_pixels: int | None = None,
) -> np.ndarray:
    """Decode the image file ``path`` to uint8 [H, W, 3] as a viewer shows it (see the module docstring).

    ``apply_exif_orientation=False`` keeps the stored pixel order of EXIF-tagged files, for data whose annotations
    (masks, boxes) were made on the stored pixels; TIFF orientation tags are applied by PIL either way.

    ``draft_min_pixels``: decode a JPEG at the largest reduction 1/2, 1/4, 1/8 whose image keeps at least this many
    pixels (PIL ``draft``); ``None``: full size. ``max_image_pixels`` applies to the full size either way.

    Raises :class:`ImageTooLargeError` when width x height exceeds ``max_image_pixels`` (``None``: no limit),
    checked from the header before any pixel is decoded, and PIL's ``OSError``/``ValueError``/``SyntaxError`` for
    unreadable, truncated or corrupt files.
    """
    # A file object, not the path: given a path, PIL memory-maps uncompressed TIFFs and then lays out those with
    # orientation 5-8 (90-degree turns) in the already-turned size, scrambling the pixels (Pillow 13, modes L, P,
    # I;16, RGBA, CMYK); reading the file normally decodes them right.
    with _pil_pixel_limit_lifted(), open(path, "rb") as file, _open_image(file, path) as image:
        width, height = image.size
        if max_image_pixels is not None and width * height > max_image_pixels:
            raise ImageTooLargeError(
                f"{path}: {width}x{height} = {width * height:,} pixels is more than max_image_pixels="
                f"{max_image_pixels:,}; raise the max_image_pixels option (ImageFolder, data modules; None removes "
                "the limit) to read it"
            )
        if draft_min_pixels is not None:
            reduction = jpeg_reduction(width, height, draft_min_pixels)
            if reduction > 1:
                # Asking for exactly (W // k, H // k) makes PIL choose the reduction k (W // (W // k) is k for W >= k).
                image.draft(None, (width // reduction, height // reduction))
        image.load()  # decode fully now so that truncated files fail here
        rgb = image_to_rgb(image, background=background, source=str(path))
        orientation = _exif_orientation(image)
    if apply_exif_orientation and orientation in _ORIENTATION_TO_DISPLAY:
        rgb = np.ascontiguousarray(_ORIENTATION_TO_DISPLAY[orientation](rgb))
    return rgb


def jpeg_reduction(width: int, height: int, min_pixels: int) -> int:
    """The largest JPEG DCT reduction (1, 2, 4 or 8) after which a ``width`` x ``height`` image keeps at least
    ``min_pixels`` pixels (counted on the floor of each side, the conservative size)."""
    for reduction in (8, 4, 2):
        if (width // reduction) * (height // reduction) >= max(1, min_pixels):
            return reduction
    return 1


def _open_image(file: BinaryIO, path: str | Path) -> Image.Image:
    try:
        return Image.open(file)
    except UnidentifiedImageError as error:  # PIL's message would name the file object, not the file
        raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}") from error


def _exif_orientation(image: Image.Image) -> int:
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF blocks raise many different errors; the pixels are fine without it
        return 1
    return orientation if isinstance(orientation, int) else 1


def image_to_rgb(image: Image.Image, *, background: Sequence[int] = WHITE, source: str = "image") -> np.ndarray:
    """uint8 [H, W, 3] from a loaded PIL image of any mode (stored orientation; ``source`` names it in warnings)."""
    if len(background) != 3 or not all(0 <= int(c) <= 255 for c in background):
        raise ValueError(f"background must be three values in 0..255 (an RGB colour), got {tuple(background)}")
    mode = image.mode
    transparency = image.info.get("transparency")
    if mode == "F" or mode == "I" or mode.startswith("I;"):
        raw = np.asarray(image)
        grey = _float_to_uint8(raw, source) if mode == "F" else _integer_to_uint8(raw, source)
        rgb = _grey_to_rgb(grey)
        if isinstance(transparency, int) and mode != "F":
            opacity = np.where(raw == transparency, 0, 255).astype(np.uint8)
            return _composite(rgb, opacity, background)
        return rgb
    if mode in _ALPHA_MODES or transparency is not None:
        rgba = np.asarray(image.convert("RGBA"))
        return _composite(rgba[..., :3], rgba[..., 3], background)
    if mode == "RGB":
        return np.asarray(image)
    if mode == "L":
        return _grey_to_rgb(np.asarray(image))
    return np.asarray(image.convert("RGB"))  # CMYK, P, 1, YCbCr, LAB, HSV, RGBX


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    # One strided copy per channel: measured 2-5x faster than np.repeat, broadcasting or convert("RGB"), which
    # matters for 100+ MP scans.
    rgb = np.empty((*grey.shape, 3), dtype=np.uint8)
    for channel in range(3):
        rgb[..., channel] = grey
    return rgb


def _integer_to_uint8(values: np.ndarray, source: str) -> np.ndarray:
    if values.dtype.itemsize > 2 or values.dtype.kind == "i":  # int32 ("I") or signed: may leave 0..65535
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > _UINT16_MAX:
            warnings.warn(
                f"{source}: 32-bit integer pixel values span {low}..{high}; values outside the 16-bit range "
                f"0..{_UINT16_MAX} were clipped (save the image as 8- or 16-bit to control its scaling)",
                RuntimeWarning,
                stacklevel=3,
            )
        values = np.clip(values, 0, _UINT16_MAX)
    return (values >> 8).astype(np.uint8)


def _float_to_uint8(values: np.ndarray, source: str) -> np.ndarray:
    finite = np.isfinite(values)
    low = float(values[finite].min()) if finite.any() else 0.0
    high = float(values[finite].max()) if finite.any() else 0.0
    if low < 0.0 or high > 1.0 or not finite.all():
        warnings.warn(
            f"{source}: float pixel values span {low:g}..{high:g}"
            f"{'' if finite.all() else ' (with NaN/inf)'}; float images are read as intensities in [0, 1] and "
            "values outside were clipped, NaN set to 0 (save the image as 8- or 16-bit to control its scaling)",
            RuntimeWarning,
            stacklevel=3,
        )
    values = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def _composite(rgb: np.ndarray, alpha: np.ndarray, background: Sequence[int]) -> np.ndarray:
    """round((rgb * a + background * (255 - a)) / 255) per channel, exact in integers (no ties: 255 is odd)."""
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    # 255 * 255 + 127 fits in uint16, which keeps the temporaries of a large image at 2 bytes per value.
    alpha = alpha[..., None].astype(np.uint16)
    out = rgb.astype(np.uint16)
    out *= alpha
    out += (255 - alpha) * np.asarray(background, dtype=np.uint16)
    out += 127
    out //= 255
    return out.astype(np.uint8)
