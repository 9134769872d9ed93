"""experiments/small_data/ablate.py: every variant's overrides are options of its base config (a typo would cost a
whole ablation run), and the table reads the recorded results."""

from __future__ import annotations

import json

import pytest

from dinov3_pl.cli import main as cli_main
from experiments.small_data.ablate import STUDIES, table, variant_args


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_every_variant_override_is_an_option_of_the_base_config(study, tmp_path, capsys):
    overrides = [override for _, variant in STUDIES[study]["variants"].values() for override in variant]
    args = variant_args(STUDIES[study], overrides, steps=10, run_dir=tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err


def test_table_lists_finished_variants_in_study_order(tmp_path):
    (tmp_path / "embedded").mkdir()
    for name, k10, k20 in (("koleo_0", 0.186, 0.184), ("base", 0.348, 0.363)):
        metrics = {"knn/top1_k10@256": k10, "knn/top1_k20@128": 0.3, "knn/top1_k20@256": k20, "train/koleo": 0.03}
        result = {"what": name, "steps": 256, "wall_s": 60.0, "metrics": metrics}
        (tmp_path / "embedded" / f"{name}.json").write_text(json.dumps(result))
    rows = table("embedded", tmp_path).splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["base", "koleo_0"]
    assert "| 34.8 | 30.0 → 36.3 |" in rows[0]
