"""TrainingHealth (dinov3_pl/callbacks/training_health.py): the statistics against direct formulas (and summed over
ranks), the states, and tiny runs that reach each state on purpose (one warning per state, naming the fix) or stay
healthy (no warning)."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.nn import functional as F

from dinov3_pl.callbacks.training_health import (
    HealthSums,
    TrainingHealth,
    TrainingHealthWarning,
    classify_health,
    dino_health_sums,
    summarise_health,
)
from dinov3_pl.data.datasets import SyntheticShapes
from dinov3_pl.data.multicrop import MultiCropDataModule
from dinov3_pl.losses.ibot import IBOTPatchLoss
from dinov3_pl.modules.pretraining import PretrainingModule
from dinov3_pl.modules.ssl import DINOSSLModule
from dinov3_pl.modules.ssl_config import BackboneConfig, HeadConfig, LossConfig, OptimConfig, TeacherConfig
from tests.helpers import logged_scalars


# ------------------------------------------------------------------------------------------------ statistics
def _random_batch(generator: torch.Generator, rows: int = 12, prototypes: int = 16, dim: int = 8):
    probs = torch.softmax(torch.randn(rows, prototypes, generator=generator) * 3, dim=-1)
    logits = torch.randn(rows, prototypes, generator=generator)
    cls = torch.randn(rows, dim, generator=generator)
    return probs, logits, cls


def test_statistics_match_direct_formulas():
    generator = torch.Generator().manual_seed(0)
    probs, logits, cls = _random_batch(generator)
    masks = torch.zeros(4, 9, dtype=torch.bool)
    masks[0, :3] = masks[2, 4:] = True  # 2 of 4 crops masked
    ibot = torch.tensor(1.7)
    sums = dino_health_sums(
        dino_loss=torch.tensor(2.5),
        target_probs=probs.unflatten(0, (2, -1)),
        student_logits=logits.unflatten(0, (2, -1)),
        cls_features=cls,
        ibot_loss=ibot,
        masks=masks,
        ibot_prototypes=32,
    )
    stats = summarise_health(sums)
    ln_k = math.log(16)
    entropy = torch.distributions.Categorical(probs=probs).entropy().mean()
    used = len(set(probs.argmax(-1).tolist()))
    assert stats["dino_loss_over_ln_k"] == pytest.approx(2.5 / ln_k)
    assert stats["target_entropy_over_ln_k"] == pytest.approx(float(entropy) / ln_k, rel=1e-5)
    assert stats["target_prototypes_used"] == used
    assert stats["target_prototypes_used_fraction"] == pytest.approx(used / 12)  # min(K=16, rows=12)
    assert stats["student_logit_std"] == pytest.approx(float(logits.std(-1, unbiased=False).mean()), rel=1e-5)
    normalised = F.normalize(cls, dim=-1)
    assert stats["cls_std"] == pytest.approx(float(normalised.std(0, unbiased=False).mean()) * math.sqrt(8), rel=1e-4)
    # iBOT divides by all 4 crops; the statistic is the mean over the 2 masked ones.
    assert stats["ibot_loss_over_ln_k"] == pytest.approx(1.7 * 4 / 2 / math.log(32))
    # Identical features: no spread at all.
    same = summarise_health(
        dino_health_sums(
            dino_loss=torch.tensor(1.0), target_probs=probs, student_logits=logits, cls_features=cls[:1].expand(12, -1)
        )
    )
    assert same["cls_std"] == pytest.approx(0.0, abs=1e-3)


def test_sums_over_ranks_give_the_global_batch():
    """What the callback's all-reduce computes: two ranks' partial sums added equal the statistics of the whole."""
    generator = torch.Generator().manual_seed(1)
    probs, logits, cls = _random_batch(generator, rows=16)
    masks = torch.rand(8, 9, generator=generator) < 0.4
    masks[1] = masks[6] = False  # unmasked crops on both ranks
    student = torch.randn(int(masks.sum()), 32, generator=generator)
    teacher = torch.softmax(torch.randn(int(masks.sum()), 32, generator=generator), dim=-1)
    loss = IBOTPatchLoss()

    def sums(rows: slice, crops: slice) -> HealthSums:
        rank_masks = masks[crops]
        first = int(masks[: crops.start].sum()) if crops.start else 0
        patches = slice(first, first + int(rank_masks.sum()))
        dino = F.cross_entropy(logits[rows], probs[rows])
        return dino_health_sums(
            dino_loss=dino,
            target_probs=probs[rows],
            student_logits=logits[rows],
            cls_features=cls[rows],
            ibot_loss=loss(student[patches], teacher[patches], rank_masks),
            masks=rank_masks,
            ibot_prototypes=32,
        )

    rank0, rank1 = sums(slice(0, 8), slice(0, 4)), sums(slice(8, 16), slice(4, 8))
    reduced = HealthSums({k: rank0.tensors[k] + rank1.tensors[k] for k in rank0.tensors}, 16, 32)
    whole = sums(slice(0, 16), slice(0, 8))
    expected, got = summarise_health(whole), summarise_health(reduced)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key


def test_states_from_statistics():
    healthy = {
        "dino_loss_over_ln_k": 0.6,
        "ibot_loss_over_ln_k": 0.7,
        "target_entropy_over_ln_k": 0.4,
        "target_prototypes_used": 20.0,
        "target_prototypes_used_fraction": 0.6,
        "student_logit_std": 0.2,
        "cls_std": 0.7,
    }
    assert classify_health(healthy) == []
    assert classify_health({**healthy, "ibot_loss_over_ln_k": 1.004, "target_entropy_over_ln_k": 0.98}) == ["uniform"]
    # Loss at ln K with sharp targets is a student that has not caught up yet, not the fixed point.
    assert classify_health({**healthy, "dino_loss_over_ln_k": 1.0}) == []
    few = {**healthy, "target_prototypes_used_fraction": 1 / 16, "target_entropy_over_ln_k": 0.05}
    assert classify_health(few) == ["few_prototypes"]
    assert classify_health({**few, "cls_std": 0.01}) == ["few_prototypes", "dimensional_collapse"]
    assert classify_health({**healthy, "cls_std": math.nan}) == []


# ------------------------------------------------------------------------------------------------ the module side
TINY = dict(depth=2, embed_dim=32, num_heads=2, patch_size=4, img_size=16)


def tiny_module(
    steps: int,
    init_values: float = 0.1,
    temperature: float = 0.01,
    momentum: float = 0.96,
    lr: float = 1e-2,
    prototypes: int = 64,
    loss: dict | None = None,
    health: dict | bool | None = None,
    **optim,
) -> DINOSSLModule:
    head = HeadConfig(num_prototypes=prototypes, hidden_dim=64, bottleneck_dim=16)
    L.seed_everything(0)  # the same initial weights whatever ran before
    return DINOSSLModule(
        backbone=BackboneConfig(timm_overrides={**TINY, "init_values": init_values}),
        dino_head=head,
        ibot_head=head,
        loss=LossConfig(**(loss or {})),
        teacher=TeacherConfig(
            momentum=momentum,
            temperature=temperature if isinstance(temperature, float) else temperature[1],
            temperature_warmup_start=temperature if isinstance(temperature, float) else temperature[0],
            temperature_warmup_steps=steps,
        ),
        optim=OptimConfig(
            **{
                "lr": lr,
                "lr_scaling": "none",
                "total_steps": steps,
                "warmup_steps": 2,
                "freeze_last_layer_steps": 1,
                **optim,
            }
        ),
        training_health=health if health is not None else {"every_n_steps": 1, "patience_steps": 5},
    )


def tiny_data(steps: int) -> MultiCropDataModule:
    return MultiCropDataModule(
        train=SyntheticShapes(8 * steps, image_size=24, seed=0),
        patch_size=4,
        global_size=16,
        local_size=8,
        num_local_crops=2,
        blur_kernel_size=3,
        batch_size=8,
        num_workers=0,
    )


def fit(
    module: DINOSSLModule, steps: int, logger=False, data_steps: int | None = None, ckpt_path=None, save_to=None
) -> tuple[list[str], TrainingHealth]:
    """Fits up to step ``steps`` (from ``ckpt_path`` if given; the data sized for ``data_steps``, default ``steps``),
    saves a checkpoint to ``save_to`` if given; returns the training-health warnings and the callback."""
    L.seed_everything(0)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, tiny_data(data_steps or steps), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    health = next(c for c in trainer.callbacks if isinstance(c, TrainingHealth))
    return [str(w.message) for w in caught if issubclass(w.category, TrainingHealthWarning)], health


def test_diagnostics_leave_the_losses_and_gradients_unchanged():
    module = tiny_module(steps=4)
    module._build_schedules()
    generator = torch.Generator().manual_seed(1)
    masks = torch.zeros(8, 16, dtype=torch.bool)
    masks[0, :3] = masks[3, 5:12] = True
    batch = {
        "global_crops": torch.randn(8, 3, 16, 16, generator=generator),
        "local_crops": torch.randn(8, 3, 8, 8, generator=generator),
        "masks": masks,
    }
    results = []
    for collect in (False, True):
        module.collect_health_diagnostics = collect
        module.health_diagnostics = None
        torch.manual_seed(0)
        module.zero_grad()
        losses = module.compute_losses(batch, step=0)
        losses["loss"].backward()
        grads = [p.grad.clone() for p in module.student.parameters() if p.grad is not None]
        results.append((losses, grads, module.health_diagnostics))
    (losses_off, grads_off, none), (losses_on, grads_on, sums) = results
    assert none is None and isinstance(sums, HealthSums)
    assert all(torch.equal(losses_off[k], losses_on[k]) for k in losses_off)
    assert all(torch.equal(a, b) for a, b in zip(grads_off, grads_on, strict=True))
    assert not any(t.requires_grad for t in sums.tensors.values())


def test_on_by_default_off_with_false_and_bad_values_are_an_error():
    assert any(isinstance(c, TrainingHealth) for c in tiny_module(4, health=True).configure_callbacks())
    off = tiny_module(4, health=False)
    assert not any(isinstance(c, TrainingHealth) for c in off.configure_callbacks())
    configured = next(
        c for c in tiny_module(4, health={"patience_steps": 7}).configure_callbacks() if isinstance(c, TrainingHealth)
    )
    assert configured.patience_steps == 7
    with pytest.raises(ValueError, match="training_health must be true, false or a dict"):
        tiny_module(4, health="yes")
    # A method that does not compute the statistics (the distillation modules) says so instead of staying silent.
    with pytest.raises(ValueError, match="training_health is not available for PretrainingModule.*set it to false"):
        PretrainingModule(training_health=True)
    with pytest.raises(ValueError, match=r"\['uniform_tol'\] are unknown; the thresholds are: uniform_tolerance"):
        TrainingHealth(thresholds={"uniform_tol": 0.1})


# ------------------------------------------------------------------------------------------------ runs
def test_upstream_settings_sit_at_the_uniform_fixed_point_warned_once_with_the_fix(tmp_path):
    """Upstream's teacher (0.04 -> 0.07, momentum 0.996), LayerScale 1e-5 and LR 5e-4 on a tiny model: DINO and
    iBOT at ln K and the CLS features of all images the same, from the first step to the last."""
    steps = 10
    module = tiny_module(steps, init_values=1e-5, temperature=(0.04, 0.07), momentum=0.996, lr=5e-4)
    logger = TensorBoardLogger(tmp_path, name="health")
    messages, health = fit(module, steps, logger=logger)
    uniform = [m for m in messages if "uniform fixed point" in m]
    collapsed = [m for m in messages if "CLS features have collapsed" in m]
    assert len(uniform) == 1 and len(collapsed) == 1 and len(messages) == 2, messages
    assert "model.init_args.teacher.temperature" in uniform[0] and "now 0.04 -> 0.07" in uniform[0]
    assert "model.init_args.teacher.momentum: 0.96 (now 0.996)" in uniform[0]
    assert "model.init_args.backbone.timm_overrides.init_values: 0.1 (now 1e-05)" in uniform[0]
    assert "model.init_args.optim.lr" in uniform[0] and "DINO loss 1.00" in uniform[0]
    assert "init_values: 0.1" in collapsed[0] and "optim.lr" in collapsed[0]
    assert health.last_states == ["uniform", "dimensional_collapse"]
    scalars = logged_scalars(logger)
    assert len(scalars["health/dino_loss_over_ln_k"]) == steps  # every_n_steps=1
    assert all(abs(value - 1) < 0.01 for value in scalars["health/dino_loss_over_ln_k"])
    for tag in (
        "ibot_loss_over_ln_k",
        "target_entropy_over_ln_k",
        "target_prototypes_used",
        "student_logit_std",
        "cls_std",
        "target_prototypes_used_fraction",
    ):
        assert f"health/{tag}" in scalars, tag


def test_softmax_centering_with_a_sharp_teacher_collapses_onto_one_prototype_warned_once():
    """Softmax centring with a slow centre (momentum 0.99) and a teacher at 0.01: every image's target is the same
    prototype within a few steps; the loss falls towards 0 while nothing is learnt."""
    steps = 12
    module = tiny_module(steps, loss={"centering": "softmax", "center_momentum": 0.99})
    messages, health = fit(module, steps)
    assert len(messages) == 1 and "collapsed onto a few prototypes" in messages[0], messages
    assert "model.init_args.loss.centering: sinkhorn_knopp (now softmax)" in messages[0]
    assert health.last_states == ["few_prototypes"] and health.last_stats["target_prototypes_used"] == 1


def test_healthy_run_prints_nothing(tmp_path):
    """A tiny run that leaves the initial state: sharp teacher, fast EMA, LayerScale 0.1, constant LR 5e-2 without
    weight decay, 16 prototypes (checked at every step: a state never holds for 5 steps in a row)."""
    steps = 16
    module = tiny_module(
        steps, momentum=0.9, lr=5e-2, prototypes=16, lr_schedule="constant", weight_decay=0.0, weight_decay_end=0.0
    )
    logger = TensorBoardLogger(tmp_path, name="healthy")
    messages, _ = fit(module, steps, logger=logger)
    assert messages == []
    # It is healthy, not merely short: informative targets and spread features in the second half.
    scalars = {key: values[steps // 2 :] for key, values in logged_scalars(logger).items()}
    assert min(scalars["health/target_entropy_over_ln_k"]) < 0.9 and min(scalars["health/cls_std"]) > 0.1


def test_a_resumed_run_keeps_the_warnings_given_and_the_states_in_progress(tmp_path):
    """The softmax collapse of the test above, stopped after 4 steps (the state already holding) and resumed from
    its checkpoint: the warning comes at the step of the uninterrupted run (the run of the state was restored),
    and a second resume after it does not repeat it."""
    steps = 12

    def run(max_steps: int, ckpt_path=None) -> tuple[list[str], TrainingHealth]:
        module = tiny_module(steps, loss={"centering": "softmax", "center_momentum": 0.99})
        save_to = tmp_path / f"step{max_steps}.ckpt"
        return fit(module, max_steps, data_steps=steps, ckpt_path=ckpt_path, save_to=save_to)

    whole, _ = run(steps)
    assert len(whole) == 1
    first, health = run(4)
    assert first == [] and "few_prototypes" in health._since
    resumed, health = run(steps - 2, tmp_path / "step4.ckpt")
    assert resumed == whole  # same message: same start of the state, same step
    again, health = run(steps, tmp_path / f"step{steps - 2}.ckpt")
    assert again == [] and health.warned == {"few_prototypes"}
