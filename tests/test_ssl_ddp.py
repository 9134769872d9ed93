"""Real 2-process DDP runs (gloo, CPU) of the demo pretraining recipe, launched as torchrun launches them: a run with
the online kNN monitor whose weights agree across ranks, and exact resume on an epoch boundary and inside an epoch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _newest_last_checkpoint(root: Path) -> dict:
    """A run that resumes into a folder holding last.ckpt writes last-v1.ckpt, which ``--ckpt_path last`` picks."""
    newest = max((root / "checkpoints").glob("last*.ckpt"), key=lambda path: path.stat().st_mtime_ns)
    return torch.load(newest, map_location="cpu", weights_only=True)


def test_two_process_run_agrees_across_ranks_and_resumes_exactly_on_and_inside_an_epoch(tmp_path):
    """Two processes launched as torchrun launches them (tests/ddp_resume_worker.py). First a run with the online kNN
    monitor: student and teacher weights identical on both ranks, the monitor's metrics logged. Then 3 epochs of 2
    steps, stopped by max_steps on an epoch boundary (step 2) and inside an epoch (step 3), resumed with
    --ckpt_path last: both ranks continue with exactly the samples they had not trained, so student, teacher, AdamW
    state and the data position equal the uninterrupted run's."""
    stops = (2, 3)
    environment = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    command = [sys.executable, "-m", "tests.ddp_resume_worker", str(tmp_path), *map(str, stops)]
    ranks = [
        subprocess.Popen(command, env={**environment, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=Path.cwd())
        for rank in range(2)
    ]
    assert [process.wait(timeout=600) for process in ranks] == [0, 0]
    assert _newest_last_checkpoint(tmp_path / "monitored")["global_step"] == 6
    straight = _newest_last_checkpoint(tmp_path / "straight")
    assert straight["global_step"] == 6
    for stop in stops:
        resumed = _newest_last_checkpoint(tmp_path / f"stopped_after_{stop}")
        assert resumed["global_step"] == 6
        assert resumed["MultiCropDataModule"] == straight["MultiCropDataModule"]
        assert straight["state_dict"].keys() == resumed["state_dict"].keys()
        for key, value in straight["state_dict"].items():
            assert torch.equal(value, resumed["state_dict"][key]), f"stopped after {stop}: {key}"
        for expected, got in zip(
            straight["optimizer_states"][0]["state"].values(),
            resumed["optimizer_states"][0]["state"].values(),
            strict=True,
        ):
            for name in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(expected[name], got[name]), f"stopped after {stop}: AdamW {name}"
