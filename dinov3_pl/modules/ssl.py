"""DINOSSLModule: DINOv3 self-supervised pretraining (DINO + iBOT + KoLeo, optional Gram anchoring).

One training step, as upstream ``SSLMetaArch``:

1. the teacher (EMA copy of student backbone + heads, eval mode, no grad) sees the 2 global crops unmasked; its
   CLS logits and the logits of the patches the student will see masked are centred by Sinkhorn-Knopp (or softmax
   centering) at the scheduled teacher temperature;
2. the student sees the global crops with iBOT masks and the local crops unmasked;
3. loss = DINO global (diagonal skipped) and local terms weighted by their pair counts + iBOT + KoLeo on the
   pre-head global CLS tokens (+ Gram anchoring on the global patch tokens when enabled);
4. after the optimizer step, the teacher is updated by EMA with foreach ops.

Every schedule is a function of ``global_step`` (the optimizer step), so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn import functional as F

from dinov3_pl.losses.centering import SoftmaxCenter, sinkhorn_knopp
from dinov3_pl.losses.dino import DINOLoss
from dinov3_pl.losses.gram import GramLoss
from dinov3_pl.losses.ibot import IBOTPatchLoss
from dinov3_pl.losses.koleo import KoLeoLoss
from dinov3_pl.models.backbone import DINOv3Backbone
from dinov3_pl.modules.ssl_config import (
    BackboneConfig,
    GramConfig,
    HeadConfig,
    LossConfig,
    OptimConfig,
    TeacherConfig,
)
from dinov3_pl.optim import build_param_groups, clip_grad_norm_per_module
from dinov3_pl.schedules import ConstantSchedule, CosineSchedule, LinearRampSchedule, Schedule

__all__ = ["DINOSSLModule"]

NUM_GLOBAL_CROPS = 2


class DINOSSLModule(L.LightningModule):
    """Student ViT + EMA teacher + DINO/iBOT heads trained with the DINOv3 recipe.

    Args:
        backbone: the student backbone (timm DINOv3 arch, overrides, optional weights to continue from).
        dino_head: DINO head sizes (upstream 65536 prototypes, 2048 hidden, 256 bottleneck).
        ibot_head: iBOT head sizes (a separate head, as upstream).
        loss: loss weights, temperatures and the centering method.
        teacher: EMA momentum and teacher-temperature schedules.
        optim: AdamW, parameter groups, LR/WD schedules, clipping.
        gram: Gram anchoring phase (off by default).
        max_consecutive_bad_steps: a non-finite loss skips the step; after this many in a row training stops
            with an error (weights are untouched by skipped steps, so the last checkpoint is good).
        knn_temperature / knn_ks: the online kNN monitor on the DataModule's labelled validation loaders.
    """

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
    ) -> None:
        super().__init__()
        # Plain dicts are accepted too: that is how `load_from_checkpoint` passes the saved hyper-parameters.
        self.backbone_config = backbone = _config(BackboneConfig, backbone)
        self.loss_config = loss = _config(LossConfig, loss)
        self.teacher_config = teacher = _config(TeacherConfig, teacher)
        self.optim_config = optim = _config(OptimConfig, optim)
        self.gram_config = gram = _config(GramConfig, gram)
        dino_head, ibot_head = _config(HeadConfig, dino_head), _config(HeadConfig, ibot_head)
        self.save_hyperparameters()

        student_backbone = self.backbone_config.build()
        embed_dim = student_backbone.embed_dim
        self.student = nn.ModuleDict(
            {
                "backbone": student_backbone,
                "dino_head": dino_head.build(embed_dim),
                "ibot_head": ibot_head.build(embed_dim),
            }
        )
        # The teacher starts as an exact copy (released weights included) and is never trained by gradients.
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.teacher.backbone.rope_rescale = None  # RoPE coordinate augmentation is for the student only
        self.gram_teacher: DINOv3Backbone | None = None
        if self.gram_config.enabled:
            self.gram_teacher = copy.deepcopy(self.teacher.backbone).requires_grad_(False).eval()
            if self.gram_config.teacher_weights is not None:
                from dinov3_pl.models.weights import load_backbone_weights

                load_backbone_weights(self.gram_teacher, self.gram_config.teacher_weights)
            self.gram_loss = GramLoss(remove_neg=self.gram_config.remove_neg, img_level=self.gram_config.img_level)
        # Checkpointed so that a resumed run refreshes the Gram teacher exactly as an uninterrupted one.
        self.register_buffer("gram_refreshes", torch.zeros((), dtype=torch.long))
        self.register_buffer("gram_initialized", torch.tensor(self.gram_config.teacher_weights is not None))

        self.dino_loss = DINOLoss(self.loss_config.student_temperature)
        self.ibot_loss = IBOTPatchLoss(self.loss_config.student_temperature)
        self.koleo_loss = KoLeoLoss()
        if self.loss_config.centering == "softmax":
            self.dino_center = SoftmaxCenter(dino_head.num_prototypes, self.loss_config.center_momentum)
            self.ibot_center = SoftmaxCenter(ibot_head.num_prototypes, self.loss_config.center_momentum)

        self.consecutive_bad_steps = 0
        # Checkpointed, so a resumed run keeps the seed of the run it continues (see on_train_batch_start).
        self.register_buffer("run_seed", torch.tensor(torch.initial_seed() % 2**62, dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self._skip_reason: str | None = None  # why the current optimizer step is skipped (None: it is not)
        self._step = 0  # the optimizer step the current batch trains (global_step moves on inside the batch)
        self._bad_images = {"epoch": 0, "run": 0}  # undecodable images dropped by the DataModule
        self._batch_start_time: float | None = None
        self._knn = None
        self._knn_has_queries = False
        self.knn_ks, self.knn_temperature = tuple(knn_ks), knn_temperature

    # ------------------------------------------------------------------------------------------------ set-up
    def train(self, mode: bool = True) -> DINOSSLModule:
        super().train(mode)
        # Lightning calls .train() at every epoch: the teachers stay in eval mode (no drop path, no RoPE jitter).
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    def configure_callbacks(self) -> list[L.Callback]:
        from dinov3_pl.callbacks.resume import ExactResume

        return [ExactResume()]

    def setup(self, stage: str) -> None:
        strategy = type(self.trainer.strategy).__name__ if self._trainer is not None else ""
        if any(name in strategy for name in ("FSDP", "ModelParallel", "DeepSpeed")):
            raise ValueError(
                f"DINOSSLModule does not support the {strategy}: its EMA teacher update, per-module gradient "
                "clipping and exact resume are written for whole (unsharded) parameters and are not tested sharded. "
                "Use trainer.strategy=ddp; for memory, backbone.grad_checkpointing=true and bf16-mixed precision"
            )

    @property
    def eval_backbone(self) -> DINOv3Backbone:
        """The backbone to evaluate and to export: the EMA teacher's."""
        return self.teacher.backbone

    def _total_steps(self) -> int:
        if self.optim_config.total_steps is not None:
            return self.optim_config.total_steps
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("set optim.total_steps or trainer.max_steps/max_epochs: the schedules need a length")
        return int(total)

    def _global_batch_size(self) -> int:
        datamodule = getattr(self.trainer, "datamodule", None)
        batch_size = getattr(datamodule, "batch_size", None) or getattr(datamodule, "hparams", {}).get("batch_size")
        if batch_size is None:
            raise ValueError("the DataModule must expose batch_size for the sqrt LR scaling rule (or lr_scaling: none)")
        return int(batch_size) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def _fit_phases_to_run(self, total: int) -> dict[str, int]:
        """LR warm-up and freeze lengths, each shortened to half the run when the run is shorter than it (smoke tests:
        ``fast_dev_run``, ``max_steps`` of a few steps), with one warning naming the keys. A teacher-temperature
        warm-up longer than the run is left as it is: it is a valid (if unusual) schedule."""
        phases = {
            "optim.warmup_steps": self.optim_config.warmup_steps,
            "optim.freeze_last_layer_steps": self.optim_config.freeze_last_layer_steps,
            "optim.head_warmup_steps": self.optim_config.head_warmup_steps,
        }
        shortened = {key: total // 2 for key, steps in phases.items() if steps > total}
        if shortened:
            changes = ", ".join(f"{key} {phases[key]} -> {steps}" for key, steps in shortened.items())
            rank_zero_warn(
                f"the run has {total} optimizer steps, fewer than some warm-up/freeze phases of the recipe; "
                f"shortened to half the run: {changes} (set model.init_args.optim.total_steps to keep the recipe)"
            )
        return {**phases, **shortened}

    def _build_schedules(self) -> None:
        optim, teacher, total = self.optim_config, self.teacher_config, self._total_steps()
        self.phase_steps = phases = self._fit_phases_to_run(total)
        scale = 1.0
        if optim.lr_scaling == "sqrt_wrt_1024":
            scale = 4 * math.sqrt(self._global_batch_size() / 1024)
        warmup = phases["optim.warmup_steps"]
        if optim.lr_schedule == "cosine":
            # Upstream's IN-1k recipe (schedules v1, configs/config.py) scales the peak LR only, not min_lr.
            self.lr_schedule: Schedule = CosineSchedule(optim.lr * scale, optim.min_lr, total, warmup)
        else:
            self.lr_schedule = ConstantSchedule(optim.lr * scale, warmup)
        if optim.weight_decay_schedule == "cosine":
            self.wd_schedule: Schedule = CosineSchedule(optim.weight_decay, optim.weight_decay_end, total)
        else:
            self.wd_schedule = ConstantSchedule(optim.weight_decay)
        if teacher.momentum_schedule == "cosine":
            self.momentum_schedule: Schedule = CosineSchedule(teacher.momentum, teacher.momentum_end, total)
        else:
            self.momentum_schedule = ConstantSchedule(teacher.momentum)
        self.teacher_temperature_schedule = ConstantSchedule(
            teacher.temperature, teacher.temperature_warmup_steps, teacher.temperature_warmup_start
        )
        gram = self.gram_config
        self.gram_weight_schedule = LinearRampSchedule(0.0, gram.weight, gram.ramp_steps, gram.start_step, cosine=True)
        self.local_dino_weight_schedule = LinearRampSchedule(
            1.0, gram.local_dino_weight_end if gram.enabled else 1.0, gram.ramp_steps, gram.start_step, cosine=True
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self._build_schedules()
        groups = build_param_groups(
            self.student,
            num_blocks=self.student.backbone.depth,
            layer_decay=self.optim_config.layer_decay,
            patch_embed_lr_mult=self.optim_config.patch_embed_lr_mult,
        )
        optimizer = torch.optim.AdamW(
            groups, lr=self.lr_schedule(0), betas=self.optim_config.betas, fused=self.optim_config.fused
        )
        self._apply_schedules(optimizer, step=0)
        return optimizer

    def _apply_schedules(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        lr, wd = self.lr_schedule(step), self.wd_schedule(step)
        for group in optimizer.param_groups:
            frozen = (group["is_last_layer"] and step < self.phase_steps["optim.freeze_last_layer_steps"]) or (
                group["module"] == "backbone" and step < self.phase_steps["optim.head_warmup_steps"]
            )
            # LR 0 (not zeroed gradients) freezes exactly: AdamW's decoupled decay is scaled by the LR too.
            group["lr"] = 0.0 if frozen else lr * group["lr_multiplier"]
            group["weight_decay"] = wd * group["wd_multiplier"]

    # ------------------------------------------------------------------------------------------------ step
    def on_train_start(self) -> None:
        self._run_seed = int(self.run_seed)  # read once: on a GPU every read of the buffer is a sync

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._step = step = self.global_step
        # Lightning accumulates gradients over windows of batch indices aligned to the epoch's start.
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        # Drop path and RoPE rescaling draw from the global RNG. Seeding it from (run seed, step, rank[, micro-batch])
        # makes every batch's randomness independent of what ran before, so a run resumed from any checkpoint is
        # exact, ranks draw differently, and so do the micro-batches of one accumulated step.
        key = (self._run_seed, step, self.global_rank) + ((micro_batch,) if micro_batch else ())
        torch.manual_seed(hash(key) % 2**63)
        if micro_batch == 0:  # once per optimizer step
            self._skip_reason = None
            self._apply_schedules(self.optimizers().optimizer, step)
            self._maybe_refresh_gram_teacher()
        self._batch_start_time = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        self._bad_images["epoch"] += int(batch.get("num_bad_images", 0))
        losses = self.compute_losses(batch, step=self._step)
        total = losses["loss"]
        if not self._all_ranks_finite(total):
            # No backward; configure_gradient_clipping then drops the whole accumulated step.
            self._skip_reason = f"non-finite loss (terms: { {k: float(v) for k, v in losses.items()} })"
            return None
        batch_size = batch["global_crops"].shape[0] // NUM_GLOBAL_CROPS
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=batch_size, prog_bar=False)
        self.log("train/loss_total", total.detach(), prog_bar=True, batch_size=batch_size)
        return total

    def compute_losses(self, batch: dict, step: int) -> dict[str, Tensor]:
        """All loss terms of one batch and their weighted sum under ``"loss"`` (also used by tests/benchmarks)."""
        if not hasattr(self, "teacher_temperature_schedule"):
            raise RuntimeError(
                "the schedules are not built yet: the Trainer builds them in configure_optimizers(); outside a "
                "Trainer give optim.total_steps and optim.lr_scaling='none' and call module._build_schedules() first"
            )
        global_crops: Tensor = batch["global_crops"]
        local_crops: Tensor | None = batch.get("local_crops")
        masks: Tensor = batch["masks"]
        batch_size = global_crops.shape[0] // NUM_GLOBAL_CROPS
        temperature = self.teacher_temperature_schedule(step)
        mask_rows = masks.flatten().nonzero().squeeze(-1)

        teacher = self._teacher_targets(global_crops, mask_rows, temperature)

        student_global = self.student.backbone(global_crops, masks=masks)
        cls_global = student_global["cls"]
        masked_patches = student_global["patch"].flatten(0, 1).index_select(0, mask_rows)
        ibot_logits = self.student.ibot_head(masked_patches)
        if local_crops is not None and local_crops.shape[0] > 0:
            cls_local = self.student.backbone(local_crops)["cls"]
            num_local_crops = local_crops.shape[0] // batch_size
        else:
            cls_local, num_local_crops = cls_global[:0], 0
        # One head pass over all CLS tokens, as upstream.
        dino_logits = self.student.dino_head(torch.cat([cls_global, cls_local]))
        dino_global = dino_logits[: cls_global.shape[0]].unflatten(0, (NUM_GLOBAL_CROPS, batch_size))
        dino_local = dino_logits[cls_global.shape[0] :].unflatten(0, (num_local_crops, batch_size))

        # Upstream weights the DINO terms by their pair counts: 2 global (diagonal skipped) and 2 x n local pairs.
        global_pairs = NUM_GLOBAL_CROPS * (NUM_GLOBAL_CROPS - 1)
        local_pairs = NUM_GLOBAL_CROPS * num_local_crops
        losses: dict[str, Tensor] = {}
        losses["dino_global"] = self.dino_loss(dino_global, teacher["cls_probs"], ignore_diagonal=True)
        total = self.loss_config.dino_weight * global_pairs / (global_pairs + local_pairs) * losses["dino_global"]
        if num_local_crops:
            local_weight = self.local_dino_weight_schedule(step)
            losses["dino_local"] = self.dino_loss(dino_local, teacher["cls_probs"])
            scale = self.loss_config.dino_weight * local_pairs / (global_pairs + local_pairs) * local_weight
            total = total + scale * losses["dino_local"]
        losses["ibot"] = self.ibot_loss(ibot_logits, teacher["patch_probs"], masks)
        total = total + self.loss_config.ibot_weight * losses["ibot"]
        losses["koleo"] = sum(self.koleo_loss(crop) for crop in cls_global.unflatten(0, (NUM_GLOBAL_CROPS, -1)))
        losses["koleo"] = losses["koleo"] / NUM_GLOBAL_CROPS
        total = total + self.loss_config.koleo_weight * NUM_GLOBAL_CROPS * losses["koleo"]
        if self.gram_config.enabled and step >= self.gram_config.start_step:
            gram_targets = self._gram_targets(batch, student_global["patch"].shape[1])
            losses["gram"] = self.gram_loss(student_global["patch"], gram_targets)
            total = total + self.gram_weight_schedule(step) * losses["gram"]
        losses["loss"] = total
        return losses

    @torch.no_grad()
    def _teacher_targets(self, global_crops: Tensor, mask_rows: Tensor, temperature: float) -> dict[str, Tensor]:
        out = self.teacher.backbone(global_crops)
        cls_logits = self.teacher.dino_head(out["cls"])
        patch_logits = self.teacher.ibot_head(out["patch"].flatten(0, 1).index_select(0, mask_rows))
        if self.loss_config.centering == "sinkhorn_knopp":
            iterations = self.loss_config.sinkhorn_iterations
            cls_probs = sinkhorn_knopp(cls_logits, temperature, iterations)
            patch_probs = sinkhorn_knopp(patch_logits, temperature, iterations)
        else:
            cls_probs = self.dino_center.probs(cls_logits, temperature)
            patch_probs = self.ibot_center.probs(patch_logits, temperature)
            self.dino_center.update(cls_logits)
            self.ibot_center.update(patch_logits)
        return {"cls_probs": cls_probs.unflatten(0, (NUM_GLOBAL_CROPS, -1)), "patch_probs": patch_probs}

    @torch.no_grad()
    def _gram_targets(self, batch: dict, num_student_patches: int) -> Tensor:
        """Gram-teacher patch features on the Gram crops, resized (bicubic, no antialias) to the student grid."""
        images = batch["gram_crops"] if "gram_crops" in batch else batch["global_crops"]
        patches = self.gram_teacher(images)["patch"]
        if patches.shape[1] != num_student_patches:
            side, student_side = math.isqrt(patches.shape[1]), math.isqrt(num_student_patches)
            grid = patches.transpose(1, 2).unflatten(-1, (side, side))
            grid = F.interpolate(grid.float(), size=(student_side, student_side), mode="bicubic", align_corners=False)
            patches = grid.flatten(2).transpose(1, 2).to(patches.dtype)
        return patches

    def _maybe_refresh_gram_teacher(self) -> None:
        gram, step = self.gram_config, self._step
        if self.gram_teacher is None:
            return
        snapshot = not bool(self.gram_initialized) and step >= gram.start_step
        refresh = (
            gram.first_refresh_step is not None
            and step >= gram.first_refresh_step
            and (step - gram.first_refresh_step) % gram.refresh_every == 0
            and int(self.gram_refreshes) < gram.max_refreshes
        )
        if snapshot or refresh:
            self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())
            self.gram_initialized.fill_(True)
            if refresh:
                self.gram_refreshes += 1

    def on_train_epoch_end(self) -> None:
        bad = self._bad_images["epoch"]
        if self.trainer.world_size > 1:
            bad = int(self.trainer.strategy.reduce(torch.tensor(bad, device=self.device), reduce_op="sum"))
        self._bad_images = {"epoch": 0, "run": self._bad_images["run"] + bad}
        self.log_dict({"data/bad_images_epoch": float(bad), "data/bad_images_total": float(self._bad_images["run"])})
        if bad:
            rank_zero_warn(
                f"epoch {self.current_epoch}: skipped {bad} undecodable image(s) ({self._bad_images['run']} in this "
                "run); the warnings above name the files, or set data.init_args.on_bad_image=raise to stop at the first"
            )

    def _all_ranks_finite(self, value: Tensor) -> bool:
        bad = (~torch.isfinite(value.detach())).float()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        return not bool(bad)

    # ------------------------------------------------------------------------------------------------ after step
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Runs between the (accumulated) backward passes and the optimizer step: clips, or drops the step."""
        if self._skip_reason is None:
            if gradient_clip_val is not None:  # Trainer(gradient_clip_val=...) asks for the global-norm clip
                self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
                return
            # Upstream clips backbone and heads one by one; the option clips the student's global norm instead.
            groups = self.student if self.optim_config.clip_per_module else {"all": self.student}
            norms = clip_grad_norm_per_module(groups, self.optim_config.clip_grad)
            self.log_dict({f"grad_norm/{k}": v for k, v in norms.items()}, rank_zero_only=True)
            if norms and not bool(torch.isfinite(torch.stack(list(norms.values()))).all()):
                self._skip_reason = f"non-finite gradient norm ({ {k: float(v) for k, v in norms.items()} })"
        if self._skip_reason is not None:
            # Without gradients AdamW leaves every parameter and its moments as they are (no decay either).
            for parameter in self.student.parameters():
                parameter.grad = None

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._skip_reason is None:
            self.consecutive_bad_steps = 0
            self._update_teacher(self.momentum_schedule(self._step))
            return
        # A skipped step: no AdamW update, no EMA. Training stops after too many in a row.
        self.consecutive_bad_steps += 1
        self.skipped_steps += 1
        self.log("train/skipped_steps", self.skipped_steps.float(), rank_zero_only=True)
        if self.consecutive_bad_steps >= self.hparams.max_consecutive_bad_steps:
            first_bad_step = self._step - self.consecutive_bad_steps + 1
            # dinov3_pl.checkpointing.SafeModelCheckpoint (the CLI's) knows the newest checkpoint of a healthy state.
            good = [getattr(c, "last_good_checkpoint", None) for c in self.trainer.checkpoint_callbacks]
            good = [path for path in good if path]
            where = (
                f"resume from {good[0]}" if good else f"resume from a checkpoint written before step {first_bad_step}"
            )
            raise FloatingPointError(
                f"{self.consecutive_bad_steps} consecutive optimizer steps skipped at step {self._step}, the last for "
                f"a {self._skip_reason}; stopping. Skipped steps leave the weights as they were: {where} with a lower "
                "LR (model.init_args.optim.lr) or fix the data."
            )

    def checkpoint_veto(self) -> str | None:
        """Why the current state must not be checkpointed (``None``: it may be). Asked by the checkpoint callback:
        while steps are being skipped, the weights are those that led to non-finite losses or gradients."""
        if self.consecutive_bad_steps:
            return f"{self.consecutive_bad_steps} optimizer step(s) in a row were skipped ({self._skip_reason})"
        return None

    @torch.no_grad()
    def _update_teacher(self, momentum: float) -> None:
        student = [p.detach() for p in self.student.parameters()]
        teacher = list(self.teacher.parameters())
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1 - momentum)

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        step = self._step  # the values this batch trained with (global_step has moved on after the step)
        stats = {
            "schedule/lr": self.lr_schedule(step),
            "schedule/weight_decay": self.wd_schedule(step),
            "schedule/momentum": self.momentum_schedule(step),
            "schedule/teacher_temperature": self.teacher_temperature_schedule(step),
        }
        if self.gram_config.enabled:
            stats["schedule/gram_weight"] = self.gram_weight_schedule(step)
            stats["schedule/local_dino_weight"] = self.local_dino_weight_schedule(step)
        if self._batch_start_time is not None:
            seconds = time.perf_counter() - self._batch_start_time
            images = batch["global_crops"].shape[0] // NUM_GLOBAL_CROPS * self.trainer.world_size
            stats["throughput/images_per_s"] = images / max(seconds, 1e-9)
        if torch.cuda.is_available() and self.device.type == "cuda":
            stats["throughput/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log_dict(stats, rank_zero_only=True)

    # ------------------------------------------------------------------------------------------------ online kNN
    def on_validation_epoch_start(self) -> None:
        from dinov3_pl.metrics import KNNAccuracy

        if self._knn is None:
            self._knn = KNNAccuracy(ks=self.knn_ks, temperature=self.knn_temperature).to(self.device)
        self._knn.reset()
        self._knn_has_queries = False

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Online kNN monitor: loader 0 is the labelled bank, loader 1 the queries (teacher CLS features)."""
        features = self.eval_backbone(batch["images"])["cls"]
        self._knn.update(features, batch["labels"], bank=dataloader_idx == 0)
        self._knn_has_queries |= dataloader_idx == 1

    def on_validation_epoch_end(self) -> None:
        saw_queries = torch.tensor(float(self._knn_has_queries), device=self.device)
        if self.trainer.world_size > 1:  # the sharded kNN search needs every rank, so all must agree to compute
            saw_queries = self.trainer.strategy.reduce(saw_queries, reduce_op="max")
        if self._knn is not None and bool(saw_queries):
            self.log_dict({f"knn/{k}": v for k, v in self._knn.compute().items()}, sync_dist=False)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Dicts instead of dataclasses keep the checkpoint loadable with torch.load(weights_only=True).
        hyper_parameters = checkpoint.get("hyper_parameters", {})
        for key, value in hyper_parameters.items():
            if dataclasses.is_dataclass(value):
                hyper_parameters[key] = dataclasses.asdict(value)
        # Lets `DINOv3Backbone(weights=run.ckpt)` and the eval modules rebuild the teacher backbone from the file.
        # What `DINOv3Backbone(None, weights=run.ckpt)`, the eval modules and export rebuild: the EMA teacher by
        # default, the student by name. Read from the built backbone: continuing from a .ckpt with arch null fills
        # in the recorded architecture.
        backbone = self.student.backbone
        record = {"arch": backbone.arch, "timm_overrides": dict(backbone.timm_overrides)}
        checkpoint["backbone_config"] = {**record, "prefix": "teacher.backbone."}
        checkpoint["backbone_configs"] = {
            "teacher": checkpoint["backbone_config"],
            "student": {**record, "prefix": "student.backbone."},
        }
        checkpoint["bad_images_total"] = self._bad_images["run"]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Not restored: consecutive_bad_steps (a resumed run, e.g. with a lower LR, starts counting afresh).
        self._bad_images["run"] = int(checkpoint.get("bad_images_total", 0))
        self._complete_gram_state(checkpoint["state_dict"])

    def _complete_gram_state(self, state_dict: dict[str, Tensor]) -> None:
        """Starting the Gram phase from a pretraining checkpoint, which has no Gram teacher: it comes from
        ``gram.teacher_weights`` (already loaded) or is snapshot from the restored EMA teacher at ``start_step``."""
        if self.gram_teacher is None or any(key.startswith("gram_teacher.") for key in state_dict):
            return
        for key, value in self.gram_teacher.state_dict().items():
            state_dict[f"gram_teacher.{key}"] = value
        state_dict["gram_initialized"] = self.gram_initialized.clone()
        state_dict["gram_refreshes"] = torch.zeros_like(self.gram_refreshes)


def _config(config_type: type, value: Any) -> Any:
    """``value`` as a ``config_type`` dataclass of its own: ``None`` gives the defaults, a dict its fields."""
    if value is None:
        return config_type()
    if isinstance(value, dict):
        return config_type(**value)
    return copy.deepcopy(value)  # the signature's default instances are shared between modules
