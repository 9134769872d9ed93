"""PretrainingModule: what every pretraining or distillation method of dinov3-pl shares, so a method is small.

A method (``DINOSSLModule``, ``DistillationModule``, ``FeatureDistillationModule``, or your own) subclasses it and
provides four things:

- ``trained_modules()``: the modules the optimizer trains, by *owner* (a student): ``{owner: {"backbone": ...,
  "dino_head": ...}}``. Each owner has its own schedules (``owner_optim(owner)``); each module is clipped on its
  own (upstream's per-module clipping); layer-wise LR decay applies to the module named ``"backbone"``.
- ``compute_losses(batch, step)``: the loss terms and their weighted sum under ``"loss"``.
- ``after_optimizer_step(step)``: what follows a successful optimizer step (EMA updates).
- ``eval_backbones()``: ``{name: state-dict prefix}`` of the backbones to monitor, evaluate and export; the first
  is the default one a checkpoint records.

Everything else is done here, the same way for every method:

- one AdamW over all owners' parameter groups (upstream's groups; LR and weight decay set at every optimizer step
  from each owner's schedules, warm-up/freeze phases longer than the run halved with one warning);
- each batch's randomness seeded from (run seed, step, rank, micro-batch): exact resume, different draws per rank
  and per micro-batch of an accumulated step; ``ExactResume`` installed;
- a non-finite loss on any micro-batch, or a non-finite gradient norm, drops the whole optimizer step (no AdamW
  step, no ``after_optimizer_step``), checkpoints are vetoed while steps are skipped, and too many in a row stop
  the run with an error naming the last good checkpoint. The step itself reads nothing back from the device: the
  verdict is a device flag. With ``optim.fused: true`` (and no fp16 GradScaler) it is applied on the device too
  (AdamW's ``found_inf``, the EMA momentum set to 1), and the host learns of a dropped step without waiting for it
  (a non-blocking copy, read once it has landed; the checkpoint veto waits for it); otherwise it is read once per
  optimizer step, before AdamW;
- undecodable images totalled per epoch; schedules, throughput and memory logged; an online kNN monitor of every
  eval backbone on the DataModule's ``[bank, queries]`` validation loaders;
- the checkpoint records its backbones (``backbone_config`` / ``backbone_configs``) so that ``arch: null``
  evaluation and ``dinov3-pl export`` rebuild them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from dinov3_pl.modules.ssl_config import OptimConfig
from dinov3_pl.optim import build_param_groups, clip_grad_norm_per_module
from dinov3_pl.schedules import ConstantSchedule, CosineSchedule, Schedule

__all__ = ["PretrainingModule", "NUM_GLOBAL_CROPS"]

NUM_GLOBAL_CROPS = 2


class PretrainingModule(L.LightningModule):
    """The shared base of pretraining and distillation methods (see the module docstring for the contract).

    ``computes_health_diagnostics``: whether the method fills ``health_diagnostics`` when asked (TrainingHealth).

    Args:
        max_consecutive_bad_steps: optimizer steps dropped in a row (non-finite loss or gradient) before training
            stops with an error; dropped steps leave the weights untouched.
        knn_ks, knn_temperature: the online kNN monitor on the DataModule's labelled validation loaders.
        training_health: install the ``TrainingHealth`` monitor (``dinov3_pl.callbacks.training_health``): ``True``
            with its defaults, a dict of its arguments, ``False`` off. The method must compute the diagnostics (set
            ``health_diagnostics`` in ``compute_losses`` when ``collect_health_diagnostics`` is set).
    """

    computes_health_diagnostics = False

    def __init__(
        self,
        max_consecutive_bad_steps: int = 10,
        knn_ks=(10, 20),
        knn_temperature: float = 0.07,
        training_health: bool | dict = False,
    ) -> None:
        super().__init__()
        if not isinstance(training_health, bool | dict):
            raise ValueError(
                f"training_health must be true, false or a dict of TrainingHealth arguments, got {training_health!r}"
            )
        if training_health is not False and not self.computes_health_diagnostics:
            raise ValueError(
                f"training_health is not available for {type(self).__name__} (it does not compute the statistics): "
                "set it to false"
            )
        self.training_health = training_health
        # Set by TrainingHealth on the steps it checks; compute_losses then leaves detached statistics (HealthSums)
        # in health_diagnostics. Off, nothing extra is computed.
        self.collect_health_diagnostics = False
        self.health_diagnostics = None
        self.max_consecutive_bad_steps = max_consecutive_bad_steps
        self.knn_ks, self.knn_temperature = tuple(knn_ks), knn_temperature
        self.consecutive_bad_steps = 0
        # Checkpointed, so a resumed run keeps the seed of the run it continues (see on_train_batch_start).
        self.register_buffer("run_seed", torch.tensor(torch.initial_seed() % 2**62, dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self._skip_reason: str | None = None  # why the current optimizer step is dropped (None: it is not)
        # 1.0 on the device when a micro-batch of the current optimizer step had a non-finite loss.
        self._step_bad: Tensor | None = None
        self._last_losses: dict[str, Tensor] = {}
        # The device verdict of the optimizer step just taken (fused AdamW path): 1.0 where it was dropped.
        self._dropped_on_device: Tensor | None = None
        self._bad_streak_on_device: Tensor | None = None
        # (step, host copy of [dropped, streak], CUDA event or None) of the device verdicts not read yet.
        self._pending_verdicts: list[tuple[int, Tensor, Any]] = []
        self._last_skip_reason: str | None = None
        self._step = 0  # the optimizer step the current batch trains (global_step moves on inside the batch)
        self._bad_images = {"epoch": 0, "run": 0}  # undecodable images dropped by the DataModule
        self._batch_start_time: float | None = None
        self._knn: dict[str, Any] = {}
        self._knn_has_queries = False

    # ------------------------------------------------------------------------------------------------ the contract
    def trained_modules(self) -> dict[str, dict[str, nn.Module]]:
        """``{owner: {module name: module}}`` of everything the optimizer trains."""
        raise NotImplementedError

    def owner_optim(self, owner: str) -> OptimConfig:
        """The AdamW options and schedules of ``owner``."""
        raise NotImplementedError

    def compute_losses(self, batch: dict, step: int) -> dict[str, Tensor]:
        """All loss terms of one batch and their weighted sum under ``"loss"``."""
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Called after every optimizer step that was not dropped (``step``: the step just taken)."""

    def eval_backbones(self) -> dict[str, str]:
        """``{name: state-dict prefix}`` of the backbones to evaluate and export; the first is the default."""
        raise NotImplementedError

    def monitored_backbones(self) -> list[str]:
        """The eval backbones the online kNN monitor follows (default: the first)."""
        return list(self.eval_backbones())[:1]

    def schedule_values(self, step: int) -> dict[str, float]:
        """Method-specific schedule values to log under ``schedule/`` (e.g. EMA momentum, teacher temperature)."""
        return {}

    # ------------------------------------------------------------------------------------------------ set-up
    def configure_callbacks(self) -> list[L.Callback]:
        from dinov3_pl.callbacks.resume import ExactResume

        callbacks: list[L.Callback] = [ExactResume()]
        if self.training_health is not False:
            from dinov3_pl.callbacks.training_health import TrainingHealth

            options = self.training_health if isinstance(self.training_health, dict) else {}
            callbacks.append(TrainingHealth(**options))
        return callbacks

    def setup(self, stage: str) -> None:
        strategy = type(self.trainer.strategy).__name__ if self._trainer is not None else ""
        if any(name in strategy for name in ("FSDP", "ModelParallel", "DeepSpeed")):
            raise ValueError(
                f"{type(self).__name__} does not support the {strategy}: its EMA updates, per-module gradient "
                "clipping and exact resume are written for whole (unsharded) parameters and are not tested sharded. "
                "Use trainer.strategy=ddp; for memory, backbone.grad_checkpointing=true and bf16-mixed precision"
            )

    def eval_backbone_module(self, name: str | None = None) -> nn.Module:
        """The eval backbone recorded as ``name`` (default: the first of ``eval_backbones()``)."""
        backbones = self.eval_backbones()
        prefix = backbones[name] if name is not None else next(iter(backbones.values()))
        return self.get_submodule(prefix.rstrip("."))

    @property
    def eval_backbone(self) -> nn.Module:
        """The default backbone to evaluate and to export."""
        return self.eval_backbone_module()

    def _total_steps(self, owner: str) -> int:
        if self.owner_optim(owner).total_steps is not None:
            return self.owner_optim(owner).total_steps
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

    def _fit_phases_to_run(self, owner: str, total: int) -> dict[str, int]:
        """LR warm-up and freeze lengths, each shortened to half the run when the run is shorter than it (smoke tests:
        ``fast_dev_run``, ``max_steps`` of a few steps), with one warning naming the keys. A teacher-temperature
        warm-up longer than the run is left as it is: it is a valid (if unusual) schedule."""
        optim = self.owner_optim(owner)
        phases = {
            "optim.warmup_steps": optim.warmup_steps,
            "optim.freeze_last_layer_steps": optim.freeze_last_layer_steps,
            "optim.head_warmup_steps": optim.head_warmup_steps,
        }
        shortened = {key: total // 2 for key, steps in phases.items() if steps > total}
        if shortened:
            changes = ", ".join(f"{key} {phases[key]} -> {steps}" for key, steps in shortened.items())
            whose = f" of {owner}" if len(self.trained_modules()) > 1 else ""
            rank_zero_warn(
                f"the run has {total} optimizer steps, fewer than some warm-up/freeze phases{whose} of the recipe; "
                f"shortened to half the run: {changes} (set model.init_args.optim.total_steps to keep the recipe)"
            )
        return {**phases, **shortened}

    def _build_owner_schedules(self, owner: str) -> dict[str, Any]:
        optim, total = self.owner_optim(owner), self._total_steps(owner)
        phases = self._fit_phases_to_run(owner, total)
        scale = 4 * math.sqrt(self._global_batch_size() / 1024) if optim.lr_scaling == "sqrt_wrt_1024" else 1.0
        warmup = phases["optim.warmup_steps"]
        if optim.lr_schedule == "cosine":
            # Upstream's IN-1k recipe (schedules v1, configs/config.py) scales the peak LR only, not min_lr.
            lr: Schedule = CosineSchedule(optim.lr * scale, optim.min_lr, total, warmup)
        else:
            lr = ConstantSchedule(optim.lr * scale, warmup)
        if optim.weight_decay_schedule == "cosine":
            wd: Schedule = CosineSchedule(optim.weight_decay, optim.weight_decay_end, total)
        else:
            wd = ConstantSchedule(optim.weight_decay)
        return {"lr": lr, "weight_decay": wd, "phases": phases, "total_steps": total}

    def _build_schedules(self) -> None:
        """Every owner's LR and weight-decay schedules, then the method's (``build_method_schedules``)."""
        self.owner_schedules = {owner: self._build_owner_schedules(owner) for owner in self.trained_modules()}
        self.build_method_schedules()

    def build_method_schedules(self) -> None:
        """Builds the method's own schedules (EMA momentum, teacher temperature, ...) once the run length is known."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self._build_schedules()
        groups, fused, betas = [], set(), set()
        for owner, modules in self.trained_modules().items():
            optim = self.owner_optim(owner)
            backbone = modules.get("backbone")
            if optim.layer_decay != 1.0 and not hasattr(getattr(backbone, "vit", None), "blocks"):
                raise ValueError(
                    f"optim.layer_decay={optim.layer_decay} of {owner!r} applies to DINOv3 ViT blocks; its backbone "
                    f"{getattr(backbone, 'arch', type(backbone).__name__)} has none: set optim.layer_decay: 1.0"
                )
            for group in build_param_groups(
                modules,
                num_blocks=getattr(backbone, "depth", 0),
                layer_decay=optim.layer_decay,
                patch_embed_lr_mult=optim.patch_embed_lr_mult,
            ):
                groups.append({**group, "owner": owner, "betas": optim.betas})
            fused.add(optim.fused)
            betas.add(tuple(optim.betas))
        if len(fused) > 1:
            raise ValueError("every student must use the same optim.fused setting (they share one AdamW)")
        optimizer = torch.optim.AdamW(groups, lr=0.0, betas=next(iter(betas)), fused=next(iter(fused)))
        self._apply_schedules(optimizer, step=0)
        return optimizer

    def _apply_schedules(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        for group in optimizer.param_groups:
            schedules = self.owner_schedules[group["owner"]]
            phases = schedules["phases"]
            frozen = (group["is_last_layer"] and step < phases["optim.freeze_last_layer_steps"]) or (
                group["module"] == "backbone" and step < phases["optim.head_warmup_steps"]
            )
            # LR 0 (not zeroed gradients) freezes exactly: AdamW's decoupled decay is scaled by the LR too.
            group["lr"] = 0.0 if frozen else schedules["lr"](step) * group["lr_multiplier"]
            group["weight_decay"] = schedules["weight_decay"](step) * group["wd_multiplier"]

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
            self._step_bad = None
            self._apply_schedules(self.optimizers().optimizer, step)
            self.on_optimizer_step_start(step)
        self._batch_start_time = time.perf_counter()

    def on_optimizer_step_start(self, step: int) -> None:
        """Called once per optimizer step, before its first micro-batch (e.g. to refresh a Gram teacher)."""

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        self._bad_images["epoch"] += int(batch.get("num_bad_images", 0))
        losses = self.compute_losses(batch, step=self._step)
        total = losses["loss"]
        # Judged on the device (no host read here); a non-finite loss still runs its backward, and the whole
        # accumulated step is dropped before AdamW (configure_gradient_clipping).
        bad = (~torch.isfinite(total.detach())).float()
        self._step_bad = bad if self._step_bad is None else torch.maximum(self._step_bad, bad)
        self._last_losses = {k: v.detach() for k, v in losses.items()}
        batch_size = batch["global_crops"].shape[0] // NUM_GLOBAL_CROPS
        # No prog_bar: the progress bar reads its values back at every step (a host sync).
        self.log_dict({f"train/{k}": v for k, v in self._last_losses.items()}, batch_size=batch_size)
        self.log("train/loss_total", total.detach(), batch_size=batch_size)
        return total

    def _device_skip(self, optimizer) -> bool:
        """Whether the dropped-step verdict can be applied on the device: fused AdamW honours ``found_inf`` (its
        kernel leaves parameters, moments and step counts as they were), unless a GradScaler already owns it."""
        optimizer = getattr(optimizer, "optimizer", optimizer)
        fused = all(group.get("fused") for group in optimizer.param_groups)
        scaler = getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None)
        return fused and scaler is None and self.supports_device_skip

    supports_device_skip = False  # the method's after_optimizer_step honours ema_momentum's dropped-step momentum

    def ema_momentum(self, momentum: float) -> float | Tensor:
        """The EMA momentum to use in ``after_optimizer_step``: 1 (no change) on the device when the step was
        dropped there (fused AdamW path), ``momentum`` otherwise."""
        if self._dropped_on_device is None:
            return momentum
        return torch.where(self._dropped_on_device > 0, 1.0, momentum)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Runs between the (accumulated) backward passes and the optimizer step: clips, and drops the step when a
        loss or a gradient norm is not finite (on the device with fused AdamW; else after one host read)."""
        self._dropped_on_device = None
        norms: dict[str, Tensor] = {}
        if gradient_clip_val is not None:  # Trainer(gradient_clip_val=...) asks for the global-norm clip
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        else:
            for owner, modules in self.trained_modules().items():
                optim = self.owner_optim(owner)
                # Upstream clips backbone and heads one by one; the option clips the owner's global norm instead.
                groups = modules if optim.clip_per_module else {"all": nn.ModuleList(modules.values())}
                prefix = f"{owner}/" if len(self.trained_modules()) > 1 else ""
                norms.update({prefix + k: v for k, v in clip_grad_norm_per_module(groups, optim.clip_grad).items()})
            self.log_dict({f"grad_norm/{k}": v for k, v in norms.items()}, rank_zero_only=True)
        bad = self._step_bad if self._step_bad is not None else torch.zeros((), device=self.device)
        if norms:
            bad = torch.maximum(bad, (~torch.isfinite(torch.stack(list(norms.values())))).any().float())
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            # Every rank must drop the same steps (an all-reduce on the device, nothing read back).
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if self._device_skip(optimizer):
            self._dropped_on_device = bad
            # Read by the fused AdamW kernel: where it is 1 the step leaves parameters, moments and step counts.
            getattr(optimizer, "optimizer", optimizer).found_inf = bad
            return
        if bool(bad):  # the one host read per optimizer step of the non-fused path
            if self._step_bad is not None and bool(self._step_bad):
                terms = {k: float(v) for k, v in self._last_losses.items()}
                self._skip_reason = f"non-finite loss (terms of the last micro-batch: {terms})"
            else:
                self._skip_reason = f"non-finite gradient norm ({ {k: float(v) for k, v in norms.items()} })"
            # Without gradients AdamW leaves every parameter and its moments as they are (no decay either).
            for modules in self.trained_modules().values():
                for module in modules.values():
                    for parameter in module.parameters():
                        parameter.grad = None

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        getattr(optimizer, "optimizer", optimizer).__dict__.pop("found_inf", None)
        if self._dropped_on_device is not None:
            self._finish_step_on_device(self._dropped_on_device)
            return
        if self._skip_reason is None:
            self.consecutive_bad_steps = 0
            self.after_optimizer_step(self._step)
            return
        # A dropped step: no AdamW update, no EMA. Training stops after too many in a row.
        self.consecutive_bad_steps += 1
        self.skipped_steps += 1
        self._last_skip_reason = self._skip_reason
        self.log("train/skipped_steps", self.skipped_steps.float(), rank_zero_only=True)
        self._stop_if_too_many_bad_steps(self._step)

    def _finish_step_on_device(self, dropped: Tensor) -> None:
        """The fused path: AdamW already honoured ``dropped``; the EMA (momentum 1 where dropped), the counters
        and the streak are updated on the device, and the host reads the verdict when its copy has landed."""
        self.after_optimizer_step(self._step)
        self._dropped_on_device = None
        if self._bad_streak_on_device is None:
            self._bad_streak_on_device = torch.full(
                (), self.consecutive_bad_steps, dtype=torch.long, device=dropped.device
            )
        dropped = dropped.long()
        self._bad_streak_on_device = (self._bad_streak_on_device + 1) * dropped  # 0 again after a good step
        self.skipped_steps += dropped
        self.log("train/skipped_steps", self.skipped_steps.float(), rank_zero_only=True)
        verdict = torch.stack([dropped, self._bad_streak_on_device]).to("cpu", non_blocking=True)
        landed = None
        if verdict.device.type == "cpu" and dropped.device.type == "cuda":
            landed = torch.cuda.Event()
            landed.record()
        self._pending_verdicts.append((self._step, verdict, landed))
        self._read_verdicts(wait=False)

    def _read_verdicts(self, wait: bool) -> None:
        """Takes in the device verdicts whose copies have landed (all of them, waiting, with ``wait``)."""
        while self._pending_verdicts:
            step, verdict, landed = self._pending_verdicts[0]
            if landed is not None and not landed.query():
                if not wait:
                    return
                landed.synchronize()
            self._pending_verdicts.pop(0)
            dropped, streak = (int(value) for value in verdict.tolist())
            self.consecutive_bad_steps = streak
            if dropped:
                self._last_skip_reason = "non-finite loss or gradient norm (judged on the device)"
                self._stop_if_too_many_bad_steps(step)

    def _stop_if_too_many_bad_steps(self, step: int) -> None:
        if self.consecutive_bad_steps < self.max_consecutive_bad_steps:
            return
        first_bad_step = step - self.consecutive_bad_steps + 1
        # dinov3_pl.checkpointing.SafeModelCheckpoint (the CLI's) knows the newest checkpoint of a healthy state.
        good = [getattr(c, "last_good_checkpoint", None) for c in self.trainer.checkpoint_callbacks]
        good = [path for path in good if path]
        where = f"resume from {good[0]}" if good else f"resume from a checkpoint written before step {first_bad_step}"
        raise FloatingPointError(
            f"{self.consecutive_bad_steps} consecutive optimizer steps skipped at step {step}, the last for "
            f"a {self._last_skip_reason}; stopping. Skipped steps leave the weights as they were: {where} with a "
            "lower LR (model.init_args.optim.lr) or fix the data."
        )

    def checkpoint_veto(self) -> str | None:
        """Why the current state must not be checkpointed (``None``: it may be). Asked by the checkpoint callback:
        while steps are being skipped, the weights are those that led to non-finite losses or gradients."""
        self._read_verdicts(wait=True)  # checkpoints are rare: waiting here for the device verdicts is cheap
        if self.consecutive_bad_steps:
            return f"{self.consecutive_bad_steps} optimizer step(s) in a row were skipped ({self._last_skip_reason})"
        return None

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        step = self._step  # the values this batch trained with (global_step has moved on after the step)
        owners = self.owner_schedules
        stats = {}
        for owner, schedules in owners.items():
            prefix = f"schedule/{owner}/" if len(owners) > 1 else "schedule/"
            stats[prefix + "lr"] = schedules["lr"](step)
            stats[prefix + "weight_decay"] = schedules["weight_decay"](step)
        stats.update({f"schedule/{key}": value for key, value in self.schedule_values(step).items()})
        if self._batch_start_time is not None:
            seconds = time.perf_counter() - self._batch_start_time
            images = batch["global_crops"].shape[0] // NUM_GLOBAL_CROPS * self.trainer.world_size
            stats["throughput/images_per_s"] = images / max(seconds, 1e-9)
        if torch.cuda.is_available() and self.device.type == "cuda":
            stats["throughput/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        # CPU tensors: a Python number would be copied to the device at every step (a host sync each).
        self.log_dict({key: torch.tensor(float(value)) for key, value in stats.items()}, rank_zero_only=True)

    def on_train_epoch_end(self) -> None:
        self._read_verdicts(wait=True)
        bad = self._bad_images["epoch"]
        if self.trainer.world_size > 1:
            bad = int(self.trainer.strategy.reduce(torch.tensor(bad, device=self.device), reduce_op="sum"))
        self._bad_images = {"epoch": 0, "run": self._bad_images["run"] + bad}
        self.log_dict({"data/bad_images_epoch": float(bad), "data/bad_images_total": float(self._bad_images["run"])})
        if bad:
            rank_zero_warn(
                f"epoch {self.current_epoch}: skipped {bad} undecodable image(s) ({self._bad_images['run']} in this "
                "run); the warnings above name the files, or set data.init_args.train.init_args.on_bad_image=raise "
                "to stop at the first"
            )

    # ------------------------------------------------------------------------------------------------ online kNN
    def on_validation_epoch_start(self) -> None:
        from dinov3_pl.metrics import KNNAccuracy

        for name in self.monitored_backbones():
            if name not in self._knn:
                self._knn[name] = KNNAccuracy(ks=self.knn_ks, temperature=self.knn_temperature).to(self.device)
            self._knn[name].reset()
        self._knn_has_queries = False

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Online kNN monitor: loader 0 is the labelled bank, loader 1 the queries (CLS of each eval backbone)."""
        for name in self.monitored_backbones():
            features = self.eval_backbone_module(name)(batch["images"])["cls"]
            self._knn[name].update(features, batch["labels"], bank=dataloader_idx == 0)
        self._knn_has_queries |= dataloader_idx == 1

    def on_validation_epoch_end(self) -> None:
        saw_queries = torch.tensor(float(self._knn_has_queries), device=self.device)
        if self.trainer.world_size > 1:  # the sharded kNN search needs every rank, so all must agree to compute
            saw_queries = self.trainer.strategy.reduce(saw_queries, reduce_op="max")
        if not self._knn or not bool(saw_queries):
            return
        several = len(self._knn) > 1
        for name, metric in self._knn.items():
            prefix = f"knn/{name}/" if several else "knn/"
            self.log_dict({prefix + k: v for k, v in metric.compute().items()}, sync_dist=False)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Dicts instead of dataclasses keep the checkpoint loadable with torch.load(weights_only=True).
        hyper_parameters = checkpoint.get("hyper_parameters", {})
        for key, value in hyper_parameters.items():
            hyper_parameters[key] = _plain(value)
        # What `DINOv3Backbone(None, weights=run.ckpt)`, the eval modules and export rebuild: the default eval
        # backbone, the others by name. Read from the built backbones: a student continued from a .ckpt with
        # arch null has the recorded architecture filled in.
        from dinov3_pl.models.weights import backbone_record

        records = {
            name: backbone_record(self.get_submodule(prefix.rstrip(".")), prefix)
            for name, prefix in self.eval_backbones().items()
        }
        checkpoint["backbone_config"] = next(iter(records.values()))
        checkpoint["backbone_configs"] = records
        checkpoint["bad_images_total"] = self._bad_images["run"]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Not restored: consecutive_bad_steps (a resumed run, e.g. with a lower LR, starts counting afresh).
        self._bad_images["run"] = int(checkpoint.get("bad_images_total", 0))


def _plain(value: Any) -> Any:
    """Dataclasses (also inside lists and dicts) as plain dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list | tuple):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value
