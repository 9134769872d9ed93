"""Smoke test of experiments/fashion_mnist/run.py: the whole pipeline (CLI pretraining with the CPU-budget YAML,
kNN/linear against raw pixels and random init, scenes, segmentation, detection, hparams, figures) on tiny fake idx
files, with the hidden ``--budget smoke`` sizes."""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_KEYS = ("knn_top1_k10", "knn_top1_k20", "knn_top1_k200", "linear_top1", "seg_miou", "det_map50")


def _load_run_module():
    spec = importlib.util.spec_from_file_location("fashion_mnist_run", REPO_ROOT / "experiments/fashion_mnist/run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _fake_garments(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright rectangles whose width depends on the class (so pixels carry the label), on a black background."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    images = np.zeros((count, 28, 28), np.uint8)
    for image, label in zip(images, labels, strict=True):
        half_width = 2 + label
        top = 4
        image[top : 28 - top, 14 - half_width : 14 + half_width] = rng.integers(150, 256)
    return images, labels


@pytest.fixture
def fake_fashion_root(tmp_path: Path) -> Path:
    root = tmp_path / "fmnist"
    root.mkdir()
    for prefix, count, seed in (("train", 200, 0), ("t10k", 80, 1)):
        images, labels = _fake_garments(count, seed)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def test_smoke_budget_writes_results_json(tmp_path, fake_fashion_root):
    run = _load_run_module()
    torch.manual_seed(0)
    out = tmp_path / "run"
    data = run.main(["--budget", "smoke", "--out", str(out), "--fmnist-root", str(fake_fashion_root)])

    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(data))
    assert results["budget"] == "smoke" and results["complete"] is True
    for key in ("protocol", "rows", "wall_time_s", "hardware", "tensorboard_dir"):
        assert key in results
    rows = {row["method"]: row for row in results["rows"]}
    assert set(rows) == {
        "raw pixels",
        "random init, CLS",
        "random init, [CLS, mean patch]",
        "DINOv3 pretrained, CLS",
        "DINOv3 pretrained, [CLS, mean patch]",
    }
    for method in ("random init, [CLS, mean patch]", "DINOv3 pretrained, [CLS, mean patch]"):
        for key in NOTEBOOK_KEYS:
            assert 0.0 <= rows[method][key] <= 1.0, (method, key)
    # Class-dependent widths are trivially separable from raw pixels: the kNN code must find that.
    assert rows["raw pixels"]["knn_top1_k10"] > 0.95
    assert results["protocol"]["pretraining"]["optimizer_steps"] == 3

    # The notebook's reader accepts the file; TensorBoard has one run per stage plus the hparams summaries.
    from dinov3_pl import viz

    viz.load_results(out / "results.json")
    tb = out / "tb"
    runs = {p.parent.relative_to(tb).as_posix() for p in tb.rglob("*tfevents*")}
    assert any(run.startswith("ssl_smoke_e32d1p4_g28l12x4_b16_s3") for run in runs), runs
    assert {"seg_smoke/pretrained", "det_smoke/random_init", "summary_smoke/raw_pixels"} <= runs
    # The HPARAMS tab: hparams plus the row's final metrics, per method.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = EventAccumulator(str(tb / "summary_smoke" / "dinov3_pretrained_cls_mean_patch")).Reload()
    assert summary.PluginTagToContent("hparams")
    logged = summary.Scalars("hp/knn_top1_k10")[-1].value
    assert logged == pytest.approx(rows["DINOv3 pretrained, [CLS, mean patch]"]["knn_top1_k10"], abs=1e-4)
    assert (out / "figures" / "smoke_pca.png").is_file() and (out / "figures" / "smoke_losses.png").is_file()
