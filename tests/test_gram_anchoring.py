"""Gram anchoring phase: snapshot and refreshes of the Gram teacher, Gram loss and weight ramps in a real fit."""

import lightning as L
import torch

from dinov3_pl.modules.ssl import DINOSSLModule
from dinov3_pl.modules.ssl_config import GramConfig
from tests.test_ssl_fit import STEPS_PER_EPOCH, tiny_data, tiny_module, trainer


class WatchGram(L.Callback):
    """Records, before each step, whether the Gram teacher equals the EMA teacher and the refresh count."""

    def __init__(self) -> None:
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        gram = pl_module.gram_teacher.state_dict()
        teacher = pl_module.teacher.backbone.state_dict()
        self.rows.append(
            {
                "step": trainer.global_step - 1,
                "initialized": bool(pl_module.gram_initialized),
                "refreshes": int(pl_module.gram_refreshes),
                "gram_crops": tuple(batch["gram_crops"].shape),
                "gram_loss": "train/gram" in trainer.callback_metrics,
                "gram": {k: v.clone() for k, v in gram.items()},
            }
        )
        assert gram.keys() == teacher.keys()


def test_gram_teacher_snapshot_refresh_and_loss(tmp_path):
    L.seed_everything(0)
    base = tiny_module().hparams
    gram = GramConfig(
        enabled=True,
        weight=2.0,
        start_step=2,
        ramp_steps=3,
        local_dino_weight_end=0.5,
        first_refresh_step=6,
        refresh_every=2,
        max_refreshes=2,
    )
    module = DINOSSLModule(**{**base, "gram": gram})
    watch = WatchGram()
    fit = trainer(tmp_path, max_epochs=3, enable_checkpointing=False, callbacks=[watch])
    fit.fit(module, tiny_data(gram_size=32))
    rows = watch.rows
    assert len(rows) == 3 * STEPS_PER_EPOCH
    assert rows[0]["gram_crops"] == (16, 3, 32, 32)  # 2 x batch 8, twice the global crop size
    assert [r["initialized"] for r in rows[:3]] == [False, False, True]  # snapshot when step 2 starts
    # Refreshes when steps 6 and 8 start, then no more (max_refreshes=2).
    assert [r["refreshes"] for r in rows] == [0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    unchanged = [torch.equal(rows[i]["gram"]["vit.cls_token"], rows[i + 1]["gram"]["vit.cls_token"]) for i in range(11)]
    # The Gram teacher changes only at the snapshot (step 2) and the refreshes (steps 6 and 8).
    assert unchanged == [True, False, True, True, True, False, True, False, True, True, True]
    assert module.gram_weight_schedule(2) == 0.0 and module.gram_weight_schedule(4) == 2.0
    assert module.local_dino_weight_schedule(1) == 1.0 and module.local_dino_weight_schedule(5) == 0.5
    assert all(p.requires_grad is False for p in module.gram_teacher.parameters())
    assert not module.gram_teacher.training


def test_gram_loss_uses_bicubic_resized_gram_teacher_features():
    """The Gram target of a 2x crop equals the Gram teacher's patch features resized to the student grid."""
    torch.manual_seed(0)
    module = DINOSSLModule(**{**tiny_module().hparams, "gram": GramConfig(enabled=True)})
    module.gram_initialized.fill_(True)
    images = torch.randn(4, 3, 32, 32)
    targets = module._gram_targets({"gram_crops": images}, num_student_patches=16)
    with torch.no_grad():
        patches = module.gram_teacher(images)["patch"]  # [4, 64, D] on an 8x8 grid
    grid = patches.transpose(1, 2).reshape(4, -1, 8, 8)
    expected = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False, antialias=False)
    torch.testing.assert_close(targets, expected.flatten(2).transpose(1, 2))
