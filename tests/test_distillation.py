"""Distillation: a frozen teacher with heads into several DINOv3 students (upstream's multi-distillation), and feature
distillation from a backbone without heads; losses against direct computations, isolation of the students,
checkpoints, exact resume, bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dinov3_pl.losses import sinkhorn_knopp
from dinov3_pl.modules import DINOSSLModule
from dinov3_pl.modules.distillation import DistillationModule, FeatureDistillationModule
from dinov3_pl.modules.ssl_config import (
    BackboneConfig,
    DistillationTeacherConfig,
    HeadConfig,
    OptimConfig,
    StudentConfig,
)
from tests.test_ssl_fit import tiny_data, trainer

HEAD = HeadConfig(num_prototypes=64, hidden_dim=48, bottleneck_dim=16)
TEACHER = dict(depth=2, embed_dim=48, num_heads=3, patch_size=4, img_size=16)
OPTIM = OptimConfig(total_steps=8, warmup_steps=2, freeze_last_layer_steps=1, lr_scaling="none", layer_decay=1.0)


def student(name: str, embed_dim: int, depth: int = 1, **optim) -> StudentConfig:
    overrides = dict(depth=depth, embed_dim=embed_dim, num_heads=2, patch_size=4, img_size=16)
    return StudentConfig(
        name=name,
        backbone=BackboneConfig(timm_overrides=overrides, drop_path_rate=0.1),
        optim=OptimConfig(**{**OPTIM.__dict__, **optim}),
    )


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    """A DINOSSLModule checkpoint (random weights are enough: distillation only reads them), saved as a run saves
    it: the EMA teacher with its heads, and the record of its backbone."""
    torch.manual_seed(0)
    module = DINOSSLModule(backbone=BackboneConfig(timm_overrides=TEACHER), dino_head=HEAD, ibot_head=HEAD)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    torch.save(checkpoint, path)
    return str(path)


def distillation(teacher_ckpt: str, **kwargs) -> DistillationModule:
    torch.manual_seed(1)
    options = dict(
        teacher=DistillationTeacherConfig(weights=teacher_ckpt, temperature=0.05, temperature_warmup_start=0.05),
        students=[student("small", 32), student("wide", 64, depth=2, lr=2e-3)],
    )
    return DistillationModule(**{**options, **kwargs})


def test_one_teacher_forward_serves_students_whose_losses_are_the_direct_computation(teacher_ckpt):
    module = distillation(teacher_ckpt)
    module._global_batch_size = lambda: 8  # type: ignore[method-assign]
    module._build_schedules()
    torch.manual_seed(2)
    batch = {
        "global_crops": torch.randn(8, 3, 16, 16),
        "local_crops": torch.randn(8, 3, 8, 8),
        "masks": torch.rand(8, 16) < 0.3,
    }
    calls = []
    module.teacher.backbone.register_forward_hook(lambda *args: calls.append(1))
    losses = module.compute_losses(batch, step=0)
    assert len(calls) == 1  # one teacher forward for both students
    assert {key.split("/")[0] for key in losses if "/" in key} == {"small", "wide"}
    torch.testing.assert_close(losses["loss"], losses["small/loss"] + losses["wide/loss"])
    # The DINO global term of one student, recomputed by hand from the frozen teacher's Sinkhorn-Knopp targets
    # (the student in eval mode on both sides, so that drop path draws nothing).
    small = module.students["small"].eval()
    with torch.no_grad():
        eval_losses = module.compute_losses(batch, step=0)
        teacher_cls = module.teacher.dino_head(module.teacher.backbone(batch["global_crops"])["cls"])
        targets = sinkhorn_knopp(teacher_cls, 0.05, 3).unflatten(0, (2, 4))
        logits = small.dino_head(small.backbone(batch["global_crops"], masks=batch["masks"])["cls"])
    log_probs = torch.log_softmax(logits / 0.1, dim=-1).unflatten(0, (2, 4))
    manual = -(targets[0] * log_probs[1]).sum(-1).mean() / 2 - (targets[1] * log_probs[0]).sum(-1).mean() / 2
    torch.testing.assert_close(eval_losses["small/dino_global"], manual, rtol=1e-5, atol=1e-6)


def test_students_never_touch_each_others_gradients(teacher_ckpt):
    module = distillation(teacher_ckpt)
    module._global_batch_size = lambda: 8  # type: ignore[method-assign]
    module._build_schedules()
    batch = {"global_crops": torch.randn(8, 3, 16, 16), "masks": torch.rand(8, 16) < 0.3}
    module.compute_losses(batch, step=0)["small/loss"].backward()
    small, wide = module.students["small"], module.students["wide"]
    assert all(p.grad is not None for p in small.backbone.parameters())
    assert all(p.grad is None for p in wide.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())


def test_a_fit_trains_the_students_and_their_emas_and_leaves_the_teacher(teacher_ckpt, tmp_path):
    L.seed_everything(0)
    module = distillation(teacher_ckpt)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    ema_before = {k: v.clone() for k, v in module.student_emas.state_dict().items()}
    optimizer_groups = []

    class Groups(L.Callback):
        def on_train_start(self, trainer, pl_module):
            optimizer_groups.extend(trainer.optimizers[0].param_groups)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_steps=3, callbacks=[checkpoint, Groups()]).fit(module, tiny_data())
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert any(not torch.equal(v, ema_before[k]) for k, v in module.student_emas.state_dict().items())
    # Each student has its own parameter groups and LR schedule (the "wide" one peaks at 2e-3).
    assert {group["owner"] for group in optimizer_groups} == {"small", "wide"}
    assert module.owner_schedules["wide"]["lr"](2) == pytest.approx(2e-3)
    saved = torch.load(checkpoint.last_model_path, map_location="cpu", weights_only=True)
    assert not any(key.startswith("teacher.") for key in saved["state_dict"])  # rebuilt from its file
    assert list(saved["backbone_configs"]) == ["small", "wide"]
    assert saved["backbone_config"]["prefix"] == "student_emas.small.average.backbone."


def test_distillation_resumes_exactly(teacher_ckpt, tmp_path):
    def fit(root, max_steps, resume):
        L.seed_everything(0 if not resume else 5)
        module = distillation(teacher_ckpt)
        checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
        run = trainer(root, max_steps=max_steps, max_epochs=-1, limit_train_batches=3, callbacks=[checkpoint])
        run.fit(module, tiny_data(), ckpt_path="last" if resume else None)
        return module, run

    straight, straight_run = fit(tmp_path / "straight", 6, resume=False)
    fit(tmp_path / "resumed", 4, resume=False)  # stops inside epoch 2
    resumed, resumed_run = fit(tmp_path / "resumed", 6, resume=True)
    assert resumed_run.global_step == 6
    expected = straight.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key
    for a, b in zip(
        straight_run.optimizers[0].state_dict()["state"].values(),
        resumed_run.optimizers[0].state_dict()["state"].values(),
        strict=True,
    ):
        assert all(torch.equal(a[name], b[name]) for name in ("exp_avg", "exp_avg_sq"))


def test_a_different_teacher_file_on_resume_is_refused(teacher_ckpt, tmp_path):
    module = distillation(teacher_ckpt)
    checkpoint = {"state_dict": {}, "teacher_fingerprint": "0123456789abcdef"}
    with pytest.raises(ValueError, match="teacher weights .* differ from those the checkpoint was trained with"):
        module.on_load_checkpoint(checkpoint)


def test_bad_input_gives_one_clear_line(teacher_ckpt, tmp_path):
    with pytest.raises(ValueError, match="patch size \\(stride\\) 8 but the teacher 4"):
        overrides = dict(depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=16)
        distillation(teacher_ckpt, students=[StudentConfig(backbone=BackboneConfig(timm_overrides=overrides))])
    with pytest.raises(ValueError, match="num_prototypes=32 but the teacher's head has 64"):
        bad = StudentConfig(
            backbone=student("s", 32).backbone,
            dino_head=HeadConfig(num_prototypes=32, hidden_dim=48, bottleneck_dim=16),
        )
        distillation(teacher_ckpt, students=[bad])
    with pytest.raises(ValueError, match="distinct Python identifiers"):
        distillation(teacher_ckpt, students=[student("a", 32), student("a", 32)])
    unknown = tmp_path / "unknown.pth"
    torch.save({"weights": torch.zeros(3)}, unknown)
    with pytest.raises(ValueError, match="not a dinov3-pl checkpoint with heads.*FeatureDistillationModule"):
        distillation(str(unknown))
    released = tmp_path / "backbone_only.ckpt"
    checkpoint = torch.load(teacher_ckpt, weights_only=True)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "head" not in k}
    torch.save(checkpoint, released)
    with pytest.raises(ValueError, match="no DINO head beside its backbone"):
        distillation(str(released))
    with pytest.raises(ValueError, match="teacher needs weights"):
        DistillationModule(students=[student("s", 32)])


def test_feature_distillation_from_a_backbone_without_heads(teacher_ckpt, tmp_path):
    """A DINOv3 ViT student with another patch size than the teacher: the teacher's 4x4 grid is resized to its
    2x2 grid; the losses are the AM-RADIO blend computed by hand."""
    L.seed_everything(0)
    overrides = dict(depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=16)
    module = FeatureDistillationModule(
        teacher=DistillationTeacherConfig(weights=teacher_ckpt),
        students=[StudentConfig(name="vit", backbone=BackboneConfig(timm_overrides=overrides), optim=OPTIM)],
    )
    images = torch.randn(4, 3, 16, 16)
    module.eval()
    with torch.no_grad():
        terms = module.feature_losses(module.students["vit"], images, module.teacher(images))
        out = module.students["vit"].backbone(images)
        teacher = module.teacher(images)
        grid = teacher["patch"].transpose(1, 2).reshape(4, 48, 4, 4)
        target = torch.nn.functional.interpolate(grid, size=(2, 2), mode="bilinear", align_corners=False)
        target = target.flatten(2).transpose(1, 2)
        patch = module.students["vit"].patch_head(out["patch"])
        cosine = (1 - torch.nn.functional.cosine_similarity(patch, target, dim=-1)).mean()
        smooth = torch.nn.functional.smooth_l1_loss(patch, target)
    torch.testing.assert_close(terms["patch_cosine"], cosine)
    torch.testing.assert_close(terms["loss"], terms["cls_cosine"] + 0.9 * cosine + 0.1 * smooth)
    trainer(tmp_path, max_steps=2).fit(module, tiny_data(num_local_crops=0))
    assert module.global_step == 2


def test_a_timm_cnn_student_end_to_end(teacher_ckpt, tmp_path):
    """Feature distillation into a timm ResNet (stride 8 here: a 2x2 grid on 16 px crops), then the student's EMA
    evaluated by KNN straight from the checkpoint with arch: null."""
    from dinov3_pl.data import ClassificationDataModule, SyntheticShapes
    from dinov3_pl.models import TimmBackbone
    from dinov3_pl.modules import KNN

    L.seed_everything(0)
    cnn = StudentConfig(
        name="cnn", backbone=BackboneConfig("resnet10t", timm_overrides={"output_stride": 8}), optim=OPTIM
    )
    module = FeatureDistillationModule(teacher=DistillationTeacherConfig(weights=teacher_ckpt), students=[cnn])
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_steps=2, callbacks=[checkpoint]).fit(module, tiny_data(num_local_crops=0))
    assert torch.isfinite(torch.as_tensor(float(module.trainer.callback_metrics["train/cnn/loss"])))
    knn = KNN(arch=None, weights=checkpoint.last_model_path, backbone_kwargs=None, ks=(5,))
    assert isinstance(knn.backbone, TimmBackbone)
    for key, value in module.student_emas["cnn"].average.backbone.state_dict().items():
        assert torch.equal(knn.backbone.state_dict()[key], value), key
    data = ClassificationDataModule(
        train=SyntheticShapes(32, seed=0), val=SyntheticShapes(16, seed=1), image_size=16, knn_mode=True, batch_size=16
    )
    results = trainer(tmp_path / "knn").validate(knn, data)
    assert 0.0 <= results[0]["knn/top1_k5"] <= 1.0


def test_an_unknown_student_name_is_one_clear_line(teacher_ckpt):
    unknown = StudentConfig(backbone=BackboneConfig("resnet_that_does_not_exist"), optim=OPTIM)
    with pytest.raises(ValueError, match="resnet_that_does_not_exist") as error:
        FeatureDistillationModule(teacher=DistillationTeacherConfig(weights=teacher_ckpt), students=[unknown])
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="patch size \\(stride\\) 8 but the teacher 4.*FeatureDistillationModule"):
        cnn = StudentConfig(backbone=BackboneConfig("resnet10t", timm_overrides={"output_stride": 8}), optim=OPTIM)
        distillation(teacher_ckpt, students=[cnn])


@pytest.fixture(scope="module")
def demo_teacher_ckpt(tmp_path_factory) -> str:
    """A teacher of the pretraining demo's architecture (configs/pretrain/demo_cpu.yaml), random weights."""
    torch.manual_seed(0)
    overrides = {"embed_dim": 96, "depth": 4, "num_heads": 3, "patch_size": 8, "img_size": 48, "init_values": 0.1}
    head = HeadConfig(num_prototypes=256, hidden_dim=256, bottleneck_dim=64)
    module = DINOSSLModule(backbone=BackboneConfig(timm_overrides=overrides), dino_head=head, ibot_head=head)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path_factory.mktemp("demo_teacher") / "last.ckpt"
    torch.save(checkpoint, path)
    return str(path)


SMOKE = (
    "--trainer.fast_dev_run=true",
    "--trainer.logger=false",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
    # The embedded shapes in place of the recipes' image folders.
    "--data.init_args.train={class_path: dinov3_pl.data.SyntheticShapes, init_args: {num_samples: 8}}",
    "--data.init_args.batch_size=4",
    "--data.init_args.num_workers=0",
    "--data.init_args.knn_monitor=false",
)


def test_the_distillation_demo_config_runs(demo_teacher_ckpt, tmp_path):
    from dinov3_pl.cli import main as cli_main

    cli = cli_main(
        [
            "fit",
            "--config=configs/distill/demo_cpu.yaml",
            f"--trainer.default_root_dir={tmp_path}",
            f"--checkpoint.dirpath={tmp_path}/checkpoints",
            f"--model.init_args.teacher.weights={demo_teacher_ckpt}",
            *SMOKE,
        ]
    )
    assert cli.trainer.global_step == 1 and set(cli.model.students) == {"small", "mid"}


@pytest.mark.parametrize("student_arch", ["resnet50", "convnext_tiny"])
def test_the_feature_distillation_configs_run(teacher_ckpt, tmp_path, student_arch):
    """The released-teacher recipes with the tiny dinov3-pl teacher in place of the released ViT-B/16 (arch null:
    the checkpoint records it) and 32 px crops (one 1x1 cell of the stride-32 CNN)."""
    from dinov3_pl.cli import main as cli_main

    cli = cli_main(
        [
            "fit",
            f"--config=configs/distill/release_to_{student_arch}.yaml",
            f"--trainer.default_root_dir={tmp_path}",
            f"--checkpoint.dirpath={tmp_path}/checkpoints",
            f"--model.init_args.teacher.weights={teacher_ckpt}",
            "--model.init_args.teacher.arch=null",
            "--data.init_args.global_size=32",
            "--data.init_args.patch_size=4",
            *SMOKE,
        ]
    )
    assert cli.trainer.global_step == 1 and type(cli.model.students[student_arch].backbone).__name__ == "TimmBackbone"


def test_the_ema_of_a_cnn_follows_its_batch_norm_statistics():
    """Averaging parameters alone left a ResNet's EMA normalising with its initial running statistics: its features
    degenerated (kNN at chance on Fashion-MNIST after a DINO run). The running mean / variance are averaged too."""
    from dinov3_pl.models import TimmBackbone
    from dinov3_pl.modules.teachers import EMA

    torch.manual_seed(0)
    student = TimmBackbone("resnet10t")
    ema = EMA(student)
    student.train()
    with torch.no_grad():
        student(torch.randn(8, 3, 32, 32) * 3 + 1)  # moves the student's running statistics
    before = {k: v.clone() for k, v in ema.average.state_dict().items() if "running" in k}
    ema.update(student, 0.9)
    after, source = ema.average.state_dict(), student.state_dict()
    moved = [k for k in before if k.endswith("running_mean")]
    assert moved
    for key in moved:
        torch.testing.assert_close(after[key], 0.9 * before[key] + 0.1 * source[key])
