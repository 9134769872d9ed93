"""One rank of the 2-process exact-resume test (tests/test_ssl_ddp.py), launched as torchrun or SLURM would launch
it: the rank and rendezvous come from the environment and Lightning's ``ddp`` strategy joins them. Every run of the
test (uninterrupted, stopped, resumed) happens in the same two processes, which saves a process start per run.

Usage: ``python tests/ddp_resume_worker.py OUT_DIR STOP [STOP ...]`` with RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dinov3_pl.cli import main as cli_main
from tests.test_ssl_fit import cli_args

TOTAL_STEPS = 6  # 3 epochs of 2 steps


def fit(root: Path, *extra: str) -> None:
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


def main(out_dir: str, stops: list[int]) -> None:
    out = Path(out_dir)
    fit(out / "straight")
    for stop in stops:
        root = out / f"stopped_after_{stop}"
        fit(root, f"--trainer.max_steps={stop}")
        fit(root, "--ckpt_path=last")


if __name__ == "__main__":
    main(sys.argv[1], [int(stop) for stop in sys.argv[2:]])
