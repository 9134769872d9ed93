"""Real 2-process DDP runs (gloo, CPU) of the demo pretraining recipe: a short run, and exact resume on an
epoch boundary and inside an epoch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from dinov3_pl.cli import main as cli_main
from tests.test_ssl_fit import cli_args

# Spawned (not forked) processes: a fork after the notebook tests' zmq threads can deadlock the suite.
TWO_CPU_PROCESSES = ("--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.strategy=ddp_spawn")


class RanksAgree(L.Callback):
    """Checks, on every rank, that student and teacher weights are identical across the processes."""

    def on_train_end(self, trainer, pl_module):
        import torch.distributed as dist

        for name in ("student", "teacher"):
            flat = torch.cat([p.detach().flatten() for p in getattr(pl_module, name).parameters()])
            gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, flat)
            assert all(torch.equal(gathered[0], other) for other in gathered[1:]), f"{name} differs across ranks"
        pl_module.ranks_checked = True


def test_two_process_ddp_run_of_the_demo_recipe(tmp_path):
    """Real DDP on CPU (gloo): Sinkhorn-Knopp sums, the finite-loss vote and gradients all cross processes."""
    cli = cli_main(
        [arg for arg in cli_args(tmp_path) if not arg.startswith("--trainer.callbacks")]
        + [
            *TWO_CPU_PROCESSES,
            "--trainer.callbacks+=tests.test_ssl_ddp.RanksAgree",
            "--data.init_args.train.init_args.num_samples=96",
            "--trainer.check_val_every_n_epoch=1",
        ]  # 3 batches of 16 per rank
    )
    # ddp_spawn returns the weights to this process, not the loop state: read the step from the checkpoint.
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert "knn/top1_k10" in cli.trainer.callback_metrics  # the online kNN monitor ran across both ranks


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _newest_last_checkpoint(root: Path) -> dict:
    """A run that resumes into a folder holding last.ckpt writes last-v1.ckpt, which ``--ckpt_path last`` picks."""
    newest = max((root / "checkpoints").glob("last*.ckpt"), key=lambda path: path.stat().st_mtime_ns)
    return torch.load(newest, map_location="cpu", weights_only=True)


def test_two_process_resume_on_an_epoch_boundary_and_inside_an_epoch_is_exact(tmp_path):
    """Two processes launched as torchrun launches them (tests/ddp_resume_worker.py), 3 epochs of 2 steps, stopped
    by max_steps on an epoch boundary (step 2) and inside an epoch (step 3), resumed with --ckpt_path last: both
    ranks continue with exactly the samples they had not trained, so student, teacher, AdamW state and the data
    position equal the uninterrupted run's."""
    stops = (2, 3)
    environment = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    command = [sys.executable, "-m", "tests.ddp_resume_worker", str(tmp_path), *map(str, stops)]
    ranks = [
        subprocess.Popen(command, env={**environment, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=Path.cwd())
        for rank in range(2)
    ]
    assert [process.wait(timeout=600) for process in ranks] == [0, 0]
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
