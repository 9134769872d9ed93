"""DINOSSLModule: DINOv3 self-supervised pretraining (DINO + iBOT + KoLeo, optional Gram anchoring).

One training step, as upstream ``SSLMetaArch``:

1. the teacher (EMA copy of student backbone + heads, eval mode, no grad) sees the 2 global crops unmasked; its
   CLS logits and the logits of the patches the student will see masked are centred by Sinkhorn-Knopp (or softmax
   centering) at the scheduled teacher temperature;
2. the student sees the global crops with iBOT masks and the local crops unmasked;
3. loss = DINO global (diagonal skipped) and local terms weighted by their pair counts + iBOT + KoLeo on the
   pre-head global CLS tokens (+ Gram anchoring on the global patch tokens when enabled);
4. after the optimizer step, the teacher is updated by EMA with foreach ops.

The student and teacher are parts (``dinov3_pl.modules.teachers``); the workflow (schedules, accumulation, skipped
steps, exact resume, checkpoint records, kNN monitor) is ``PretrainingModule``'s. ``build_teacher`` is the hook for
another teacher: one that does not follow the student (``frozen=True``) makes the module keep an EMA of the student
for evaluation and export. Every schedule is a function of the optimizer step, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from dinov3_pl.losses.gram import GramLoss
from dinov3_pl.models.backbone import DINOv3Backbone
from dinov3_pl.modules.pretraining import PretrainingModule
from dinov3_pl.modules.ssl_config import (
    BackboneConfig,
    GramConfig,
    HeadConfig,
    LossConfig,
    OptimConfig,
    TeacherConfig,
)
from dinov3_pl.modules.teachers import EMA, DINOStudent, DINOTeacher, compile_backbone, resize_patch_grid
from dinov3_pl.schedules import ConstantSchedule, CosineSchedule, LinearRampSchedule, Schedule

__all__ = ["DINOSSLModule"]


class DINOSSLModule(PretrainingModule):
    """Student ViT + EMA teacher + DINO/iBOT heads trained with the DINOv3 recipe.

    Args:
        backbone: the student backbone (timm DINOv3 arch, overrides, optional weights to continue from).
        dino_head: DINO head sizes (upstream 65536 prototypes, 2048 hidden, 256 bottleneck).
        ibot_head: iBOT head sizes (a separate head, as upstream); not built when ``loss.ibot_weight`` is 0.
        loss: loss weights (a term of weight 0 is not computed), temperatures and the centering method.
        teacher: EMA momentum and teacher-temperature schedules.
        optim: AdamW, parameter groups, LR/WD schedules, clipping.
        gram: Gram anchoring phase (off by default).
        max_consecutive_bad_steps: a non-finite loss or gradient drops the optimizer step; after this many in a row
            training stops with an error (dropped steps leave the weights untouched).
        knn_temperature / knn_ks: the online kNN monitor on the DataModule's labelled validation loaders.
        training_health: the plateau / collapse monitor (``dinov3_pl.callbacks.training_health``, on by default):
            ``false`` turns it off, a dict sets its arguments (e.g. ``{patience_steps: 500}``); see
            docs/training_health.md.
        compile: ``torch.compile`` the backbone blocks, the heads, Sinkhorn-Knopp and the loss functions of the
            student, the teacher and the Gram teacher (each part in place: parameter names, state-dict keys and
            checkpoints are those of the eager model). The LightningModule itself is never compiled. A dict is
            passed to ``torch.compile`` (e.g. ``{mode: max-autotune}``, ``{backend: aot_eager}``).
    """

    computes_health_diagnostics = True
    supports_device_skip = True

    def __init__(
        self,
        backbone: BackboneConfig = BackboneConfig(),
        dino_head: HeadConfig = HeadConfig(),
        ibot_head: HeadConfig = HeadConfig(),
        loss: LossConfig = LossConfig(),
        teacher: TeacherConfig = TeacherConfig(),
        optim: OptimConfig = OptimConfig(),
        gram: GramConfig = GramConfig(),
        max_consecutive_bad_steps: int = 10,
        knn_ks: tuple[int, ...] = (10, 20),
        knn_temperature: float = 0.07,
        training_health: bool | dict = True,
        compile: bool | dict = False,
    ) -> None:
        if not isinstance(compile, bool | dict):
            raise ValueError(f"compile must be true, false or a dict of torch.compile arguments, got {compile!r}")
        # Plain dicts are accepted too: that is how `load_from_checkpoint` passes the saved hyper-parameters.
        self.backbone_config = backbone = _config(BackboneConfig, backbone)
        self.loss_config = loss = _config(LossConfig, loss)
        self.teacher_config = teacher = _config(TeacherConfig, teacher)
        self.optim_config = _config(OptimConfig, optim)
        self.gram_config = gram = _config(GramConfig, gram)
        self.head_configs = _config(HeadConfig, dino_head), _config(HeadConfig, ibot_head)
        super().__init__(max_consecutive_bad_steps, knn_ks, knn_temperature, training_health)
        self.save_hyperparameters()

        dino_head, ibot_head = self.head_configs
        self.student = DINOStudent(backbone.build(), dino_head, ibot_head if loss.ibot_weight > 0 else None, loss)
        self.teacher = self.build_teacher()
        # A teacher that does not follow the student (distillation) is not the model to evaluate: the student's EMA is.
        self.student_ema = EMA(self.student) if self.teacher.frozen else None
        self.gram_teacher: DINOv3Backbone | None = None
        if gram.enabled:
            self.gram_teacher = copy.deepcopy(self.teacher.backbone).requires_grad_(False).eval()
            if gram.teacher_weights is not None:
                from dinov3_pl.models.weights import load_backbone_weights

                load_backbone_weights(self.gram_teacher, gram.teacher_weights)
            self.gram_loss = GramLoss(remove_neg=gram.remove_neg, img_level=gram.img_level)
        # The Gram schedule's state is kept as Python ints (reading a device buffer at every step is a host sync)
        # and checkpointed, so that a resumed run refreshes the Gram teacher exactly as an uninterrupted one. The
        # buffers mirror them: state dicts keep their keys, and checkpoints written before still load.
        self._gram_initialized = gram.teacher_weights is not None
        self._gram_refreshes = 0
        self.register_buffer("gram_refreshes", torch.zeros((), dtype=torch.long))
        self.register_buffer("gram_initialized", torch.tensor(self._gram_initialized))
        self.compiled = compile is not False
        if self.compiled:
            self._compile_parts(**(compile if isinstance(compile, dict) else {}))

    def _compile_parts(self, **compile_options: Any) -> None:
        self.student.compile_parts(**compile_options)
        if hasattr(self.teacher, "compile_parts"):  # a teacher of your own (build_teacher) may not offer it
            self.teacher.compile_parts(**compile_options)
        if self.gram_teacher is not None:
            compile_backbone(self.gram_teacher, **compile_options)
            self.gram_loss.compile(**compile_options)

    def build_teacher(self) -> DINOTeacher:
        """The teacher: an exact copy of the student (released weights included) that follows it by EMA. Override it
        to plug in another teacher (see docs/extending.md)."""
        return DINOTeacher.following(self.student, self.loss_config)

    # ------------------------------------------------------------------------------------------------ the parts
    def trained_modules(self) -> dict[str, dict]:
        return {"student": self.student.trained_modules()}

    def owner_optim(self, owner: str) -> OptimConfig:
        return self.optim_config

    def eval_backbones(self) -> dict[str, str]:
        if self.student_ema is not None:
            return {"student_ema": "student_ema.average.backbone.", "student": "student.backbone."}
        return {"teacher": "teacher.backbone.", "student": "student.backbone."}

    def train(self, mode: bool = True) -> DINOSSLModule:
        super().train(mode)
        # Lightning calls .train() at every epoch: the teachers stay in eval mode (no drop path, no RoPE jitter).
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    # ------------------------------------------------------------------------------------------------ schedules
    def build_method_schedules(self) -> None:
        teacher, gram, total = self.teacher_config, self.gram_config, self._total_steps("student")
        if teacher.momentum_schedule == "cosine":
            self.momentum_schedule: Schedule = CosineSchedule(teacher.momentum, teacher.momentum_end, total)
        else:
            self.momentum_schedule = ConstantSchedule(teacher.momentum)
        self.teacher_temperature_schedule = ConstantSchedule(
            teacher.temperature, teacher.temperature_warmup_steps, teacher.temperature_warmup_start
        )
        self.gram_weight_schedule = LinearRampSchedule(0.0, gram.weight, gram.ramp_steps, gram.start_step, cosine=True)
        self.local_dino_weight_schedule = LinearRampSchedule(
            1.0, gram.local_dino_weight_end if gram.enabled else 1.0, gram.ramp_steps, gram.start_step, cosine=True
        )

    @property
    def lr_schedule(self) -> Schedule:
        return self.owner_schedules["student"]["lr"]

    @property
    def wd_schedule(self) -> Schedule:
        return self.owner_schedules["student"]["weight_decay"]

    @property
    def phase_steps(self) -> dict[str, int]:
        return self.owner_schedules["student"]["phases"]

    def schedule_values(self, step: int) -> dict[str, float]:
        values = {
            "momentum": self.momentum_schedule(step),
            "teacher_temperature": self.teacher_temperature_schedule(step),
        }
        if self.gram_config.enabled:
            values["gram_weight"] = self.gram_weight_schedule(step)
            values["local_dino_weight"] = self.local_dino_weight_schedule(step)
        return values

    # ------------------------------------------------------------------------------------------------ step
    def compute_losses(self, batch: dict, step: int) -> dict[str, Tensor]:
        """All loss terms of one batch and their weighted sum under ``"loss"`` (also used by tests/benchmarks)."""
        if not hasattr(self, "teacher_temperature_schedule"):
            raise RuntimeError(
                "the schedules are not built yet: the Trainer builds them in configure_optimizers(); outside a "
                "Trainer give optim.total_steps and optim.lr_scaling='none' and call module._build_schedules() first"
            )
        masks = batch["masks"] if self.student.ibot_head is not None else None
        targets = self.teacher.targets(
            batch["global_crops"],
            masks,
            self.teacher_temperature_schedule(step),
            mask_indices=batch.get("mask_indices"),
        )
        student_outputs: dict[str, Tensor] | None = {} if self.collect_health_diagnostics else None
        losses, student_global = self.student.losses(
            batch, targets, self.local_dino_weight_schedule(step), outputs=student_outputs
        )
        for name, (weight, term) in self.extra_losses(batch, student_global, step).items():
            losses[name] = term
            losses["loss"] = losses["loss"] + weight * term
        if student_outputs is not None and "dino_global" in losses:
            self.health_diagnostics = self._health_sums(losses, targets, student_outputs, student_global, masks)
        return losses

    def _health_sums(self, losses, targets, student_outputs, student_global, masks):
        """The TrainingHealth statistics of this batch (detached; see dinov3_pl.callbacks.training_health)."""
        from dinov3_pl.callbacks.training_health import dino_health_sums

        with_ibot = "ibot" in losses and masks is not None
        return dino_health_sums(
            dino_loss=losses["dino_global"],
            target_probs=targets["cls_probs"],
            student_logits=student_outputs["dino_global_logits"],
            cls_features=student_global["cls"],
            ibot_loss=losses["ibot"] if with_ibot else None,
            masks=masks if with_ibot else None,
            ibot_prototypes=self.student.ibot_head.last_layer.out_features if with_ibot else None,
        )

    def extra_losses(self, batch: dict, student_global: dict[str, Tensor], step: int) -> dict[str, tuple]:
        """Loss terms beyond DINO / iBOT / KoLeo: ``{name: (weight, term)}``, added to the total and logged.
        ``student_global`` is the student's masked forward of the global crops (``{"cls", "storage", "patch"}``).
        Gram anchoring is one; override (and call ``super()``) to add your own (see docs/extending.md)."""
        if not self.gram_config.enabled or step < self.gram_config.start_step:
            return {}
        gram_targets = self._gram_targets(batch, student_global["patch"].shape[1])
        return {"gram": (self.gram_weight_schedule(step), self.gram_loss(student_global["patch"], gram_targets))}

    @torch.no_grad()
    def _gram_targets(self, batch: dict, num_student_patches: int) -> Tensor:
        """Gram-teacher patch features on the Gram crops, resized (bicubic, no antialias) to the student grid."""
        images = batch["gram_crops"] if "gram_crops" in batch else batch["global_crops"]
        side = int(num_student_patches**0.5)
        return resize_patch_grid(self.gram_teacher(images)["patch"], (side, side))

    def on_optimizer_step_start(self, step: int) -> None:
        gram = self.gram_config
        if self.gram_teacher is None:
            return
        snapshot = not self._gram_initialized and step >= gram.start_step
        refresh = (
            gram.first_refresh_step is not None
            and step >= gram.first_refresh_step
            and (step - gram.first_refresh_step) % gram.refresh_every == 0
            and self._gram_refreshes < gram.max_refreshes
        )
        if snapshot or refresh:
            self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())
            self._gram_initialized = True
            if refresh:
                self._gram_refreshes += 1
            # fill_ with a Python number launches a kernel; nothing is read back.
            self.gram_initialized.fill_(True)
            self.gram_refreshes.fill_(self._gram_refreshes)

    def after_optimizer_step(self, step: int) -> None:
        momentum = self.ema_momentum(self.momentum_schedule(step))
        self.teacher.update(self.student, momentum)
        if self.student_ema is not None:
            self.student_ema.update(self.student, momentum)

    def _update_teacher(self, momentum: float) -> None:
        self.teacher.update(self.student, momentum)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["gram_schedule"] = {"initialized": self._gram_initialized, "refreshes": self._gram_refreshes}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state_dict = checkpoint["state_dict"]
        if self._complete_gram_state(state_dict):
            return  # a pretraining checkpoint: the Gram phase starts afresh (the state set in __init__)
        # Checkpoints written before the Python-int state record it in the buffers only (CPU tensors: no sync).
        recorded = checkpoint.get("gram_schedule") or {
            "initialized": bool(state_dict.get("gram_initialized", self._gram_initialized)),
            "refreshes": int(state_dict.get("gram_refreshes", 0)),
        }
        self._gram_initialized, self._gram_refreshes = bool(recorded["initialized"]), int(recorded["refreshes"])

    def _complete_gram_state(self, state_dict: dict[str, Tensor]) -> bool:
        """Starting the Gram phase from a pretraining checkpoint, which has no Gram teacher: it comes from
        ``gram.teacher_weights`` (already loaded) or is snapshot from the restored EMA teacher at ``start_step``.
        Returns whether the checkpoint was such a one (completed here)."""
        if self.gram_teacher is None or any(key.startswith("gram_teacher.") for key in state_dict):
            return False
        for key, value in self.gram_teacher.state_dict().items():
            state_dict[f"gram_teacher.{key}"] = value
        state_dict["gram_initialized"] = self.gram_initialized.clone()
        state_dict["gram_refreshes"] = torch.zeros_like(self.gram_refreshes)
        return True


def _config(config_type: type, value: Any) -> Any:
    """``value`` as a ``config_type`` dataclass of its own: ``None`` gives the defaults, a dict its fields."""
    if value is None:
        return config_type()
    if isinstance(value, dict):
        return config_type(**value)
    return copy.deepcopy(value)  # the signature's default instances are shared between modules
