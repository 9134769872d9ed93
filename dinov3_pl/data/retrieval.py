"""Image retrieval data: the revisited Oxford / Paris benchmarks as distributed, and a DataModule of [database,
queries] loaders for ``dinov3_pl.modules.retrieval.Retrieval`` (any labelled datasets work too).

Revisited layout (revisitop's ``download.py`` unpacks it so; ``root`` is the dataset's own folder)::

    root/gnd_roxford5k.pkl      # {"imlist": [...], "qimlist": [...], "gnd": [{"bbx", "easy", "hard", "junk"}, ...]}
    root/jpg/<name>.jpg         # database and query images

``imlist`` names the database images (the queries are not among them: the revisited protocol removed them),
``qimlist`` the query images, and ``gnd[q]`` query ``q``'s box ``bbx`` (x1, y1, x2, y2 in pixels, 0-based) and the
database indices of its ``easy`` and ``hard`` positives and of its ``junk`` images.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dinov3_pl.data.datasets import SyntheticShapes, describe_dataset, prepare_datasets
from dinov3_pl.data.decode import DEFAULT_MAX_IMAGE_PIXELS, image_to_rgb, read_rgb
from dinov3_pl.data.samplers import ShardedEvalSampler
from dinov3_pl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_bicubic, to_rgb_array
from dinov3_pl.metrics.retrieval import EASY, HARD, JUNK

__all__ = ["RetrievalDataModule", "RetrievalTransform", "RevisitedDataset", "retrieval_collate"]

_GROUND_TRUTH_KEYS = ("bbx", "easy", "hard", "junk")


def _find_ground_truth(root: Path, name: str | None) -> Path:
    """``root/gnd_<name>.pkl``; with ``name`` unset, the one ``gnd_*.pkl`` in ``root``; revisitop's ``dir_main``
    (the folder above the dataset's) is accepted too when ``name`` is given."""
    if not root.is_dir():
        raise FileNotFoundError(f"revisited dataset folder {root} does not exist")
    if name is not None:
        for candidate in (root / f"gnd_{name}.pkl", root / name / f"gnd_{name}.pkl"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"no gnd_{name}.pkl in {root} (expected root/gnd_{name}.pkl and root/jpg/, as revisitop's download.py "
            "unpacks them; root is the dataset's folder, e.g. .../datasets/roxford5k)"
        )
    found = sorted(root.glob("gnd_*.pkl"))
    if len(found) != 1:
        listed = ", ".join(path.name for path in found) if found else "none"
        raise FileNotFoundError(
            f"{root} needs exactly one ground-truth file gnd_<name>.pkl (found {listed}): point root at the dataset's "
            "folder (e.g. .../datasets/roxford5k, holding gnd_roxford5k.pkl and jpg/) or set name"
        )
    return found[0]


def _read_ground_truth(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            content = pickle.load(file)
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"{path} is not a readable pickle ({error}); download it again") from error
    if not isinstance(content, Mapping) or not {"imlist", "qimlist", "gnd"} <= set(content):
        got = sorted(content) if isinstance(content, Mapping) else type(content).__name__
        raise ValueError(f"{path} must hold a dict with 'imlist', 'qimlist' and 'gnd' (revisitop's format); got {got}")
    if len(content["gnd"]) != len(content["qimlist"]):
        raise ValueError(
            f"{path} has {len(content['qimlist'])} query images (qimlist) but {len(content['gnd'])} ground-truth "
            "entries (gnd); they must pair up"
        )
    num_database = len(content["imlist"])
    for query, entry in enumerate(content["gnd"]):
        missing = [key for key in _GROUND_TRUTH_KEYS if key not in entry]
        if missing:
            raise ValueError(f"{path}: gnd[{query}] has no {missing} (each entry needs {list(_GROUND_TRUTH_KEYS)})")
        for key in ("easy", "hard", "junk"):
            indices = np.asarray(entry[key], dtype=np.int64).reshape(-1)
            outside = indices[(indices < 0) | (indices >= num_database)]
            if outside.size:
                raise ValueError(
                    f"{path}: gnd[{query}]['{key}'] holds database index {int(outside[0])}, outside the "
                    f"{num_database} images of imlist"
                )
    return dict(content)


class RevisitedDataset(Dataset):
    """Revisited Oxford or Paris (``roxford5k`` / ``rparis6k``, Radenović et al. 2018) read as revisitop distributes it.

    ``split="database"``: the ``imlist`` images, samples ``{"image", "label": -1, "path"}``. ``split="queries"``:
    the ``qimlist`` images cropped to their ``bbx`` as the revisited protocol requires (revisitop's
    ``example_process_images.py``: ``PIL.Image.crop(bbx)``, which rounds the corners; the box is clipped to the
    image), samples ``{"image", "label": -1, "relevance", "path"}`` where ``relevance`` is uint8 [database size]:
    ``metrics.retrieval.EASY`` / ``HARD`` / ``JUNK`` at the database indices the ground truth lists, 0 elsewhere.

    Args:
        root: the dataset's folder, holding ``gnd_<name>.pkl`` and ``jpg/``.
        split: ``"database"`` or ``"queries"``.
        name: ``roxford5k``, ``rparis6k``, ...; ``None`` reads the one ``gnd_*.pkl`` in ``root``.
        crop_queries: crop queries to their box (the protocol). ``False`` reproduces evaluations that used whole
            query images (facebookresearch/dino's ``eval_image_retrieval.py``); their numbers are not comparable.
        max_image_pixels: decoding limit (``dinov3_pl.data.decode.read_rgb``).

    Every listed image must exist (checked here, one error naming the first missing file): a missing database image
    would silently change every query's ranking. Images keep their stored pixel order (no EXIF rotation), the frame
    the boxes were drawn in.
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["database", "queries"] = "database",
        name: str | None = None,
        crop_queries: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if split not in ("database", "queries"):
            raise ValueError(f"RevisitedDataset split must be 'database' or 'queries', got {split!r}")
        self.root = Path(root)
        self.ground_truth_file = _find_ground_truth(self.root, name)
        self.name = self.ground_truth_file.stem.removeprefix("gnd_")
        content = _read_ground_truth(self.ground_truth_file)
        self.image_dir = self.ground_truth_file.parent / "jpg"
        self.split = split
        self.crop_queries = bool(crop_queries)
        self.max_image_pixels = max_image_pixels
        self.database_names: list[str] = [str(item) for item in content["imlist"]]
        self.query_names: list[str] = [str(item) for item in content["qimlist"]]
        self.ground_truth: list[dict[str, Any]] = [dict(entry) for entry in content["gnd"]]
        self.names = self.database_names if split == "database" else self.query_names
        self.paths = [self.image_dir / f"{stem}.jpg" for stem in self.names]
        missing = [path for path in self.paths if not path.is_file()]
        if missing:
            listed = "imlist" if split == "database" else "qimlist"
            raise FileNotFoundError(
                f"{len(missing)} of the {len(self.paths)} {split} images listed in {self.ground_truth_file.name} "
                f"({listed}) are missing, e.g. {missing[0]}: unpack the {self.name} images into {self.image_dir}"
            )

    @property
    def num_database(self) -> int:
        return len(self.database_names)

    def __len__(self) -> int:
        return len(self.paths)

    def relevance(self, query: int) -> np.ndarray:
        """Relevance codes of query ``query`` over the database, uint8 [database size]."""
        codes = np.zeros(self.num_database, dtype=np.uint8)
        entry = self.ground_truth[query]
        for key, code in (("easy", EASY), ("hard", HARD), ("junk", JUNK)):
            codes[np.asarray(entry[key], dtype=np.int64).reshape(-1)] = code
        return codes

    def query_box(self, query: int, width: int, height: int) -> tuple[int, int, int, int]:
        """Query ``query``'s crop (left, top, right, bottom): PIL's rounding of ``bbx``, clipped to the image."""
        x1, y1, x2, y2 = (round(float(value)) for value in self.ground_truth[query]["bbx"])
        left, top = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
        right, bottom = min(max(x2, left + 1), width), min(max(y2, top + 1), height)
        return left, top, right, bottom

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            image = read_rgb(path, max_image_pixels=self.max_image_pixels, apply_exif_orientation=False)
        except (OSError, ValueError, SyntaxError) as error:
            # Not skipped: every database image takes part in every query's ranking.
            raise ValueError(f"cannot decode {self.split} image {path}: {error}") from error
        sample: dict[str, Any] = {"image": image, "label": -1, "path": str(path)}
        if self.split == "queries":
            if self.crop_queries:
                left, top, right, bottom = self.query_box(index, image.shape[1], image.shape[0])
                sample["image"] = np.ascontiguousarray(image[top:bottom, left:right])
            sample["relevance"] = self.relevance(index)
        return sample


class RetrievalTransform:
    """Resize keeping the aspect ratio so that the longer side is ``image_size`` (bicubic, antialiased), each side
    then rounded to a multiple of ``size_multiple`` (the patch size: the backbone needs whole patches), normalise.

    facebookresearch/dino's ``eval_image_retrieval.py`` resizes so (``thumbnail`` to 224, no crop); nothing is
    cropped away, since a landmark can be anywhere in the picture.
    """

    def __init__(
        self,
        image_size: int = 224,
        size_multiple: int = 16,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if image_size < size_multiple or size_multiple < 1:
            raise ValueError(
                f"image_size ({image_size}) must be at least size_multiple ({size_multiple}), which must be >= 1"
            )
        self.image_size, self.size_multiple = int(image_size), int(size_multiple)
        self._scale = (255.0 * np.asarray(std, dtype=np.float32)).reshape(1, 1, 3)
        self._offset = (255.0 * np.asarray(mean, dtype=np.float32)).reshape(1, 1, 3)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        scale = self.image_size / max(height, width)
        multiple = self.size_multiple

        def side(length: int) -> int:
            return max(multiple, int(length * scale / multiple + 0.5) * multiple)  # halves round up

        return side(height), side(width)

    def __call__(self, image: Any) -> Tensor:
        image = to_rgb_array(image)
        height, width = self.output_size(*image.shape[:2])
        image = resize_bicubic(image, width, height)
        normalised = (image.astype(np.float32) - self._offset) / self._scale
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


class _RetrievalSamples(Dataset):
    """A contract dataset's samples as ``{"image": tensor, "label", "index"[, "relevance"]}``."""

    def __init__(self, base: Dataset, transform: RetrievalTransform, name: str) -> None:
        self.base, self.transform, self.name = base, transform, name

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.base[index]
        if sample is None:  # an unreadable file a dataset chose to skip
            return None
        if not isinstance(sample, Mapping) or "image" not in sample:
            got = f"a dict with keys {sorted(sample)}" if isinstance(sample, Mapping) else type(sample).__name__
            raise TypeError(
                f"{self.name} sample {index} is {got}; samples must be dicts with 'image' (PIL image or uint8 "
                "[H, W, 3]) and 'label' (int, -1 when unknown) or 'relevance' (queries of a ground-truth benchmark)"
            )
        image = sample["image"]
        if isinstance(image, Image.Image):
            image = image_to_rgb(image)
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            got = f"{image.dtype} array {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise TypeError(f"{self.name} sample {index} has a {got} image; expected a PIL image or uint8 [H, W, 3]")
        item = {"image": self.transform(image), "label": int(sample.get("label", -1)), "index": index}
        if "relevance" in sample:
            item["relevance"] = torch.as_tensor(np.asarray(sample["relevance"], dtype=np.uint8))
        return item


def retrieval_collate(samples: Sequence[dict[str, Any] | None]) -> dict[str, Tensor | int]:
    """Stacks samples into ``{"images", "labels", "indices"[, "relevance"], "num_bad_images"}``; ``None`` samples
    are dropped and counted. Images of one batch must have one size."""
    kept = [sample for sample in samples if sample is not None]
    batch: dict[str, Tensor | int] = {"num_bad_images": len(samples) - len(kept)}
    if not kept:
        batch.update(images=torch.empty(0), labels=torch.empty(0, dtype=torch.long), indices=torch.empty(0).long())
        return batch
    sizes = sorted({tuple(sample["image"].shape[-2:]) for sample in kept})
    if len(sizes) > 1:
        raise ValueError(
            f"a batch holds images of sizes {sizes}: retrieval keeps each image's aspect ratio, so images of "
            "different shapes cannot be stacked; set the data's batch_size: 1"
        )
    batch["images"] = torch.stack([sample["image"] for sample in kept]).float()
    batch["labels"] = torch.tensor([sample["label"] for sample in kept], dtype=torch.long)
    batch["indices"] = torch.tensor([sample["index"] for sample in kept], dtype=torch.long)
    with_relevance = sum("relevance" in sample for sample in kept)
    if with_relevance == len(kept):
        batch["relevance"] = torch.stack([sample["relevance"] for sample in kept])
    elif with_relevance:
        raise ValueError("some samples of a batch have 'relevance' and others not; a split must be one or the other")
    return batch


class RetrievalDataModule(L.LightningDataModule):
    """``[database, queries]`` loaders (the ``BankQueryEvaluation`` contract) for ``Retrieval``, as val and test.

    The datasets are any of the sample contract (docs/datasets.md): a ground-truth benchmark
    (``RevisitedDataset(split="database")`` and ``RevisitedDataset(split="queries")``, whose query samples carry
    ``relevance`` over the database) or labelled datasets (positives = the query's label: ``SyntheticShapes``,
    ``ImageFolder(with_labels=True)``, ...). Both ``None``: the embedded ``SyntheticShapes``, a 512-image database
    (seed ``seed``) and 128 queries (seed ``seed + 1``).

    Args:
        database, queries: the two datasets.
        image_size: the longer side after resizing (``RetrievalTransform``; aspect ratio kept, nothing cropped).
        size_multiple: each side is rounded to a multiple of it: the backbone's patch size.
        batch_size: images per batch; ``1`` for benchmarks whose images differ in shape (a batch holds one size).
        num_workers: loader processes.
        mean, std: normalisation.
        seed: seed of the default synthetic datasets.
    """

    def __init__(
        self,
        database: Dataset | None = None,
        queries: Dataset | None = None,
        image_size: int = 224,
        size_multiple: int = 16,
        batch_size: int = 1,
        num_workers: int = 0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # Datasets stay out of checkpoints and hparams; the CLI's config.yaml records how they were built.
        self.save_hyperparameters(ignore=["database", "queries"])
        if (database is None) != (queries is None):
            given, absent = ("database", "queries") if queries is None else ("queries", "database")
            raise ValueError(
                f"RetrievalDataModule got {given} but no {absent}: pass both, or neither for the embedded "
                "SyntheticShapes"
            )
        if database is None:
            database = SyntheticShapes(512, image_size=64, seed=seed)
            queries = SyntheticShapes(128, image_size=64, seed=seed + 1)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.transform = RetrievalTransform(image_size, size_multiple, mean, std)
        self.datasets: dict[str, Dataset] = {"database": database, "queries": queries}
        self._splits: dict[str, Dataset] = {}

    def prepare_data(self) -> None:
        prepare_datasets(self.datasets.values())

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        for split, data in self.datasets.items():
            if len(data) == 0:
                raise ValueError(f"the {split} dataset ({describe_dataset(data)}) is empty")
        self._splits = {
            split: _RetrievalSamples(data, self.transform, f"{split} dataset ({describe_dataset(data)})")
            for split, data in self.datasets.items()
        }

    def split(self, name: str) -> Dataset:
        """The transformed ``database`` or ``queries`` dataset."""
        if not self._splits:
            self.setup()
        return self._splits[name]

    def _loader(self, name: str) -> DataLoader:
        dataset = self.split(name)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=ShardedEvalSampler(dataset),  # each image once over the DDP ranks
            num_workers=self.hparams.num_workers,
            collate_fn=retrieval_collate,
            persistent_workers=self.hparams.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader("database"), self._loader("queries")]

    test_dataloader = val_dataloader
