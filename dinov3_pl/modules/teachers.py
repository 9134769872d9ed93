"""Teachers and students of the DINO-style methods, as parts a method puts together.

- :class:`DINOStudent`: a backbone with a DINO head and (when iBOT is on) an iBOT head; ``losses()`` computes the
  DINOv3 loss terms of one batch against a teacher's targets (DINO global/local with upstream's pair weights,
  iBOT on the masked patches, KoLeo on the pre-head global CLS tokens). Terms whose weight is 0 are not computed.
- :class:`DINOTeacher`: a backbone with the same heads whose centred outputs (Sinkhorn-Knopp or softmax
  centering, at the scheduled temperature) are the targets. ``update(student, momentum)`` follows the student by
  EMA (self-distillation, ``DINOSSLModule``); a frozen teacher (``frozen=True``: distillation from a trained
  model) ignores it.
- :class:`EMA`: an exponential moving average of a module (the students' evaluation copies in distillation).
- :func:`load_dino_teacher`: a frozen DINOTeacher (backbone and heads) read from a dinov3-pl checkpoint.
- :func:`resize_patch_grid`: a teacher's patch tokens resized to a student's grid (Gram anchoring, feature
  distillation).

A method of your own combines these or replaces one: a teacher is any module with ``targets(...)`` and
``update(student, momentum)`` (see docs/extending.md, "A new teacher").
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dinov3_pl.losses.centering import SoftmaxCenter, sinkhorn_knopp
from dinov3_pl.losses.dino import DINOLoss
from dinov3_pl.losses.ibot import IBOTPatchLoss
from dinov3_pl.losses.koleo import KoLeoLoss
from dinov3_pl.modules.ssl_config import HeadConfig, LossConfig

__all__ = [
    "DINOStudent",
    "DINOTeacher",
    "EMA",
    "load_dino_teacher",
    "resize_patch_grid",
    "compile_backbone",
    "ema_update",
    "ema_update_module",
]

NUM_GLOBAL_CROPS = 2


@torch.no_grad()
def ema_update(average: list[Tensor], source: list[Tensor], momentum: float | Tensor) -> None:
    """``average = momentum * average + (1 - momentum) * source``, in place, with foreach ops (as upstream).
    A 0-dim tensor ``momentum`` stays on the device (1 where a step was dropped there: the average is unchanged)."""
    torch._foreach_mul_(average, momentum)
    if isinstance(momentum, Tensor):
        torch._foreach_add_(average, torch._foreach_mul(source, 1 - momentum))
    else:
        torch._foreach_add_(average, source, alpha=1 - momentum)


def _running_statistics(module: nn.Module) -> dict[str, Tensor]:
    """The running mean / variance buffers of the module's batch-norm layers (none in a ViT)."""
    return {
        f"{name}.{stat}": getattr(layer, stat)
        for name, layer in module.named_modules()
        if isinstance(layer, nn.modules.batchnorm._NormBase) and layer.track_running_stats
        for stat in ("running_mean", "running_var")
    }


@torch.no_grad()
def ema_update_module(average: nn.Module, source: nn.Module, momentum: float | Tensor) -> None:
    """EMA of ``source``'s parameters into ``average``, and of its batch-norm running statistics: parameters alone
    would leave a CNN's EMA normalising with the statistics it started with (its features then degenerate)."""
    ema_update(*_paired_parameters(average, source), momentum)
    stats = _running_statistics(average)
    if stats:
        source_stats = _running_statistics(source)
        ema_update(list(stats.values()), [source_stats[name] for name in stats], momentum)


def _paired_parameters(average: nn.Module, source: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters of two modules of the same structure, paired by name (a mismatch is an error)."""
    source_parameters = dict(source.named_parameters())
    names = [name for name, _ in average.named_parameters()]
    missing = [name for name in names if name not in source_parameters]
    if missing or len(names) != len(source_parameters):
        raise ValueError(f"the EMA and its source differ in parameters (e.g. {missing[:3]})")
    return [p for _, p in average.named_parameters()], [source_parameters[name].detach() for name in names]


class EMA(nn.Module):
    """An exponential moving average of ``source`` (a frozen copy, kept in eval mode), updated by :meth:`update`."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.average = copy.deepcopy(source).requires_grad_(False).eval()

    def update(self, source: nn.Module, momentum: float | Tensor) -> None:
        ema_update_module(self.average, source, momentum)

    def train(self, mode: bool = True) -> EMA:
        return super().train(False)  # never in training mode: no drop path, no RoPE jitter


class DINOStudent(nn.Module):
    """A backbone with a DINO head and, when ``ibot_head`` is given, an iBOT head (upstream: separate heads).

    ``mask_inputs``: the global crops go through the backbone with their iBOT patches replaced by the mask token
    (self-distillation) or whole (distillation, as upstream); either way the masks pick the patches iBOT compares.
    """

    def __init__(
        self,
        backbone: nn.Module,
        dino_head: HeadConfig,
        ibot_head: HeadConfig | None,
        loss: LossConfig,
        mask_inputs: bool = True,
    ) -> None:
        super().__init__()
        self.loss_config = loss
        # Self-distillation feeds the iBOT-masked global crops (mask tokens); distillation feeds them whole.
        self.mask_inputs = mask_inputs
        self.dino_loss = DINOLoss(loss.student_temperature)
        self.ibot_loss = IBOTPatchLoss(loss.student_temperature)
        self.koleo_loss = KoLeoLoss()
        self.backbone = backbone
        self.dino_head = dino_head.build(backbone.embed_dim)
        if ibot_head is not None:
            self.ibot_head = ibot_head.build(backbone.embed_dim)
        else:
            self.ibot_head = None

    def compile_parts(self, **compile_options: Any) -> None:
        """``torch.compile`` in place the backbone's blocks, the heads and the loss modules (names unchanged)."""
        compile_backbone(self.backbone, **compile_options)
        for part in (self.dino_head, self.ibot_head, self.dino_loss, self.ibot_loss, self.koleo_loss):
            if part is not None:
                part.compile(**compile_options)

    def trained_modules(self) -> dict[str, nn.Module]:
        """Each clipped on its own, as upstream clips backbone, DINO head and iBOT head."""
        modules = {"backbone": self.backbone, "dino_head": self.dino_head}
        if self.ibot_head is not None:
            modules["ibot_head"] = self.ibot_head
        return modules

    def losses(
        self,
        batch: dict,
        targets: dict[str, Tensor],
        local_dino_weight: float = 1.0,
        outputs: dict[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The loss terms of ``batch`` against ``targets`` (from :meth:`DINOTeacher.targets`) and their weighted
        sum under ``"loss"``; also returns the student's global-crop outputs (Gram anchoring reads them). A dict
        given as ``outputs`` receives the student's DINO logits of the global crops (``"dino_global_logits"``
        [2, B, K], detached), for the training-health statistics.

        Upstream weights the DINO terms by their pair counts: 2 global (diagonal skipped) and 2 x n local pairs.
        """
        loss = self.loss_config
        global_crops: Tensor = batch["global_crops"]
        local_crops: Tensor | None = batch.get("local_crops")
        masks: Tensor = batch["masks"]
        with_ibot = self.ibot_head is not None and loss.ibot_weight > 0
        student_global = self.backbone(global_crops, masks=masks if with_ibot and self.mask_inputs else None)
        cls_global = student_global["cls"]
        if local_crops is not None and local_crops.shape[0] > 0:
            cls_local = self.backbone(local_crops)["cls"]
        else:
            cls_local = cls_global[:0]
        terms = self.head_losses(student_global, cls_local, batch, targets, local_dino_weight, outputs)
        return terms, student_global

    def head_losses(
        self,
        student_global: dict[str, Tensor],
        cls_local: Tensor,
        batch: dict,
        targets: dict[str, Tensor],
        local_dino_weight: float = 1.0,
        outputs: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """The part of :meth:`losses` after the backbone: heads and loss terms from the student's global outputs
        and local CLS tokens. It reads nothing back from the device, so it compiles as one graph
        (``fullgraph=True``) when the batch carries the collate's ``ibot_weights``."""
        loss = self.loss_config
        masks: Tensor = batch["masks"]
        with_ibot = self.ibot_head is not None and loss.ibot_weight > 0
        cls_global = student_global["cls"]
        batch_size = cls_global.shape[0] // NUM_GLOBAL_CROPS
        num_local_crops = cls_local.shape[0] // batch_size
        terms: dict[str, Tensor] = {}
        total = cls_global.new_zeros(())
        if loss.dino_weight > 0:
            # One head pass over all CLS tokens, as upstream.
            dino_logits = self.dino_head(torch.cat([cls_global, cls_local]))
            dino_global = dino_logits[: cls_global.shape[0]].unflatten(0, (NUM_GLOBAL_CROPS, batch_size))
            dino_local = dino_logits[cls_global.shape[0] :].unflatten(0, (num_local_crops, batch_size))
            if outputs is not None:
                outputs["dino_global_logits"] = dino_global.detach()
            global_pairs = NUM_GLOBAL_CROPS * (NUM_GLOBAL_CROPS - 1)
            local_pairs = NUM_GLOBAL_CROPS * num_local_crops
            terms["dino_global"] = self.dino_loss(dino_global, targets["cls_probs"], ignore_diagonal=True)
            total = total + loss.dino_weight * global_pairs / (global_pairs + local_pairs) * terms["dino_global"]
            if num_local_crops:
                terms["dino_local"] = self.dino_loss(dino_local, targets["cls_probs"])
                scale = loss.dino_weight * local_pairs / (global_pairs + local_pairs) * local_dino_weight
                scale = scale * loss.dino_local_weight
                total = total + scale * terms["dino_local"]
        if with_ibot:
            masked_patches = student_global["patch"].flatten(0, 1).index_select(0, targets["mask_rows"])
            ibot_logits = self.ibot_head(masked_patches)
            # The collate's per-patch weights (made on CPU) spare the loss a boolean-mask select, a host sync.
            ibot_weights = batch.get("ibot_weights")
            terms["ibot"] = self.ibot_loss(ibot_logits, targets["patch_probs"], masks, masks_weight=ibot_weights)
            total = total + loss.ibot_weight * terms["ibot"]
        if loss.koleo_weight > 0:
            per_crop = [self.koleo_loss(crop) for crop in cls_global.unflatten(0, (NUM_GLOBAL_CROPS, -1))]
            terms["koleo"] = sum(per_crop) / NUM_GLOBAL_CROPS
            # Upstream: the mean over the global crops, times their number, times the weight.
            total = total + loss.koleo_weight * NUM_GLOBAL_CROPS * terms["koleo"]
        terms["loss"] = total
        return terms


class DINOTeacher(nn.Module):
    """A backbone with DINO (and iBOT) heads whose centred outputs are the targets of DINO-style students.

    ``frozen=False``: the teacher follows a student by EMA (``update``), as in self-distillation; ``True``: it is a
    trained model that never changes (distillation).
    """

    def __init__(
        self,
        backbone: nn.Module,
        dino_head: nn.Module,
        ibot_head: nn.Module | None,
        loss: LossConfig,
        frozen: bool = False,
    ) -> None:
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head
        self.frozen = frozen
        self.centering, self.sinkhorn_iterations = loss.centering, loss.sinkhorn_iterations
        if loss.centering == "softmax":
            self.dino_center = SoftmaxCenter(dino_head.last_layer.out_features, loss.center_momentum)
            if ibot_head is not None:
                self.ibot_center = SoftmaxCenter(ibot_head.last_layer.out_features, loss.center_momentum)
        self._sinkhorn_knopp = sinkhorn_knopp  # compile_parts swaps in a compiled one
        self.requires_grad_(False).eval()
        if hasattr(self.backbone, "rope_rescale"):
            self.backbone.rope_rescale = None  # RoPE coordinate augmentation is for students only

    @classmethod
    def following(cls, student: DINOStudent, loss: LossConfig) -> DINOTeacher:
        """A teacher that starts as an exact copy of ``student`` and follows it by EMA."""
        copied = copy.deepcopy(student)
        return cls(copied.backbone, copied.dino_head, copied.ibot_head, loss, frozen=False)

    def compile_parts(self, **compile_options: Any) -> None:
        """``torch.compile`` in place the backbone's blocks and the heads, and compile Sinkhorn-Knopp (names
        unchanged). Softmax centering stays eager (two small ops around an EMA buffer)."""
        compile_backbone(self.backbone, **compile_options)
        for head in (self.dino_head, self.ibot_head):
            if head is not None:
                head.compile(**compile_options)
        self._sinkhorn_knopp = torch.compile(sinkhorn_knopp, **compile_options)

    def train(self, mode: bool = True) -> DINOTeacher:
        return super().train(False)  # always in eval mode: no drop path, no RoPE jitter

    def update(self, student: DINOStudent, momentum: float | Tensor) -> None:
        """The EMA step after each optimizer step (nothing for a frozen teacher)."""
        if not self.frozen:
            ema_update_module(self, student, momentum)

    @torch.no_grad()
    def targets(
        self, global_crops: Tensor, masks: Tensor | None, temperature: float, mask_indices: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Teacher probabilities on the unmasked global crops: ``cls_probs`` [2, B, K] and, with an iBOT head and
        ``masks``, ``patch_probs`` [M, K] for the M patches the student sees masked (rows ``mask_rows``).
        ``mask_indices``: the batch's precomputed ``masks.flatten().nonzero()`` (the collate's ``mask_indices``);
        given, the step has no ``nonzero`` (a host sync with a data-dependent shape) on the device."""
        return self.targets_from_outputs(self.backbone(global_crops), masks, temperature, mask_indices)

    @torch.no_grad()
    def targets_from_outputs(
        self, out: dict[str, Tensor], masks: Tensor | None, temperature: float, mask_indices: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The part of :meth:`targets` after the backbone (its ``{"cls", "patch"}`` outputs): heads and centering.
        With ``mask_indices`` it reads nothing back from the device and compiles as one graph."""
        cls_logits = self.dino_head(out["cls"])
        cls_probs = self._center(cls_logits, temperature, "dino")
        targets = {"cls_probs": cls_probs.unflatten(0, (NUM_GLOBAL_CROPS, -1))}
        if self.ibot_head is not None and masks is not None:
            mask_rows = masks.flatten().nonzero().squeeze(-1) if mask_indices is None else mask_indices
            patch_logits = self.ibot_head(out["patch"].flatten(0, 1).index_select(0, mask_rows))
            targets["patch_probs"] = self._center(patch_logits, temperature, "ibot")
            targets["mask_rows"] = mask_rows
        return targets

    def _center(self, logits: Tensor, temperature: float, head: str) -> Tensor:
        if self.centering == "sinkhorn_knopp":
            return self._sinkhorn_knopp(logits, temperature, self.sinkhorn_iterations)
        center: SoftmaxCenter = getattr(self, f"{head}_center")
        probs = center.probs(logits, temperature)
        center.update(logits)
        return probs


def compile_backbone(backbone: nn.Module, **compile_options: Any) -> None:
    """Compiles a backbone in place: block by block for a DINOv3 ViT (``DINOv3Backbone.compile_blocks``), whole
    otherwise (``nn.Module.compile``); either way its parameter names and state-dict keys are unchanged."""
    if hasattr(backbone, "compile_blocks"):
        backbone.compile_blocks(**compile_options)
    else:
        backbone.compile(**compile_options)


def resize_patch_grid(patches: Tensor, grid_hw: tuple[int, int], mode: str = "bicubic") -> Tensor:
    """Patch tokens [B, N, D] of a square grid resized to ``grid_hw`` (no antialias, as upstream's Gram teacher)."""
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"resize_patch_grid needs a square patch grid, got {patches.shape[1]} tokens")
    if (side, side) == tuple(grid_hw):
        return patches
    grid = patches.transpose(1, 2).unflatten(-1, (side, side))
    grid = F.interpolate(grid.float(), size=tuple(grid_hw), mode=mode, align_corners=False)
    return grid.flatten(2).transpose(1, 2).to(patches.dtype)


# ------------------------------------------------------------------------------------------------ loading teachers
def _head_config_from_weights(state_dict: Mapping[str, Tensor], prefix: str) -> HeadConfig:
    """A DINOHead's sizes read from its weights (``mlp.{0,2,..}.weight``, ``last_layer.weight``)."""
    linears = sorted(
        (int(key[len(prefix) :].split(".")[1]), value)
        for key, value in state_dict.items()
        if key.startswith(prefix + "mlp.") and key.endswith(".weight")
    )
    if not linears or prefix + "last_layer.weight" not in state_dict:
        raise ValueError(f"the checkpoint has no DINO head weights under {prefix!r}")
    last = state_dict[prefix + "last_layer.weight"]
    hidden = linears[0][1].shape[0] if len(linears) > 1 else last.shape[1]
    return HeadConfig(
        num_prototypes=last.shape[0], hidden_dim=hidden, bottleneck_dim=last.shape[1], num_layers=len(linears)
    )


def load_dino_teacher(weights: str, loss: LossConfig, backbone_name: str | None = None) -> DINOTeacher:
    """A frozen :class:`DINOTeacher` read from a dinov3-pl checkpoint: the recorded backbone (default, or
    ``backbone_name``) and the DINO / iBOT heads beside it (``<root>.dino_head``, ``<root>.ibot_head``)."""
    from dinov3_pl.models.weights import build_backbone, read_checkpoint, recorded_backbones, select_backbone

    checkpoint = read_checkpoint(weights)
    records = recorded_backbones(checkpoint)
    if not records:
        raise ValueError(
            f"{weights} is not a dinov3-pl checkpoint with heads: DINO-style distillation needs a teacher with DINO "
            "and iBOT heads (a DINOSSLModule checkpoint). For a backbone without heads (a released .pth, a Hugging "
            "Face folder) use FeatureDistillationModule"
        )
    checkpoint = select_backbone(checkpoint, backbone_name)
    prefix = checkpoint["backbone_config"]["prefix"]
    root = prefix[: -len("backbone.")] if prefix.endswith("backbone.") else prefix
    state_dict: dict[str, Any] = checkpoint["state_dict"]
    heads = {}
    for name in ("dino_head", "ibot_head"):
        head_prefix = f"{root}{name}."
        if not any(key.startswith(head_prefix) for key in state_dict):
            if name == "dino_head":
                raise ValueError(
                    f"{weights} holds no DINO head beside its backbone ({head_prefix}*): DINO-style distillation needs "
                    "the teacher's heads; use FeatureDistillationModule for a backbone without heads"
                )
            heads[name] = None
            continue
        heads[name] = _rebuild_head(state_dict, head_prefix, _head_config_from_weights(state_dict, head_prefix))
    backbone = build_backbone(None, checkpoint)
    return DINOTeacher(backbone, heads["dino_head"], heads["ibot_head"], loss, frozen=True)


def _rebuild_head(state_dict: Mapping[str, Tensor], prefix: str, config: HeadConfig) -> nn.Module:
    in_dim = state_dict[prefix + "mlp.0.weight"].shape[1]
    head = config.build(in_dim)
    head.load_state_dict({key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)})
    return head
