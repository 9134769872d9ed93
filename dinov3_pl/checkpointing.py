"""Checkpoints that survive the faults of long runs.

``SafeModelCheckpoint`` is Lightning's ``ModelCheckpoint`` (same options, the CLI's ``checkpoint:`` group) plus:

- **Atomic, durable writes.** It installs ``AtomicCheckpointIO`` when the strategy uses Lightning's default
  ``TorchCheckpointIO``: the checkpoint is streamed into a hidden ``.NAME.PID.partial`` file in the checkpoint folder,
  fsynced, then ``os.replace``d over ``NAME``, and the folder is fsynced. A write killed half-way leaves the previous
  file intact and only a ``.partial`` file, which no resolution picks up (it does not end in ``.ckpt``) and the next
  fit removes. Lightning's own writer serialises the whole checkpoint into memory, writes it to the system temp
  folder and moves it: when that folder is another file system (tmpfs ``/tmp``, node-local disk) the move is a copy,
  and a copy killed half-way leaves a truncated ``last.ckpt``; it never fsyncs.
- **Only healthy states.** No checkpoint is written while any parameter of the LightningModule is non-finite or
  while ``pl_module.checkpoint_veto()`` (optional) returns a reason; the previous files stay, one warning gives the
  reason, and ``last_good_checkpoint`` names the newest file written from a healthy state.
- **Preemption.** On SIGUSR1 or SIGTERM (``preemption_signals``) training stops at the next optimizer-step
  boundary: it writes the ``last`` checkpoint there (the same save as ``every_n_train_steps``, so resuming is exact)
  and exits with status 128 + the signal number (143 for SIGTERM, 138 for SIGUSR1), the shell's code for "ended by
  that signal": the run is not finished, and schedulers that restart failed jobs (Kubernetes, torchelastic) resume
  it. A second signal before that boundary gets the signal's default action (a hung run stays killable). The
  signal waits for a training step to end: one that arrives during validation is acted on after it. Lightning
  alone saves on SIGUSR1 only under SLURM auto-requeue, and on SIGTERM it stops without saving.
- **``ckpt_path="last"`` skips unreadable files.** Candidates are the ``last*.ckpt`` files of the folder, newest
  written first (modification time; among equal times the higher ``-vN``), then every other ``*.ckpt`` of the folder
  by the same order. The first one that reads back (``checkpoint_problem``) is used; each skipped one is named in a
  warning. Modification time, not the recorded global step, decides: a run resumed from an earlier checkpoint writes
  ``last-v1.ckpt`` next to the abandoned branch's ``last.ckpt``, and the branch to continue is the one that ran last,
  even when the abandoned one had trained more steps.
- ``fast_dev_run`` writes no checkpoint at all (Lightning's ``ModelCheckpoint`` still writes ``last.ckpt`` when its
  training ends, which ``ckpt_path="last"`` then resumes as if it were a finished epoch).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

__all__ = [
    "AtomicCheckpointIO",
    "SafeModelCheckpoint",
    "StoppedBySignal",
    "UnreadableCheckpointError",
    "checkpoint_problem",
    "newest_readable_checkpoint",
    "save_atomically",
]

PARTIAL_SUFFIX = ".partial"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_OPCODE = b"\x80"  # how torch.save's legacy (non-zip) format starts
_VERSION = re.compile(r"-v(\d+)$")


class UnreadableCheckpointError(ValueError):
    """A checkpoint file that cannot be read back (missing, truncated, corrupt, or not a checkpoint)."""


class StoppedBySignal(SystemExit):
    """Training stopped on a preemption signal after writing a resumable checkpoint (exit status 128 + signal)."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.checkpoint = checkpoint


# ------------------------------------------------------------------------------------------------------ files
def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be loaded as a checkpoint, or ``None`` when it reads back.

    A ``torch.save`` file is a zip archive; every record's CRC-32 is checked, which reads the file once. That is
    needed: ``torch.load`` checks no CRC and loads flipped bytes in tensor data silently. Folders (sharded
    checkpoints) and the legacy non-zip format are left to the loader.
    """
    path = Path(path)
    if not path.exists():
        return "no such file"
    if path.is_dir():
        return None
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    with open(path, "rb") as file:
        head = file.read(len(_ZIP_MAGIC))
    if head != _ZIP_MAGIC:
        if head.startswith(_PICKLE_PROTOCOL_OPCODE):
            return None
        return "not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist()):
                return "a zip archive without data.pkl, not a torch.save file"
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as error:
        return f"truncated or corrupt ({size} bytes; {error})"
    if damaged is not None:
        return f"corrupt (checksum mismatch in record {damaged})"
    return None


def _is_last(path: Path, last_name: str) -> bool:
    return path.stem == last_name or path.stem.startswith(last_name + "-")


def _newest_first(path: Path) -> tuple[int, int]:
    version = _VERSION.search(path.stem)
    return path.stat().st_mtime_ns, int(version.group(1)) if version else -1


def newest_readable_checkpoint(
    folder: str | Path, last_name: str = ModelCheckpoint.CHECKPOINT_NAME_LAST
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint ``ckpt_path="last"`` resumes from, and the newer files skipped as unreadable (with why).

    ``last*.ckpt`` files first, newest written first, then the other ``*.ckpt`` files of ``folder`` (see the
    module docstring for why modification time decides). ``(None, [])`` when the folder holds no checkpoint.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None, []
    files = [path for path in folder.iterdir() if path.suffix == ".ckpt" and path.exists()]
    last = sorted((path for path in files if _is_last(path, last_name)), key=_newest_first, reverse=True)
    others = sorted((path for path in files if not _is_last(path, last_name)), key=_newest_first, reverse=True)
    skipped: list[tuple[Path, str]] = []
    for path in last + others:
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; some file systems (and Windows) refuse to open or fsync a folder.
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def save_atomically(checkpoint: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to ``path`` so that ``path`` holds either its previous content or the whole new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target, so that os.replace is a rename on one file system, never a copy.
    partial = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        with open(partial, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    _fsync_folder(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic, fsynced local writes (``save_atomically``) and loads that name
    the problem of an unreadable file. Remote paths (``s3://`` ...) keep Lightning's writer: object stores replace
    an object whole."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_atomically(checkpoint, path)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except Exception as error:
            problem = checkpoint_problem(path) if _is_local_file_protocol(path) else None
            if problem is None:
                raise
            raise UnreadableCheckpointError(f"checkpoint {path} is unreadable: {problem}") from error


# --------------------------------------------------------------------------------------------------- callback
class SafeModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with atomic writes, healthy-state-only saves, a resumable save on preemption signals and
    a ``last`` resolution that skips unreadable files (see the module docstring).

    Args:
        preemption_signals: signal names that stop training at the next optimizer-step boundary after writing the
            ``last`` checkpoint; ``[]`` leaves the signals to Lightning.
        **kwargs: ``ModelCheckpoint``'s arguments.

    Attributes:
        last_good_checkpoint: path of the newest checkpoint this callback wrote (from a healthy state), or the
            checkpoint the run resumed from before it wrote one; ``None`` if neither.
    """

    def __init__(self, preemption_signals: Sequence[str] = ("SIGUSR1", "SIGTERM"), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        unknown = [name for name in preemption_signals if name not in signal.Signals.__members__]
        if unknown:
            raise ValueError(
                f"preemption_signals: unknown signal name(s) {unknown}; use names such as 'SIGUSR1' or 'SIGTERM'"
            )
        self.preemption_signals = tuple(int(signal.Signals[name]) for name in preemption_signals)
        self.last_good_checkpoint: str | None = None
        self._received_signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._veto_warned = False
        self._files_written = 0

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Exactly the default writer: a user's own CheckpointIO (async, remote, ...) is left as it is.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "fit" and trainer.is_global_zero:
            self._remove_partial_files()

    def _remove_partial_files(self) -> None:
        if not self.dirpath or not _is_local_file_protocol(self.dirpath) or not Path(self.dirpath).is_dir():
            return
        for partial in Path(self.dirpath).glob(f".*.ckpt.*{PARTIAL_SUFFIX}"):
            with contextlib.suppress(OSError):
                partial.unlink()
                rank_zero_info(f"removed {partial}, left by a checkpoint write that was killed")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.last_good_checkpoint is None and trainer.ckpt_path is not None:
            self.last_good_checkpoint = str(trainer.ckpt_path)
        self._received_signal = None
        # After Lightning's own registration (it runs right before the training loop), so these handlers win. They
        # replace Lightning's SIGTERM handler too: that one stops mid-validation without saving and, under DDP,
        # broadcasts from inside the signal handler; the step boundary below is agreed on by all ranks instead.
        if threading.current_thread() is threading.main_thread():
            for signum in self.preemption_signals:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._received_signal is None:
            self._received_signal = signum
            return
        # A second signal while the first waits for a step boundary: a hung run (a stuck collective) must still be
        # killable, so it gets the signal's default action.
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if signal.getsignal(signum) == self._on_signal and handler is not None:
                signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_signal_handlers()
        if self._should_save_on_exception(trainer) and self._veto_reason(trainer, pl_module, warn=True):
            return
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_signal_handlers()
        super().teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------------------------------------ saving
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if self.preemption_signals:
            self._stop_if_signalled(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        super().on_train_end(trainer, pl_module)

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self.save_top_k == 0 or self._veto_reason(trainer, trainer.lightning_module, warn=True):
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if not self.save_last or self._veto_reason(trainer, trainer.lightning_module, warn=True):
            return
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.last_good_checkpoint = filepath
        self._files_written += 1
        self._veto_warned = False

    def _veto_reason(self, trainer: L.Trainer, pl_module: L.LightningModule, warn: bool = False) -> str | None:
        """Why the current state must not be saved, agreed on by all processes (``None``: save)."""
        veto = getattr(pl_module, "checkpoint_veto", None)
        reason = veto() if callable(veto) else None
        if reason is None:
            parameters = [p for p in pl_module.parameters() if p.is_floating_point() or p.is_complex()]
            if parameters and not bool(torch.stack([torch.isfinite(p).all() for p in parameters]).all()):
                name = next(n for n, p in pl_module.named_parameters() if not bool(torch.isfinite(p).all()))
                reason = f"parameter {name} holds non-finite values"
        if not trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            return None
        reason = reason or "another process reported a state that must not be saved"
        if warn and not self._veto_warned:
            self._veto_warned = True
            kept = self.last_good_checkpoint or "none was written yet"
            rank_zero_warn(
                f"checkpoint not written at step {trainer.global_step}: {reason}. The last good checkpoint is kept: "
                f"{kept}"
            )
        return reason

    # ------------------------------------------------------------------------------------------------ preemption
    def _stop_if_signalled(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signum = self._received_signal or 0
        if trainer.world_size > 1:  # a signal may reach one process only: all stop at the same step
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=pl_module.device), reduce_op="max"))
        if not signum or trainer.fit_loop.epoch_loop._should_accumulate():
            return  # mid-accumulation the optimizer has not stepped: not a state a resume can continue from
        name = signal.Signals(signum).name
        written = None
        if trainer.fast_dev_run:
            outcome = "fast_dev_run writes no checkpoint"
        else:
            written = self._save_resume_checkpoint(trainer)
            outcome = (
                f"wrote {written}; continue with --ckpt_path last (Trainer.fit(ckpt_path='last'))"
                if written
                else f"the state could not be saved, the last good checkpoint is {self.last_good_checkpoint}"
            )
        if trainer.is_global_zero:
            print(f"dinov3-pl: {name} received, stopped after step {trainer.global_step}: {outcome}", file=sys.stderr)
        raise StoppedBySignal(signum, written)

    def _save_resume_checkpoint(self, trainer: L.Trainer) -> str | None:
        """Writes the ``last`` checkpoint now (a real file even when ``save_last`` is off or ``"link"``)."""
        if self._last_global_step_saved == trainer.global_step and self._last_checkpoint_saved == self.last_model_path:
            return self.last_model_path  # this step's last checkpoint is already written
        save_last, self.save_last = self.save_last, True
        written_before = self._files_written
        try:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            self.save_last = save_last
        return self.last_model_path if self._files_written > written_before else None

    # ------------------------------------------------------------------------------------------------ resume
    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        # The private resolver also gives the logger-based folder used when dirpath is not set.
        folder = self.dirpath or self._ModelCheckpoint__resolve_ckpt_dir(trainer)
        if not _is_local_file_protocol(folder):
            return super()._find_last_checkpoints(trainer)
        chosen, skipped = newest_readable_checkpoint(folder, self.CHECKPOINT_NAME_LAST)
        for path, problem in skipped:
            rank_zero_warn(f'ckpt_path="last": skipping {path}: {problem}')
        if chosen is None:
            if skipped:
                raise UnreadableCheckpointError(
                    f'ckpt_path="last": no readable checkpoint in {folder} ({len(skipped)} unreadable, see the '
                    "warnings); pass a checkpoint file as ckpt_path, or move these files away to start afresh"
                )
            return set()
        if not _is_last(chosen, self.CHECKPOINT_NAME_LAST):
            rank_zero_warn(f'ckpt_path="last": no readable last checkpoint in {folder}; resuming from {chosen}')
        return {os.path.normpath(chosen)}
