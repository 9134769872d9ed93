"""experiments/demo/compare_eval.py (the demo's last step): both backbones through a task's config, overrides
passed to every run, one table."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from tests.helpers import save_tiny_ssl_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "img_size": 32}


def test_knn_table_for_the_checkpoint_and_random_init_with_overrides(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("compare_eval", REPO_ROOT / "experiments/demo/compare_eval.py")
    compare_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_eval)
    checkpoint = save_tiny_ssl_checkpoint(tmp_path / "tiny.ckpt", TINY)
    monkeypatch.chdir(REPO_ROOT)  # the task configs are repository paths
    overrides = [
        "--override=--data.init_args.train.init_args.num_samples=64",
        "--override=--data.init_args.val.init_args.num_samples=32",
        "--override=--model.init_args.ks=[10, 20]",  # no k = 200: that column must come out empty
    ]
    monkeypatch.setattr(sys, "argv", ["compare_eval.py", f"--checkpoint={checkpoint}", "--tasks", "knn", *overrides])
    compare_eval.main()
    out = capsys.readouterr().out
    rows = {
        name: values
        for name, values in re.findall(r"^((?:pretrained|random)[^\n]*?)\s{2,}(\S+%\s+\S+%\s+\S+%)$", out, re.M)
    }
    assert list(rows) == [
        "pretrained teacher, CLS",
        "pretrained teacher, [CLS, mean patch]",
        "random init, [CLS, mean patch]",
    ]
    for values in rows.values():
        k10, k20, k200 = (float(v.rstrip("%")) for v in values.split())
        assert 0.0 <= k10 <= 100.0 and 0.0 <= k20 <= 100.0 and k200 != k200  # NaN: the ks override reached the runs
    assert "overrides: --data.init_args.train.init_args.num_samples=64" in out and "margin (top-1 k=20)" in out
