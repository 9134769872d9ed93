"""DINOSSLModule on the paths beyond the demo: gradient accumulation, skipped steps, smoke-test lengths, the Gram phase
started from a pretraining checkpoint, and the options --print_config shows."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from dinov3_pl.checkpointing import SafeModelCheckpoint
from dinov3_pl.cli import main as cli_main
from dinov3_pl.modules.ssl import DINOSSLModule
from dinov3_pl.modules.ssl_config import BackboneConfig, GramConfig
from tests.test_ssl_fit import InjectNaN, cli_args, tiny_data, tiny_module, trainer
from tests.test_weights import make_upstream_state_dict


def _student_and_optimizer(module: DINOSSLModule, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = {f"student.{k}": v.clone() for k, v in module.student.state_dict().items()}
    state.update({f"teacher.{k}": v.clone() for k, v in module.teacher.state_dict().items()})
    for index, moments in optimizer.state_dict()["state"].items():
        state.update({f"adamw.{index}.{name}": value.clone() for name, value in moments.items()})
    return state


class RecordSteps(L.Callback):
    """Per batch: the optimizer step it trains, the global RNG seed it ran with, the LR AdamW used for that step
    and the LR the module logged for it."""

    def __init__(self) -> None:
        self.seeds, self.used_lr, self.logged_lr = [], {}, {}
        self._pending_step: int | None = None

    def _read_logged(self, trainer) -> None:
        if self._pending_step is not None:
            self.logged_lr[self._pending_step] = float(trainer.callback_metrics["schedule/lr"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._read_logged(trainer)  # callbacks run before the module's hooks: this is the previous batch's log

    def on_before_backward(self, trainer, pl_module, loss):
        self.seeds.append((trainer.global_step, torch.initial_seed()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        group = next(g for g in optimizer.param_groups if g["module"] == "dino_head" and not g["is_last_layer"])
        self.used_lr[trainer.global_step] = group["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._pending_step = pl_module._step

    def on_train_end(self, trainer, pl_module):
        self._read_logged(trainer)


def test_accumulation_randomness_per_micro_batch_and_logged_lr_is_the_lr_used(tmp_path):
    L.seed_everything(0)
    module = tiny_module(lr_scaling="none")
    record = RecordSteps()
    trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2, enable_checkpointing=False, callbacks=[record]).fit(
        module, tiny_data()
    )
    # 4 batches -> 2 optimizer steps of 2 micro-batches; each micro-batch draws from its own seed.
    steps = [step for step, _ in record.seeds]
    assert steps == [0, 0, 1, 1]
    seeds = [seed for _, seed in record.seeds]
    assert len(set(seeds)) == 4
    # The first micro-batch keeps the seed a run without accumulation uses (runs stay reproducible across versions).
    run_seed = int(module.run_seed)
    assert seeds[0] == hash((run_seed, 0, 0)) % 2**63 and seeds[2] == hash((run_seed, 1, 0)) % 2**63
    # The logged LR of each step is the LR its optimizer step used (it was logged one step ahead before).
    assert record.logged_lr.keys() == record.used_lr.keys() == {0, 1}
    assert record.used_lr[0] != record.used_lr[1]
    for step, lr in record.used_lr.items():
        assert record.logged_lr[step] == pytest.approx(lr, rel=1e-6)
        assert lr == pytest.approx(module.lr_schedule(step), rel=1e-6)


def test_a_bad_micro_batch_drops_the_whole_accumulated_step(tmp_path):
    """NaN in the first micro-batch of step 1's window: no AdamW step and no EMA for step 1, although the second
    micro-batch was finite (before, AdamW stepped on it while the EMA was skipped)."""
    L.seed_everything(0)
    module = tiny_module()
    states = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                states["before"] = _student_and_optimizer(pl_module, trainer.optimizers[0])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 3:
                states["after"] = _student_and_optimizer(pl_module, trainer.optimizers[0])

    fit = trainer(
        tmp_path,
        max_epochs=1,
        accumulate_grad_batches=2,
        enable_checkpointing=False,
        callbacks=[InjectNaN({2}), Snapshot()],
    )
    fit.fit(module, tiny_data())
    assert fit.global_step == 2 and int(module.skipped_steps) == 1 and module.consecutive_bad_steps == 1
    for key, value in states["before"].items():
        assert torch.equal(states["after"][key], value), f"{key} changed in a dropped step"


def test_a_non_finite_gradient_drops_the_step(tmp_path):
    L.seed_everything(0)
    module = tiny_module()
    states = {}

    class InfGradient(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 1:
                states["before"] = _student_and_optimizer(pl_module, trainer.optimizers[0])
                next(pl_module.student.dino_head.parameters()).grad[0, 0] = float("inf")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                states["after"] = _student_and_optimizer(pl_module, trainer.optimizers[0])

    fit = trainer(tmp_path, max_steps=2, enable_checkpointing=False, callbacks=[InfGradient()])
    fit.fit(module, tiny_data())
    assert int(module.skipped_steps) == 1
    changed = [key for key, value in states["before"].items() if not torch.equal(states["after"][key], value)]
    # The gradients existed when the snapshot was taken, so only AdamW's step counters could differ: none do.
    assert changed == []


def test_bad_streak_vetoes_checkpoints_and_the_stop_names_the_last_good_one(tmp_path):
    L.seed_everything(0)
    module = DINOSSLModule(**{**tiny_module().hparams, "max_consecutive_bad_steps": 3})
    every_step = SafeModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    vetoes = []

    class WatchVeto(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            vetoes.append(pl_module.checkpoint_veto())

    fit = trainer(tmp_path, max_epochs=2, callbacks=[InjectNaN({2, 3, 4}), every_step, WatchVeto()])
    with pytest.raises(FloatingPointError, match=r"3 consecutive optimizer steps skipped.*step=2\.ckpt"):
        fit.fit(module, tiny_data())
    assert vetoes[:2] == [None, None] and all("skipped" in reason for reason in vetoes[2:])
    # The steps that produced non-finite losses were never saved: the newest file is that of step 2.
    assert sorted(path.name for path in (tmp_path / "ckpt").iterdir()) == ["step=1.ckpt", "step=2.ckpt"]


def test_the_bad_step_count_is_not_carried_into_a_resumed_run():
    module = tiny_module()
    module.on_load_checkpoint({"state_dict": {}, "consecutive_bad_steps": 9})
    assert module.consecutive_bad_steps == 0


@pytest.mark.parametrize("length", ["--trainer.fast_dev_run=true", "--trainer.max_steps=1", "--trainer.max_steps=5"])
def test_smoke_test_lengths_run_the_demo_config_with_one_warning(tmp_path, length):
    """The demo recipe warms up for 20 steps and freezes the last layer for 10; a shorter run halves them."""
    fixed = ("--trainer.max_steps", "--trainer.max_epochs", "--model.init_args.optim")
    args = [arg for arg in cli_args(tmp_path) if not arg.startswith(fixed)]
    with pytest.warns(UserWarning, match=r"optim\.warmup_steps 20 -> \d, optim\.freeze_last_layer_steps 10 -> \d"):
        cli = cli_main([*args, length])
    assert cli.trainer.global_step == (5 if length.endswith("5") else 1)
    assert cli.model.phase_steps["optim.warmup_steps"] == cli.trainer.global_step // 2


def test_print_config_shows_every_field_of_every_option_group(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", "configs/pretrain/demo_cpu.yaml", "--print_config"])
    printed = capsys.readouterr().out
    for group in ("backbone", "dino_head", "ibot_head", "loss", "teacher", "optim", "gram"):
        assert f"    {group}: null" not in printed
    for field in ("sinkhorn_iterations: 3", "momentum_schedule: cosine", "clip_per_module: true", "max_refreshes: 3"):
        assert field in printed


def test_bad_images_are_totalled_at_each_epoch_end_and_in_tensorboard(tmp_path):
    from dinov3_pl.data import ImageFolder
    from tests.helpers import logged_scalars
    from tests.test_multicrop import _image_folder

    root = _image_folder(tmp_path / "images", num_good=7)  # 7 good images + 1 corrupt, batches of 4: 2 per epoch
    data = tiny_data(ImageFolder(root), batch_size=4, knn_monitor=False)
    logger = TensorBoardLogger(tmp_path, name="bad_images")
    fit = trainer(tmp_path, max_epochs=2, logger=logger, enable_checkpointing=False, log_every_n_steps=1)
    with pytest.warns(UserWarning) as warned:
        fit.fit(tiny_module(), data)
    totals = [str(w.message) for w in warned if "undecodable image(s)" in str(w.message)]
    assert totals == [
        "epoch 0: skipped 1 undecodable image(s) (1 in this run); the warnings above name the files, or set "
        "data.init_args.train.init_args.on_bad_image=raise to stop at the first",
        "epoch 1: skipped 1 undecodable image(s) (2 in this run); the warnings above name the files, or set "
        "data.init_args.train.init_args.on_bad_image=raise to stop at the first",
    ]
    scalars = logged_scalars(logger)
    assert scalars["data/bad_images_epoch"] == [1.0, 1.0] and scalars["data/bad_images_total"] == [1.0, 2.0]


def test_the_batch_rule_scales_the_peak_lr_only(monkeypatch):
    """Upstream's IN-1k recipe (schedules v1, configs/config.py apply_scaling_rules_to_cfg) scales optim.lr by
    4 * sqrt(global batch / 1024) and leaves min_lr as configured."""
    module = tiny_module(lr=1e-3, min_lr=1e-6, lr_scaling="sqrt_wrt_1024", total_steps=100, warmup_steps=10)
    monkeypatch.setattr(module, "_global_batch_size", lambda: 4096)
    module._build_schedules()
    assert module.lr_schedule(10) == pytest.approx(1e-3 * 4 * 2)
    assert module.lr_schedule(100) == pytest.approx(1e-6)


def test_sharded_strategies_are_refused_with_a_clear_error():
    """Lightning's FSDP needs a GPU, so the refusal is checked on the module's set-up with the strategy object."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    module = tiny_module()
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="does not support the FSDPStrategy.*trainer.strategy=ddp"):
        module.setup("fit")
    module._trainer = SimpleNamespace(strategy=DDPStrategy())
    module.setup("fit")


# ------------------------------------------------------------------------------------------------ the Gram phase
def _pretrain(root, steps: int, **module_kwargs) -> tuple[DINOSSLModule, str]:
    L.seed_everything(0)
    module = DINOSSLModule(**{**tiny_module().hparams, **module_kwargs})
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True)
    trainer(root, max_steps=steps, callbacks=[checkpoint]).fit(module, tiny_data(gram_size=32))
    return module, checkpoint.last_model_path


class WatchGramTeacher(L.Callback):
    def __init__(self) -> None:
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = {key: value.clone() for key, value in pl_module.gram_teacher.state_dict().items()}
        self.rows.append((pl_module._step, int(pl_module.gram_refreshes), state))


def test_gram_phase_starts_from_a_pretraining_checkpoint_with_an_ema_snapshot(tmp_path):
    """As configs/pretrain/gram_anchoring.yaml documents: the pretraining checkpoint has no Gram teacher; the phase
    snapshots the EMA teacher restored from it at start_step and refreshes it at the documented steps."""
    pretrained, path = _pretrain(tmp_path / "pretrain", steps=3)
    teacher_at_start = {k: v.clone() for k, v in pretrained.teacher.backbone.state_dict().items()}
    gram = GramConfig(enabled=True, start_step=3, ramp_steps=2, first_refresh_step=5, refresh_every=1, max_refreshes=1)
    module = DINOSSLModule(**{**tiny_module().hparams, "gram": gram})
    watch = WatchGramTeacher()
    fit = trainer(tmp_path / "gram", max_steps=7, callbacks=[watch], enable_checkpointing=False)
    fit.fit(module, tiny_data(gram_size=32), ckpt_path=path)
    steps = [step for step, _, _ in watch.rows]
    assert steps == [3, 4, 5, 6]
    for key, value in watch.rows[0][2].items():  # snapshot when step 3 starts = the restored EMA teacher
        assert torch.equal(value, teacher_at_start[key]), key
    assert [refreshes for _, refreshes, _ in watch.rows] == [0, 0, 1, 1]  # refreshed once, when step 5 starts
    same = [
        torch.equal(a[2]["vit.cls_token"], b[2]["vit.cls_token"])
        for a, b in zip(watch.rows, watch.rows[1:], strict=False)
    ]
    assert same == [True, False, True]


def test_gram_phase_from_a_pretraining_checkpoint_keeps_released_teacher_weights(tmp_path):
    """gram.teacher_weights (a released upstream .pth) is the Gram teacher, not overwritten by the checkpoint."""
    layout = dict(embed_dim=32, depth=2, num_heads=2, ffn="mlp", ffn_hidden=128, patch=4)
    released = tmp_path / "released.pth"
    torch.save(make_upstream_state_dict(seed=3, **layout), released)
    tiny = {"timm_overrides": tiny_module().backbone_config.timm_overrides, "arch": "vit_small_patch16_dinov3_qkvb"}
    _, path = _pretrain(tmp_path / "pretrain", steps=2, backbone=BackboneConfig(**tiny))
    gram = GramConfig(enabled=True, start_step=0, ramp_steps=2, teacher_weights=str(released))
    module = DINOSSLModule(**{**tiny_module().hparams, "backbone": BackboneConfig(**tiny), "gram": gram})
    expected = {k: v.clone() for k, v in module.gram_teacher.state_dict().items()}
    watch = WatchGramTeacher()
    trainer(tmp_path / "gram", max_steps=4, callbacks=[watch], enable_checkpointing=False).fit(
        module, tiny_data(gram_size=32), ckpt_path=path
    )
    assert [step for step, _, _ in watch.rows] == [2, 3]
    for key, value in watch.rows[-1][2].items():
        assert torch.equal(value, expected[key]), key
    assert not torch.equal(watch.rows[-1][2]["vit.cls_token"], module.teacher.backbone.vit.cls_token)


def test_null_given_on_the_command_line_for_a_nested_option_is_none():
    """jsonargparse 4.53 passes `--model.init_args.backbone.arch=null` as the string "None" to nested dataclass
    fields (a YAML file's null arrives right); the option groups read it as None."""
    from dinov3_pl.modules.ssl_config import DistillationTeacherConfig

    assert BackboneConfig(arch="None", weights="None").arch is None
    assert DistillationTeacherConfig(weights="t.ckpt", arch="None").arch is None
    assert GramConfig(teacher_weights="None").teacher_weights is None
    assert BackboneConfig(arch="vit_small_patch16_dinov3").arch == "vit_small_patch16_dinov3"
