"""One rank of the 2-process DDP test (tests/test_ssl_ddp.py), launched as torchrun or SLURM would launch it: the
rank and rendezvous come from the environment and Lightning's ``ddp`` strategy joins them. Every run of the test
happens in the same two processes, which saves two interpreter starts per run: a run with the online kNN monitor whose
weights must agree across ranks, then the uninterrupted, stopped and resumed runs of the exact-resume check.

Usage: ``python tests/ddp_resume_worker.py OUT_DIR STOP [STOP ...]`` with RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from dinov3_pl.cli import main as cli_main
from tests.test_ssl_fit import cli_args

TOTAL_STEPS = 6  # 3 epochs of 2 steps


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


def fit(root: Path, *extra: str):
    """100 images, 50 per rank, batches of 16 -> 3 per epoch, cut to 2 by limit_train_batches; 3 epochs."""
    fixed = ("--trainer.max_epochs", "--trainer.max_steps", "--model.init_args.optim.total_steps")
    cli = cli_main(
        [arg for arg in cli_args(root) if not arg.startswith(fixed)]
        + [
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            "--trainer.max_epochs=3",
            "--trainer.limit_train_batches=2",
            f"--model.init_args.optim.total_steps={TOTAL_STEPS}",  # the same schedules whether interrupted or not
            "--data.init_args.train.init_args.num_samples=100",
            "--data.init_args.knn_monitor=false",
            *extra,
        ]
    )
    assert cli.trainer.world_size == 2, "the processes did not join one DDP group"
    return cli


def main(out_dir: str, stops: list[int]) -> None:
    out = Path(out_dir)
    # Sinkhorn-Knopp sums, the finite-loss vote, gradients and the kNN monitor's sharded search cross processes.
    monitored = fit(
        out / "monitored",
        "--data.init_args.knn_monitor=true",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.callbacks+=tests.ddp_resume_worker.RanksAgree",
    )
    assert getattr(monitored.model, "ranks_checked", False), "RanksAgree did not run"
    assert "knn/top1_k10" in monitored.trainer.callback_metrics, "the online kNN monitor did not run"
    fit(out / "straight")
    for stop in stops:
        root = out / f"stopped_after_{stop}"
        fit(root, f"--trainer.max_steps={stop}")
        fit(root, "--ckpt_path=last")


if __name__ == "__main__":
    main(sys.argv[1], [int(stop) for stop in sys.argv[2:]])
