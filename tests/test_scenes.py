"""Fashion-MNIST scenes builder on tiny fake idx files: determinism, masks vs boxes, COCO API, the FashionMNISTScenes
dataset (built by prepare_data, read lazily) in the DataModules."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from dinov3_pl.data.dense import CocoDetectionDataset, DetectionDataModule, SegmentationDataModule, SegmentationFolder
from dinov3_pl.data.scenes import FashionMNISTScenes, build_fmnist_scenes, ensure_fmnist_scenes, main


def _write_idx(path, array):
    header = (0x0803 if array.ndim == 3 else 0x0801).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory):
    """20 fake 28×28 'garments' (bright blobs of varied shape) per split, labels cycling through the 10 classes."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 20), ("t10k", 20)):
        images = np.zeros((count, 28, 28), np.uint8)
        for i in range(count):
            top, left = rng.integers(2, 8, size=2)
            bottom, right = rng.integers(18, 26, size=2)
            images[i, top:bottom, left:right] = rng.integers(120, 255)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return root


def _digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_build_is_deterministic_by_seed(fake_fmnist, tmp_path):
    kwargs = dict(num_train=6, num_val=3, canvas_size=64, scale_range=(0.8, 1.2))
    first = _digest(build_fmnist_scenes(fake_fmnist, tmp_path / "a", seed=1, **kwargs))
    second = _digest(build_fmnist_scenes(fake_fmnist, tmp_path / "b", seed=1, **kwargs))
    other = _digest(build_fmnist_scenes(fake_fmnist, tmp_path / "c", seed=2, **kwargs))
    assert len(first) == 2 * 9 + 3 and first == second
    assert first["images/training/000000.png"] != other["images/training/000000.png"]


def test_masks_consistent_with_boxes_and_coco_api(fake_fmnist, tmp_path):
    out = build_fmnist_scenes(
        fake_fmnist,
        tmp_path / "s",
        num_train=12,
        num_val=4,
        canvas_size=64,
        items=(2, 5),
        scale_range=(0.8, 1.6),
        seed=0,
    )
    from faster_coco_eval import COCO

    coco = COCO(str(out / "instances_train.json"))
    assert len(coco.getImgIds()) == 12 and sorted(coco.getCatIds()) == list(range(1, 11))
    assert len(coco.getAnnIds()) > 12  # at least one box per scene on average with 2-5 items
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        mask = np.asarray(Image.open(out / "annotations" / info["file_name"]))
        image = np.asarray(Image.open(out / "images" / info["file_name"]))
        assert mask.shape == image.shape[:2] == (64, 64)
        covered = np.zeros_like(mask, bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            x, y, w, h = (int(v) for v in ann["bbox"])
            region = mask[y : y + h, x : x + w] == ann["category_id"]
            # Tight box: the class touches all four sides; the annotated area fits inside it.
            assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
            assert region.sum() >= ann["area"] > 0 and ann["area"] <= w * h
            covered[y : y + h, x : x + w] |= region
        labelled = (mask != 0) & (mask != 255)
        assert (covered == labelled).all(), "every labelled pixel lies in a box of its class, and only those"


def _scenes(root, fmnist_root, task, **build):
    build = {"num_train": 4, "num_val": 2, **build}
    return {
        split: FashionMNISTScenes(root, split, task, fmnist_root=fmnist_root, **build) for split in ("train", "val")
    }


def test_prepare_data_builds_once_and_the_datamodules_read_it_lazily(fake_fmnist, tmp_path):
    root = tmp_path / "scenes"
    seg = SegmentationDataModule(**_scenes(root, str(fake_fmnist), "segmentation"), image_size=32, batch_size=2)
    # Nothing is read or written before prepare_data: the class attributes give the class count.
    assert not root.exists() and seg.num_classes == 11 and seg.class_names[:2] == ["background", "T-shirt/top"]
    seg.prepare_data()
    stamp = (root / "scenes_meta.json").stat().st_mtime_ns
    seg.setup("fit")
    assert len(seg.train_set) == 4 and len(seg.val_set) == 2
    assert next(iter(seg.val_dataloader()))["masks"].shape[-2:] == (112, 112)
    # The samples are the generic readers' samples of the same build.
    expected = SegmentationFolder(root, "validation")[1]
    for key in ("image", "mask", "path"):
        np.testing.assert_array_equal(seg.datasets["val"][1][key], expected[key])

    det = DetectionDataModule(**_scenes(root, str(fake_fmnist), "detection"), image_size=56, batch_size=2)
    det.prepare_data()  # the build is there with these settings: nothing is rebuilt
    det.setup("fit")
    assert (root / "scenes_meta.json").stat().st_mtime_ns == stamp
    assert det.num_classes == 10 and det.class_names[0] == "T-shirt/top"
    batch = next(iter(det.val_dataloader()))
    coco = json.loads((root / "instances_val.json").read_text())
    first = [a for a in coco["annotations"] if a["image_id"] == coco["images"][0]["id"]]
    assert len(batch["targets"][0]["boxes"]) == len(first)
    expected = CocoDetectionDataset(root / "images", root / "instances_train.json")[0]
    for key in ("boxes", "box_labels", "path"):
        np.testing.assert_array_equal(det.datasets["train"][0][key], expected[key])

    with pytest.raises(ValueError, match="other settings"):
        ensure_fmnist_scenes(root, fake_fmnist, num_train=5, num_val=2)
    with pytest.raises(ValueError, match=r"other settings \(have, want\): \{'canvas_size': \(112, 64\)\}"):
        len(FashionMNISTScenes(root, "val", canvas_size=64, num_train=4, num_val=2, fmnist_root=fake_fmnist))


def test_scenes_read_without_prepare_data_build_on_first_use(fake_fmnist, tmp_path):
    scenes = FashionMNISTScenes(tmp_path / "lazy", "val", "detection", fmnist_root=fake_fmnist, num_train=2, num_val=3)
    assert not (tmp_path / "lazy").exists()
    assert len(scenes) == 3 and (tmp_path / "lazy" / "scenes_meta.json").is_file()
    with pytest.raises(ValueError, match="split must be 'train' or 'val', got 'validation'"):
        FashionMNISTScenes(tmp_path, "validation")


def test_bad_inputs_and_command(fake_fmnist, tmp_path):
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST"):
        build_fmnist_scenes(tmp_path / "nothing", tmp_path / "out", num_train=1, num_val=1, canvas_size=64)
    with pytest.raises(ValueError, match="do not fit"):
        build_fmnist_scenes(fake_fmnist, tmp_path / "out", canvas_size=32, scale_range=(1.0, 2.0))
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a Fashion-MNIST scenes folder"):
        ensure_fmnist_scenes(tmp_path / "occupied", fake_fmnist)
    main(
        [
            "--fmnist-root",
            str(fake_fmnist),
            "--out",
            str(tmp_path / "cli"),
            "--num-train",
            "2",
            "--num-val",
            "1",
            "--canvas-size",
            "64",
        ]
    )
    assert len(list((tmp_path / "cli" / "annotations" / "validation").glob("*.png"))) == 1
