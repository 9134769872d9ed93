"""The notebooks run end to end (tiny settings, executed by nbclient) and the viz helpers they use are correct."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient

from dinov3_pl import viz
from tests.helpers import save_tiny_ssl_checkpoint

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TINY_BACKBONE = {"depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 8}


# ---------------------------------------------------------------------------------------------- running notebooks
@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A kernelspec that starts ipykernel with this interpreter, so no globally registered kernel is needed."""
    folder = tmp_path_factory.mktemp("kernels")
    spec = folder / "dinov3pl-test"
    spec.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "dinov3-pl test", "language": "python"})
    )
    return folder


def run_notebook(name: str, parameters: dict, kernel_dir: Path, timeout: int = 120) -> nbformat.NotebookNode:
    """Executes ``notebooks/<name>`` from the notebooks folder, ``parameters`` assigned at the end of the cell
    tagged ``parameters`` (as papermill does), so the notebook's other defaults stay."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [cell for cell in notebook.cells if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name} must have exactly one cell tagged 'parameters'"
    tagged[0].source += "".join(f"\n{key} = {value!r}" for key, value in parameters.items())
    manager = KernelManager(
        kernel_name="dinov3pl-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    )
    client = NotebookClient(notebook, km=manager, timeout=timeout, resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        client.execute()  # raises CellExecutionError (with the traceback) if a cell fails
    finally:
        # A kernel left running keeps zmq threads in this process, and a later fork-based test can deadlock.
        if manager.has_kernel:
            manager.shutdown_kernel(now=True)
    return notebook


def outputs_of(notebook: nbformat.NotebookNode) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def text_of(notebook: nbformat.NotebookNode) -> str:
    parts = []
    for output in outputs_of(notebook):
        parts.append(output.get("text", ""))
        parts += [output.get("data", {}).get(kind, "") for kind in ("text/plain", "text/markdown")]
    return "\n".join(parts)


def png_count(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {}) for output in outputs_of(notebook))


def test_committed_notebooks_have_no_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"clear the outputs of {path.name}"


def test_quickstart_runs_from_a_tiny_dinov3_pl_checkpoint(kernel_dir, tmp_path):
    # The path the notebook documents for own checkpoints: WEIGHTS = a .ckpt, ARCH = None (read from the ckpt).
    save_tiny_ssl_checkpoint(tmp_path / "tiny.ckpt", TINY_BACKBONE)
    notebook = run_notebook(
        "quickstart.ipynb",
        {"WEIGHTS": str(tmp_path / "tiny.ckpt"), "ARCH": None, "IMAGE_SIZE": 64, "NUM_SHAPES": 8, "TOP_K": 3},
        kernel_dir,
    )
    text = text_of(notebook)
    assert f"depth 2, dim 64, patch 8, weights: {tmp_path / 'tiny.ckpt'}" in text
    assert "14 images of 64x64" in text
    assert "'patch': (14, 64, 64)" in text  # 6 photos + 8 shapes, (64 / 8)^2 patches, dim 64
    assert "kNN (k=8) accuracy on 8 new shapes" in text
    assert png_count(notebook) == 3  # images, retrieval, PCA maps


def test_fashion_mnist_results_without_results_file_stops_gracefully(kernel_dir, tmp_path):
    notebook = run_notebook("fashion_mnist_results.ipynb", {"RESULTS": str(tmp_path / "missing.json")}, kernel_dir)
    assert "No results file" in text_of(notebook) and "experiments/fashion_mnist/README.md" in text_of(notebook)
    assert png_count(notebook) == 0


def write_fake_experiment(root: Path) -> Path:
    """A results.json plus TensorBoard logs (two runs, scalars and a PCA image) like the experiment writes."""
    from torch.utils.tensorboard import SummaryWriter

    log_root = root / "tensorboard"
    for run, scale in (("pretrain/version_0", 1.0), ("pretrain/version_1", 0.5)):
        writer = SummaryWriter(str(log_root / run))
        for step in range(5):
            writer.add_scalar("train/loss_total", scale * (10 - step), step)
            writer.add_scalar("train/ibot", scale * (5 - step), step)
        writer.add_scalar("knn/top1_k20", 0.3 * scale, 4)
        writer.add_image("pca_patch_features", torch.rand(3, 16, 24) * scale, 4)
        writer.close()
    rows = [
        {"method": "random init", "knn_top1_k10": 0.1, "knn_top1_k20": 0.11, "knn_top1_k200": None},
        {"method": "dinov3-pl tiny", "knn_top1_k10": 0.8125, "linear_top1": 0.85, "seg_miou": 0.5, "det_map50": None},
    ]
    results = {
        "budget": "test",
        "protocol": {"dataset": "Fashion-MNIST"},
        "rows": rows,
        "wall_time_s": 90.0,
        "hardware": "2 CPU cores",
        "tensorboard_dir": str(log_root),
    }
    path = root / "results.json"
    path.write_text(json.dumps(results))
    return path


def test_fashion_mnist_results_shows_table_curves_and_pca_image(kernel_dir, tmp_path):
    results = write_fake_experiment(tmp_path)
    notebook = run_notebook("fashion_mnist_results.ipynb", {"RESULTS": str(results)}, kernel_dir)
    text = text_of(notebook)
    assert "budget 'test', wall time 1.5 min" in text
    assert "| dinov3-pl tiny | 81.2 | - | - | 85.0 | 50.0 | - |" in text
    assert "pretrain/version_0" in text and "pretrain/version_1" in text
    assert png_count(notebook) == 2  # training curves, PCA image


# ---------------------------------------------------------------------------------------------- viz helpers
def test_cosine_top_k_matches_brute_force_and_skips_self():
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(20, 5, generator=generator)
    queries = bank[[3, 7]] * 2.0  # scaling must not change cosine neighbours
    similarities, indices = viz.cosine_top_k(queries, bank, k=4, exclude=torch.tensor([3, 7]))
    for row, query in enumerate(queries):
        brute = [
            (float(np.dot(query, b) / np.linalg.norm(query) / np.linalg.norm(b)), j) for j, b in enumerate(bank.numpy())
        ]
        brute = sorted((s, j) for s, j in brute if j != [3, 7][row])[::-1][:4]
        assert indices[row].tolist() == [j for _, j in brute]
        np.testing.assert_allclose(similarities[row].numpy(), [s for s, _ in brute], rtol=1e-5)
    with pytest.raises(ValueError, match="larger than"):
        viz.cosine_top_k(queries, bank, k=20, exclude=torch.tensor([3, 7]))


def test_extract_features_matches_backbone_and_restores_train_mode():
    from dinov3_pl.models.backbone import DINOv3Backbone

    torch.manual_seed(0)
    backbone = DINOv3Backbone(**TINY_BACKBONE, img_size=32).train()
    images = torch.randn(5, 3, 32, 32)
    features = viz.extract_features(backbone, images, batch_size=2)
    assert backbone.training
    with torch.no_grad():
        reference = backbone.eval()(images)
    torch.testing.assert_close(features["cls"], reference["cls"])
    torch.testing.assert_close(features["mean_patch"], reference["patch"].mean(1))
    torch.testing.assert_close(features["cls_mean_patch"], torch.cat([reference["cls"], reference["patch"].mean(1)], 1))


def test_pca_maps_colour_the_dominant_direction():
    # Patches on one side of the grid point one way, the rest the other: the first component splits them.
    patch = torch.randn(1, 16, 8) * 0.01
    patch[0, :8, 0] += 5.0
    maps = viz.pca_maps(patch, (4, 4), size=(8, 8))
    assert maps.shape == (1, 8, 8, 3) and maps.min() >= 0 and maps.max() <= 1
    first = maps[0, :, :, 0]
    assert abs(first[:4].mean() - first[4:].mean()) > 0.9  # top half (patches 0-7) vs bottom half


def test_skimage_photos_are_rgb_uint8():
    photos = viz.skimage_photos(["astronaut", "camera"])
    assert [p.shape[-1] for p in photos.values()] == [3, 3] and all(p.dtype == np.uint8 for p in photos.values())
    np.testing.assert_array_equal(photos["camera"][..., 0], photos["camera"][..., 2])
    with pytest.raises(ValueError, match="no image called"):
        viz.skimage_photos(["not_an_image"])


def test_results_table_and_loader(tmp_path):
    table = viz.results_markdown_table([{"method": "a", "knn_top1_k10": 0.5}], metrics=("knn_top1_k10", "seg_miou"))
    assert table.splitlines() == ["| method | knn_top1_k10 | seg_miou |", "|---|---|---|", "| a | 50.0 | - |"]
    extra = viz.results_markdown_table([{"method": "a", "knn_top1_k100": 0.25}, {"method": "b", "linear_top5": 1}])
    assert extra.splitlines()[0].endswith("| det_map50 | knn_top1_k100 | linear_top5 |")
    assert extra.splitlines()[2] == "| a | - | - | - | - | - | - | 25.0 | - |"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="missing keys"):
        viz.load_results(bad)
    assert viz.find_path(bad.name, tmp_path) == tmp_path / bad.name
    assert viz.find_path("does/not/exist.json", tmp_path) is None


def test_tensorboard_readers_return_what_was_written(tmp_path):
    results = write_fake_experiment(tmp_path)
    log_dir = json.loads(results.read_text())["tensorboard_dir"]
    scalars = viz.read_tensorboard_scalars(log_dir, ["train/loss_total", "not/logged"])
    assert sorted(scalars) == ["pretrain/version_0", "pretrain/version_1"]
    steps, values = scalars["pretrain/version_1"]["train/loss_total"]
    np.testing.assert_array_equal(steps, np.arange(5))
    np.testing.assert_allclose(values, 0.5 * (10 - np.arange(5)))
    image, step = viz.read_tensorboard_image(log_dir)
    assert image.shape == (16, 24, 3) and image.dtype == np.uint8 and step == 4
    assert viz.read_tensorboard_image(log_dir, "absent") is None
