"""A real 2-process DDP run (gloo, CPU) of the demo pretraining recipe."""

import lightning as L
import torch

from dinov3_pl.cli import main as cli_main
from tests.test_ssl_fit import cli_args


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
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
            "--trainer.strategy=ddp_spawn",
            "--trainer.callbacks+=tests.test_ssl_ddp.RanksAgree",
            "--data.init_args.num_samples=96",
            "--trainer.check_val_every_n_epoch=1",
        ]  # 3 batches of 16 per rank
    )
    # ddp_spawn returns the weights to this process, not the loop state: read the step from the checkpoint.
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert "knn/top1_k10" in cli.trainer.callback_metrics  # the online kNN monitor ran across both ranks
