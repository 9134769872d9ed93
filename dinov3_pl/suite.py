"""``dinov3-pl evaluate``: one backbone on every task of a suite YAML, and result folders side by side.

    dinov3-pl evaluate --suite configs/suite/embedded.yaml --weights runs/demo/checkpoints/last.ckpt \\
        --output runs/suite/teacher
    dinov3-pl evaluate --suite configs/suite/embedded.yaml --weights runs/demo/checkpoints/last.ckpt --random-init \\
        --output runs/suite/random
    dinov3-pl evaluate --compare runs/suite/teacher runs/suite/random

A task is an evaluation config (``configs/eval/*.yaml``), the stage to run it with (``fit``, ``validate``,
``test``), the metric keys to report and overrides of that config. The backbone is given once and reaches every task
as its ``model.init_args.{arch, weights, backbone_kwargs}``. Each task runs in-process through ``dinov3_pl.cli`` in
its own folder ``OUTPUT/<task>/`` (TensorBoard logs, checkpoints, ``task.json`` = what it runs, ``result.json`` =
every metric it logged once it finished, with the code version that ran it). Running the same command again skips
finished tasks and resumes an unfinished ``fit`` from its newest readable checkpoint; a folder that holds a run of
another backbone, config or overrides is refused rather than mixed in. At the end ``OUTPUT/results.json``,
``OUTPUT/results.md`` (the table) and TensorBoard hparams (backbone and metrics, ``tensorboard --logdir`` on the
parent folder lists the backbones side by side). docs/evaluation.md describes the YAML format."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml

from dinov3_pl.checkpointing import StoppedBySignal, newest_readable_checkpoint

__all__ = [
    "Backbone",
    "Metric",
    "SuiteError",
    "Task",
    "compare_tables",
    "load_suite",
    "main",
    "make_backbone",
    "read_results",
    "run_suite",
]

STAGES = ("fit", "validate", "test")
TASK_FIELDS = ("config", "stage", "metrics", "overrides")
RESULT_FILE = "result.json"
SPEC_FILE = "task.json"
MISSING = "—"


@functools.cache
def code_version() -> dict[str, Any]:
    """What produced a result: the dinov3-pl version, its git commit and whether the checkout had local changes
    (``None`` outside a git checkout, e.g. an installed wheel), and the versions of the libraries that set the
    numerics. Read once per process (two git calls), not once per task."""
    import lightning
    import timm

    from dinov3_pl import __version__

    source = Path(__file__).resolve().parent

    def git(*arguments: str) -> str | None:
        try:
            done = subprocess.run(["git", *arguments], cwd=source, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "dinov3_pl": __version__,
        "commit": commit,
        "modified": bool(changes) if changes is not None else None,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
    }


class SuiteError(ValueError):
    """A mistake in the suite, its backbone or an output folder: the message is the one line that says what to
    change."""


# ------------------------------------------------------------------------------------------------ the suite file
@dataclass(frozen=True)
class Metric:
    key: str  # as the task's module logs it (Lightning's callback metrics), e.g. "knn/top1_k20"
    label: str
    percent: bool = True  # a fraction shown x 100 (accuracy, mIoU, mAP); False for e.g. an RMSE


@dataclass(frozen=True)
class Task:
    name: str
    config: str
    stage: str
    metrics: tuple[Metric, ...]
    overrides: dict[str, Any] = field(default_factory=dict)

    def cli_arguments(self) -> list[str]:
        return [
            self.stage,
            "--config",
            self.config,
            *(_cli_argument(key, value) for key, value in self.overrides.items()),
        ]


def _cli_argument(key: str, value: Any) -> str:
    # JSON is YAML, so jsonargparse reads lists, dicts, null and booleans back as the suite file wrote them.
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def _closest_hint(name: str, valid: Sequence[str]) -> str:
    from dinov3_pl.cli import _closest

    guess = _closest(name, list(valid))
    return f"did you mean {guess}?" if guess else f"choose from {', '.join(valid)}"


def _parse_metrics(where: str, value: Any) -> tuple[Metric, ...]:
    """``{key: label}``, ``{key: {label: ..., percent: false}}`` or a list of keys (the key is its label)."""
    if isinstance(value, list) and value and all(isinstance(key, str) for key in value):
        return tuple(Metric(key, key) for key in value)
    if not isinstance(value, dict) or not value:
        raise SuiteError(f"{where}: metrics must map each metric key to its label, e.g. {{knn/top1_k20: top-1 k=20}}")
    metrics = []
    for key, spec in value.items():
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"label", "percent"})
            if unknown or not isinstance(spec.get("percent", True), bool):
                raise SuiteError(f"{where}: metric {key} takes {{label: TEXT, percent: true|false}}, got {spec}")
            metrics.append(Metric(str(key), str(spec.get("label", key)), spec.get("percent", True)))
        else:
            metrics.append(Metric(str(key), str(key if spec is None else spec)))
    return tuple(metrics)


def _parse_task(suite: Path, name: str, entry: Any) -> Task:
    where = f"{suite}, task {name}"
    if not isinstance(entry, dict):
        raise SuiteError(f"{where}: expected a mapping with {', '.join(TASK_FIELDS)}, got {entry!r}")
    for key in entry:
        if key not in TASK_FIELDS:
            raise SuiteError(f"{where}: unknown field {key!r}; {_closest_hint(str(key), TASK_FIELDS)}")
    for required in ("config", "stage", "metrics"):
        if required not in entry:
            raise SuiteError(f"{where}: the field {required!r} is missing")
    config = Path(str(entry["config"]))
    if not config.is_file():
        known = sorted(path.name for path in config.parent.glob("*.yaml")) if config.parent.is_dir() else []
        hint = f"; {_closest_hint(config.name, known)}" if known else " (paths are relative to the current folder)"
        raise SuiteError(f"{where}: config {config} does not exist{hint}")
    if entry["stage"] not in STAGES:
        raise SuiteError(f"{where}: stage {entry['stage']!r} is not one of {', '.join(STAGES)}")
    overrides = entry.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SuiteError(f"{where}: overrides must map config keys to values, e.g. {{trainer.max_epochs: 2}}")
    return Task(name, str(config), entry["stage"], _parse_metrics(where, entry["metrics"]), dict(overrides))


def load_suite(path: str | Path, only: Sequence[str] | None = None) -> list[Task]:
    """The tasks of a suite YAML (``tasks: {name: {config, stage, metrics, overrides}}``), in file order, or only
    those named in ``only`` (in that order)."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite {path} does not exist")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SuiteError(f"suite {path} is not valid YAML: {' '.join(str(error).split())}") from error
    if not isinstance(document, dict) or not isinstance(document.get("tasks"), dict) or not document["tasks"]:
        raise SuiteError(f"suite {path}: expected a mapping `tasks: {{name: {{config, stage, metrics}}}}`")
    unknown = sorted(set(document) - {"tasks"})
    if unknown:
        raise SuiteError(f"suite {path}: unknown top-level key {unknown[0]!r}; the tasks go under `tasks:`")
    tasks = {name: _parse_task(path, str(name), entry) for name, entry in document["tasks"].items()}
    if only:
        for name in only:
            if name not in tasks:
                raise SuiteError(f"--tasks {name}: suite {path} has no such task; {_closest_hint(name, list(tasks))}")
        return [tasks[name] for name in only]
    return list(tasks.values())


# ------------------------------------------------------------------------------------------------ the backbone
@dataclass(frozen=True)
class Backbone:
    """The backbone every task evaluates: weights (a dinov3-pl ``.ckpt`` records its architecture), an architecture
    (timm name + overrides) for other weights or at random init, or neither (each config's own backbone)."""

    name: str
    weights: str | None = None
    arch: str | None = None
    timm_overrides: dict[str, Any] | None = None
    description: str = ""

    def cli_arguments(self) -> list[str]:
        if self.weights is None and self.arch is None:
            return []
        return [
            _cli_argument("model.init_args.arch", self.arch),
            _cli_argument("model.init_args.weights", self.weights),
            _cli_argument("model.init_args.backbone_kwargs", self.timm_overrides),
        ]

    def record(self) -> dict[str, Any]:
        """What identifies this backbone's results: a retrained checkpoint at the same path is another backbone."""
        record: dict[str, Any] = {"arch": self.arch, "timm_overrides": self.timm_overrides, "weights": self.weights}
        if self.weights is not None:
            stat = Path(self.weights).stat()
            record["weights_file"] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        return record


def _recorded_architecture(weights: str) -> tuple[str, dict[str, Any]] | None:
    """``(arch, timm_overrides)`` that a dinov3-pl ``.ckpt`` records, else ``None``."""
    try:
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    recorded = checkpoint.get("backbone_config") if isinstance(checkpoint, dict) else None
    if not isinstance(recorded, dict) or not recorded.get("arch"):
        return None
    return recorded["arch"], dict(recorded.get("timm_overrides") or {})


def make_backbone(
    name: str,
    weights: str | None = None,
    arch: str | None = None,
    timm_overrides: dict[str, Any] | None = None,
    random_init: bool = False,
) -> Backbone:
    """The backbone of the command line's ``--weights``, ``--arch``, ``--timm-overrides`` and ``--random-init``."""
    shown = weights  # as the user wrote it, for the tables; the runs and the records use the absolute path
    if weights is not None:
        weights = str(Path(weights).expanduser().resolve())
        if not Path(weights).exists():
            raise SuiteError(f"--weights {shown}: no such file or folder")
    if not random_init:
        if weights is None and arch is None:
            return Backbone(name, description="each config's own backbone (random init)")
        if arch is None:  # a dinov3-pl .ckpt records its architecture; other weights fail in the task with a hint
            return Backbone(name, weights=weights, description=f"weights {shown}")
        overrides = f" {json.dumps(timm_overrides)}" if timm_overrides else ""
        return Backbone(name, weights, arch, timm_overrides, f"weights {shown}, {arch}{overrides}")
    if arch is None:
        recorded = _recorded_architecture(weights) if weights is not None else None
        if recorded is None:
            raise SuiteError(
                "--random-init needs the architecture: --weights of a dinov3-pl .ckpt (it records it) or --arch "
                "(and --timm-overrides)"
            )
        arch, timm_overrides = recorded
    description = f"random init, {arch} {json.dumps(timm_overrides or {})}"
    if weights is not None:
        description += f" (the architecture of {shown})"
    return Backbone(name, None, arch, timm_overrides or {}, description)


# ------------------------------------------------------------------------------------------------ running
def _run_cli(task: Task, arguments: list[str]) -> Any:
    """One run of the ``dinov3-pl`` CLI in this process; its errors become a SuiteError naming the task."""
    from dinov3_pl.cli import CommandLineError, DINOv3CLI

    # Lightning's per-run metric tables stay out of the suite's output; LightningCLI warns when it sees both its
    # args and a foreign sys.argv (the suite's own).
    try:
        with contextlib.redirect_stdout(io.StringIO()), mock.patch.object(sys, "argv", sys.argv[:1]):
            return DINOv3CLI(args=arguments)
    except CommandLineError as error:
        raise SuiteError(f"task {task.name} ({task.stage} {task.config}): {error.message}") from error


def _spec(task: Task, backbone: Backbone, settings: Sequence[str]) -> dict[str, Any]:
    """What a task's result depends on: a stored result is reused only when all of it is the same."""
    return {
        "config": task.config,
        "config_content": yaml.safe_load(Path(task.config).read_text()),  # comments may change, values may not
        "stage": task.stage,
        "overrides": task.overrides,
        "settings": list(settings),
        "backbone": backbone.record(),
    }


def _differences(stored: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        keys = list(dict.fromkeys([*stored, *current]))
        return [diff for key in keys for diff in _differences(stored.get(key), current.get(key), f"{prefix}{key}.")]
    return [] if stored == current else [prefix.rstrip(".")]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SuiteError(f"{path} cannot be read ({error}); delete it to run that task again") from error


def _check_same_run(task: Task, folder: Path, spec: dict[str, Any]) -> None:
    for stored_file in (folder / RESULT_FILE, folder / SPEC_FILE):
        if stored_file.exists():
            stored = _read_json(stored_file).get("spec")
            # JSON has no tuples: compare what the file would hold
            differences = _differences(stored, json.loads(json.dumps(spec)))
            if differences:
                raise SuiteError(
                    f"task {task.name}: {folder} holds a run with another {', '.join(differences[:3])}; give another "
                    f"--output or delete {folder} to run it again"
                )
            return


def _logged_metrics(trainer: Any) -> dict[str, float]:
    metrics = {}
    for key, value in trainer.callback_metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            continue
        metrics[key] = float(value)
    return metrics


def _run_task(
    task: Task, backbone: Backbone, settings: Sequence[str], folder: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    spec = _spec(task, backbone, settings)
    _check_same_run(task, folder, spec)
    result_file = folder / RESULT_FILE
    if result_file.exists():
        log(f"{task.name}: finished before, read from {result_file}")
        return _read_json(result_file)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPEC_FILE).write_text(json.dumps({"spec": spec}, indent=2) + "\n")
    arguments = [
        *task.cli_arguments(),
        *backbone.cli_arguments(),
        *settings,
        f"--trainer.default_root_dir={folder}",
        f"--checkpoint.dirpath={folder / 'checkpoints'}",
    ]
    resumed_from = None
    if task.stage == "fit":
        newest, _ = newest_readable_checkpoint(folder / "checkpoints")
        if newest is not None:
            resumed_from = str(newest)
            arguments.append(f"--ckpt_path={newest}")
    log(f"{task.name}: {task.stage} {task.config}" + (f", resuming from {resumed_from}" if resumed_from else ""))
    start = time.perf_counter()
    try:
        cli = _run_cli(task, arguments)
    except StoppedBySignal:
        log(f"{task.name}: stopped by a signal; the same command again resumes it")
        raise
    metrics = _logged_metrics(cli.trainer)
    if resumed_from and not any(metric.key in metrics for metric in task.metrics):
        # The checkpoint was the end of training (stopped between the last save and result.json): the fit loop has
        # nothing left to run and logs nothing, so validate the trained heads instead.
        validate = ["validate", *arguments[1:]]
        metrics = _logged_metrics(_run_cli(task, validate).trainer)
    result = {
        "spec": spec,
        "metrics": metrics,
        "seconds": round(time.perf_counter() - start, 1),
        "resumed_from": resumed_from,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code": code_version(),
    }
    # Written only now: a run that raised or was stopped by a signal leaves task.json alone, so it is resumed.
    partial = result_file.with_suffix(".json.partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(result_file)
    log(f"{task.name}: done in {result['seconds']:.0f} s")
    return result


def _check_arguments(task: Task, backbone: Backbone, settings: Sequence[str]) -> None:
    """Parses the task's full command line (nothing is built): a typo in an override or a setting is found before
    the first task spends its time."""
    from dinov3_pl.cli import CommandLineError, DINOv3CLI

    arguments = [*task.cli_arguments(), *backbone.cli_arguments(), *settings, "--print_config"]
    try:
        with contextlib.redirect_stdout(io.StringIO()), mock.patch.object(sys, "argv", sys.argv[:1]):
            DINOv3CLI(args=arguments)
    except CommandLineError as error:
        raise SuiteError(f"task {task.name} ({task.stage} {task.config}): {error.message}") from error
    except SystemExit as stop:  # --print_config ends with status 0
        if stop.code not in (0, None):
            raise


def _reported(task: Task, result: dict[str, Any]) -> list[dict[str, Any]]:
    metrics = result["metrics"]
    missing = [metric.key for metric in task.metrics if metric.key not in metrics]
    if missing:
        raise SuiteError(
            f"task {task.name}: metric {missing[0]} was not logged by {task.stage} {task.config}; it logged "
            f"{', '.join(sorted(metrics)) or 'nothing'} (fix the suite's metrics: the run is kept and not repeated)"
        )
    return [{"key": m.key, "label": m.label, "percent": m.percent, "value": metrics[m.key]} for m in task.metrics]


def _print_now(line: str) -> None:
    print(line, flush=True)  # progress lines appear as they happen, also when stdout is a file


def run_suite(
    suite: str | Path,
    backbone: Backbone,
    output: str | Path,
    only: Sequence[str] | None = None,
    settings: Sequence[str] = (),
    log: Callable[[str], None] = _print_now,
) -> dict[str, Any]:
    """Runs (or reads back) every task of ``suite`` for ``backbone`` in ``output``; writes and returns its results.

    ``settings``: extra command-line arguments for every task (``--seed_everything=1``), part of what a stored
    result must match.
    """
    tasks = load_suite(suite, only)
    output = Path(output)
    pending = [task for task in tasks if not (output / task.name / RESULT_FILE).exists()]
    for task in pending[1:]:  # the first one parses its command line first thing anyway
        _check_arguments(task, backbone, settings)
    results: dict[str, Any] = {}
    for task in tasks:
        result = _run_task(task, backbone, settings, output / task.name, log)
        results[task.name] = {**result, "reported": _reported(task, result)}
    summary = {
        "name": backbone.name,
        "backbone": backbone.description,
        "suite": str(suite),
        "settings": list(settings),
        "tasks": results,
    }
    (output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = compare_tables([summary])
    (output / "results.md").write_text(table)
    _write_hparams(output, summary)
    return summary


def _write_hparams(output: Path, summary: dict[str, Any]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for old in output.glob("events.out.tfevents.*"):  # one hparams record per folder, the latest results
        old.unlink()
    metrics = {
        f"{task}/{row['key']}": row["value"]
        for task, result in summary["tasks"].items()
        for row in result["reported"]
        if math.isfinite(row["value"])
    }
    hparams = {"backbone": summary["name"], "description": summary["backbone"], "suite": summary["suite"]}
    with SummaryWriter(log_dir=str(output)) as writer:
        writer.add_hparams(hparams, metrics, run_name=".")


# ------------------------------------------------------------------------------------------------ tables
def _format(value: float | None, percent: bool) -> str:
    if value is None:
        return MISSING
    return f"{value * 100:.1f}%" if percent else f"{value:.4g}"


def _format_difference(difference: float | None, percent: bool) -> str:
    if difference is None:
        return MISSING
    return f"{difference * 100:+.1f}" if percent else f"{difference:+.3g}"  # points, or the metric's own unit


def compare_tables(summaries: Sequence[dict[str, Any]]) -> str:
    """One Markdown table: a row per (task, metric), a column per results (and their difference when two)."""
    names = [summary["name"] for summary in summaries]
    rows: dict[tuple[str, str], tuple[str, bool]] = {}  # (task, key) -> (label, percent), in first-seen order
    values: list[dict[tuple[str, str], float]] = []
    for summary in summaries:
        found = {}
        for task, result in summary["tasks"].items():
            for row in result["reported"]:
                rows.setdefault((task, row["key"]), (row["label"], row["percent"]))
                found[(task, row["key"])] = row["value"]
        values.append(found)
    header = ["task", "metric", *names]
    if len(summaries) == 2:
        header.append(f"{names[0]} − {names[1]}")
    lines = [f"| {' | '.join(header)} |", f"| --- | --- |{' ---: |' * (len(header) - 2)}"]
    for (task, key), (label, percent) in rows.items():
        cells = [_format(found.get((task, key)), percent) for found in values]
        if len(summaries) == 2:
            first, second = (found.get((task, key)) for found in values)
            difference = None if first is None or second is None else first - second
            cells.append(_format_difference(difference, percent))
        lines.append(f"| {task} | {label} | {' | '.join(cells)} |")
    notes = [f"- {summary['name']}: {summary['backbone']} ({summary['suite']})" for summary in summaries]
    if any(summary.get("settings") for summary in summaries):
        notes += [f"- {s['name']} settings: {' '.join(s['settings'])}" for s in summaries if s.get("settings")]
    percent_note = "Percentages are metrics x 100" + (", the difference in points" if len(summaries) == 2 else "")
    return "\n".join([*lines, "", *notes, "", f"{percent_note}; {MISSING}: not evaluated.", ""])


def read_results(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise SuiteError(f"--compare {folder}: no results.json there (the --output of `dinov3-pl evaluate --suite`)")
    return _read_json(path)


# ------------------------------------------------------------------------------------------------ the command
class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise SuiteError(f"{message} (`{self.prog} --help` lists the options)")


def _timm_overrides(text: str) -> dict[str, Any]:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{depth: 2}}', got {text}")
    return value


def build_parser(prog: str = "dinov3-pl evaluate") -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=prog,
        description="Evaluate one backbone on every task of a suite YAML (resumable), or compare result folders.",
        epilog="docs/evaluation.md describes the suite format, resuming and comparing.",
    )
    parser.add_argument("--suite", metavar="YAML", help="the tasks, e.g. configs/suite/embedded.yaml")
    parser.add_argument("--output", metavar="DIR", help="the results folder (--compare: also write DIR/comparison.md)")
    parser.add_argument("--weights", metavar="PATH", help="a dinov3-pl .ckpt, an upstream .pth, a HF folder, ...")
    parser.add_argument("--arch", metavar="ARCH", help="timm arch for weights that record none, or at random init")
    parser.add_argument(
        "--timm-overrides", type=_timm_overrides, metavar="YAML", help="e.g. '{depth: 2, embed_dim: 96}' with --arch"
    )
    parser.add_argument("--random-init", action="store_true", help="the architecture of --weights (or --arch) only")
    parser.add_argument("--name", help="the backbone's column in the tables (default: the --output folder's name)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="only these tasks of the suite")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config value for every task, e.g. --set seed_everything=1 (repeatable)",
    )
    parser.add_argument("--compare", nargs="+", metavar="DIR", help="result folders to put side by side")
    return parser


def _settings(pairs: Sequence[str]) -> list[str]:
    settings = []
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key or key.startswith("-"):
            raise SuiteError(f"--set {pair}: expected KEY=VALUE, e.g. --set trainer.max_epochs=2")
        settings.append(f"--{key}={value}")
    return settings


def _evaluate(argv: Sequence[str] | None, prog: str) -> str:
    args = build_parser(prog).parse_args(argv)
    if args.compare:
        if args.suite:
            raise SuiteError("--compare reads finished result folders; run --suite first, then --compare")
        table = compare_tables([read_results(folder) for folder in args.compare])
        if args.output:
            Path(args.output).mkdir(parents=True, exist_ok=True)
            (Path(args.output) / "comparison.md").write_text(table)
        return table
    if not args.suite or not args.output:
        raise SuiteError("give --suite YAML and --output DIR (or --compare DIR DIR ...)")
    if args.timm_overrides is not None and args.arch is None:
        raise SuiteError("--timm-overrides needs --arch (a dinov3-pl .ckpt records both)")
    name = args.name or Path(args.output).resolve().name
    backbone = make_backbone(name, args.weights, args.arch, args.timm_overrides, args.random_init)
    summary = run_suite(args.suite, backbone, args.output, args.tasks, _settings(args.set))
    return compare_tables([summary])


def main(argv: Sequence[str] | None = None, prog: str = "dinov3-pl evaluate") -> None:
    """The ``dinov3-pl evaluate`` command; ``argv`` without the subcommand."""
    try:
        print(_evaluate(argv, prog))
    except SuiteError as error:
        sys.stderr.write(f"error: {' '.join(str(error).split())}\n")
        raise SystemExit(2) from None
