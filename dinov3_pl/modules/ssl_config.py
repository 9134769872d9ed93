"""Typed option groups of ``DINOSSLModule`` and the distillation modules; each maps 1:1 onto a block of the YAML
recipe.

Defaults are the upstream ImageNet-1k ViT-L recipe (``vitl_im1k_lin834.yaml``) stated in steps, except where a
field says otherwise. DESIGN.md §3 lists the upstream facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from dinov3_pl.models.backbone import DINOv3Backbone
from dinov3_pl.models.heads import DINOHead

__all__ = [
    "BackboneConfig",
    "HeadConfig",
    "LossConfig",
    "TeacherConfig",
    "OptimConfig",
    "GramConfig",
    "StudentConfig",
    "DistillationTeacherConfig",
    "FeatureLossConfig",
]


@dataclass(frozen=True)
class _Options:
    """Base of the option groups: a ``str | None`` field given the string ``"None"`` means ``None``.

    Why: inside LightningCLI's subclass mode, jsonargparse (4.53) turns ``--model.init_args.backbone.arch=null``
    into the string ``"None"`` for fields of nested dataclasses (``arch: null`` in a YAML file is parsed right).
    """

    def __post_init__(self) -> None:
        for field_ in fields(self):
            if getattr(self, field_.name) == "None" and "None" in str(field_.type):
                object.__setattr__(self, field_.name, None)


@dataclass(frozen=True)
class BackboneConfig(_Options):
    """The student backbone (the teacher is its EMA copy). ``weights`` continues from released/upstream weights;
    ``arch: null`` takes the architecture a dinov3-pl ``.ckpt`` given as ``weights`` records. A student of feature
    distillation may be any timm model (``arch: convnext_tiny``, ``resnet50``, ...; ``rope_rescale``,
    ``drop_path_uniform`` and ``drop_path_subset`` are DINOv3-only)."""

    arch: str | None = "vit_small_patch16_dinov3"
    weights: str | None = None
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = True
    drop_path_subset: bool = False
    rope_rescale: float | None = None
    grad_checkpointing: bool = False
    timm_overrides: dict = field(default_factory=dict)

    def build(self) -> DINOv3Backbone:
        if self.arch is not None and "dinov3" not in self.arch:
            from dinov3_pl.models.weights import build_backbone

            if self.rope_rescale is not None:
                raise ValueError(f"rope_rescale is for DINOv3 ViTs; {self.arch} has no RoPE: set it to null")
            if self.drop_path_subset:
                raise ValueError(f"drop_path_subset is for DINOv3 ViTs; set it to false for {self.arch}")
            backbone = build_backbone(
                self.arch, self.weights, drop_path_rate=self.drop_path_rate, **self.timm_overrides
            )
            if self.grad_checkpointing:
                backbone.model.set_grad_checkpointing(True)
            return backbone
        return DINOv3Backbone(
            self.arch,
            weights=self.weights,
            drop_path_rate=self.drop_path_rate,
            drop_path_uniform=self.drop_path_uniform,
            drop_path_subset=self.drop_path_subset,
            rope_rescale=self.rope_rescale,
            grad_checkpointing=self.grad_checkpointing,
            **self.timm_overrides,
        )


@dataclass(frozen=True)
class HeadConfig:
    """A DINO or iBOT head: MLP ``num_layers`` deep -> ``bottleneck_dim`` -> L2 norm -> ``num_prototypes``."""

    num_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3

    def build(self, in_dim: int) -> DINOHead:
        return DINOHead(in_dim, self.num_prototypes, self.hidden_dim, self.bottleneck_dim, self.num_layers)


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and temperatures. The DINO global/local terms are further scaled by their pair counts."""

    dino_weight: float = 1.0
    dino_local_weight: float = 1.0  # on top of the pair count
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    student_temperature: float = 0.1
    centering: Literal["sinkhorn_knopp", "softmax"] = "sinkhorn_knopp"
    sinkhorn_iterations: int = 3
    center_momentum: float = 0.9  # softmax centering only (DINOv1/v2 style)


@dataclass(frozen=True)
class TeacherConfig:
    """EMA momentum (cosine ``momentum`` -> ``momentum_end`` over training, or constant) and the teacher
    temperature (linear warm-up from ``temperature_warmup_start`` over ``temperature_warmup_steps``)."""

    momentum: float = 0.992
    momentum_end: float = 1.0
    momentum_schedule: Literal["cosine", "constant"] = "cosine"
    temperature: float = 0.07
    temperature_warmup_start: float = 0.04
    temperature_warmup_steps: int = 37_500  # 30 upstream epochs of 1250 iterations


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with upstream's parameter groups and schedules, all in optimizer steps.

    ``lr`` is the base LR for a global batch of 1024/4 = 256 under ``lr_scaling="sqrt_wrt_1024"`` (upstream:
    ``lr × 4·sqrt(global_batch / 1024)``). ``total_steps=None`` takes the trainer's total number of steps.
    """

    lr: float = 1e-3
    min_lr: float = 1e-6
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_scaling: Literal["sqrt_wrt_1024", "none"] = "sqrt_wrt_1024"
    warmup_steps: int = 12_500
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    weight_decay_schedule: Literal["cosine", "constant"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_steps: int = 1_250
    head_warmup_steps: int = 0  # backbone LR 0 for these first steps (continuing from released weights)
    clip_grad: float | None = 3.0
    clip_per_module: bool = True  # upstream: backbone, DINO head and iBOT head clipped separately
    total_steps: int | None = None
    fused: bool | None = None  # torch's fused AdamW kernel (CPU and CUDA); None keeps torch's default


@dataclass(frozen=True)
class GramConfig(_Options):
    """Gram anchoring (upstream ``dinov3_vit7b16_gram_anchor.yaml``), all in steps.

    The Gram teacher is a frozen backbone: loaded from ``teacher_weights`` or, when that is ``None``, a snapshot
    of the EMA teacher taken at ``start_step``. It is refreshed from the EMA teacher at ``first_refresh_step`` and
    then every ``refresh_every`` steps, at most ``max_refreshes`` times. The loss weight ramps 0 -> ``weight`` and
    the local DINO weight 1 -> ``local_dino_weight_end`` by a cosine over ``ramp_steps`` from ``start_step``.
    """

    enabled: bool = False
    weight: float = 2.0
    start_step: int = 0
    ramp_steps: int = 1_000  # one epoch of the 7B configs (OFFICIAL_EPOCH_LENGTH 1000)
    local_dino_weight_end: float = 0.5
    teacher_weights: str | None = None
    first_refresh_step: int | None = None
    refresh_every: int = 10_000
    max_refreshes: int = 3
    img_level: bool = True
    remove_neg: bool = False


@dataclass(frozen=True)
class StudentConfig:
    """One student of a distillation run: its backbone, its own AdamW groups and schedules (``optim``), and the EMA
    of its weights that is evaluated and exported (momentum cosine ``ema_momentum`` -> ``ema_momentum_end``, or
    constant). DINO-style distillation: ``dino_head`` / ``ibot_head`` (``None``: the teacher's sizes, whose
    prototype counts the student must share). Feature distillation: ``projection_hidden_dim`` sizes the MLPs that
    map the student's CLS and patch tokens onto the teacher's (0: a linear map)."""

    name: str = "student"
    backbone: BackboneConfig = BackboneConfig()
    optim: OptimConfig = OptimConfig()
    dino_head: HeadConfig | None = None
    ibot_head: HeadConfig | None = None
    projection_hidden_dim: int = 1024
    ema_momentum: float = 0.994
    ema_momentum_end: float = 1.0
    ema_momentum_schedule: Literal["cosine", "constant"] = "cosine"


@dataclass(frozen=True)
class DistillationTeacherConfig(_Options):
    """The frozen teacher of a distillation run. ``weights``: a dinov3-pl checkpoint (its recorded backbone, or
    ``backbone_name``; DINO-style distillation also reads the DINO/iBOT heads beside it) or, for feature
    distillation, any backbone weights (upstream ``.pth``, Hugging Face folder, timm state dict) with ``arch`` and
    ``timm_overrides``. The teacher temperature (DINO-style) warms up linearly from ``temperature_warmup_start``."""

    weights: str = ""
    backbone_name: str | None = None
    arch: str | None = None
    timm_overrides: dict = field(default_factory=dict)
    temperature: float = 0.07
    temperature_warmup_start: float = 0.04
    temperature_warmup_steps: int = 0


@dataclass(frozen=True)
class FeatureLossConfig:
    """Feature distillation (AM-RADIO, Ranzinger et al., CVPR 2024): the student's projected CLS token matches the
    teacher's by cosine distance; its projected patch tokens match the teacher's (resized to the student's grid) by
    ``patch_cosine_share`` x cosine distance + (1 - share) x smooth-L1 (AM-RADIO's 0.9 / 0.1)."""

    cls_weight: float = 1.0
    patch_weight: float = 1.0
    patch_cosine_share: float = 0.9
    smooth_l1_beta: float = 1.0
