"""``dinov3-pl evaluate``: a suite of tasks for one backbone (tables, hparams, skip on rerun, resume after a signal),
one clear line for a bad suite, and result folders side by side."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
import yaml

import dinov3_pl
from dinov3_pl import suite as suite_module
from dinov3_pl.cli import console_main
from dinov3_pl.cli import main as cli_main
from dinov3_pl.modules.linear_probe import LinearProbe
from tests.helpers import save_tiny_ssl_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "img_size": 32}
QUIET = {"trainer.enable_progress_bar": False, "trainer.enable_model_summary": False}
KNN = {
    "config": "configs/eval/knn_synthetic.yaml",
    "stage": "validate",
    "metrics": {"knn/top1_k10": "top-1 k=10", "knn/top1_k20": "top-1 k=20"},
    "overrides": {
        **QUIET,
        "trainer.logger": False,
        "data.init_args.train.init_args.num_samples": 64,
        "data.init_args.val.init_args.num_samples": 32,
        "model.init_args.ks": [10, 20],
    },
}


def linear_task(train_samples: int) -> dict:
    """A linear probe of train_samples / 16 optimizer steps (one epoch), one learning rate."""
    return {
        "config": "configs/eval/linear_synthetic.yaml",
        "stage": "fit",
        "metrics": {"linear/top1": "top-1"},
        "overrides": {
            **QUIET,
            "trainer.max_epochs": 1,
            "data.init_args.train.init_args.num_samples": train_samples,
            "data.init_args.val.init_args.num_samples": 16,
            "data.init_args.batch_size": 16,
            "model.init_args.learning_rates": [0.01],
        },
    }


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """The repository as the current folder (suites name configs by repository path) and a tiny checkpoint."""
    monkeypatch.chdir(REPO_ROOT)
    return tmp_path, save_tiny_ssl_checkpoint(tmp_path / "tiny.ckpt", TINY)


def write_suite(path: Path, tasks: dict) -> Path:
    path.write_text(yaml.safe_dump({"tasks": tasks}, sort_keys=False))
    return path


def count_runs(monkeypatch) -> list[list[str]]:
    """The command lines of the CLI runs the suite makes (not its parse-only checks)."""
    calls: list[list[str]] = []
    run_cli = suite_module._run_cli

    def counting(task, arguments):
        calls.append(arguments)
        return run_cli(task, arguments)

    monkeypatch.setattr(suite_module, "_run_cli", counting)
    return calls


def test_a_two_task_suite_writes_both_tables_and_hparams_and_a_rerun_skips_the_finished_tasks(workspace, monkeypatch):
    tmp_path, checkpoint = workspace
    suite = write_suite(tmp_path / "suite.yaml", {"knn": KNN, "linear": linear_task(16)})
    output = tmp_path / "teacher"
    runs = count_runs(monkeypatch)
    summary = suite_module.run_suite(suite, suite_module.make_backbone("teacher", str(checkpoint)), output)

    assert [arguments[0] for arguments in runs] == ["validate", "fit"]
    assert all(f"--model.init_args.weights={checkpoint}" in arguments for arguments in runs)  # the backbone, once given
    saved = json.loads((output / "results.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    reported = {
        (task, row["key"]): row["value"] for task, result in saved["tasks"].items() for row in result["reported"]
    }
    assert set(reported) == {("knn", "knn/top1_k10"), ("knn", "knn/top1_k20"), ("linear", "linear/top1")}
    for (task, key), value in reported.items():  # the values are the runs' own logged metrics
        assert value == json.loads((output / task / "result.json").read_text())["metrics"][key]
        assert 0.0 <= value <= 1.0
    table = (output / "results.md").read_text()
    assert table.splitlines()[0] == "| task | metric | teacher |"
    assert f"| knn | top-1 k=20 | {reported[('knn', 'knn/top1_k20')] * 100:.1f}% |" in table
    assert f"| linear | top-1 | {reported[('linear', 'linear/top1')] * 100:.1f}% |" in table
    assert (output / "linear" / "checkpoints" / "last.ckpt").exists()  # each task in its own folder
    code = saved["tasks"]["knn"]["code"]  # what produced the numbers
    assert code["torch"] == torch.__version__ and code["dinov3_pl"] == dinov3_pl.__version__
    assert code["commit"] is None or len(code["commit"]) == 40

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output))
    events.Reload()
    logged = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    assert logged == pytest.approx({f"{task}/{key}": value for (task, key), value in reported.items()})
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")

    result_times = {task: (output / task / "result.json").stat().st_mtime_ns for task in ("knn", "linear")}
    again = suite_module.run_suite(suite, suite_module.make_backbone("teacher", str(checkpoint)), output)
    assert len(runs) == 2  # nothing ran again
    assert {task: (output / task / "result.json").stat().st_mtime_ns for task in result_times} == result_times
    assert again["tasks"] == summary["tasks"]


def test_a_fit_stopped_by_a_signal_resumes_from_its_checkpoint(workspace, monkeypatch):
    tmp_path, checkpoint = workspace
    suite = write_suite(tmp_path / "suite.yaml", {"linear": linear_task(32)})  # two optimizer steps
    backbone = suite_module.make_backbone("teacher", str(checkpoint))
    steps: list[int] = []
    training_step = LinearProbe.training_step

    def step_then_preempt(self, batch, batch_idx):
        steps.append(self.trainer.global_step)
        if len(steps) == 1:  # the scheduler's preemption signal arrives during the first step
            os.kill(os.getpid(), signal.SIGUSR1)
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(LinearProbe, "training_step", step_then_preempt)
    runs = count_runs(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        suite_module.run_suite(suite, backbone, tmp_path / "out", log=lambda line: None)
    assert stop.value.code == 128 + signal.SIGUSR1 and steps == [0]
    assert not (tmp_path / "out" / "linear" / "result.json").exists()

    summary = suite_module.run_suite(suite, backbone, tmp_path / "out", log=lambda line: None)
    last = tmp_path / "out" / "linear" / "checkpoints" / "last.ckpt"
    assert runs[1][-1] == f"--ckpt_path={last}" and summary["tasks"]["linear"]["resumed_from"] == str(last)
    assert steps == [0, 1]  # the second run trained only the step the first one had not
    import torch

    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2


def run_command(capsys, arguments: list[str]) -> list[str]:
    with pytest.raises(SystemExit) as stop:
        console_main(["evaluate", *arguments])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and not any(line.startswith("Traceback") for line in lines), lines
    return lines


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"config": "configs/eval/knn_synthetc.yaml"},
            "task knn: config configs/eval/knn_synthetc.yaml does not exist; did you mean knn_synthetic.yaml?",
        ),
        ({"stge": "validate"}, "task knn: unknown field 'stge'; did you mean stage?"),
        ({"stage": "train"}, "task knn: stage 'train' is not one of fit, validate, test"),
        (
            {"overrides": {**KNN["overrides"], "model.init_args.k": [10]}},
            "task knn (validate configs/eval/knn_synthetic.yaml): model.init_args.k: KNN has no option 'k'; did you "
            "mean model.init_args.ks?",
        ),
    ],
)
def test_a_bad_task_entry_is_one_line_before_anything_runs(workspace, monkeypatch, capsys, change, expected):
    tmp_path, checkpoint = workspace
    suite = write_suite(tmp_path / "suite.yaml", {"first": KNN, "knn": {**KNN, **change}})
    runs = count_runs(monkeypatch)
    lines = run_command(capsys, ["--suite", str(suite), "--weights", str(checkpoint), "--output", str(tmp_path / "o")])
    assert lines[-1].endswith(expected) and runs == []


def test_an_unknown_metric_key_names_the_logged_ones_and_the_fixed_suite_reuses_the_run(workspace, monkeypatch, capsys):
    tmp_path, checkpoint = workspace
    metrics = {"knn/top1_k10": "top-1 k=10", "knn/top1_k200": "top-1 k=200"}  # ks is [10, 20]: no k=200
    suite = write_suite(tmp_path / "suite.yaml", {"knn": {**KNN, "metrics": metrics}})
    command = ["--suite", str(suite), "--weights", str(checkpoint), "--output", str(tmp_path / "o")]
    runs = count_runs(monkeypatch)
    lines = run_command(capsys, command)
    assert re.fullmatch(
        r"error: task knn: metric knn/top1_k200 was not logged by validate configs/eval/knn_synthetic.yaml; it logged "
        r".*knn/top1_k20, .*\(fix the suite's metrics: the run is kept and not repeated\)",
        lines[-1],
    )
    write_suite(suite, {"knn": {**KNN, "metrics": {"knn/top1_k10": "top-1 k=10", "knn/top1_k20": "top-1 k=20"}}})
    console_main(["evaluate", *command])
    assert len(runs) == 1 and "| knn | top-1 k=20 |" in capsys.readouterr().out


def test_compare_puts_two_result_folders_in_one_table_equal_to_direct_runs(workspace, capsys):
    tmp_path, checkpoint = workspace
    suite = write_suite(tmp_path / "suite.yaml", {"knn": KNN})
    setting = "data.init_args.val.init_args.num_samples=24"  # for every task, over the task's own 32
    for name, extra in (("teacher", []), ("random", ["--random-init"])):
        output = str(tmp_path / name)
        command = ["--suite", str(suite), "--weights", str(checkpoint), *extra, "--output", output, "--set", setting]
        console_main(["evaluate", *command])
    capsys.readouterr()
    console_main(
        ["evaluate", "--compare", str(tmp_path / "teacher"), str(tmp_path / "random"), "--output", str(tmp_path)]
    )
    table = capsys.readouterr().out
    assert table == (tmp_path / "comparison.md").read_text() + "\n"

    # Independently: the config run directly with the checkpoint's architecture and no weights (the teacher's column
    # is its own result.json, whose run got the checkpoint: the first test).
    knn = [
        "validate",
        "--config",
        KNN["config"],
        *(suite_module._cli_argument(k, v) for k, v in KNN["overrides"].items()),
        f"--{setting}",
        f"--model.init_args.backbone_kwargs={json.dumps(TINY)}",
    ]
    random = cli_main(knn).trainer.callback_metrics
    teacher = json.loads((tmp_path / "teacher" / "knn" / "result.json").read_text())["metrics"]
    lines = table.splitlines()
    assert lines[0] == "| task | metric | teacher | random | teacher − random |"
    for label, key in (("top-1 k=10", "knn/top1_k10"), ("top-1 k=20", "knn/top1_k20")):
        first, second = float(teacher[key]), float(random[key])
        assert f"| knn | {label} | {first * 100:.1f}% | {second * 100:.1f}% | {(first - second) * 100:+.1f} |" in lines
    assert f"- random: random init, vit_small_patch16_dinov3 {json.dumps(TINY)} (the architecture of " in table
    assert f"- teacher settings: --{setting}" in lines

    # A folder keeps one backbone's results: another backbone, or the checkpoint retrained in place, is refused.
    teacher_folder = tmp_path / "teacher"
    command = ["--suite", str(suite), "--weights", str(checkpoint), "--output", str(teacher_folder), "--set", setting]
    lines = run_command(capsys, [*command, "--random-init"])
    assert lines[-1] == (
        f"error: task knn: {teacher_folder / 'knn'} holds a run with another backbone.arch, backbone.timm_overrides, "
        f"backbone.weights; give another --output or delete {teacher_folder / 'knn'} to run it again"
    )
    os.utime(checkpoint, ns=(checkpoint.stat().st_atime_ns, checkpoint.stat().st_mtime_ns + 1))
    lines = run_command(capsys, command)
    assert lines[-1].startswith(
        f"error: task knn: {teacher_folder / 'knn'} holds a run with another backbone.weights_file"
    )


def test_the_table_of_hand_made_results_shows_percentages_raw_values_and_missing_tasks():
    def summary(name: str, tasks: dict) -> dict:
        return {
            "name": name,
            "backbone": f"{name} weights",
            "suite": "s.yaml",
            "tasks": {
                task: {"reported": [{"key": k, "label": k, "percent": p, "value": v} for k, p, v in rows]}
                for task, rows in tasks.items()
            },
        }

    first = summary("a", {"knn": [("top1", True, 0.5)], "depth": [("rmse", False, 1.2281)]})
    second = summary("b", {"depth": [("rmse", False, 1.2762)], "video": [("JF", True, 0.25)]})
    lines = suite_module.compare_tables([first, second]).splitlines()
    assert lines[:5] == [
        "| task | metric | a | b | a − b |",
        "| --- | --- | ---: | ---: | ---: |",
        "| knn | top1 | 50.0% | — | — |",
        "| depth | rmse | 1.228 | 1.276 | -0.0481 |",
        "| video | JF | — | 25.0% | — |",
    ]
