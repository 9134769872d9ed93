"""Exact resume at every boundary: a CLI run stopped after step k and resumed with ``--ckpt_path last`` ends with the
same state, bit for bit, as the uninterrupted run (module weights and buffers, AdamW state, data position).

The runs cross three epochs of a dataset whose length is not a multiple of the batch, with ``limit_train_batches``
cutting every epoch short, so the interrupts fall inside epochs and on every epoch boundary. The 2-process DDP
case is in tests/test_ssl_ddp.py.
"""

from __future__ import annotations

import pytest
import torch

from dinov3_pl.cli import main as cli_main

# 35 images in batches of 8: 4 batches per epoch (drop_last), cut to 3 by limit_train_batches.
BATCHES_PER_EPOCH = 3
TINY_MODEL = (
    "--model.init_args.backbone.timm_overrides={depth: 2, embed_dim: 32, num_heads: 2, patch_size: 4, img_size: 16}",
    # Drop path and RoPE rescaling on: resume must also restore the randomness they draw.
    "--model.init_args.backbone.drop_path_rate=0.1",
    "--model.init_args.backbone.rope_rescale=2.0",
    "--model.init_args.dino_head={num_prototypes: 64, hidden_dim: 48, bottleneck_dim: 16}",
    "--model.init_args.ibot_head={num_prototypes: 64, hidden_dim: 48, bottleneck_dim: 16}",
    "--model.init_args.optim.warmup_steps=2",
    "--model.init_args.optim.freeze_last_layer_steps=1",
)
TINY_DATA = (
    "--data.init_args.train.init_args.num_samples=35",
    "--data.init_args.train.init_args.image_size=24",
    # The kNN monitor on 16 + 8 other shapes of 24 px (the demo's bank and queries, made smaller).
    "--data.init_args.knn_bank.init_args.num_samples=16",
    "--data.init_args.knn_bank.init_args.image_size=24",
    "--data.init_args.knn_queries.init_args.num_samples=8",
    "--data.init_args.knn_queries.init_args.image_size=24",
    "--data.init_args.patch_size=4",
    "--data.init_args.global_size=16",
    "--data.init_args.local_size=8",
    "--data.init_args.num_local_crops=2",
    "--data.init_args.blur_kernel_size=3",
    "--data.init_args.batch_size=8",
    "--data.init_args.num_workers=0",
    "--data.init_args.knn_bank_size=16",
    "--data.init_args.knn_query_size=8",
    "--data.init_args.eval_size=16",
)
VARIANTS = {
    "validation_off": ("--trainer.limit_val_batches=0",),
    # Validation at every epoch end (the online kNN monitor), gradient accumulation over 2 batches (each epoch ends
    # on an incomplete window), softmax centering (its running centres are state) and Gram anchoring from step 1,
    # refreshed at steps 3 and 4 (its counters and snapshot are state).
    "validation_on_accumulate_2_centering_gram": (
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.accumulate_grad_batches=2",
        "--model.init_args.loss.centering=softmax",
        "--model.init_args.gram={enabled: true, start_step: 1, ramp_steps: 2, first_refresh_step: 3, "
        "refresh_every: 1, max_refreshes: 2}",
        "--data.init_args.gram_size=32",
    ),
}


def steps_per_epoch(variant: str) -> int:
    accumulate = 2 if "accumulate_2" in variant else 1
    return -(-BATCHES_PER_EPOCH // accumulate)  # Lightning steps on the epoch's last, incomplete window too


def fit(root, variant: str, max_steps: int, *extra: str):
    total = 3 * steps_per_epoch(variant)
    return cli_main(
        [
            "fit",
            "--config=configs/pretrain/demo_cpu.yaml",
            f"--trainer.default_root_dir={root}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.callbacks=[]",
            "--trainer.max_epochs=-1",
            f"--trainer.max_steps={max_steps}",
            f"--trainer.limit_train_batches={BATCHES_PER_EPOCH}",
            f"--checkpoint.dirpath={root}/checkpoints",
            f"--model.init_args.optim.total_steps={total}",  # the same schedules whether interrupted or not
            *TINY_MODEL,
            *TINY_DATA,
            *VARIANTS[variant],
            *extra,
        ]
    )


def final_state(cli) -> dict:
    return {
        "global_step": cli.trainer.global_step,
        "module": {key: value.clone() for key, value in cli.model.state_dict().items()},
        "optimizer": cli.trainer.optimizers[0].state_dict()["state"],
        "data": cli.datamodule.state_dict(),
    }


def assert_same_state(got: dict, expected: dict, where: str) -> None:
    assert got["global_step"] == expected["global_step"], where
    assert got["data"] == expected["data"], where
    assert got["module"].keys() == expected["module"].keys()
    for key, value in expected["module"].items():
        assert torch.equal(got["module"][key], value), f"{where}: {key} differs"
    assert got["optimizer"].keys() == expected["optimizer"].keys()
    for index, moments in expected["optimizer"].items():
        for name, value in moments.items():
            assert torch.equal(got["optimizer"][index][name], value), f"{where}: AdamW {index}.{name} differs"


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_after_any_step_equals_the_uninterrupted_run(tmp_path, variant):
    per_epoch = steps_per_epoch(variant)
    total = 3 * per_epoch
    expected = final_state(fit(tmp_path / "straight", variant, total))
    assert expected["global_step"] == total
    if "gram" in variant:
        assert int(expected["module"]["gram_refreshes"]) == 2  # the counters moved during the run
    # Every epoch boundary, and one step inside each epoch.
    boundaries = [per_epoch * epoch for epoch in (1, 2)]
    inside = [per_epoch * epoch + 1 for epoch in range(3)]
    for k in sorted({*boundaries, *inside} - {total}):
        root = tmp_path / f"stopped_after_{k}"
        assert fit(root, variant, k).trainer.global_step == k
        resumed = fit(root, variant, total, "--ckpt_path=last")
        assert_same_state(final_state(resumed), expected, f"{variant}, stopped after step {k}")
