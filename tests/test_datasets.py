"""Tests for dinov3_pl.data.datasets: SyntheticShapes, FashionMNIST idx reader, ImageFolder."""

from __future__ import annotations

import gzip
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinov3_pl.data.datasets import (
    FashionMNIST,
    ImageFolder,
    SyntheticShapes,
    default_fashion_mnist_root,
    read_idx_ubyte,
)

# ---------------------------------------------------------------------------------------------------------------------
# SyntheticShapes
# ---------------------------------------------------------------------------------------------------------------------


def test_synthetic_shapes_sample_format():
    dataset = SyntheticShapes(num_samples=40, image_size=48, seed=3)
    assert len(dataset) == 40 and dataset.num_classes == len(dataset.class_names) == 8
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample["image"].shape == (48, 48, 3) and sample["image"].dtype == np.uint8
        assert sample["mask"].shape == (48, 48) and sample["mask"].dtype == np.uint8
        assert sample["boxes"].dtype == np.float32 and sample["boxes"].shape[1] == 4
        assert sample["box_labels"].dtype == np.int64 and len(sample["box_labels"]) == len(sample["boxes"])
        assert 1 <= len(sample["boxes"]) <= 3
        assert sample["label"] == dataset.labels[index]
        assert set(np.unique(sample["mask"])) <= set(range(dataset.num_classes + 1))
        # The labelled main shape is drawn on top and is the largest one.
        areas = [(x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in sample["boxes"]]
        assert sample["box_labels"][int(np.argmax(areas))] == sample["label"]
        assert (sample["mask"] == sample["label"] + 1).sum() > 0.04 * 48 * 48


def test_synthetic_shapes_deterministic_by_seed_and_index():
    a, b = SyntheticShapes(16, 32, seed=0), SyntheticShapes(16, 32, seed=0)
    for index in (0, 5, 15):
        for key in ("image", "mask", "boxes", "box_labels"):
            np.testing.assert_array_equal(a[index][key], b[index][key])
    # Access order must not matter (sample i depends only on (seed, i)).
    first = a[7]["image"].copy()
    _ = [a[i] for i in range(16)]
    np.testing.assert_array_equal(a[7]["image"], first)
    other_seed = SyntheticShapes(16, 32, seed=1)
    assert not np.array_equal(a[3]["image"], other_seed[3]["image"])
    assert not np.array_equal(a[3]["image"], a[11]["image"])  # same class, different sample
    with pytest.raises(IndexError):
        a[16]


def test_synthetic_shapes_boxes_are_tight_around_mask_pixels():
    dataset = SyntheticShapes(64, 64, seed=5)
    checked = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        for (x1, y1, x2, y2), box_label in zip(sample["boxes"], sample["box_labels"], strict=True):
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            inside = sample["mask"][int(y1) : int(y2), int(x1) : int(x2)] == box_label + 1
            assert inside.any()
            if (sample["box_labels"] == box_label).sum() == 1:
                # A class present once: all its mask pixels lie in its box and touch every side (tight box).
                rows, cols = np.nonzero(sample["mask"] == box_label + 1)
                assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (y1, y2, x1, x2)
                checked += 1
    assert checked > 64


def test_synthetic_shapes_classes_balanced_and_shape_not_colour():
    dataset = SyntheticShapes(160, 32, seed=0)
    np.testing.assert_array_equal(np.bincount(dataset.labels), np.full(8, 20))
    # Mean colour of the main shape does not predict the class: per-class mean colours are all mid-range.
    colours = np.zeros((8, 3))
    for index in range(len(dataset)):
        sample = dataset[index]
        colours[sample["label"]] += sample["image"][sample["mask"] == sample["label"] + 1].mean(axis=0) / 20
    assert np.all((colours > 60) & (colours < 195))


def test_synthetic_shapes_surface_patterns_cover_half_of_every_shape():
    # Each class's two-tone pattern lights about half of the unit disc whatever its phase, so the mean brightness
    # of a shape does not give its class away.
    from dinov3_pl.data.datasets import SHAPE_PATTERN_NAMES, _surface_pattern

    grid = np.linspace(-1, 1, 201)
    u, v = np.meshgrid(grid, grid)
    disc = u * u + v * v <= 1
    assert len(SHAPE_PATTERN_NAMES) == SyntheticShapes.num_classes
    for shape_class in range(SyntheticShapes.num_classes):
        for phase in (0.0, 1.0, 2.5):
            lit = _surface_pattern(shape_class, u[disc], v[disc], phase).mean()
            assert 0.4 < lit < 0.62, (SHAPE_PATTERN_NAMES[shape_class], phase, lit)
    with pytest.raises(ValueError, match="unknown shape"):
        _surface_pattern(8, u, v, 0.0)


def test_synthetic_shapes_grey_by_default_with_visible_shapes():
    grey, colour = SyntheticShapes(24, 48, seed=0), SyntheticShapes(24, 48, seed=0, grayscale=False)
    for index in range(len(grey)):
        image, mask = grey[index]["image"], grey[index]["mask"]
        assert (image == image[:, :, :1]).all()  # three equal channels
        np.testing.assert_array_equal(mask, colour[index]["mask"])  # same layout, only the rendering differs
        # The main shape stands out from the background in grey levels (its lit tone at least).
        main, background = mask == grey[index]["label"] + 1, mask == 0
        lit = np.percentile(image[main][:, 0], 90)
        assert (
            abs(float(lit) - float(np.median(image[background][:, 0]))) > 20
            or abs(float(np.percentile(image[main][:, 0], 10)) - float(np.median(image[background][:, 0]))) > 20
        )
    assert any((colour[i]["image"] != colour[i]["image"][:, :, :1]).any() for i in range(4))


def test_synthetic_shapes_bad_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        SyntheticShapes(num_samples=0)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticShapes(image_size=8)


# ---------------------------------------------------------------------------------------------------------------------
# FashionMNIST (tiny idx files written here; the real files are optional)
# ---------------------------------------------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None, compress: bool = True) -> None:
    magic = (0x0800 | array.ndim) if magic is None else magic
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def _write_fashion(root: Path, train: bool, images: np.ndarray, labels: np.ndarray) -> None:
    prefix = "train" if train else "t10k"
    root.mkdir(parents=True, exist_ok=True)
    _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
    _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)


@pytest.fixture
def fake_images_labels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8), np.array([0, 3, 9, 1, 1, 5, 2], dtype=np.uint8)


def test_fashion_mnist_reads_generated_idx_files(tmp_path, fake_images_labels):
    images, labels = fake_images_labels
    _write_fashion(tmp_path, train=True, images=images, labels=labels)
    _write_fashion(tmp_path, train=False, images=images[:3], labels=labels[:3])
    train, test = FashionMNIST(tmp_path, train=True), FashionMNIST(tmp_path, train=False)
    assert len(train) == 7 and len(test) == 3 and train.num_classes == 10 and len(train.class_names) == 10
    np.testing.assert_array_equal(train.images, images)
    assert train.labels.dtype == np.int64
    np.testing.assert_array_equal(train.labels, labels)
    sample = train[2]
    assert sample["image"].shape == (28, 28, 3) and sample["image"].dtype == np.uint8 and sample["label"] == 9
    for channel in range(3):
        np.testing.assert_array_equal(sample["image"][:, :, channel], images[2])


def test_fashion_mnist_torchvision_layout_and_uncompressed(tmp_path, fake_images_labels):
    images, labels = fake_images_labels
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "t10k-images-idx3-ubyte", images, compress=False)
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels, compress=False)
    dataset = FashionMNIST(tmp_path, train=False)
    np.testing.assert_array_equal(dataset.images, images)


def test_fashion_mnist_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz.*download=True"):
        FashionMNIST(tmp_path / "nowhere", train=True)


def test_fashion_mnist_corrupt_files(tmp_path, fake_images_labels):
    images, labels = fake_images_labels
    # Wrong magic number (labels file given as images file).
    bad_magic = tmp_path / "magic"
    _write_fashion(bad_magic, True, images, labels)
    _write_idx(bad_magic / "train-images-idx3-ubyte.gz", images, magic=0x0801)
    with pytest.raises(ValueError, match="magic"):
        FashionMNIST(bad_magic)
    # Truncated payload.
    truncated = tmp_path / "truncated"
    _write_fashion(truncated, True, images, labels)
    raw = gzip.decompress((truncated / "train-images-idx3-ubyte.gz").read_bytes())
    (truncated / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        FashionMNIST(truncated)
    # Broken gzip stream.
    broken = tmp_path / "broken"
    _write_fashion(broken, True, images, labels)
    data = (broken / "train-labels-idx1-ubyte.gz").read_bytes()
    (broken / "train-labels-idx1-ubyte.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt gzip"):
        FashionMNIST(broken)
    # Image/label count mismatch.
    mismatch = tmp_path / "mismatch"
    _write_fashion(mismatch, True, images, labels[:5])
    with pytest.raises(ValueError, match="mismatch"):
        FashionMNIST(mismatch)
    # Labels out of range.
    out_of_range = tmp_path / "range"
    _write_fashion(out_of_range, True, images, np.full(7, 10, dtype=np.uint8))
    with pytest.raises(ValueError, match="labels outside"):
        FashionMNIST(out_of_range)


def test_read_idx_header_too_short(tmp_path):
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08"))
    with pytest.raises(ValueError, match="too short"):
        read_idx_ubyte(path, expected_ndim=1)


def test_fashion_mnist_download_delegates_to_torchvision(tmp_path, monkeypatch, fake_images_labels):
    images, labels = fake_images_labels
    calls = []

    def fake_torchvision_fashion(root, train, download):
        calls.append((root, train, download))
        _write_fashion(Path(root) / "FashionMNIST" / "raw", train, images, labels)

    fake_datasets = types.SimpleNamespace(FashionMNIST=fake_torchvision_fashion)
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(datasets=fake_datasets))
    dataset = FashionMNIST(tmp_path, train=True, download=True)
    assert calls == [(str(tmp_path), True, True)] and len(dataset) == 7


@pytest.mark.skipif(default_fashion_mnist_root() is None, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_real_debian_files():
    root = default_fashion_mnist_root()
    train, test = FashionMNIST(root, train=True), FashionMNIST(root, train=False)
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    np.testing.assert_array_equal(np.unique(train.labels), np.arange(10))
    np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 1000))


# ---------------------------------------------------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------------------------------------------------


def _make_folder(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    (root / "cats" / "nested").mkdir(parents=True)
    (root / "dogs").mkdir(parents=True)
    paths = {
        "rgb_png": root / "cats" / "a.png",
        "gray_jpg": root / "cats" / "nested" / "b.JPG",
        "rgba_webp": root / "dogs" / "c.webp",
    }
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(paths["rgb_png"])
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(paths["gray_jpg"])
    Image.fromarray(rng.integers(0, 256, (10, 12, 4), dtype=np.uint8), mode="RGBA").save(paths["rgba_webp"])
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    return paths


def test_image_folder_reads_recursively_with_labels(tmp_path):
    paths = _make_folder(tmp_path)
    dataset = ImageFolder(tmp_path, with_labels=True)
    assert len(dataset) == 3 and dataset.class_names == ("cats", "dogs") and dataset.num_classes == 2
    samples = {Path(dataset[i]["path"]).name: dataset[i] for i in range(len(dataset))}
    assert samples["a.png"]["image"].shape == (20, 24, 3) and samples["a.png"]["label"] == 0
    gray = samples["b.JPG"]["image"]
    assert gray.shape == (16, 16, 3) and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])  # grayscale replicated to 3 channels
    assert samples["c.webp"]["image"].shape == (10, 12, 3) and samples["c.webp"]["label"] == 1
    np.testing.assert_array_equal(samples["a.png"]["image"], np.asarray(Image.open(paths["rgb_png"])))
    unlabelled = ImageFolder(tmp_path)
    assert {unlabelled[i]["label"] for i in range(3)} == {-1}


def test_image_folder_bad_images_skip_and_raise(tmp_path):
    paths = _make_folder(tmp_path)
    (tmp_path / "cats" / "empty.jpg").write_bytes(b"")
    (tmp_path / "cats" / "garbage.png").write_bytes(b"\x89PNG definitely not a png")
    data = paths["rgb_png"].read_bytes()
    (tmp_path / "dogs" / "truncated.png").write_bytes(data[: len(data) // 2])
    skipping = ImageFolder(tmp_path, on_bad_image="skip")
    with pytest.warns(RuntimeWarning, match="skipping undecodable image file"):
        results = {Path(p).name: skipping[i] for i, p in enumerate(skipping.paths)}
    assert {name for name, sample in results.items() if sample is None} == {"empty.jpg", "garbage.png", "truncated.png"}
    raising = ImageFolder(tmp_path, on_bad_image="raise")
    for i, path in enumerate(raising.paths):
        if path.name in ("empty.jpg", "garbage.png", "truncated.png"):
            with pytest.raises(ValueError, match=path.name):
                raising[i]
        else:
            assert raising[i] is not None


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="on_bad_image"):
        ImageFolder(tmp_path, on_bad_image="ignore")
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (4, 4)).save(loose / "top.png")
    with pytest.raises(ValueError, match="top level"):
        ImageFolder(loose, with_labels=True)
