"""Benchmark datasets read as distributed: ImageNet-1k, ADE20K, Pascal VOC 2012 and COCO.

Each class is a ``torch.utils.data.Dataset`` in the sample contract of :mod:`dinov3_pl.data.datasets` (``image`` uint8
[H, W, 3], ``label`` / ``mask`` / ``boxes`` + ``box_labels``, ``path``) with ``num_classes`` and ``class_names``, so a
config can inject it by ``class_path``. Layouts read (``root`` is what the user passes):

- :class:`ImageNet`: ``root/train/<wnid>/*.JPEG``; validation as ``root/val/<wnid>/*.JPEG`` or flat
  ``root/val/*.JPEG`` labelled by Kaggle's ``LOC_val_solution.csv`` or by the ILSVRC2012 devkit
  (``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`` + ``meta.mat``). The Kaggle download
  (``root/ILSVRC/Data/CLS-LOC/{train,val}`` with the CSV files in ``root``) is read as it unpacks.
- :class:`ADE20K`: ``ADEChallengeData2016/{images,annotations}/{training,validation}/``.
- :class:`PascalVOC`: ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}``, plus the
  SBD-augmented training set as mmsegmentation's ``voc_aug.py`` converter writes it.
- :class:`COCODetection`: ``root/annotations/instances_{split}{year}.json`` + ``root/{split}{year}/``.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dinov3_pl.data.datasets import ImageFolder, _image_extensions
from dinov3_pl.data.decode import DEFAULT_MAX_IMAGE_PIXELS, read_rgb
from dinov3_pl.data.detection import CocoDetectionDataset
from dinov3_pl.data.segmentation import SegmentationFolder

__all__ = [
    "ADE20K",
    "ADE20K_CLASS_NAMES",
    "COCODetection",
    "ImageNet",
    "PascalVOC",
    "VOC_CLASS_NAMES",
]


# --------------------------------------------------------------------------------------------------------------------
# ImageNet
# --------------------------------------------------------------------------------------------------------------------

_KAGGLE_DATA_PARTS = ("ILSVRC", "Data", "CLS-LOC")
_SYNSET_MAPPING = "LOC_synset_mapping.txt"
_VAL_SOLUTION = "LOC_val_solution.csv"
_DEVKIT_DATA = Path("ILSVRC2012_devkit_t12") / "data"
_DEVKIT_GROUND_TRUTH = _DEVKIT_DATA / "ILSVRC2012_validation_ground_truth.txt"
_DEVKIT_META = _DEVKIT_DATA / "meta.mat"
_VAL_FILE_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})")


def _imagenet_data_root(root: Path) -> Path:
    """The folder holding ``train/`` and ``val/``: ``root`` itself or the Kaggle download's ``ILSVRC/Data/CLS-LOC``."""
    if (root / "train").is_dir() or (root / "val").is_dir():
        return root
    kaggle = root.joinpath(*_KAGGLE_DATA_PARTS)
    if kaggle.is_dir():
        return kaggle
    raise FileNotFoundError(
        f"ImageNet root {root} has neither train/ nor val/ (expected root/train/<wnid>/*.JPEG and root/val/, or the "
        f"Kaggle download with root/{'/'.join(_KAGGLE_DATA_PARTS)}/)"
    )


def _imagenet_metadata_dirs(root: Path, data_root: Path) -> list[Path]:
    """Folders that may hold the label files: the given root, the data folder, and the top of a Kaggle download."""
    folders = [root, data_root]
    if data_root.parts[-3:] == _KAGGLE_DATA_PARTS:
        folders.append(data_root.parents[2])
    return list(dict.fromkeys(folders))


def _find_first(folders: list[Path], relative: str | Path) -> Path | None:
    for folder in folders:
        if (folder / relative).is_file():
            return folder / relative
    return None


def _read_synset_mapping(path: Path) -> dict[str, str]:
    """``LOC_synset_mapping.txt``: ``<wnid> <human-readable names>`` per line."""
    names = {}
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        wnid, _, description = line.strip().partition(" ")
        if not description:
            raise ValueError(f"{path} line {line_number}: expected '<wnid> <names>', got {line!r}")
        names[wnid] = description.strip()
    return names


def _read_val_solution(path: Path, class_index: dict[str, int]) -> dict[str, int]:
    """Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``): image stem -> class index of the first
    token of its boxes (every box of a validation image has the image's class)."""
    labels = {}
    with path.open(newline="") as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if header is None or [column.strip() for column in header[:2]] != ["ImageId", "PredictionString"]:
            raise ValueError(f"{path}: expected the header 'ImageId,PredictionString', got {header}")
        for row_number, row in enumerate(reader, start=2):
            if not row:
                continue
            tokens = row[1].split() if len(row) > 1 else []
            if not tokens:
                raise ValueError(f"{path} line {row_number}: no class in PredictionString for {row[0]!r}")
            wnid = tokens[0]
            if wnid not in class_index:
                raise ValueError(
                    f"{path} line {row_number}: image {row[0]} has class {wnid!r}, which is not one of the "
                    f"{len(class_index)} training classes (root/train/<wnid>/ folders or {_SYNSET_MAPPING})"
                )
            labels[row[0].strip()] = class_index[wnid]
    return labels


def _read_devkit_labels(ground_truth: Path, meta: Path, class_index: dict[str, int]) -> dict[int, int]:
    """ILSVRC2012 devkit: validation image number (1-based line of the ground-truth file) -> class index.

    The ground truth holds the devkit's ILSVRC2012_ID per image, which ``meta.mat`` maps to a wnid; those ids are not
    in wnid order, hence the lookup."""
    try:
        import scipy.io
    except ImportError as error:
        raise ImportError(
            f"reading the ImageNet devkit's {meta} needs scipy: `pip install scipy`, or put Kaggle's {_VAL_SOLUTION} "
            "next to the val folder instead"
        ) from error
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: the devkit's ground truth {ground_truth} needs it to name classes")
    synsets = np.atleast_1d(scipy.io.loadmat(meta, squeeze_me=True)["synsets"])
    wnid_of_id = {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"], strict=True)}
    labels = {}
    for line_number, line in enumerate(ground_truth.read_text().split(), start=1):
        devkit_id = int(line)
        if devkit_id not in wnid_of_id:
            raise ValueError(f"{ground_truth} line {line_number}: ILSVRC2012_ID {devkit_id} is not in {meta}")
        wnid = wnid_of_id[devkit_id]
        if wnid not in class_index:
            raise ValueError(
                f"{ground_truth} line {line_number}: class {wnid!r} (ILSVRC2012_ID {devkit_id}) is not one of the "
                f"{len(class_index)} training classes"
            )
        labels[line_number] = class_index[wnid]
    return labels


class ImageNet(ImageFolder):
    """ImageNet-1k (ILSVRC2012) classification, read from the files as distributed.

    Classes are the wnid folders of ``root/train`` in sorted order (torchvision's order: class 0 is ``n01440764``,
    tench); without a train folder, the wnids of ``LOC_synset_mapping.txt``. ``class_names`` are the descriptions of
    ``LOC_synset_mapping.txt`` when it is found (in ``root``, the data folder or the top of a Kaggle download), else
    the wnids, so train and val always agree. ``split="val"`` reads, in this order of preference:

    1. class folders ``root/val/<wnid>/*.JPEG`` (torchvision's layout);
    2. flat ``root/val/*.JPEG`` labelled by Kaggle's ``LOC_val_solution.csv`` (first wnid of each row);
    3. flat ``root/val/*.JPEG`` labelled by ``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt``
       (line i labels ``ILSVRC2012_val_<i:08d>``) and ``meta.mat`` (needs scipy).

    A val folder holding a subset of the images reads as that subset; an image without a label is an error. Decoding
    and the ``on_bad_image`` / ``max_image_pixels`` policy are :class:`~dinov3_pl.data.datasets.ImageFolder`'s.
    ``root`` may also be the Kaggle download's top folder (``ILSVRC/Data/CLS-LOC`` below it).
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "val"] = "train",
        on_bad_image: Literal["skip", "raise"] = "skip",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"ImageNet split must be 'train' or 'val', got {split!r}")
        given_root = Path(root)
        data_root = _imagenet_data_root(given_root)
        split_dir = data_root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"ImageNet {split} folder {split_dir} does not exist")
        metadata_dirs = _imagenet_metadata_dirs(given_root, data_root)
        mapping_file = _find_first(metadata_dirs, _SYNSET_MAPPING)
        descriptions = _read_synset_mapping(mapping_file) if mapping_file else None
        wnids = self._class_wnids(data_root / "train", descriptions, mapping_file)
        class_index = {wnid: index for index, wnid in enumerate(wnids)}

        flat = split == "val" and _has_top_level_image(split_dir)
        super().__init__(split_dir, with_labels=not flat, on_bad_image=on_bad_image, max_image_pixels=max_image_pixels)
        if flat:
            labels = self._flat_val_labels(metadata_dirs, class_index, split_dir)
        else:
            unknown = sorted(set(self.class_names) - set(class_index))
            if unknown:
                raise ValueError(
                    f"{split_dir} has class folders that are not training classes: {unknown[:5]} "
                    f"({len(unknown)} in all; classes come from {data_root / 'train'} or {_SYNSET_MAPPING})"
                )
            labels = np.asarray([class_index[wnid] for wnid in self.class_names], dtype=np.int64)[self.labels]
        self.split = split
        self.data_root = data_root
        self.wnids: tuple[str, ...] = wnids
        self.labels = labels
        self.class_names = tuple(descriptions[wnid] for wnid in wnids) if descriptions else wnids

    @staticmethod
    def _class_wnids(
        train_dir: Path, descriptions: dict[str, str] | None, mapping_file: Path | None
    ) -> tuple[str, ...]:
        if train_dir.is_dir():
            wnids = tuple(sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith(".")))
            if not wnids:
                raise ValueError(f"ImageNet train folder {train_dir} has no class folders (expected <wnid>/*.JPEG)")
            if descriptions is not None:
                undescribed = [wnid for wnid in wnids if wnid not in descriptions]
                if undescribed:
                    raise ValueError(
                        f"{mapping_file} does not list the training classes {undescribed[:5]} "
                        f"({len(undescribed)} in all) of {train_dir}"
                    )
            return wnids
        if descriptions is not None:
            return tuple(sorted(descriptions))
        raise FileNotFoundError(
            f"ImageNet classes come from the class folders of {train_dir} or from {_SYNSET_MAPPING}; neither was found"
        )

    def _flat_val_labels(self, metadata_dirs: list[Path], class_index: dict[str, int], split_dir: Path) -> np.ndarray:
        nested = [path for path in self.paths if path.parent != split_dir]
        if nested:
            raise ValueError(
                f"{split_dir} mixes images at the top level with images in sub-folders (e.g. {nested[0]}); use "
                "either class folders val/<wnid>/ or a flat val/ folder"
            )
        solution = _find_first(metadata_dirs, _VAL_SOLUTION)
        if solution is not None:
            by_stem = _read_val_solution(solution, class_index)
            return self._lookup(lambda path: by_stem.get(path.stem), solution)
        ground_truth = _find_first(metadata_dirs, _DEVKIT_GROUND_TRUTH)
        if ground_truth is not None:
            meta = ground_truth.parent / _DEVKIT_META.name
            by_number = _read_devkit_labels(ground_truth, meta, class_index)

            def devkit_label(path: Path) -> int | None:
                match = _VAL_FILE_NUMBER.fullmatch(path.stem)
                return by_number.get(int(match.group(1))) if match else None

            return self._lookup(devkit_label, ground_truth)
        searched = ", ".join(str(folder) for folder in metadata_dirs)
        raise FileNotFoundError(
            f"{split_dir} holds images without class folders and no labels were found: put Kaggle's {_VAL_SOLUTION} "
            f"or the devkit's {_DEVKIT_GROUND_TRUTH} (+ meta.mat) in one of: {searched}"
        )

    def _lookup(self, label_of: Callable[[Path], int | None], source: Path) -> np.ndarray:
        labels = [label_of(path) for path in self.paths]
        unlabelled = [str(path) for path, label in zip(self.paths, labels, strict=True) if label is None]
        if unlabelled:
            raise ValueError(
                f"{len(unlabelled)} validation image(s) have no label in {source}, e.g. {unlabelled[0]} (expected "
                "file names ILSVRC2012_val_<8 digits>.JPEG as distributed)"
            )
        return np.asarray(labels, dtype=np.int64)


def _has_top_level_image(folder: Path) -> bool:
    extensions = _image_extensions()
    with os.scandir(folder) as entries:
        return any(
            entry.is_file() and not entry.name.startswith(".") and os.path.splitext(entry.name)[1].lower() in extensions
            for entry in entries
        )


# --------------------------------------------------------------------------------------------------------------------
# ADE20K
# --------------------------------------------------------------------------------------------------------------------

# The 150 classes of the SceneParsing benchmark (ADEChallengeData2016's objectInfo150), in label order 1..150 (ids
# 0..149 after reduce-zero-label), as named by mmsegmentation and upstream dinov3.
# fmt: off
ADE20K_CLASS_NAMES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board",
    "shower", "radiator", "glass", "clock", "flag",
)
# fmt: on

_ADE20K_FOLDER = "ADEChallengeData2016"
_ADE20K_SPLIT_DIRS = {"train": "training", "val": "validation"}


class ADE20K(SegmentationFolder):
    """ADE20K SceneParsing (``ADEChallengeData2016``, 20,210 train / 2,000 val images, 150 classes).

    ``root`` is ``ADEChallengeData2016`` or its parent. Label PNGs hold 0 = unlabelled and 1..150; they are read with
    reduce-zero-label as mmsegmentation and upstream dinov3 evaluate: 0 -> 255 (ignored), c -> c - 1.
    """

    num_classes: int = len(ADE20K_CLASS_NAMES)
    class_names: tuple[str, ...] = ADE20K_CLASS_NAMES

    def __init__(self, root: str | Path, split: Literal["train", "val"] = "train") -> None:
        if split not in _ADE20K_SPLIT_DIRS:
            raise ValueError(f"ADE20K split must be 'train' or 'val', got {split!r}")
        given = Path(root)
        if (given / _ADE20K_FOLDER).is_dir():
            given = given / _ADE20K_FOLDER
        elif not (given / "images").is_dir():
            raise FileNotFoundError(
                f"ADE20K root {root} holds neither {_ADE20K_FOLDER}/ nor images/ (pass the {_ADE20K_FOLDER} folder "
                "of ADEChallengeData2016.zip, or the folder it was unpacked into)"
            )
        super().__init__(given, _ADE20K_SPLIT_DIRS[split], reduce_zero_label=True)
        # Set on the instance: SegmentationFolder stores its own (optional) num_classes there.
        self.num_classes = len(ADE20K_CLASS_NAMES)
        self.class_names = ADE20K_CLASS_NAMES
        self.split = split


# --------------------------------------------------------------------------------------------------------------------
# Pascal VOC 2012
# --------------------------------------------------------------------------------------------------------------------

# fmt: off
VOC_CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# fmt: on

_VOC_SPLIT_FILES = Path("ImageSets") / "Segmentation"
# mmsegmentation's voc_aug.py writes aug.txt (SBD ids outside VOC train and val; its voc12aug config reads them
# after train.txt) and trainaug.txt (the whole 10,582-image set); train_aug.txt is the name used by DeepLab-style
# SegmentationClassAug downloads.
_VOC_AUG_LISTS = ("trainaug.txt", "train_aug.txt")


def _voc_year_root(root: Path) -> Path:
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(
        f"Pascal VOC root {root} has no JPEGImages/ (pass VOCdevkit/VOC2012, VOCdevkit or the folder holding "
        "VOCdevkit, as unpacked from VOCtrainval_11-May-2012.tar)"
    )


def _read_id_list(path: Path) -> list[str]:
    """One image id per line; lines like ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` give ``<id>``."""
    if not path.is_file():
        raise FileNotFoundError(f"Pascal VOC split file {path} does not exist")
    ids = [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"Pascal VOC split file {path} lists no image ids")
    return ids


class PascalVOC(Dataset):
    """Pascal VOC 2012 semantic segmentation, 21 classes (0 = background), 255 = object borders and "difficult"
    regions (ignored).

    ``root`` is ``VOCdevkit/VOC2012``, ``VOCdevkit`` or its parent. Image ids come from
    ``ImageSets/Segmentation/{train,val}.txt``; images are ``JPEGImages/<id>.jpg``, labels
    ``SegmentationClass/<id>.png``: palette PNGs whose palette *index* is the class id (their colours are only for
    viewing).

    ``split="trainaug"`` is the 10,582-image training set augmented with SBD as mmsegmentation's
    ``tools/dataset_converters/voc_aug.py`` writes it: ``ImageSets/Segmentation/train.txt`` followed by
    ``aug.txt`` (mmsegmentation's voc12aug config); without ``aug.txt``, ``trainaug.txt`` or ``train_aug.txt``
    (one id per line, or DeepLab's ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` lines). An id with an
    official ``SegmentationClass/<id>.png`` label uses it; the others read ``SegmentationClassAug/<id>.png``
    (grey PNGs of class ids). A trainaug list that contains ``val.txt`` ids is refused.
    """

    num_classes: int = len(VOC_CLASS_NAMES)
    class_names: tuple[str, ...] = VOC_CLASS_NAMES

    def __init__(self, root: str | Path, split: Literal["train", "val", "trainaug"] = "train") -> None:
        if split not in ("train", "val", "trainaug"):
            raise ValueError(f"Pascal VOC split must be 'train', 'val' or 'trainaug', got {split!r}")
        self.root = _voc_year_root(Path(root))
        self.split = split
        lists = self.root / _VOC_SPLIT_FILES
        if split == "trainaug":
            ids, list_files = self._trainaug_ids(lists)
        else:
            list_files = [lists / f"{split}.txt"]
            ids = _read_id_list(list_files[0])
        listed_in = " + ".join(str(path) for path in list_files)
        self.ids = ids
        self.images = [self.root / "JPEGImages" / f"{image_id}.jpg" for image_id in ids]
        for image_id, image in zip(ids, self.images, strict=True):
            if not image.is_file():
                raise FileNotFoundError(f"image {image} of id {image_id!r} listed in {listed_in} does not exist")
        self.labels = [self._label_path(image_id, listed_in) for image_id in ids]

    def _trainaug_ids(self, lists: Path) -> tuple[list[str], list[Path]]:
        if (lists / "aug.txt").is_file():
            list_files = [lists / "train.txt", lists / "aug.txt"]
            ids = _read_id_list(list_files[0]) + _read_id_list(list_files[1])
        else:
            found = [lists / name for name in _VOC_AUG_LISTS if (lists / name).is_file()]
            if not found:
                raise FileNotFoundError(
                    f"Pascal VOC trainaug needs {lists / 'aug.txt'} (with train.txt), {lists / 'trainaug.txt'} or "
                    f"{lists / 'train_aug.txt'}: run mmsegmentation's tools/dataset_converters/voc_aug.py on the "
                    "SBD download (benchmark.tgz) to write them and SegmentationClassAug/"
                )
            list_files = found[:1]
            ids = _read_id_list(list_files[0])
        duplicates = len(ids) - len(set(ids))
        if duplicates:
            raise ValueError(f"{' + '.join(map(str, list_files))} list {duplicates} image id(s) more than once")
        val_file = lists / "val.txt"
        if val_file.is_file():
            leaked = sorted(set(ids) & set(_read_id_list(val_file)))
            if leaked:
                raise ValueError(
                    f"{' + '.join(map(str, list_files))} contain {len(leaked)} id(s) of {val_file} (e.g. {leaked[0]}): "
                    "the augmented training set must exclude the validation images"
                )
        return ids, list_files

    def _label_path(self, image_id: str, listed_in: str) -> Path:
        official = self.root / "SegmentationClass" / f"{image_id}.png"
        if official.is_file():
            return official
        augmented = self.root / "SegmentationClassAug" / f"{image_id}.png"
        if self.split == "trainaug" and augmented.is_file():
            return augmented
        searched = f"{official}" + (f" or {augmented}" if self.split == "trainaug" else "")
        raise FileNotFoundError(f"label map of id {image_id!r} listed in {listed_in} does not exist: {searched}")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image = read_rgb(self.images[index])
        label_path = self.labels[index]
        with Image.open(label_path) as label:
            # np.asarray of a palette image gives the indices, which are the class ids; converting it to "L" or
            # "RGB" would give colours instead.
            if label.mode not in ("P", "L"):
                raise ValueError(
                    f"label map {label_path} has mode {label.mode}; expected a palette (P) or grey (L) PNG of class "
                    "ids (colour-coded RGB labels must be turned back into palette indices)"
                )
            mask = np.asarray(label, dtype=np.uint8)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"label map {label_path} is {mask.shape[1]}x{mask.shape[0]} but its image {self.images[index]} is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        return {"image": image, "mask": mask, "path": str(self.images[index])}


# --------------------------------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------------------------------


class COCODetection(CocoDetectionDataset):
    """COCO object detection (``instances_*.json``) as distributed: ``root/annotations/instances_{split}{year}.json``
    and images in ``root/{split}{year}/``. Categories map to contiguous labels 0..79 in category-id order (see
    :class:`~dinov3_pl.data.detection.CocoDetectionDataset`); crowd regions come as ``crowd_boxes``, which
    the evaluation ignores and training leaves out.
    """

    def __init__(self, root: str | Path, split: Literal["train", "val"] = "train", year: int = 2017) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"COCO split must be 'train' or 'val', got {split!r}")
        self.root = Path(root)
        self.split, self.year = split, int(year)
        annotation_file = self.root / "annotations" / f"instances_{split}{self.year}.json"
        image_root = self.root / f"{split}{self.year}"
        if not annotation_file.is_file():
            raise FileNotFoundError(
                f"COCO annotation file {annotation_file} does not exist (unpack annotations_trainval{self.year}.zip "
                "into root, which gives root/annotations/)"
            )
        if not image_root.is_dir():
            raise FileNotFoundError(
                f"COCO image folder {image_root} does not exist (unpack {split}{self.year}.zip into root)"
            )
        super().__init__(image_root, annotation_file)
        self.class_names = tuple(self.class_names)
