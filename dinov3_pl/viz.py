"""Small helpers the notebooks share: photos, feature extraction, retrieval, PCA maps, results and TensorBoard logs.

Everything here is plain functions so the notebooks stay short and the logic is tested (tests/test_notebooks.py).
torch, matplotlib and TensorBoard are imported inside the functions that need them, so reading results and logs
starts fast.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = [
    "DEFAULT_PHOTOS",
    "RESULT_METRICS",
    "cosine_top_k",
    "denormalise",
    "extract_features",
    "find_path",
    "load_results",
    "pca_maps",
    "read_tensorboard_image",
    "read_tensorboard_scalars",
    "results_markdown_table",
    "show_images",
    "show_retrieval",
    "plot_scalars",
    "skimage_photos",
]

# Colour photos that ship inside scikit-image (no download).
DEFAULT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "colorwheel")
RESULT_METRICS = ("knn_top1_k10", "knn_top1_k20", "knn_top1_k200", "linear_top1", "seg_miou", "det_map50")
REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- images, features
def skimage_photos(names: Sequence[str] = DEFAULT_PHOTOS) -> dict[str, np.ndarray]:
    """The named ``skimage.data`` images as uint8 [H, W, 3] RGB arrays (grey replicated, alpha dropped)."""
    import skimage.data

    photos = {}
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"skimage.data has no image called {name!r}")
        image = np.asarray(loader())
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        photos[name] = np.ascontiguousarray(image[..., :3].astype(np.uint8))
    return photos


def denormalise(images: Tensor) -> np.ndarray:
    """ImageNet-normalised [B, 3, H, W] tensors -> float [B, H, W, 3] arrays in [0, 1] for plotting."""
    import torch

    from dinov3_pl.callbacks.pca import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.detach().cpu().float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def extract_features(backbone: torch.nn.Module, images: Tensor, batch_size: int = 16) -> dict[str, Tensor]:
    """Runs a ``DINOv3Backbone`` in eval mode. Returns ``cls`` [B, D], ``mean_patch`` [B, D], ``patch`` [B, N, D]
    and ``cls_mean_patch`` [B, 2D] (the evaluation feature of the linear protocol)."""
    import torch

    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        outputs = [backbone(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    backbone.train(was_training)
    cls = torch.cat([out["cls"] for out in outputs]).float()
    patch = torch.cat([out["patch"] for out in outputs]).float()
    mean_patch = patch.mean(dim=1)
    return {"cls": cls, "mean_patch": mean_patch, "patch": patch, "cls_mean_patch": torch.cat([cls, mean_patch], 1)}


def cosine_top_k(queries: Tensor, bank: Tensor, k: int, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` bank rows most cosine-similar to each query: (similarities [Q, k], indices [Q, k]), best first.

    ``exclude`` [Q] gives, per query, one bank index to skip (the query itself when queries are part of the bank).
    """
    import torch
    from torch.nn import functional as F

    if k > len(bank) - (exclude is not None):
        raise ValueError(f"k={k} is larger than the {len(bank)} bank entries available")
    similarity = F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    if exclude is not None:
        similarity[torch.arange(len(queries)), exclude] = float("-inf")
    return similarity.topk(k, dim=1)


def pca_maps(patch: Tensor, grid_hw: tuple[int, int], size: tuple[int, int] | None = None) -> np.ndarray:
    """First 3 PCA components of [B, N, D] patch features (one PCA over all images) as float [B, h, w, 3] RGB,
    upsampled (nearest) to ``size`` when given."""
    from torch.nn import functional as F

    from dinov3_pl.callbacks.pca import pca_rgb

    maps = pca_rgb(patch, grid_hw)
    if size is not None:
        maps = F.interpolate(maps, size=size, mode="nearest")
    return maps.permute(0, 2, 3, 1).numpy()


def show_images(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[Sequence[str]] | None = None, size=2.0):
    """A grid figure, one image per cell (rows of equal length); returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    num_rows, num_cols = len(rows), max(len(row) for row in rows)
    figure, axes = plt.subplots(num_rows, num_cols, figsize=(size * num_cols, size * num_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(num_cols):
            axes[r, c].axis("off")
            if c < len(row):
                axes[r, c].imshow(row[c])
                if titles is not None:
                    axes[r, c].set_title(titles[r][c], fontsize=8)
    figure.tight_layout()
    return figure


def show_retrieval(images: np.ndarray, names: Sequence[str], query_indices, similarities: Tensor, indices: Tensor):
    """One row per query: the query, then its neighbours with their cosine similarity."""
    rows, titles = [], []
    for row, query in enumerate(query_indices):
        rows.append([images[query]] + [images[j] for j in indices[row].tolist()])
        titles.append(
            [f"query: {names[query]}"]
            + [f"{names[j]}\n{s:.3f}" for j, s in zip(indices[row].tolist(), similarities[row].tolist(), strict=True)]
        )
    return show_images(rows, titles)


# --------------------------------------------------------------------------------------------- results, logs
def find_path(path: str | Path, *bases: str | Path) -> Path | None:
    """``path`` if it exists as given (absolute or from the working directory), else under the first of ``bases``
    (then the repository root) where it exists; ``None`` when it is nowhere."""
    path = Path(path)
    candidates = [path] + ([] if path.is_absolute() else [Path(base) / path for base in (*bases, REPO_ROOT)])
    return next((candidate for candidate in candidates if candidate.exists()), None)


def load_results(path: str | Path) -> dict[str, Any]:
    """Reads an experiment ``results.json`` and checks the keys the results notebook uses."""
    with open(path) as handle:
        results = json.load(handle)
    missing = {"budget", "rows"} - set(results)
    if missing:
        raise ValueError(f"{path} is not an experiment results file: missing keys {sorted(missing)}")
    for row in results["rows"]:
        if "method" not in row:
            raise ValueError(f"{path}: every row needs a 'method', got {row}")
    return results


def results_markdown_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None = None) -> str:
    """Markdown table, one line per method; metrics as percentages with one decimal, missing ones as '-'.

    ``metrics=None`` shows the standard columns (``RESULT_METRICS``) followed by any other key the rows have.
    """
    if metrics is None:
        extra = [key for row in rows for key in row if key != "method" and key not in RESULT_METRICS]
        metrics = [*RESULT_METRICS, *dict.fromkeys(extra)]

    def cell(value: Any) -> str:
        return "-" if value is None else f"{100 * float(value):.1f}"

    lines = ["| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines += [f"| {row['method']} | " + " | ".join(cell(row.get(m)) for m in metrics) + " |" for row in rows]
    return "\n".join(lines)


def _event_runs(log_dir: str | Path) -> dict[str, Path]:
    """Every folder under ``log_dir`` holding TensorBoard event files, keyed by its path relative to ``log_dir``."""
    log_dir = Path(log_dir)
    folders = sorted({event.parent for event in log_dir.rglob("*tfevents*")})
    return {str(folder.relative_to(log_dir)) if folder != log_dir else ".": folder for folder in folders}


def _accumulator(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # 0 keeps every scalar; images: only the last few are wanted.
    return EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 4}).Reload()


def read_tensorboard_scalars(log_dir: str | Path, tags: Sequence[str] | None = None) -> dict[str, dict]:
    """``{run: {tag: (steps array, values array)}}`` for every run (event-file folder) under ``log_dir``;
    only ``tags`` when given (missing tags are left out)."""
    scalars: dict[str, dict] = {}
    for run, folder in _event_runs(log_dir).items():
        accumulator = _accumulator(folder)
        available = accumulator.Tags().get("scalars", [])
        wanted = [tag for tag in (tags if tags is not None else available) if tag in available]
        series = {}
        for tag in wanted:
            events = accumulator.Scalars(tag)
            series[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events]))
        if series:
            scalars[run] = series
    return scalars


def read_tensorboard_image(log_dir: str | Path, tag: str = "pca_patch_features") -> tuple[np.ndarray, int] | None:
    """The last image logged under ``tag`` in any run under ``log_dir`` as (uint8 [H, W, C], step), or ``None``."""
    from PIL import Image

    latest = None
    for folder in _event_runs(log_dir).values():
        accumulator = _accumulator(folder)
        if tag in accumulator.Tags().get("images", []):
            event = accumulator.Images(tag)[-1]
            if latest is None or event.step >= latest.step:
                latest = event
    if latest is None:
        return None
    return np.asarray(Image.open(io.BytesIO(latest.encoded_image_string))), latest.step


def plot_scalars(scalars: Mapping[str, Mapping[str, tuple]], tags: Sequence[str], columns: int = 3):
    """One panel per tag, one line per run; returns the matplotlib Figure (``None`` if no tag has data)."""
    import matplotlib.pyplot as plt

    present = [tag for tag in tags if any(tag in series for series in scalars.values())]
    if not present:
        return None
    num_rows = -(-len(present) // columns)
    figure, axes = plt.subplots(num_rows, columns, figsize=(4 * columns, 3 * num_rows), squeeze=False)
    for axis in axes.flat[len(present) :]:
        axis.axis("off")
    for axis, tag in zip(axes.flat, present, strict=False):
        for run, series in scalars.items():
            if tag in series:
                steps, values = series[tag]
                axis.plot(steps, values, label=run, marker="." if len(steps) < 20 else None)
        axis.set_title(tag, fontsize=9)
        axis.set_xlabel("step")
        if len(scalars) > 1:
            axis.legend(fontsize=7)
    figure.tight_layout()
    return figure
