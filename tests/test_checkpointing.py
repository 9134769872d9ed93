"""SafeModelCheckpoint and its file handling: atomic writes under faults, unreadable files, healthy-state-only
saves, preemption signals, and fast_dev_run (tiny Linear modules; the preemption test runs the real CLI)."""

from __future__ import annotations

import errno
import io
import os
import signal
import struct
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from dinov3_pl.checkpointing import (
    AtomicCheckpointIO,
    SafeModelCheckpoint,
    StoppedBySignal,
    UnreadableCheckpointError,
    checkpoint_problem,
    newest_readable_checkpoint,
    save_atomically,
)

ROOT = Path(__file__).parents[1]


class TinyRegression(L.LightningModule):
    """A Linear layer fit by SGD on 32 fixed random samples (batch 4: 8 steps per epoch)."""

    def __init__(self, veto_steps: tuple[int, ...] = ()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.veto_steps = set(veto_steps)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return torch.nn.functional.mse_loss(self.layer(inputs), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(32, 4, generator=generator)
        return DataLoader(TensorDataset(inputs, inputs.sum(1, keepdim=True)), batch_size=4)

    def checkpoint_veto(self) -> str | None:
        return f"test veto at step {self.global_step}" if self.global_step in self.veto_steps else None


def tiny_trainer(root: Path, callbacks: list, **kwargs) -> L.Trainer:
    options = dict(
        default_root_dir=root,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=4,  # runs end at max_steps
    )
    return L.Trainer(callbacks=callbacks, **{**options, **kwargs})


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def checkpoint_bytes(step: int) -> bytes:
    buffer = io.BytesIO()
    torch.save({"global_step": step, "weights": torch.arange(1000.0) + step}, buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ readability
def test_checkpoint_problem_names_missing_empty_truncated_corrupt_and_foreign_files(tmp_path):
    good = tmp_path / "good.ckpt"
    good.write_bytes(checkpoint_bytes(3))
    assert checkpoint_problem(good) is None
    assert checkpoint_problem(tmp_path / "missing.ckpt") == "no such file"
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert "empty" in checkpoint_problem(tmp_path / "empty.ckpt")
    (tmp_path / "half.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated" in checkpoint_problem(tmp_path / "half.ckpt")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    assert "not a PyTorch checkpoint" in checkpoint_problem(tmp_path / "notes.ckpt")

    # One flipped byte in the tensor data: torch.load reads it without complaint, the CRC check does not.
    data = bytearray(good.read_bytes())
    data[data.find(struct.pack("<f", 503.0))] ^= 0xFF  # a byte of weights[500]
    flipped = tmp_path / "flipped.ckpt"
    flipped.write_bytes(bytes(data))
    loaded = torch.load(flipped, weights_only=True)
    assert not torch.equal(loaded["weights"], torch.arange(1000.0) + 3)
    assert "checksum mismatch" in checkpoint_problem(flipped)


def test_newest_readable_prefers_last_files_by_write_time_then_other_checkpoints(tmp_path):
    def write(name: str, step: int, mtime: int, data: bytes | None = None) -> Path:
        path = tmp_path / name
        path.write_bytes(checkpoint_bytes(step) if data is None else data)
        os.utime(path, (mtime, mtime))
        return path

    write("epoch=0-step=9.ckpt", 9, mtime=4000)  # newer, but not a last checkpoint
    write("last.ckpt", 8, mtime=1000)
    resumed_branch = write("last-v1.ckpt", 5, mtime=2000)  # written later, fewer steps: the branch that ran last
    assert newest_readable_checkpoint(tmp_path) == (resumed_branch, [])

    truncated = write("last-v2.ckpt", 7, mtime=3000, data=checkpoint_bytes(7)[:100])
    chosen, skipped = newest_readable_checkpoint(tmp_path)
    assert chosen == resumed_branch and [path for path, _ in skipped] == [truncated]

    for name in ("last.ckpt", "last-v1.ckpt"):
        (tmp_path / name).write_bytes(b"")
    chosen, skipped = newest_readable_checkpoint(tmp_path)
    assert chosen == tmp_path / "epoch=0-step=9.ckpt" and len(skipped) == 3
    (tmp_path / ".last.ckpt.123.partial").write_bytes(checkpoint_bytes(99))  # never a candidate
    assert newest_readable_checkpoint(tmp_path)[0] == tmp_path / "epoch=0-step=9.ckpt"


# ------------------------------------------------------------------------------------------------ atomic writes
def test_a_write_failing_half_way_keeps_the_previous_last_checkpoint(tmp_path, monkeypatch):
    """The disk fills up while step 4's checkpoint is written: step 3's last.ckpt stays whole and is resumed."""
    folder = tmp_path / "checkpoints"
    real_save = torch.save

    class FailHalfWay(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:  # the save at the end of this batch writes half, then fails

                def half_then_full_disk(obj, file, *args, **kwargs):
                    buffer = io.BytesIO()
                    real_save(obj, buffer, *args, **kwargs)
                    half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
                    if isinstance(file, (str, os.PathLike)):
                        Path(file).write_bytes(half)
                    else:
                        file.write(half)
                    raise OSError(errno.ENOSPC, "No space left on device")

                monkeypatch.setattr(torch, "save", half_then_full_disk)

    callback = SafeModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_last=True, save_top_k=0)
    trainer = tiny_trainer(tmp_path, [callback, FailHalfWay()])
    with pytest.raises(OSError, match="No space left"):
        trainer.fit(TinyRegression())
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert sorted(path.name for path in folder.iterdir()) == ["last.ckpt"]  # no partial file left
    assert checkpoint_problem(folder / "last.ckpt") is None and step_of(folder / "last.ckpt") == 3
    monkeypatch.undo()

    resumed = tiny_trainer(tmp_path, [SafeModelCheckpoint(dirpath=folder, save_last=True)], max_steps=5)
    resumed.fit(TinyRegression(), ckpt_path="last")
    assert Path(resumed.ckpt_path) == folder / "last.ckpt" and resumed.global_step == 5


_KILLED_WRITER = """
import sys, torch
from dinov3_pl.checkpointing import save_atomically
big = {"global_step": 2, "weights": torch.randn(48 * 2**20 // 4)}
while True:
    save_atomically(big, sys.argv[1])
"""


def test_a_write_killed_mid_way_leaves_the_previous_file_and_fit_removes_the_partial_one(tmp_path):
    """SIGKILL while a 48 MB checkpoint is written over last.ckpt: last.ckpt is still a whole, readable file."""
    last = tmp_path / "last.ckpt"
    last.write_bytes(checkpoint_bytes(1))
    for _ in range(3):  # the kill must land while the file is written; retry if it landed between writes
        writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(last)], cwd=ROOT)
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 0 for p in tmp_path.glob(".last.ckpt.*.partial") if p.exists()):
            assert writer.poll() is None and time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.005)
        writer.kill()
        writer.wait()
        if list(tmp_path.glob(".last.ckpt.*.partial")):
            break
    partial_files = list(tmp_path.glob(".last.ckpt.*.partial"))
    assert partial_files, "the kill never landed during a write"
    assert checkpoint_problem(last) is None and step_of(last) in (1, 2)
    assert newest_readable_checkpoint(tmp_path) == (last, [])

    callback = SafeModelCheckpoint(dirpath=tmp_path, save_last=True)
    tiny_trainer(tmp_path, [callback], max_steps=1).fit(TinyRegression())
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*.partial"))


def test_save_atomically_replaces_whole_files_only(tmp_path):
    path = tmp_path / "sub" / "model.ckpt"
    save_atomically({"global_step": 1}, path)
    save_atomically({"global_step": 2}, path)
    assert step_of(path) == 2 and [p.name for p in path.parent.iterdir()] == ["model.ckpt"]


# ------------------------------------------------------------------------------------------------ resolution
def test_last_skips_an_unreadable_newest_checkpoint_with_a_warning(tmp_path):
    folder = tmp_path / "checkpoints"
    first = tiny_trainer(tmp_path, [SafeModelCheckpoint(dirpath=folder, save_last=True)], max_steps=2)
    first.fit(TinyRegression())
    (folder / "last-v1.ckpt").write_bytes((folder / "last.ckpt").read_bytes()[:-100])  # newer and truncated
    with pytest.warns(UserWarning, match=r"skipping .*last-v1\.ckpt: truncated"):
        resumed = tiny_trainer(tmp_path, [SafeModelCheckpoint(dirpath=folder, save_last=True)], max_steps=3)
        resumed.fit(TinyRegression(), ckpt_path="last")
    assert Path(resumed.ckpt_path) == folder / "last.ckpt" and resumed.global_step == 3


def test_last_with_only_unreadable_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(checkpoint_bytes(4)[:50])
    trainer = tiny_trainer(tmp_path, [SafeModelCheckpoint(dirpath=folder, save_last=True)], max_steps=2)
    with pytest.warns(UserWarning, match="skipping"), pytest.raises(UnreadableCheckpointError, match="no readable"):
        trainer.fit(TinyRegression(), ckpt_path="last")


def test_an_unreadable_file_is_named_when_loaded(tmp_path):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(checkpoint_bytes(1)[:-10])
    with pytest.raises(UnreadableCheckpointError, match=r"broken\.ckpt is unreadable: truncated"):
        AtomicCheckpointIO().load_checkpoint(path)


# ------------------------------------------------------------------------------------------------ fast_dev_run
def test_fast_dev_run_leaves_no_checkpoint_for_last_to_resume(tmp_path):
    """Lightning's ModelCheckpoint writes last.ckpt when a fast_dev_run ends; resuming it trained 0 steps."""
    folder = tmp_path / "checkpoints"
    tiny_trainer(tmp_path, [SafeModelCheckpoint(dirpath=folder, save_last=True)], fast_dev_run=True).fit(
        TinyRegression()
    )
    assert not list(folder.glob("*.ckpt"))
    trainer = tiny_trainer(tmp_path, [SafeModelCheckpoint(dirpath=folder, save_last=True)], max_epochs=1)
    trainer.fit(TinyRegression(), ckpt_path="last")
    assert trainer.global_step == 8  # a whole epoch from scratch


def test_fast_dev_run_from_the_cli_writes_no_checkpoint(tmp_path):
    from dinov3_pl.cli import main as cli_main
    from tests.test_ssl_fit import cli_args

    cli = cli_main(cli_args(tmp_path, "--trainer.fast_dev_run=true"))
    assert cli.trainer.global_step == 1 and isinstance(cli.trainer.checkpoint_callback, SafeModelCheckpoint)
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))


# ------------------------------------------------------------------------------------------------ healthy states
def test_no_checkpoint_while_a_parameter_is_non_finite(tmp_path):
    folder = tmp_path / "checkpoints"

    class PoisonAtStep3(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.layer.weight[0, 0] = float("nan")

    callback = SafeModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_last=True, save_top_k=1)
    trainer = tiny_trainer(tmp_path, [callback, PoisonAtStep3()], max_steps=6)
    with pytest.warns(UserWarning, match="not written at step 4: parameter layer.weight holds non-finite") as record:
        trainer.fit(TinyRegression())
    assert sum("not written" in str(warning.message) for warning in record) == 1  # warned once for the episode
    assert sorted(path.name for path in folder.iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"]
    assert step_of(folder / "last.ckpt") == 3
    assert trainer.checkpoint_callback is callback
    assert callback.last_good_checkpoint == str(folder / "last.ckpt")
    assert torch.isfinite(torch.load(folder / "last.ckpt", weights_only=True)["state_dict"]["layer.weight"]).all()


def test_the_module_can_veto_a_save_and_saving_resumes_after(tmp_path):
    folder = tmp_path / "checkpoints"
    callback = SafeModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1, save_last=False)
    trainer = tiny_trainer(tmp_path, [callback], max_steps=5)
    with pytest.warns(UserWarning, match="not written at step 2: test veto at step 2") as record:
        trainer.fit(TinyRegression(veto_steps=(2, 3)))
    assert sum("not written" in str(warning.message) for warning in record) == 1
    steps = sorted(int(path.stem.split("step=")[1]) for path in folder.glob("epoch=*.ckpt"))
    assert steps == [1, 4, 5]
    assert callback.last_good_checkpoint == str(folder / "epoch=0-step=5.ckpt")


# ------------------------------------------------------------------------------------------------ preemption
def test_sigusr1_writes_last_at_the_step_boundary_and_the_resume_trains_the_rest(tmp_path):
    folder = tmp_path / "checkpoints"

    class SignalAtStep2(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:  # mid-step: the checkpoint must wait for the step to finish
                os.kill(os.getpid(), signal.SIGUSR1)

    def unhandled(signum, frame):  # SIGUSR1's default action would end pytest itself
        raise AssertionError("SIGUSR1 reached the handler installed before the run")

    callback = SafeModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0)
    stopped = tiny_trainer(tmp_path, [callback, SignalAtStep2()], max_steps=6)
    before = signal.signal(signal.SIGUSR1, unhandled)
    try:
        with pytest.raises(StoppedBySignal) as stop:
            stopped.fit(TinyRegression())
        assert signal.getsignal(signal.SIGUSR1) is unhandled  # handlers given back
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert stop.value.code == 128 + signal.SIGUSR1 and stop.value.checkpoint == str(folder / "last.ckpt")
    assert step_of(folder / "last.ckpt") == 3

    trained = []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            trained.append(trainer.global_step)

    resumed = tiny_trainer(tmp_path, [SafeModelCheckpoint(dirpath=folder, save_last=True), Count()], max_steps=6)
    resumed.fit(TinyRegression(), ckpt_path="last")
    assert trained == [4, 5, 6]


def test_a_second_signal_gets_its_default_action(monkeypatch):
    """A run hung in a collective never reaches a step boundary: a second SIGTERM must still end it."""
    calls = []
    monkeypatch.setattr(signal, "signal", lambda signum, handler: calls.append(("handler", signum, handler)))
    monkeypatch.setattr(signal, "raise_signal", lambda signum: calls.append(("raise", signum)))
    callback = SafeModelCheckpoint()
    callback._on_signal(signal.SIGTERM, None)
    assert callback._received_signal == signal.SIGTERM and calls == []
    callback._on_signal(signal.SIGTERM, None)
    assert calls == [("handler", signal.SIGTERM, signal.SIG_DFL), ("raise", signal.SIGTERM)]


class SignalRank1AtStep2(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow
def test_a_signal_to_one_ddp_process_stops_every_process_at_the_same_step(tmp_path):
    """Two CPU processes (gloo); only rank 1 gets SIGUSR1. Both must save together (the save is collective) and
    stop: each process exits with 138, which ddp_spawn reports as the failure of its processes."""
    folder = tmp_path / "checkpoints"
    callback = SafeModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0)
    # A gloo timeout turns a rank left alone in the save's barrier into an error instead of a hang.
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60))
    trainer = tiny_trainer(tmp_path, [callback, SignalRank1AtStep2()], max_steps=6, devices=2, strategy=strategy)
    with pytest.raises(Exception, match="exit code 138"):
        trainer.fit(TinyRegression())
    assert step_of(folder / "last.ckpt") == 3


class SlowSteps(L.Callback):
    """Writes each finished step to ``marker`` and sleeps, so that a signal lands mid-run (preemption test)."""

    def __init__(self, marker: str, seconds: float = 0.5) -> None:
        self.marker, self.seconds = marker, seconds

    def on_train_batch_end(self, trainer, *args) -> None:
        Path(self.marker).write_text(str(trainer.global_step))
        time.sleep(self.seconds)


class CountSteps(L.Callback):
    """Counts the optimizer steps a run trains."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.steps.append(trainer.global_step)


@pytest.mark.slow
def test_sigterm_to_a_cli_fit_writes_a_checkpoint_that_resumes_exactly(tmp_path):
    """``dinov3-pl fit`` gets SIGTERM mid-run: it writes last.ckpt at the next step boundary and exits 143; resuming
    with --ckpt_path last trains exactly the remaining steps, to the weights of an uninterrupted run."""
    from dinov3_pl.cli import main as cli_main
    from tests.test_ssl_fit import cli_args

    six_steps = (
        "--trainer.max_steps=6",
        "--model.init_args.optim.total_steps=6",
        "--data.init_args.train.init_args.num_samples=48",
        "--data.init_args.batch_size=8",
        "--data.init_args.knn_monitor=false",
    )
    marker = tmp_path / "step.txt"
    command = [
        str(Path(sys.executable).with_name("dinov3-pl")),
        *cli_args(tmp_path / "run", *six_steps),
        "--trainer.callbacks+=tests.test_checkpointing.SlowSteps",
        f"--trainer.callbacks.marker={marker}",
    ]
    # The subprocess must sum with as many threads as this process (which an earlier test may have changed), or the
    # resumed weights differ from the straight run's in the last bits.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    fit = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (marker.exists() and marker.read_text() == "2"):
        assert fit.poll() is None, fit.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never reached step 2"
        time.sleep(0.02)
    fit.send_signal(signal.SIGTERM)
    _, stderr = fit.communicate(timeout=120)
    assert fit.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "SIGTERM received, stopped after step 2" in stderr.splitlines()[-1]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert step_of(last) == 2

    counter = "--trainer.callbacks+=tests.test_checkpointing.CountSteps"
    resumed = cli_main(cli_args(tmp_path / "run", *six_steps, counter, "--ckpt_path=last"))
    assert resumed.trainer.global_step == 6
    # pytest imports this file as another module than the CLI does: find the counter by name.
    assert next(c for c in resumed.trainer.callbacks if type(c).__name__ == "CountSteps").steps == [3, 4, 5, 6]

    straight = cli_main(cli_args(tmp_path / "straight", *six_steps))
    expected, got = straight.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key
