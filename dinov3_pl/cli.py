"""``dinov3-pl``: LightningCLI over every LightningModule and DataModule of the package.

``dinov3-pl fit --config configs/pretrain/demo_cpu.yaml``; ``--print_config`` shows every option. Model and data are
chosen by ``class_path`` (any LightningModule / LightningDataModule subclass, including a user's own).

A mistake in the configuration ends in one line that says what to change, not in the parser's usage text and
Union report: the unknown key with the closest valid one, a value of the wrong type with the key it was given to,
the message of the error raised while building the model, data or trainer, or why a ``--ckpt_path`` file cannot be
read. Set ``JSONARGPARSE_DEBUG=1`` for the full report and traceback.

Checkpoints are written by ``SafeModelCheckpoint`` (configured under ``checkpoint:``, ``save_last`` on, so
``--ckpt_path last`` resumes): atomic writes, healthy states only, a resumable checkpoint on SIGUSR1/SIGTERM, and
``last`` skips unreadable files (see ``dinov3_pl.checkpointing``). ``predict`` saves its configuration next to the
model's ``output`` file (``features.pt`` -> ``features.config.yaml``), the record of which weights and images made
those features, and nowhere when the model names no output file; the other subcommands save ``config.yaml`` in the
run's log folder, as Lightning does.

``dinov3-pl export WEIGHTS --format {ckpt,timm,hf} --out PATH`` writes one backbone as a slim checkpoint, a timm
state dict or a Hugging Face folder (``dinov3_pl.export``, docs/export.md).

``dinov3-pl evaluate --suite configs/suite/embedded.yaml --weights W --output DIR`` runs one backbone on every task of
a suite (each task one run of this CLI, resumable) and writes one table; ``dinov3-pl evaluate --compare DIR DIR`` puts
finished result folders side by side (``dinov3_pl.suite``, docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from dinov3_pl.checkpointing import (
    SafeModelCheckpoint,
    UnreadableCheckpointError,
    checkpoint_problem,
    newest_readable_checkpoint,
)

__all__ = [
    "CommandLineError",
    "DINOv3ArgumentParser",
    "DINOv3CLI",
    "SaveConfig",
    "explain_parse_error",
    "main",
    "trainer_defaults",
]

DEBUG_HINT = "JSONARGPARSE_DEBUG=1 shows the full report"


def trainer_defaults() -> dict:
    """bf16 mixed precision on a GPU, fp32 on the CPU."""
    return {"precision": "bf16-mixed" if torch.cuda.is_available() else "32-true"}


def _debugging() -> bool:
    from jsonargparse._common import debug_mode_active  # the switch jsonargparse itself honours

    return debug_mode_active()


class CommandLineError(SystemExit):
    """A command line that cannot run, with the one line that says what to change (``message``). ``main`` writes
    it to stderr; ``dinov3-pl evaluate`` runs the CLI itself and names the task in front of it."""

    def __init__(self, tip: str, message: str, status: int) -> None:
        super().__init__(status)
        self.tip = tip
        self.message = " ".join(str(message).split())

    def write(self) -> None:
        """The CLI's error output: the tip, then the line (last, where the eye lands)."""
        sys.stderr.write(f"{self.tip}\nerror: {self.message}\n")


def _fail(tip: str, message: str, status: int) -> typing.NoReturn:
    raise CommandLineError(tip, message, status)


# ----------------------------------------------------------------------------------------------- parse errors
_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)':")
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted")
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (.+)")
_GIVEN_VALUE = re.compile(r"^Given value: (.*)")
_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value type:|"
    r"Expected a <class 'NoneType'>)"
)


@dataclasses.dataclass
class _Leaf:
    """One failure in jsonargparse's nested report, with the keys and classes that lead to it."""

    text: str
    keys: list[str]  # parser keys from the top, e.g. ["model", "optim"]
    class_path: str | None  # the innermost class the failure belongs to
    given: str | None = None


def _leaves(message: str) -> list[_Leaf]:
    """Splits jsonargparse's indented error report into its failures (its format as of jsonargparse 4.53)."""
    stack: list[tuple[int, str, str]] = []  # (indent, "key" | "class", value)
    leaves: list[_Leaf] = []
    for raw in message.splitlines():
        text = raw.strip()
        if text.startswith("- "):
            text = text[2:]
        if not text:
            continue
        indent = len(raw) - len(raw.lstrip(" -"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if match := _PARSER_KEY.match(text):
            stack.append((indent, "key", match.group(1)))
        elif match := _CLASS_PATH.match(text):
            stack.append((indent, "class", match.group(1)))
        elif match := _GIVEN_VALUE.match(text):
            for leaf in reversed(leaves):
                if leaf.given is None:
                    leaf.given = match.group(1)
                    break
        elif not _NOISE.match(text):
            classes = [value for _, kind, value in stack if kind == "class"]
            keys = [value for _, kind, value in stack if kind == "key"]
            leaves.append(_Leaf(text, keys, classes[-1] if classes else None))
    return leaves


def _import(class_path: str) -> type | None:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(__import__(module_name, fromlist=[name]), name)
    except Exception:
        return None


def _options(cls: type) -> dict[str, Any]:
    """The keyword options of ``cls`` (dataclass fields or ``__init__`` parameters) and their types."""
    try:
        hints = typing.get_type_hints(cls if dataclasses.is_dataclass(cls) else cls.__init__)
    except Exception:
        hints = {}
    if dataclasses.is_dataclass(cls):
        return {field.name: hints.get(field.name) for field in dataclasses.fields(cls) if field.init}
    parameters = inspect.signature(cls.__init__).parameters.values()
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {p.name: hints.get(p.name) for p in parameters if p.name != "self" and p.kind not in kinds}


def _class_of(annotation: Any) -> type | None:
    """The class an option holds (``OptimConfig`` for ``OptimConfig | None``), if any."""
    candidates = typing.get_args(annotation) or (annotation,)
    return next((c for c in candidates if inspect.isclass(c) and c is not type(None)), None)


def _initials(name: str) -> str:
    return "".join(word[0] for word in name.split("_") if word)


def _closest(name: str, valid: list[str]) -> str | None:
    """The valid name the user most likely meant: the same name in another case, an abbreviation by initials either
    way (``lr`` for ``learning_rate``: difflib rates those two 0.27), else difflib's closest."""
    for candidate in valid:
        if candidate.lower() == name.lower():
            return candidate
        if ("_" in name and candidate == _initials(name)) or ("_" in candidate and _initials(candidate) == name):
            return candidate
    matches = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _unknown_option(prefix: str, cls: type, relative_key: str) -> str:
    """``prefix.relative_key`` is not an option: say so with the closest valid key, descending nested option
    classes (``optim.learning_rate`` -> ``OptimConfig``)."""
    parts = relative_key.split(".")
    owner, walked = cls, []
    for index, part in enumerate(parts):
        options = _options(owner)
        if part in options and index < len(parts) - 1 and (nested := _class_of(options[part])) is not None:
            owner, walked = nested, [*walked, part]
            continue
        if part in options:
            break
        where = ".".join(filter(None, [prefix, *walked]))
        bad, owner_prefix = (f"{where}.{part}", f"{where}.") if where else (part, "")
        guess = _closest(part, sorted(options))
        if guess:
            return f"{bad}: {owner.__name__} has no option {part!r}; did you mean {owner_prefix}{guess}?"
        return f"{bad}: {owner.__name__} has no option {part!r}; its options: {', '.join(sorted(options))}"
    return f"{prefix}.{relative_key}: not accepted by {cls.__name__}"


def _unknown_argument(argument: str, parser: Any) -> str:
    """An unrecognized top-level ``--key=value``, with the closest option of the (sub)command's parser."""
    key = argument.lstrip("-").split("=", 1)[0]
    options = sorted({dest for action in parser._actions if (dest := getattr(action, "dest", None))})
    parent, _, name = key.rpartition(".")
    siblings = [option.rpartition(".")[2] for option in options if option.rpartition(".")[0] == parent]
    guess = _closest(name, siblings)
    if guess:
        return f"{key}: no such option; did you mean --{parent + '.' if parent else ''}{guess}?"
    groups = sorted({option.split(".", 1)[0] for option in options})
    first = key.split(".", 1)[0]
    guess = _closest(first, groups) if first not in groups else None
    if guess:
        return f"{key}: no such option; did you mean --{guess}{key[len(first) :]}?"
    return f"{key}: no such option (--help lists them)"


def explain_parse_error(message: str, parser: Any) -> str:
    """One line that says what to change, from jsonargparse's error report (the report itself when unrecognised)."""
    leaves = _leaves(message)
    if not leaves:
        return message
    # The deepest failure is the specific one: "Option 'x' is not accepted" rather than "Expected a path".
    leaf = max(leaves, key=lambda item: (len(item.keys) + (item.class_path is not None), -leaves.index(item)))
    top, nested = (leaf.keys[0], leaf.keys[1:]) if leaf.keys else (None, [])
    in_class = leaf.class_path is not None and top is not None
    prefix = ".".join(filter(None, [top, "init_args" if in_class else None, *nested]))
    cls = _import(leaf.class_path) if leaf.class_path else None
    if leaf.class_path and cls is None:
        return f"{top}: class_path {leaf.class_path} cannot be imported: {leaf.text}"
    if (match := _NOT_ACCEPTED.match(leaf.text)) and cls is not None:
        return _unknown_option(prefix, cls, match.group(1))
    if match := _UNRECOGNIZED.match(leaf.text):
        argument = match.group(1).split()[0]
        if cls is not None:
            return _unknown_option(prefix, cls, argument.lstrip("-").split("=", 1)[0])
        return _unknown_argument(argument, parser)
    text = re.sub(r"<class '([\w.]+)'>", r"\1", leaf.text)
    text = re.sub(r"^Expected a (.+?)\. Got value: (.*)$", r"expected \1, got \2", text)
    text = re.sub(r"^Expected a ", "expected ", text)
    given = leaf.given
    if given is not None and text.startswith("expected ") and "got " not in text and not given.startswith("NestedArg("):
        text = f"{text}, got {given}" if len(given) < 200 else text
    return f"{prefix}: {text}" if prefix else text


class DINOv3ArgumentParser(LightningArgumentParser):
    """Lightning's parser whose errors end in one line saying what to change (``explain_parse_error``)."""

    def error(self, message: str, ex: Exception | None = None) -> typing.NoReturn:
        if not self.exit_on_error or _debugging():
            super().error(message, ex)  # raises instead of exiting
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        _fail(f"tip: `{prog} --help` lists every option; {DEBUG_HINT}", explain_parse_error(message, parser), 2)


# ----------------------------------------------------------------------------------------------- configs saved
class SaveConfig(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback``; for ``predict`` the config goes next to the model's ``output`` file
    (``features.pt`` -> ``features.config.yaml``), or nowhere when the model names none: predict runs have no log
    folder, and Lightning's fallback is the current working directory."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            super().setup(trainer, pl_module, stage)
            return
        output = getattr(pl_module, "hparams", {}).get("output")
        if output and trainer.is_global_zero and not self.already_saved:
            path = Path(output).with_suffix(".config.yaml")
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)
        self.already_saved = True


# ------------------------------------------------------------------------------------------------------ CLI
class DINOv3CLI(LightningCLI):
    """LightningCLI with the project's trainer defaults, concise errors, configs saved where they belong, and a
    ``SafeModelCheckpoint`` that is always there (configured under ``checkpoint:``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("trainer_defaults", trainer_defaults())
        kwargs.setdefault("save_config_callback", SaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", DINOv3ArgumentParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(SafeModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the hyper-parameters of a --ckpt_path file right here (torch.load): check the file first,
        # so that a missing, truncated or corrupt one is one line, not torch's PytorchStreamReader traceback.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and _is_local_checkpoint_path(str(ckpt_path)):
            problem = checkpoint_problem(ckpt_path)
            if problem is not None:
                _fail(
                    f"tip: `--ckpt_path last` resumes from the newest readable checkpoint of the run; {DEBUG_HINT}",
                    f"--ckpt_path {ckpt_path}: {problem}; {_alternative(Path(ckpt_path))}",
                    2,
                )
        super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:
            if _debugging():
                raise
            cause = _root_cause(error)
            built = re.search(r"class_path='([\w.]+)'", str(error))  # jsonargparse's report names the class
            _fail(
                f"tip: the configuration parsed, building its classes failed; {DEBUG_HINT} and the traceback",
                f"{built.group(1) + ': ' if built else ''}{type(cause).__name__}: {cause}",
                1,
            )

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except UnreadableCheckpointError as error:  # from --ckpt_path last when no candidate reads back
            if _debugging():
                raise
            _fail(f"tip: {DEBUG_HINT} and the traceback", str(error), 2)


def _is_local_checkpoint_path(ckpt_path: str) -> bool:
    """A file path, not one of Lightning's names ("last", "best", "hpc", "registry...") nor a URL."""
    return ckpt_path not in ("last", "best", "hpc") and not ckpt_path.startswith("registry") and "://" not in ckpt_path


def _alternative(bad: Path) -> str:
    newest, _ = newest_readable_checkpoint(bad.parent) if bad.parent.is_dir() else (None, [])
    if newest is not None and newest.resolve() != bad.resolve():
        return f"the newest readable checkpoint there is {newest}"
    return "pass another checkpoint file"


def _root_cause(error: BaseException) -> BaseException:
    """The exception the user's configuration raised, under jsonargparse's wrappers."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def main(args: list[str] | None = None) -> DINOv3CLI:
    """Runs the CLI in-process (``args`` as on the command line) and returns it, for tests and notebooks."""
    try:
        return DINOv3CLI(args=args)
    except CommandLineError as error:
        error.write()
        raise


def console_main(args: list[str] | None = None) -> None:
    """The ``dinov3-pl`` console script: exit status 0 on success (a returned object would become status 1).

    ``dinov3-pl export ...`` and ``dinov3-pl evaluate ...`` are dispatched before LightningCLI parses anything
    (``dinov3_pl.export`` builds no model or trainer; ``dinov3_pl.suite`` runs this CLI once per task); every other
    command line goes to LightningCLI untouched.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:
        from dinov3_pl.export import main as export_main

        export_main(argv[1:])
        return
    if argv[:1] == ["evaluate"]:
        from dinov3_pl.suite import main as evaluate_main

        evaluate_main(argv[1:])
        return
    main(args)


if __name__ == "__main__":
    console_main()
