"""DINOSSLModule pieces that need no Trainer: loss composition, EMA, schedules applied to the optimizer groups."""

import math

import pytest
import torch

from dinov3_pl.losses.centering import sinkhorn_knopp
from dinov3_pl.modules.ssl import DINOSSLModule
from dinov3_pl.modules.ssl_config import BackboneConfig, HeadConfig, LossConfig, OptimConfig, TeacherConfig

TINY = dict(depth=2, embed_dim=32, num_heads=2, patch_size=4, img_size=16)
BATCH, LOCALS = 4, 3


def make_module(build_schedules: bool = True, **kwargs) -> DINOSSLModule:
    torch.manual_seed(0)
    defaults = dict(
        backbone=BackboneConfig(timm_overrides=TINY),
        dino_head=HeadConfig(num_prototypes=64, hidden_dim=48, bottleneck_dim=16),
        ibot_head=HeadConfig(num_prototypes=32, hidden_dim=48, bottleneck_dim=16),
        optim=OptimConfig(total_steps=100, warmup_steps=10, freeze_last_layer_steps=5, lr_scaling="none"),
    )
    module = DINOSSLModule(**{**defaults, **kwargs})
    if build_schedules:
        module._build_schedules()
    return module


def make_batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    masks = torch.zeros(2 * BATCH, 16, dtype=torch.bool)
    masks[0, :3] = masks[3, 5:12] = masks[6, :1] = True
    return {
        "global_crops": torch.randn(2 * BATCH, 3, 16, 16, generator=generator),
        "local_crops": torch.randn(LOCALS * BATCH, 3, 8, 8, generator=generator),
        "masks": masks,
    }


def test_total_loss_is_the_upstream_weighted_sum():
    module = make_module()
    losses = module.compute_losses(make_batch(), step=0)
    global_pairs, local_pairs = 2, 2 * LOCALS  # diagonal skipped: 2 global pairs; 2 x 3 local pairs
    expected = (
        global_pairs / (global_pairs + local_pairs) * losses["dino_global"]
        + local_pairs / (global_pairs + local_pairs) * losses["dino_local"]
        + losses["ibot"]
        + 0.1 * 2 * losses["koleo"]
    )
    torch.testing.assert_close(losses["loss"], expected)


def test_dino_global_term_from_an_independent_computation():
    """Teacher targets recomputed by hand: SK over the teacher's global CLS logits at the warm-up temperature."""
    module = make_module()
    batch = make_batch()
    losses = module.compute_losses(batch, step=0)
    with torch.no_grad():
        teacher_cls = module.teacher.dino_head(module.teacher.backbone(batch["global_crops"])["cls"])
        targets = sinkhorn_knopp(teacher_cls, 0.04, 3).unflatten(0, (2, BATCH))
        student = module.student.dino_head(module.student.backbone(batch["global_crops"], masks=batch["masks"])["cls"])
        log_probs = torch.log_softmax(student / 0.1, dim=-1).unflatten(0, (2, BATCH))
        manual = -(targets[0] * log_probs[1]).sum(-1).mean() / 2 - (targets[1] * log_probs[0]).sum(-1).mean() / 2
    torch.testing.assert_close(losses["dino_global"], manual, rtol=1e-5, atol=1e-6)


def test_every_student_parameter_gets_a_gradient_and_teacher_none():
    module = make_module()
    module.compute_losses(make_batch(), step=0)["loss"].backward()
    assert [n for n, p in module.student.named_parameters() if p.grad is None] == []
    assert all(not p.requires_grad for p in module.teacher.parameters())


def test_ema_update_is_the_momentum_average():
    module = make_module()
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(torch.randn_like(p))
    teacher_before = [p.clone() for p in module.teacher.parameters()]
    module._update_teacher(0.9)
    pairs = zip(teacher_before, module.student.parameters(), module.teacher.parameters(), strict=True)
    for before, student, after in pairs:
        torch.testing.assert_close(after, 0.9 * before + 0.1 * student)


def test_teacher_stays_in_eval_mode_and_without_rope_jitter():
    module = make_module(backbone=BackboneConfig(timm_overrides=TINY, rope_rescale=2.0, drop_path_rate=0.2))
    module.train()
    assert module.student.training and not module.teacher.training
    assert module.student.backbone.rope_rescale == 2.0 and module.teacher.backbone.rope_rescale is None


def test_schedules_reach_the_optimizer_groups():
    module = make_module(
        optim=OptimConfig(
            total_steps=100, warmup_steps=10, freeze_last_layer_steps=5, head_warmup_steps=3, lr_scaling="none", lr=1e-3
        )
    )
    optimizer = module.configure_optimizers()
    by_kind = lambda step: (module._apply_schedules(optimizer, step), optimizer.param_groups)[1]  # noqa: E731
    for group in by_kind(2):
        if group["module"] == "backbone" or group["is_last_layer"]:
            assert group["lr"] == 0.0  # head warm-up freezes the backbone, last layer frozen
    for group in by_kind(4):
        expected = 0.0 if group["is_last_layer"] else module.lr_schedule(4) * group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected)
    for group in by_kind(50):
        assert group["lr"] == pytest.approx(module.lr_schedule(50) * group["lr_multiplier"])
        assert group["weight_decay"] == pytest.approx(module.wd_schedule(50) * group["wd_multiplier"])
    assert module.lr_schedule(9) == pytest.approx(1e-3)  # end of warm-up


def test_fused_adamw_option_steps_like_the_default_kernel():
    torch.manual_seed(0)
    settings = dict(total_steps=10, warmup_steps=0, freeze_last_layer_steps=0, lr_scaling="none")
    plain = make_module(optim=OptimConfig(**settings))
    fused = make_module(optim=OptimConfig(**settings, fused=True))
    fused.load_state_dict(plain.state_dict())
    optimizers = [plain.configure_optimizers(), fused.configure_optimizers()]
    assert [o.defaults["fused"] for o in optimizers] == [None, True]
    for module in (plain, fused):
        for index, parameter in enumerate(module.student.parameters()):
            parameter.grad = torch.full_like(parameter, 0.01 * (index % 7 - 3))
    for optimizer in optimizers:
        optimizer.step()
    for a, b in zip(plain.student.parameters(), fused.student.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_losses_before_the_schedules_exist_give_a_clear_error():
    module = make_module(build_schedules=False)
    with pytest.raises(RuntimeError, match="schedules are not built"):
        module.compute_losses(make_batch(), step=0)


def test_sqrt_lr_scaling_rule():
    module = make_module(build_schedules=False, optim=OptimConfig(total_steps=100, lr=1e-3, warmup_steps=0))
    module._global_batch_size = lambda: 256  # type: ignore[method-assign]
    module._build_schedules()
    assert module.lr_schedule(0) == pytest.approx(1e-3 * 4 * math.sqrt(256 / 1024))


def test_teacher_temperature_warmup_used_in_targets():
    module = make_module(
        teacher=TeacherConfig(temperature=0.07, temperature_warmup_start=0.04, temperature_warmup_steps=11)
    )
    assert module.teacher_temperature_schedule(0) == pytest.approx(0.04)
    assert module.teacher_temperature_schedule(5) == pytest.approx(0.055)
    assert module.teacher_temperature_schedule(20) == pytest.approx(0.07)


def test_softmax_centering_option_updates_the_centre():
    module = make_module(loss=LossConfig(centering="softmax"))
    assert torch.count_nonzero(module.teacher.dino_center.center) == 0
    losses = module.compute_losses(make_batch(), step=0)
    assert torch.isfinite(losses["loss"])
    centers = module.teacher.dino_center.center, module.teacher.ibot_center.center
    assert all(torch.count_nonzero(center) > 0 for center in centers)


def test_checkpoint_records_the_backbone_config():
    module = make_module()
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    record = {"arch": "vit_small_patch16_dinov3", "timm_overrides": TINY, "kind": "dinov3"}
    assert checkpoint["backbone_config"] == {**record, "prefix": "teacher.backbone."}
    assert checkpoint["backbone_configs"] == {
        "teacher": {**record, "prefix": "teacher.backbone."},
        "student": {**record, "prefix": "student.backbone."},
    }
