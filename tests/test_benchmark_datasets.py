"""ImageNet, ADE20K, Pascal VOC and COCO readers (dinov3_pl.data.benchmarks) on tiny copies in the exact distributed
layouts (tests/fixtures/benchmarks.py): labels and masks against the values written, class order, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from PIL import Image

from dinov3_pl.data.benchmarks import (
    ADE20K,
    ADE20K_CLASS_NAMES,
    VOC_CLASS_NAMES,
    COCODetection,
    ImageNet,
    PascalVOC,
)
from tests.fixtures.benchmarks import (
    COCO_CATEGORIES,
    IMAGENET_DESCRIPTIONS,
    IMAGENET_WNIDS,
    VOC_AUG_IDS,
    VOC_TRAIN_IDS,
    VOC_VAL_IDS,
    voc_palette,
    write_ade20k,
    write_coco,
    write_imagenet,
    write_val_solution,
    write_voc,
)

# torchvision's order: class index = position of the wnid in the sorted training wnids.
SORTED_WNIDS = sorted(IMAGENET_WNIDS)


def _stem(sample: dict) -> str:
    return Path(sample["path"]).stem


# --------------------------------------------------------------------------------------------------------------------
# ImageNet
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("val_layout", ["folders", "kaggle", "devkit"])
def test_imagenet_labels_follow_sorted_train_wnids_in_every_layout(tmp_path, val_layout):
    written = write_imagenet(tmp_path, val_layout)
    train = ImageNet(written["root"], "train")
    assert train.num_classes == 3 and len(train) == 6 and train.wnids == tuple(SORTED_WNIDS)
    for index in range(len(train)):
        sample = train[index]
        wnid = Path(sample["path"]).parent.name
        assert sample["label"] == SORTED_WNIDS.index(wnid)
        assert sample["image"].shape == (8, 10, 3) and sample["image"].dtype == np.uint8

    val = ImageNet(written["root"], "val")
    assert len(val) == len(written["val_wnids"]) and val.num_classes == 3
    for index in range(len(val)):
        sample = val[index]
        assert sample["label"] == SORTED_WNIDS.index(written["val_wnids"][_stem(sample)])
        assert sample["image"].shape == (9, 7, 3)
    # Class names are the same on both splits (the classification DataModule compares them).
    assert train.class_names == val.class_names
    if val_layout == "kaggle":
        assert val.class_names == tuple(IMAGENET_DESCRIPTIONS[wnid] for wnid in SORTED_WNIDS)
        assert val.class_names[0] == "tench, Tinca tinca"
    else:
        assert val.class_names == tuple(SORTED_WNIDS)


def test_imagenet_kaggle_root_may_be_the_data_folder_and_devkit_ids_are_not_class_indices(tmp_path):
    written = write_imagenet(tmp_path / "kaggle", "kaggle")
    # Passing ILSVRC/Data/CLS-LOC itself still finds the CSV files two levels up.
    val = ImageNet(written["data_root"], "val")
    assert val.class_names[2] == "kit fox, Vulpes macrotis"
    # Devkit: kit fox has ILSVRC2012_ID 1 but is the last of the sorted wnids.
    devkit = ImageNet(write_imagenet(tmp_path / "devkit", "devkit")["root"], "val")
    first = next(devkit[i] for i in range(len(devkit)) if _stem(devkit[i]) == "ILSVRC2012_val_00000001")
    assert first["label"] == 2


def test_imagenet_bad_images_follow_the_image_folder_policy(tmp_path):
    written = write_imagenet(tmp_path, "folders", images_per_class=1)
    bad = written["data_root"] / "train" / IMAGENET_WNIDS[0] / "broken.JPEG"
    bad.write_bytes(b"not a jpeg")
    skipping = ImageNet(written["root"], "train")
    position = [str(p) for p in skipping.paths].index(str(bad))
    with pytest.warns(RuntimeWarning, match="broken.JPEG"):
        assert skipping[position] is None
    with pytest.raises(ValueError, match="cannot decode image file .*broken.JPEG"):
        ImageNet(written["root"], "train", on_bad_image="raise")[position]
    good = next(i for i, path in enumerate(skipping.paths) if path != bad)
    with pytest.raises(ValueError, match="is more than max_image_pixels=50"):
        ImageNet(written["root"], "train", on_bad_image="raise", max_image_pixels=50)[good]


def test_imagenet_val_csv_with_unknown_wnid(tmp_path):
    written = write_imagenet(tmp_path, "kaggle")
    wnids = dict(written["val_wnids"], ILSVRC2012_val_00000002="n09999999")
    write_val_solution(tmp_path / "LOC_val_solution.csv", wnids)
    with pytest.raises(ValueError, match=r"LOC_val_solution.csv line \d+: image ILSVRC2012_val_00000002 has class "):
        ImageNet(written["root"], "val")


def test_imagenet_val_image_without_label(tmp_path):
    written = write_imagenet(tmp_path, "kaggle")
    Image.new("RGB", (4, 4)).save(written["data_root"] / "val" / "ILSVRC2012_val_00000099.JPEG")
    with pytest.raises(ValueError, match=r"1 validation image\(s\) have no label in .*LOC_val_solution.csv"):
        ImageNet(written["root"], "val")


def test_imagenet_flat_val_without_label_files(tmp_path):
    written = write_imagenet(tmp_path, "kaggle")
    (tmp_path / "LOC_val_solution.csv").unlink()
    with pytest.raises(FileNotFoundError, match="no labels were found: put Kaggle's LOC_val_solution.csv"):
        ImageNet(written["root"], "val")
    ImageNet(written["root"], "train")  # the train split needs no val labels


def test_imagenet_devkit_without_scipy(tmp_path, monkeypatch):
    written = write_imagenet(tmp_path, "devkit")
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ImportError, match=r"meta.mat needs scipy: `pip install scipy`, or put Kaggle's"):
        ImageNet(written["root"], "val")


def test_imagenet_val_class_folder_not_in_train(tmp_path):
    written = write_imagenet(tmp_path, "folders")
    (written["data_root"] / "val" / "n07760859").mkdir()
    Image.new("RGB", (4, 4)).save(written["data_root"] / "val" / "n07760859" / "y.JPEG")
    with pytest.raises(ValueError, match=r"class folders that are not training classes: \['n07760859'\]"):
        ImageNet(written["root"], "val")


def test_imagenet_other_bad_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="has neither train/ nor val/"):
        ImageNet(tmp_path, "train")
    written = write_imagenet(tmp_path / "k", "kaggle")
    (tmp_path / "k" / "LOC_synset_mapping.txt").write_text("n01440764 tench\n")
    with pytest.raises(ValueError, match=r"does not list the training classes \['n01443537', 'n02119789'\]"):
        ImageNet(written["root"], "train")
    written = write_imagenet(tmp_path / "mixed", "devkit")
    (written["data_root"] / "val" / "sub").mkdir()
    Image.new("RGB", (4, 4)).save(written["data_root"] / "val" / "sub" / "ILSVRC2012_val_00000009.JPEG")
    with pytest.raises(ValueError, match="mixes images at the top level with images in sub-folders"):
        ImageNet(written["root"], "val")
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        ImageNet(written["root"], "test")


# --------------------------------------------------------------------------------------------------------------------
# ADE20K
# --------------------------------------------------------------------------------------------------------------------


def test_ade20k_reduce_zero_label_from_either_root(tmp_path):
    written = write_ade20k(tmp_path)
    for root in (tmp_path, tmp_path / "ADEChallengeData2016"):
        for split, split_dir in (("train", "training"), ("val", "validation")):
            dataset = ADE20K(root, split)
            assert len(dataset) == len(written[split_dir]) and dataset.num_classes == 150
            for index in range(len(dataset)):
                sample = dataset[index]
                raw = written[split_dir][_stem(sample)].astype(np.int64)
                # 0 (unlabelled) -> 255, class c -> c - 1, 255 stays 255.
                expected = np.where((raw == 0) | (raw == 255), 255, raw - 1)
                np.testing.assert_array_equal(sample["mask"], expected)
                assert sample["image"].shape == (6, 8, 3)
    first = ADE20K(tmp_path, "train")[0]["mask"]
    assert first[0, 0] == 0 and first[1, 0] == 149 and first[2, 0] == 255 and first[0, 7] == 255


def test_ade20k_class_names():
    assert len(ADE20K_CLASS_NAMES) == 150 == len(set(ADE20K_CLASS_NAMES))
    # Spot checks against objectInfo150 (label id - 1 after reduce-zero-label).
    for index, name in {0: "wall", 7: "bed", 12: "person", 20: "car", 75: "swivel chair", 149: "flag"}.items():
        assert ADE20K_CLASS_NAMES[index] == name


def test_ade20k_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds neither ADEChallengeData2016/ nor images/"):
        ADE20K(tmp_path, "train")
    write_ade20k(tmp_path)
    label = tmp_path / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000001.png"
    Image.fromarray(np.zeros((5, 8), np.uint8)).save(label)
    with pytest.raises(ValueError, match=r"ADE_val_00000001\.png is 8x5 but its image"):
        ADE20K(tmp_path, "val")[0]
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        ADE20K(tmp_path, "validation")


# --------------------------------------------------------------------------------------------------------------------
# Pascal VOC
# --------------------------------------------------------------------------------------------------------------------


def test_voc_palette_index_is_the_class_id(tmp_path):
    written = write_voc(tmp_path, aug="none")
    label_file = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{VOC_TRAIN_IDS[0]}.png"
    with Image.open(label_file) as label:
        assert label.mode == "P" and label.getpalette()[3:6] == [128, 0, 0]
    roots = (tmp_path, tmp_path / "VOCdevkit", tmp_path / "VOCdevkit" / "VOC2012")
    for root in roots:
        for split, ids in (("train", VOC_TRAIN_IDS), ("val", VOC_VAL_IDS)):
            dataset = PascalVOC(root, split)
            assert [_stem(dataset[i]) for i in range(len(dataset))] == list(ids)
            for index in range(len(dataset)):
                sample = dataset[index]
                np.testing.assert_array_equal(sample["mask"], written[_stem(sample)])
                assert sample["mask"].dtype == np.uint8 and sample["image"].shape == (5, 7, 3)
    mask = PascalVOC(tmp_path, "train")[0]["mask"]
    assert (mask[0] == 255).all() and mask[1, 0] == 0 and mask[1, 1] == 20
    assert PascalVOC.num_classes == 21 and VOC_CLASS_NAMES[15] == "person" and VOC_CLASS_NAMES[0] == "background"


@pytest.mark.parametrize("aug", ["mmseg", "trainaug", "train_aug"])
def test_voc_trainaug(tmp_path, aug):
    written = write_voc(tmp_path, aug=aug)
    dataset = PascalVOC(tmp_path, "trainaug")
    stems = [_stem(dataset[i]) for i in range(len(dataset))]
    assert sorted(stems) == sorted(VOC_TRAIN_IDS + VOC_AUG_IDS)
    if aug == "mmseg":  # mmsegmentation's voc12aug config: train.txt, then aug.txt
        assert stems == list(VOC_TRAIN_IDS + VOC_AUG_IDS)
    for index in range(len(dataset)):
        sample = dataset[index]
        # VOC train ids keep their official label (with 255 borders) even where SBD has one too.
        np.testing.assert_array_equal(sample["mask"], written[_stem(sample)])
    augmented = dataset.labels[stems.index(VOC_AUG_IDS[0])]
    assert augmented.parent.name == "SegmentationClassAug"


def test_voc_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no JPEGImages/"):
        PascalVOC(tmp_path, "train")
    write_voc(tmp_path, aug="none")
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    with pytest.raises(FileNotFoundError, match=r"Pascal VOC trainaug needs .*aug\.txt"):
        PascalVOC(tmp_path, "trainaug")

    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"split file .*ImageSets/Segmentation/val\.txt does not exist"):
        PascalVOC(tmp_path, "val")

    train_list = voc / "ImageSets" / "Segmentation" / "train.txt"
    train_list.write_text(f"{VOC_TRAIN_IDS[0]}\n2011_999999\n")
    with pytest.raises(FileNotFoundError, match=r"image .*JPEGImages/2011_999999\.jpg of id '2011_999999' listed in"):
        PascalVOC(tmp_path, "train")
    Image.new("RGB", (7, 5)).save(voc / "JPEGImages" / "2011_999999.jpg")
    with pytest.raises(FileNotFoundError, match=r"label map of id '2011_999999' listed in .*train\.txt"):
        PascalVOC(tmp_path, "train")

    train_list.write_text(f"{VOC_TRAIN_IDS[0]}\n")
    label = voc / "SegmentationClass" / f"{VOC_TRAIN_IDS[0]}.png"
    Image.new("P", (7, 4)).save(label)
    with pytest.raises(ValueError, match=rf"{VOC_TRAIN_IDS[0]}\.png is 7x4 but its image .* is 7x5"):
        PascalVOC(tmp_path, "train")[0]
    Image.new("RGB", (7, 5)).save(label)
    with pytest.raises(ValueError, match="has mode RGB; expected a palette"):
        PascalVOC(tmp_path, "train")[0]


def test_voc_trainaug_refuses_val_ids(tmp_path):
    write_voc(tmp_path, aug="trainaug")
    lists = tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    (lists / "trainaug.txt").write_text(f"{VOC_TRAIN_IDS[0]}\n{VOC_VAL_IDS[0]}\n")
    with pytest.raises(ValueError, match=rf"contain 1 id\(s\) of .*val\.txt \(e\.g\. {VOC_VAL_IDS[0]}\)"):
        PascalVOC(tmp_path, "trainaug")


# --------------------------------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------------------------------


def test_coco_detection_contiguous_labels_and_xyxy_boxes(tmp_path):
    expected = write_coco(tmp_path, "val", 2017)
    dataset = COCODetection(tmp_path, "val")
    assert dataset.num_classes == 3 and dataset.class_names == ("person", "car", "toothbrush")
    contiguous = {category["id"]: index for index, category in enumerate(COCO_CATEGORIES)}
    assert len(dataset) == len(expected)
    for index in range(len(dataset)):
        sample = dataset[index]
        wanted = expected[Path(sample["path"]).name]
        np.testing.assert_allclose(sample["boxes"], np.asarray(wanted["boxes"], np.float32).reshape(-1, 4))
        assert sample["box_labels"].tolist() == [contiguous[c] for c in wanted["categories"]]
        np.testing.assert_allclose(sample["box_areas"], wanted["areas"])
        # Crowd regions apart: training leaves them out, the evaluation ignores detections on them.
        np.testing.assert_allclose(sample["crowd_boxes"], np.asarray(wanted["crowd_boxes"], np.float32).reshape(-1, 4))
        assert sample["crowd_labels"].tolist() == [contiguous[c] for c in wanted["crowd_categories"]]
    assert sum(len(dataset[index]["crowd_boxes"]) for index in range(len(dataset))) == 1
    write_coco(tmp_path / "y2014", "train", 2014)
    assert len(COCODetection(tmp_path / "y2014", "train", year=2014)) == 3


def test_coco_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"annotations/instances_train2017\.json does not exist"):
        COCODetection(tmp_path, "train")
    write_coco(tmp_path, "val")
    for image in (tmp_path / "val2017").iterdir():
        image.unlink()
    (tmp_path / "val2017").rmdir()
    with pytest.raises(FileNotFoundError, match=r"COCO image folder .*val2017 does not exist"):
        COCODetection(tmp_path, "val")


# --------------------------------------------------------------------------------------------------------------------
# class_path
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, init_args, write",
    [
        ("ImageNet", {"split": "val"}, lambda root: write_imagenet(root, "kaggle")),
        ("ADE20K", {"split": "val"}, write_ade20k),
        ("PascalVOC", {"split": "trainaug"}, write_voc),
        ("COCODetection", {"split": "val", "year": 2017}, write_coco),
    ],
)
def test_instantiated_by_class_path(tmp_path, name, init_args, write):
    write(tmp_path)
    parser = ArgumentParser()
    parser.add_argument("--d", type=torch.utils.data.Dataset)
    spec = {"class_path": f"dinov3_pl.data.benchmarks.{name}", "init_args": {"root": str(tmp_path), **init_args}}
    dataset = parser.instantiate_classes(parser.parse_args(["--d", json.dumps(spec)])).d
    assert type(dataset).__name__ == name and len(dataset) > 0 and dataset.num_classes >= 3
    assert isinstance(dataset[0], dict) and dataset[0]["image"].dtype == np.uint8


def test_fixture_palette_is_voc():
    palette = voc_palette()
    # VOC's colour map: background black, aeroplane (128, 0, 0), person (192, 128, 128), border (224, 224, 192).
    assert palette[0:3] == [0, 0, 0] and palette[3:6] == [128, 0, 0]
    assert palette[45:48] == [192, 128, 128] and palette[765:768] == [224, 224, 192]
