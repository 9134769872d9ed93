"""TrainingHealth: watches a DINO-style pretraining run for the states it can get stuck in, logs the statistics that
tell them apart to TensorBoard (``health/*``) and prints one warning per state, naming the settings that get out of
it (docs/training_health.md: the states, the scalars and the measurements behind the advice).

The states, judged every ``every_n_steps`` optimizer steps on statistics of one batch (all ranks' rows together):

- ``uniform``: the uniform fixed point. The student predicts every prototype equally, so its DINO (or iBOT)
  cross-entropy equals ln K whatever the targets, and the teacher (its EMA) does too: targets of entropy ~ln K.
  Nothing is learnt; typical at init with a soft teacher, a slow EMA and LayerScale 1e-5.
- ``few_prototypes``: collapse onto a few prototypes: confident targets that all pick the same few prototypes
  (reachable with softmax centering and a sharp teacher; Sinkhorn-Knopp gives every prototype the same mass).
- ``dimensional_collapse``: the CLS features (L2-normalised) of all images of the batch point the same way: their
  std across the batch goes to 0 (at init with LayerScale 1e-5 it is ~1e-4).

A state is reported once it has held at every check for ``patience_steps`` (counted after ``grace_steps``, by
default the LR warm-up, during which the LR is too small to leave the initial state). The heads' two states exclude
each other (they differ by the targets' entropy); the features' state is judged on its own, so a run stuck at the
uniform fixed point with identical CLS features (LayerScale 1e-5) gets both warnings.

The module computes the statistics as detached tensors, only on the steps the callback asks for
(``collect_health_diagnostics``), as partial sums; the callback sums them over ranks (one all-reduce), so every
rank decides the same; only rank 0 logs and warns. No host-device sync happens on the other steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

__all__ = [
    "STATES",
    "HealthSums",
    "HealthThresholds",
    "TrainingHealth",
    "TrainingHealthWarning",
    "classify_health",
    "dino_health_sums",
    "summarise_health",
]

STATES = ("uniform", "few_prototypes", "dimensional_collapse")


class TrainingHealthWarning(UserWarning):
    """The category of TrainingHealth's warnings (``warnings.filterwarnings("ignore", category=...)`` hides them)."""


@dataclass
class HealthSums:
    """Partial sums of one rank's batch; summing them over ranks gives the statistics of the global batch."""

    tensors: dict[str, Tensor]
    dino_prototypes: int
    ibot_prototypes: int | None = None


@torch.no_grad()
def dino_health_sums(
    *,
    dino_loss: Tensor,
    target_probs: Tensor,
    student_logits: Tensor,
    cls_features: Tensor,
    ibot_loss: Tensor | None = None,
    masks: Tensor | None = None,
    ibot_prototypes: int | None = None,
) -> HealthSums:
    """The health statistics of one batch as partial sums (detached, fp32, on the batch's device).

    Args:
        dino_loss: the DINO (global-crop) cross-entropy of the batch.
        target_probs: ``[..., K]`` teacher target probabilities of the DINO head (rows sum to 1).
        student_logits: ``[..., K]`` student DINO-head logits (before the temperature).
        cls_features: ``[B, D]`` student CLS features (pre-head); their L2-normalised spread is measured.
        ibot_loss, masks, ibot_prototypes: the iBOT loss, the ``[C, N]`` masks it used and the iBOT head's K; the
            loss is divided by C, masked or not, so it is rescaled to a mean over the masked crops.
    """
    probs = target_probs.detach().float().flatten(0, -2)
    logits = student_logits.detach().float().flatten(0, -2)
    features = torch.nn.functional.normalize(cls_features.detach().float(), dim=-1)
    num_prototypes = probs.shape[-1]
    row_entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)
    argmax_counts = torch.zeros(num_prototypes, device=probs.device)
    argmax_counts.index_add_(0, probs.argmax(dim=-1), torch.ones(probs.shape[0], device=probs.device))
    one = torch.ones((), device=probs.device)
    tensors = {
        "ranks": one,
        "dino_loss": dino_loss.detach().float(),
        "target_entropy_sum": row_entropy.sum(),
        "target_rows": one * probs.shape[0],
        "target_argmax_counts": argmax_counts,
        "student_logit_std_sum": logits.std(dim=-1, unbiased=False).sum(),
        "student_rows": one * logits.shape[0],
        "cls_sum": features.sum(dim=0),
        "cls_square_sum": (features * features).sum(dim=0),
        "cls_count": one * features.shape[0],
    }
    if ibot_loss is not None and masks is not None:
        masked_crops = masks.any(dim=-1).sum().float()
        # Summed over ranks as (loss x C, masked crops): the per-masked-crop mean of the global batch.
        tensors["ibot_loss_times_crops"] = ibot_loss.detach().float() * masks.shape[0]
        tensors["ibot_masked_crops"] = masked_crops
    return HealthSums(tensors, num_prototypes, ibot_prototypes if ibot_loss is not None else None)


def summarise_health(sums: HealthSums) -> dict[str, float]:
    """The statistics (CPU floats) of (rank-summed) partial sums: what ``health/*`` logs. Ratios to ln K are 1 at
    the uniform fixed point; ``cls_std`` is the mean per-dimension std of the L2-normalised CLS features across the
    batch times sqrt(D): about 1 for features spread over the sphere, 0 when every image gives the same direction."""
    values = {key: value.detach().double().cpu() for key, value in sums.tensors.items()}
    ln_k = math.log(sums.dino_prototypes)
    rows = float(values["target_rows"])
    used = int((values["target_argmax_counts"] > 0).sum())
    count = float(values["cls_count"])
    mean = values["cls_sum"] / count
    variance = (values["cls_square_sum"] / count - mean * mean).clamp_min(0.0)
    stats = {
        "dino_loss_over_ln_k": float(values["dino_loss"] / values["ranks"]) / ln_k,
        "target_entropy_over_ln_k": float(values["target_entropy_sum"]) / rows / ln_k,
        "target_prototypes_used": float(used),
        "target_prototypes_used_fraction": used / min(sums.dino_prototypes, rows),
        "student_logit_std": float(values["student_logit_std_sum"] / values["student_rows"]),
        "cls_std": float(variance.sqrt().mean()) * math.sqrt(mean.numel()),
    }
    if sums.ibot_prototypes is not None and "ibot_masked_crops" in values:
        masked = float(values["ibot_masked_crops"])
        if masked > 0:
            per_crop = float(values["ibot_loss_times_crops"]) / masked
            stats["ibot_loss_over_ln_k"] = per_crop / math.log(sums.ibot_prototypes)
    return stats


@dataclass(frozen=True)
class HealthThresholds:
    """Where the states begin (see docs/training_health.md for the values measured in healthy and stuck runs)."""

    uniform_tolerance: float = 0.01  # |DINO or iBOT loss / ln K - 1| below this ...
    uniform_target_entropy: float = 0.97  # ... with targets this close to uniform (entropy / ln K above): uniform
    few_prototypes_fraction: float = 0.1  # prototypes picked by the targets / min(K, rows) at most this ...
    few_prototypes_target_entropy: float = 0.5  # ... with targets at least this confident (entropy / ln K below)
    collapsed_cls_std: float = 0.05  # cls_std (1: spread over the sphere) below this: dimensional collapse


def classify_health(stats: dict[str, float], thresholds: HealthThresholds = HealthThresholds()) -> list[str]:
    """The states that hold (empty: healthy): at most one of the heads' (``"uniform"``, ``"few_prototypes"``; they
    differ by the targets' entropy) and, independently, ``"dimensional_collapse"`` of the features."""
    if not all(math.isfinite(value) for value in stats.values()):
        return []  # a non-finite step is dropped by the module; its statistics say nothing
    states = []
    loss_ratios = [stats["dino_loss_over_ln_k"], stats.get("ibot_loss_over_ln_k", math.inf)]
    if (
        any(abs(ratio - 1.0) < thresholds.uniform_tolerance for ratio in loss_ratios)
        and stats["target_entropy_over_ln_k"] > thresholds.uniform_target_entropy
    ):
        states.append("uniform")
    elif (
        stats["target_prototypes_used_fraction"] <= thresholds.few_prototypes_fraction
        and stats["target_entropy_over_ln_k"] < thresholds.few_prototypes_target_entropy
    ):
        states.append("few_prototypes")
    if stats["cls_std"] < thresholds.collapsed_cls_std:
        states.append("dimensional_collapse")
    return states


class TrainingHealth(L.Callback):
    """Logs ``health/*`` every ``every_n_steps`` optimizer steps and warns once per state that has held for
    ``patience_steps`` (see the module docstring). The module installs it (``DINOSSLModule(training_health=...)``,
    on by default: ``training_health: false`` turns it off, a dict sets these arguments).

    Args:
        every_n_steps: steps between checks (``None``: the Trainer's ``log_every_n_steps``).
        patience_steps: how long a state must hold (at every check) before the warning.
        grace_steps: steps before states start counting (``None``: the LR warm-up of the run).
        thresholds: where the states begin (``HealthThresholds`` fields as a dict).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        patience_steps: int = 1000,
        grace_steps: int | None = None,
        thresholds: dict | None = None,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(
                f"training_health every_n_steps must be >= 1 (or null: log_every_n_steps), got {every_n_steps}"
            )
        if patience_steps < 1:
            raise ValueError(f"training_health patience_steps must be >= 1, got {patience_steps}")
        self.every_n_steps, self.patience_steps, self.grace_steps = every_n_steps, patience_steps, grace_steps
        unknown = set(thresholds or {}) - {f.name for f in fields(HealthThresholds)}
        if unknown:
            names = ", ".join(f.name for f in fields(HealthThresholds))
            raise ValueError(f"training_health thresholds {sorted(unknown)} are unknown; the thresholds are: {names}")
        self.thresholds = HealthThresholds(**(thresholds or {}))
        self.warned: set[str] = set()
        self._since: dict[str, int] = {}  # state -> first step of its current run of consecutive checks
        self._restored = False  # load_state_dict ran (a resumed fit): on_train_start keeps what it restored
        self._every = 1
        self._grace = 0
        self.last_stats: dict[str, float] = {}
        self.last_states: list[str] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not getattr(pl_module, "computes_health_diagnostics", False):
            raise ValueError(
                "TrainingHealth needs a module that computes its statistics (DINOSSLModule); "
                f"{type(pl_module).__name__} does not: remove the callback"
            )
        self._every = self.every_n_steps or max(int(trainer.log_every_n_steps), 1)
        if self.grace_steps is not None:
            self._grace = self.grace_steps
        else:
            schedules = getattr(pl_module, "owner_schedules", {})
            self._grace = max((s["phases"]["optim.warmup_steps"] for s in schedules.values()), default=0)
        if not self._restored:  # a resumed run continues the runs of states (and the warnings given) it left
            self._since = {}
        self._restored = False

    def state_dict(self) -> dict[str, Any]:
        return {"warned": sorted(self.warned), "since": dict(self._since)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.warned = set(state_dict.get("warned", []))
        self._since = {str(state): int(step) for state, step in state_dict.get("since", {}).items()}
        self._restored = True

    def _due(self, step: int) -> bool:
        # The steps Lightning logs train/* at (log_every_n_steps: steps n-1, 2n-1, ...), so the curves line up.
        return (step + 1) % self._every == 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        first_micro_batch = batch_idx % trainer.accumulate_grad_batches == 0
        pl_module.collect_health_diagnostics = first_micro_batch and self._due(trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        due, sums = pl_module.collect_health_diagnostics, pl_module.health_diagnostics
        pl_module.collect_health_diagnostics, pl_module.health_diagnostics = False, None
        if not due or sums is None:
            return
        step = getattr(pl_module, "_step", trainer.global_step)
        if trainer.world_size > 1:
            names = list(sums.tensors)
            flat = torch.cat([sums.tensors[name].reshape(-1) for name in names])
            flat = trainer.strategy.reduce(flat, reduce_op="sum")
            sizes = [sums.tensors[name].numel() for name in names]
            parts = flat.split(sizes)
            sums.tensors = {n: p.reshape(sums.tensors[n].shape) for n, p in zip(names, parts, strict=True)}
        self.last_stats = stats = summarise_health(sums)
        self.last_states = states = classify_health(stats, self.thresholds)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"health/{key}": value for key, value in stats.items()}, step=step)
        for state in STATES:
            if state not in states or step < self._grace:
                self._since.pop(state, None)
                continue
            since = self._since.setdefault(state, step)
            # Held at every check from `since` to `step`: patience counted in steps, whatever the check interval.
            if step - since + 1 >= self.patience_steps and state not in self.warned:
                self.warned.add(state)
                rank_zero_warn(health_warning(state, stats, since, step, pl_module), category=TrainingHealthWarning)


def _current_settings(pl_module: L.LightningModule) -> dict[str, object]:
    """The module's values of the settings the advice names (those it has)."""
    settings: dict[str, object] = {}
    teacher = getattr(pl_module, "teacher_config", None)
    if teacher is not None and hasattr(teacher, "momentum"):
        settings["teacher.temperature"] = f"{teacher.temperature_warmup_start} -> {teacher.temperature}"
        settings["teacher.momentum"] = teacher.momentum
    backbone = getattr(pl_module, "backbone_config", None)
    if backbone is not None:
        settings["backbone.timm_overrides.init_values"] = backbone.timm_overrides.get(
            "init_values", "1e-05 (the DINOv3 default)"
        )
    optim = getattr(pl_module, "optim_config", None)
    if optim is not None:
        settings["optim.lr"] = optim.lr
    loss = getattr(pl_module, "loss_config", None)
    if loss is not None:
        settings["loss.centering"] = loss.centering
        settings["loss.koleo_weight"] = loss.koleo_weight
    return settings


def _now(settings: dict[str, object], key: str) -> str:
    return f" (now {settings[key]})" if key in settings else ""


def health_warning(state: str, stats: dict[str, float], since: int, step: int, pl_module: L.LightningModule) -> str:
    """The one warning of ``state``: what was measured, what it means, and the settings that get out of it."""
    now = _current_settings(pl_module)

    def key(name: str, value: str = "") -> str:
        current = f" (now {now[name]})" if name in now else ""
        return f"model.init_args.{name}{': ' + value if value else ''}{current}"

    ibot = f", iBOT loss {stats['ibot_loss_over_ln_k']:.3f} x ln K" if "ibot_loss_over_ln_k" in stats else ""
    evidence = (
        f"DINO loss {stats['dino_loss_over_ln_k']:.3f} x ln K{ibot}, target entropy "
        f"{stats['target_entropy_over_ln_k']:.3f} x ln K, {int(stats['target_prototypes_used'])} prototypes picked "
        f"by the targets ({stats['target_prototypes_used_fraction']:.0%} of the possible), student logit std "
        f"{stats['student_logit_std']:.3g}, CLS std {stats['cls_std']:.3g} (1: spread over the sphere)"
    )
    where = f"from step {since} to step {step}"
    fixes = "Settings that get a run out of it (the measurements are in docs/training_health.md): "
    silence = " (training_health: false turns this monitor off)"
    layer_scale = f"a larger LayerScale init, {key('backbone.timm_overrides.init_values', '0.1')}"
    if state == "uniform":
        return (
            f"training health: the run sits at the uniform fixed point {where}: {evidence}. The student predicts every "
            "prototype equally and so does its EMA teacher: the targets carry no signal and nothing is learnt. "
            f"{fixes}a sharper teacher, {key('teacher.temperature', '0.01')} and teacher.temperature_warmup_start: "
            f"0.01; a faster EMA, {key('teacher.momentum', '0.96')}; {layer_scale}; a higher LR, {key('optim.lr')}"
            f"{silence}."
        )
    if state == "few_prototypes":
        return (
            f"training health: the targets have collapsed onto a few prototypes {where}: {evidence}. Every image gets "
            "the same confident target, so the loss falls while the features stop carrying information. "
            f"{fixes}Sinkhorn-Knopp centring, {key('loss.centering', 'sinkhorn_knopp')} (it gives every prototype the "
            f"same mass), or, with softmax centring, a softer teacher, {key('teacher.temperature', '0.04 -> 0.07')} "
            f"(a lower LR only delays the collapse){silence}."
        )
    return (
        f"training health: the CLS features have collapsed {where}: {evidence}. Every image of a batch gives nearly "
        f"the same direction of CLS feature. {fixes}{layer_scale}; a higher LR, {key('optim.lr')}; KoLeo keeps the "
        f"features apart once they move, {key('loss.koleo_weight', '0.1')}{silence}."
    )
