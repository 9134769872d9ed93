"""Distillation of a trained teacher into one or several smaller students, in one run.

- :class:`DistillationModule` — upstream's (multi-)distillation (``dinov3/train/multidist_meta_arch.py``): a
  frozen teacher *with* DINO and iBOT heads (a ``DINOSSLModule`` checkpoint) sees the global crops once per batch;
  its head outputs, Sinkhorn-Knopp-centred at the teacher temperature, are every student's targets. Each student
  (a DINOv3 ViT, or any timm model whose stride equals the teacher's patch size, as upstream's ConvNeXt students)
  trains its own heads with the DINOv3 loss (DINO global and local, iBOT on the masked patches' positions, KoLeo) on
  its unmasked global crops, as upstream's distillation does.
- :class:`FeatureDistillationModule` — from a backbone *without* heads (a released ``.pth``, a Hugging Face
  folder, timm weights or a dinov3-pl checkpoint): each student, any timm model by name or a DINOv3 ViT, maps its
  CLS and patch tokens through small MLPs onto the teacher's and matches them (AM-RADIO's cosine / smooth-L1
  blend, ``FeatureLossConfig``); the teacher's patch grid is resized to the student's.

In both, each student has its own parameter groups, schedules, per-module clipping and an EMA of its weights that
is evaluated (online kNN ``knn/<name>/...``) and exported (the checkpoint records each EMA by name; the first is
the default). The students' graphs are disjoint, so the one backward of the summed loss gives each student exactly
its own gradients. Under DDP every rank runs every student on its share of the batch; upstream instead splits the
ranks into one group per student and broadcasts the teacher's outputs to the groups, which balances big fleets of
GPUs but needs as many GPU groups as students: here a single GPU (or CPU) can distil several students.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dinov3_pl.modules.pretraining import PretrainingModule
from dinov3_pl.modules.ssl import _config
from dinov3_pl.modules.ssl_config import (
    DistillationTeacherConfig,
    FeatureLossConfig,
    LossConfig,
    OptimConfig,
    StudentConfig,
)
from dinov3_pl.modules.teachers import EMA, DINOStudent, load_dino_teacher, resize_patch_grid
from dinov3_pl.schedules import ConstantSchedule, CosineSchedule, Schedule

__all__ = ["DistillationModule", "FeatureDistillationModule", "FeatureStudent"]


def _students(students: Any) -> list[StudentConfig]:
    configs = [_config(StudentConfig, student) for student in (students or [])]
    if not configs:
        raise ValueError("a distillation run needs at least one student (model.init_args.students)")
    names = [student.name for student in configs]
    if len(set(names)) != len(names) or any(not name.isidentifier() for name in names):
        raise ValueError(f"student names must be distinct Python identifiers (they name modules), got {names}")
    return configs


def _fingerprint(module: nn.Module) -> str:
    """A short hash of a module's weights: a resumed run must distil from the same teacher."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class _Distillation(PretrainingModule):
    """What both distillation methods share: a frozen teacher (not saved in checkpoints: rebuilt from its file and
    checked by fingerprint), students with their own optimizer settings, and an EMA of each student."""

    supports_device_skip = True  # the EMAs take ema_momentum (1 on the device where a step was dropped)

    def __init__(self, teacher: DistillationTeacherConfig, students: list, max_bad: int, knn_ks, knn_temperature):
        self.teacher_config = _config(DistillationTeacherConfig, teacher)
        self.student_configs = {student.name: student for student in _students(students)}
        if not self.teacher_config.weights:
            raise ValueError("the teacher needs weights: model.init_args.teacher.weights=<checkpoint or weights file>")
        super().__init__(max_bad, knn_ks, knn_temperature)

    def _finish_students(self, students: dict[str, nn.Module]) -> None:
        self.students = nn.ModuleDict(students)
        self.student_emas = nn.ModuleDict({name: EMA(student) for name, student in students.items()})
        self._teacher_fingerprint = _fingerprint(self.teacher)

    def _compile_parts(self, compile: bool | dict) -> None:
        """``compile`` (true, false or torch.compile arguments): compiles the students' and the teacher's parts in
        place (blocks, heads, losses, Sinkhorn-Knopp; names and checkpoints unchanged). The EMAs stay eager."""
        if not isinstance(compile, bool | dict):
            raise ValueError(f"compile must be true, false or a dict of torch.compile arguments, got {compile!r}")
        self.compiled = compile is not False
        if not self.compiled:
            return
        options = compile if isinstance(compile, dict) else {}
        for part in (*self.students.values(), self.teacher):
            part.compile_parts(**options)

    def trained_modules(self) -> dict[str, dict[str, nn.Module]]:
        return {name: student.trained_modules() for name, student in self.students.items()}

    def owner_optim(self, owner: str) -> OptimConfig:
        return self.student_configs[owner].optim

    def eval_backbones(self) -> dict[str, str]:
        students = {name: f"student_emas.{name}.average.backbone." for name in self.students}
        return {**students, "teacher": "teacher.backbone."}

    def monitored_backbones(self) -> list[str]:
        return list(self.students)

    def build_method_schedules(self) -> None:
        self.ema_schedules: dict[str, Schedule] = {}
        for name, config in self.student_configs.items():
            if config.ema_momentum_schedule == "cosine":
                total = self._total_steps(name)
                self.ema_schedules[name] = CosineSchedule(config.ema_momentum, config.ema_momentum_end, total)
            else:
                self.ema_schedules[name] = ConstantSchedule(config.ema_momentum)

    def schedule_values(self, step: int) -> dict[str, float]:
        return {f"{name}/ema_momentum": schedule(step) for name, schedule in self.ema_schedules.items()}

    def after_optimizer_step(self, step: int) -> None:
        for name, student in self.students.items():
            self.student_emas[name].update(student, self.ema_momentum(self.ema_schedules[name](step)))

    def train(self, mode: bool = True) -> _Distillation:
        super().train(mode)
        self.teacher.eval()  # Lightning calls .train() every epoch; the teacher never trains
        return self

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # The frozen teacher is rebuilt from its file: leaving it out keeps checkpoints student-sized.
        state = checkpoint["state_dict"]
        for key in [key for key in state if key.startswith("teacher.")]:
            del state[key]
        checkpoint["teacher_fingerprint"] = self._teacher_fingerprint
        checkpoint["backbone_configs"].pop("teacher", None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("teacher_fingerprint")
        if saved is not None and saved != self._teacher_fingerprint:
            raise ValueError(
                f"the teacher weights ({self.teacher_config.weights}) differ from those the checkpoint was trained "
                "with (weight fingerprints differ): resume with the same teacher file"
            )
        state = checkpoint["state_dict"]
        for key, value in self.teacher.state_dict().items():
            state.setdefault(f"teacher.{key}", value)


class DistillationModule(_Distillation):
    """Upstream-style (multi-)distillation from a frozen DINO teacher with heads (see the module docstring).

    Args:
        teacher: the teacher checkpoint (a ``DINOSSLModule`` run: its EMA teacher and heads) and the teacher
            temperature schedule.
        students: one entry per student (name, backbone, optim, heads, EMA momentum).
        loss: loss weights and temperatures, shared by the students (centering is Sinkhorn-Knopp, as upstream's
            multi-distillation always does).
        max_consecutive_bad_steps, knn_ks, knn_temperature: see ``PretrainingModule``.
        compile: as ``DINOSSLModule``'s: the students' and the teacher's blocks, heads, losses and Sinkhorn-Knopp.
    """

    def __init__(
        self,
        teacher: DistillationTeacherConfig = DistillationTeacherConfig(),
        students: list[StudentConfig] | None = None,
        loss: LossConfig = LossConfig(),
        max_consecutive_bad_steps: int = 10,
        knn_ks: tuple[int, ...] = (10, 20),
        knn_temperature: float = 0.07,
        compile: bool | dict = False,
    ) -> None:
        super().__init__(teacher, students, max_consecutive_bad_steps, knn_ks, knn_temperature)
        self.loss_config = loss = _config(LossConfig, loss)
        if loss.centering != "sinkhorn_knopp":
            raise ValueError("distillation centres the teacher with Sinkhorn-Knopp (upstream always does): centering")
        self.save_hyperparameters()
        self.teacher = load_dino_teacher(self.teacher_config.weights, loss, self.teacher_config.backbone_name)
        teacher_patch = self.teacher.backbone.patch_size
        dino_sizes = _head_config_of(self.teacher.dino_head)
        ibot_sizes = _head_config_of(self.teacher.ibot_head) if self.teacher.ibot_head is not None else None
        students = {}
        for name, config in self.student_configs.items():
            backbone = config.backbone.build()
            if backbone.patch_size != teacher_patch:
                raise ValueError(
                    f"student {name!r} has patch size (stride) {backbone.patch_size} but the teacher {teacher_patch}: "
                    "iBOT's targets are the teacher's patches, so the grids must match (as upstream requires); "
                    "FeatureDistillationModule resizes grids instead"
                )
            dino_head, ibot_head = config.dino_head or dino_sizes, config.ibot_head or ibot_sizes
            for head, sizes, what in ((dino_head, dino_sizes, "dino_head"), (ibot_head, ibot_sizes, "ibot_head")):
                if head is not None and sizes is not None and head.num_prototypes != sizes.num_prototypes:
                    raise ValueError(
                        f"student {name!r}: {what}.num_prototypes={head.num_prototypes} but the teacher's head has "
                        f"{sizes.num_prototypes}; the losses compare distributions over the same prototypes"
                    )
            use_ibot = ibot_head if loss.ibot_weight > 0 and self.teacher.ibot_head is not None else None
            # As upstream (SSLMetaArch.get_student_output with distillation on): the students see their global
            # crops unmasked; the iBOT masks only pick the patches whose outputs are compared with the teacher's.
            students[name] = DINOStudent(backbone, dino_head, use_ibot, loss, mask_inputs=False)
        self._finish_students(students)
        self._compile_parts(compile)

    def build_method_schedules(self) -> None:
        super().build_method_schedules()
        teacher = self.teacher_config
        self.teacher_temperature_schedule = ConstantSchedule(
            teacher.temperature, teacher.temperature_warmup_steps, teacher.temperature_warmup_start
        )

    def schedule_values(self, step: int) -> dict[str, float]:
        return {**super().schedule_values(step), "teacher_temperature": self.teacher_temperature_schedule(step)}

    def compute_losses(self, batch: dict, step: int) -> dict[str, Tensor]:
        """One teacher forward for all students; each student's terms under ``<name>/...``, the sum as ``"loss"``."""
        use_ibot = any(student.ibot_head is not None for student in self.students.values())
        masks = batch["masks"] if use_ibot else None
        targets = self.teacher.targets(
            batch["global_crops"],
            masks,
            self.teacher_temperature_schedule(step),
            mask_indices=batch.get("mask_indices"),
        )
        losses: dict[str, Tensor] = {}
        total = batch["global_crops"].new_zeros(())
        for name, student in self.students.items():
            terms, _ = student.losses(batch, targets)
            losses.update({f"{name}/{key}": value for key, value in terms.items()})
            total = total + terms["loss"]
        losses["loss"] = total
        return losses


def _head_config_of(head: nn.Module):
    from dinov3_pl.modules.ssl_config import HeadConfig

    linears = [module for module in head.mlp if isinstance(module, nn.Linear)]
    return HeadConfig(
        num_prototypes=head.last_layer.out_features,
        hidden_dim=linears[0].out_features if len(linears) > 1 else head.last_layer.in_features,
        bottleneck_dim=head.last_layer.in_features,
        num_layers=len(linears),
    )


class FeatureStudent(nn.Module):
    """A backbone (any timm model or a DINOv3 ViT) with two MLPs that map its CLS and patch tokens onto the
    teacher's feature size (``hidden_dim`` wide, GELU; AM-RADIO's adaptor heads); ``hidden_dim`` 0: one linear
    layer each, which leaves the matching to the backbone itself."""

    def __init__(self, backbone: nn.Module, teacher_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.backbone = backbone

        def projection() -> nn.Module:
            if hidden_dim <= 0:
                return nn.Linear(backbone.embed_dim, teacher_dim)
            return nn.Sequential(
                nn.Linear(backbone.embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, teacher_dim)
            )

        self.cls_head, self.patch_head = projection(), projection()

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "cls_head": self.cls_head, "patch_head": self.patch_head}


class FeatureDistillationModule(_Distillation):
    """Feature distillation from a teacher backbone without heads into any timm or DINOv3 students (see the module
    docstring). Every student and the teacher see the same global crops (set the DataModule's
    ``num_local_crops: 0``: local crops are not used).

    Args:
        teacher: the teacher's weights (any format ``build_backbone`` reads; ``arch`` unless it is a dinov3-pl .ckpt).
        students: one entry per student (name, backbone: a DINOv3 arch or any timm name, optim,
            projection_hidden_dim, EMA momentum).
        loss: the cosine / smooth-L1 weights.
        max_consecutive_bad_steps, knn_ks, knn_temperature: see ``PretrainingModule``.
    """

    def __init__(
        self,
        teacher: DistillationTeacherConfig = DistillationTeacherConfig(),
        students: list[StudentConfig] | None = None,
        loss: FeatureLossConfig = FeatureLossConfig(),
        max_consecutive_bad_steps: int = 10,
        knn_ks: tuple[int, ...] = (10, 20),
        knn_temperature: float = 0.07,
    ) -> None:
        from dinov3_pl.models.weights import build_backbone

        super().__init__(teacher, students, max_consecutive_bad_steps, knn_ks, knn_temperature)
        self.loss_config = _config(FeatureLossConfig, loss)
        self.save_hyperparameters()
        config = self.teacher_config
        self.teacher = build_backbone(
            config.arch, config.weights, backbone_name=config.backbone_name, **config.timm_overrides
        ).requires_grad_(False)
        self.teacher.eval()
        students = {
            name: FeatureStudent(student.backbone.build(), self.teacher.embed_dim, student.projection_hidden_dim)
            for name, student in self.student_configs.items()
        }
        self._finish_students(students)

    def eval_backbones(self) -> dict[str, str]:
        backbones = super().eval_backbones()
        backbones["teacher"] = "teacher."
        return backbones

    def compute_losses(self, batch: dict, step: int) -> dict[str, Tensor]:
        images = batch["global_crops"]
        with torch.no_grad():
            teacher = self.teacher(images)
        losses: dict[str, Tensor] = {}
        total = images.new_zeros(())
        for name, student in self.students.items():
            terms = self.feature_losses(student, images, teacher)
            losses.update({f"{name}/{key}": value for key, value in terms.items()})
            total = total + terms["loss"]
        losses["loss"] = total
        return losses

    def feature_losses(self, student: FeatureStudent, images: Tensor, teacher: dict[str, Tensor]) -> dict[str, Tensor]:
        """Cosine distance of the projected CLS tokens; cosine / smooth-L1 blend of the projected patch tokens
        against the teacher's patch grid resized (bilinear) to the student's."""
        loss = self.loss_config
        out = student.backbone(images)
        grid = (images.shape[-2] // student.backbone.patch_size, images.shape[-1] // student.backbone.patch_size)
        if grid[0] * grid[1] != out["patch"].shape[1]:
            raise ValueError(
                f"{student.backbone.arch} gave {out['patch'].shape[1]} patch tokens for {tuple(images.shape[-2:])} "
                f"images, not the {grid[0]}x{grid[1]} its stride {student.backbone.patch_size} implies"
            )
        target_patch = resize_patch_grid(teacher["patch"].float(), grid, mode="bilinear")
        cls = student.cls_head(out["cls"]).float()
        patch = student.patch_head(out["patch"]).float()
        terms = {"cls_cosine": (1 - F.cosine_similarity(cls, teacher["cls"].float(), dim=-1)).mean()}
        terms["patch_cosine"] = (1 - F.cosine_similarity(patch, target_patch, dim=-1)).mean()
        terms["patch_smooth_l1"] = F.smooth_l1_loss(patch, target_patch, beta=loss.smooth_l1_beta)
        share = loss.patch_cosine_share
        patch_term = share * terms["patch_cosine"] + (1 - share) * terms["patch_smooth_l1"]
        terms["loss"] = loss.cls_weight * terms["cls_cosine"] + loss.patch_weight * patch_term
        return terms
