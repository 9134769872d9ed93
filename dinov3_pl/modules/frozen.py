"""FrozenBackboneModule: the base LightningModule of every frozen-backbone evaluation (kNN, linear, dense heads).

It owns one thing: a backbone that is loaded, frozen and kept in ``eval()`` mode, plus helpers that turn images
into the features the evaluation protocols use. Subclasses add a head, a loss and metrics. The backbone is a
``DINOv3Backbone`` (timm DINOv3 ViT) or, for any other timm model name or a checkpoint recording one, a
``TimmBackbone`` (ResNet, ConvNeXt, ...), whose class feature is the model's own pooled feature and whose layers are
its stages (of different widths and resolutions).

Subclass contract (see docs/extending.md):

- call ``super().__init__(arch=..., weights=..., backbone_kwargs=..., feature_type=..., n_last_blocks=...)`` then
  ``self.save_hyperparameters()`` in your own ``__init__``;
- get features with ``self.features(images)`` ([B, F], sized by ``self.feature_dim``), ``self.extract(images)``
  (final-layer token dict) or ``self.patch_maps(images, layers)`` ([B, D, h, w] maps for dense heads);
- those helpers run the backbone under ``torch.no_grad()`` (and bf16 autocast on CUDA) while it is frozen and
  always return float32, so heads train in full precision;
- ``configure_optimizers`` should optimise ``self.trainable_parameters()`` (the backbone's are excluded while it
  is frozen); ``self.head_optimizer(...)`` builds the usual AdamW/SGD + step-wise LR schedule over them;
- to fine-tune instead of probing, call ``self.unfreeze_last_blocks(k)`` in ``__init__``: the last ``k`` blocks
  (``-1``: all of the backbone) then train and the helpers run them with gradients; everything else stays frozen;
- dense heads size their input with ``self.patch_map_channels(layers)`` (a TimmBackbone's stages differ in width).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from dinov3_pl.models.weights import build_backbone
from dinov3_pl.modules.feature_cache import FeatureCache

__all__ = [
    "FeatureType",
    "FrozenBackboneModule",
    "build_eval_backbone",
    "class_token_dims",
    "feature_dim",
    "lr_factor",
]

FeatureType = Literal["cls", "cls_meanpatch", "meanpatch"]
FEATURE_TYPES: tuple[str, ...] = ("cls", "cls_meanpatch", "meanpatch")

# Marker stored in checkpoints whose frozen backbone weights were left out (they are rebuilt from ``weights``).
_OMITTED_KEY = "frozen_backbone_omitted"


def build_eval_backbone(arch: str | None, weights: str | None, backbone_kwargs: dict | None) -> nn.Module:
    """Builds the backbone to evaluate: ``arch`` + timm overrides, weights from a file or a dinov3-pl ``.ckpt``
    (whose recorded architecture is used; see ``dinov3_pl.models.weights.build_backbone``). A timm DINOv3 ViT name
    gives a ``DINOv3Backbone``, any other timm name (``resnet50``, ``convnext_tiny``) a ``TimmBackbone``."""
    return build_backbone(arch, weights, **(backbone_kwargs or {}))


def feature_dim(
    embed_dim: int, feature_type: str, n_last_blocks: int = 1, *, class_token_dims: Sequence[int] | None = None
) -> int:
    """Length of the vector ``FrozenBackboneModule.features`` returns for this feature type.

    ``class_token_dims``: widths of the ``n_last_blocks`` class tokens (oldest first) when they are not all
    ``embed_dim`` (a ``TimmBackbone``'s pooled stage maps, see ``class_token_dims``); the mean patch token is always
    ``embed_dim`` wide.
    """
    if class_token_dims is None:
        class_token_dims = [embed_dim] * n_last_blocks
    elif len(class_token_dims) != n_last_blocks:
        raise ValueError(f"class_token_dims has {len(class_token_dims)} widths for n_last_blocks={n_last_blocks}")
    if feature_type == "cls":
        return sum(class_token_dims)
    if feature_type == "cls_meanpatch":
        return sum(class_token_dims) + embed_dim
    if feature_type == "meanpatch":
        return embed_dim
    raise ValueError(f"feature_type must be one of {FEATURE_TYPES}, got {feature_type!r}")


def class_token_dims(backbone: nn.Module, n_last_blocks: int) -> list[int]:
    """Widths of the class tokens ``FrozenBackboneModule.features`` concatenates for the last ``n_last_blocks``
    layers. A ``DINOv3Backbone``'s are all ``embed_dim``. A ``TimmBackbone``'s last one is the model's own pooled
    feature (``cls_dim``, e.g. 1280 after a MobileNetV4's ``conv_head``) and the earlier ones are its stage maps,
    average-pooled (``layer_channels``)."""
    embed_dim = backbone.embed_dim
    cls_dim = getattr(backbone, "cls_dim", embed_dim)
    channels = getattr(backbone, "layer_channels", None)
    if channels is None:
        return [embed_dim] * (n_last_blocks - 1) + [cls_dim]
    return [*channels[len(channels) - n_last_blocks : -1], cls_dim]


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at ``step``: linear warm-up, then cosine / poly(0.9) decay to ``min_ratio`` or
    constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    if schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "poly":
        decay = (1 - progress) ** 0.9
    elif schedule == "constant":
        decay = 1.0
    else:
        raise ValueError(f"schedule must be cosine, poly or constant, got {schedule!r}")
    return min_ratio + (1 - min_ratio) * decay


class FrozenBackboneModule(L.LightningModule):
    """A LightningModule around a frozen backbone; the base of the evaluation modules.

    Args:
        arch: timm model name: a DINOv3 ViT such as ``vit_small_patch16_dinov3`` (a ``DINOv3Backbone``) or any other
            timm model such as ``resnet50`` (a ``TimmBackbone``). May be ``None`` when ``weights`` is a dinov3-pl
            ``.ckpt``, which records its architecture (a given ``arch`` must then match the recorded one).
        weights: backbone weights (upstream ``.pth``, Hugging Face folder/safetensors, timm state dict or a
            dinov3-pl ``.ckpt``); ``None`` evaluates a randomly initialised backbone (a baseline).
        backbone_kwargs: timm overrides, e.g. ``{"depth": 2, "embed_dim": 96, "patch_size": 4, "img_size": 32}``;
            with a dinov3-pl ``.ckpt`` they apply on top of the recorded ones (leave them out there).
        feature_type: what ``features()`` returns: ``"cls"`` (class token), ``"cls_meanpatch"`` (class token and
            mean patch token concatenated, the upstream linear protocol) or ``"meanpatch"``.
        n_last_blocks: concatenate the class tokens of the last ``n`` blocks (each after the final norm), as
            upstream linear evaluation does; the mean patch token always comes from the last block. For a
            ``TimmBackbone`` the "blocks" are its stages: the last one gives the model's own pooled feature, the
            earlier ones their average-pooled maps (``feature_dim`` adds up their widths).
        cache_eval_features: keep the features of validation/test/predict samples in memory, keyed by
            ``(stage, dataloader index, sample index)``, so a backbone pass is done once per sample. Needs batches
            with an ``"indices"`` entry and a deterministic (non-augmented) eval transform.
        feature_cache_gb: bound on that cache's CPU memory per process (GiB, all stages together); samples that do
            not fit are embedded again at every pass (one warning). See ``dinov3_pl.modules.feature_cache`` for sizes.
        feature_cache_dtype: storage type of cached features: ``"float32"`` (exact) or ``"bfloat16"`` (half the
            memory; the features a GPU computes under bf16 autocast lose little more).
    """

    def __init__(
        self,
        arch: str | None = "vit_small_patch16_dinov3",
        weights: str | None = None,
        backbone_kwargs: dict | None = None,
        feature_type: FeatureType = "cls",
        n_last_blocks: int = 1,
        cache_eval_features: bool = False,
        feature_cache_gb: float = 4.0,
        feature_cache_dtype: Literal["float32", "bfloat16"] = "float32",
    ) -> None:
        super().__init__()
        if feature_type not in FEATURE_TYPES:
            raise ValueError(f"feature_type must be one of {FEATURE_TYPES}, got {feature_type!r}")
        if n_last_blocks < 1:
            raise ValueError(f"n_last_blocks must be >= 1, got {n_last_blocks}")
        self.feature_type = feature_type
        self.n_last_blocks = n_last_blocks
        self.cache_eval_features = cache_eval_features
        self.cache_train_features = False  # subclasses may enable it for non-augmented training data
        self.backbone_weights = weights
        self.backbone = build_eval_backbone(arch, weights, backbone_kwargs)
        depth = getattr(self.backbone, "depth", None)
        if depth is not None and n_last_blocks > depth:
            raise ValueError(f"n_last_blocks={n_last_blocks} exceeds the backbone depth {depth}")
        self.embed_dim: int = self.backbone.embed_dim
        self.patch_size: int = self.backbone.patch_size
        self.feature_dim: int = feature_dim(
            self.embed_dim,
            feature_type,
            n_last_blocks,
            class_token_dims=class_token_dims(self.backbone, n_last_blocks),
        )
        self.trainable_backbone_modules: list[nn.Module] = []
        self._feature_cache = FeatureCache(int(feature_cache_gb * 2**30), feature_cache_dtype)
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def configure_callbacks(self) -> list[L.Callback]:
        """``BadImageCount``: logs and warns how many unreadable images each stage skipped (``num_bad_images``)."""
        from dinov3_pl.callbacks.bad_images import BadImageCount

        return [BadImageCount()]

    # ------------------------------------------------------------------------------------ freezing and modes
    @property
    def backbone_frozen(self) -> bool:
        """True when no backbone parameter is trained (a pure probe)."""
        return not self.trainable_backbone_modules

    def unfreeze_last_blocks(self, num_blocks: int) -> None:
        """Makes the last ``num_blocks`` transformer blocks and the final norm trainable; ``-1``: the whole backbone.

        For a ``TimmBackbone`` the blocks are its stages (``depth`` of them, the stem in the first) and what runs
        after the last stage trains with them (final conv or norm, the pooling head's norm; see
        ``TimmBackbone.last_layers``). ``0`` keeps everything frozen. Trainable modules follow Lightning's
        train/eval switches (a CNN's BatchNorm statistics then update); the rest stays in ``eval()`` and under
        ``requires_grad=False``.
        """
        depth = int(self.backbone.depth)
        if num_blocks < -1 or num_blocks > depth:
            raise ValueError(f"num_blocks must be -1 (all) or in [0, {depth}], got {num_blocks}")
        self.backbone.requires_grad_(False)
        if num_blocks == -1:
            modules: list[nn.Module] = [self.backbone]
        elif num_blocks == 0:
            modules = []
        elif hasattr(self.backbone, "last_layers"):  # TimmBackbone
            modules = self.backbone.last_layers(num_blocks)
        else:
            modules = [*list(self.backbone.vit.blocks)[-num_blocks:], self.backbone.vit.norm]
        for module in modules:
            module.requires_grad_(True)
        self.trainable_backbone_modules = modules
        self._feature_cache.clear()
        self._set_backbone_modes()

    def _set_backbone_modes(self) -> None:
        # The frozen part is always in eval(); trainable parts follow the module's own mode.
        self.backbone.eval()
        for module in self.trainable_backbone_modules:
            module.train(self.training)

    def train(self, mode: bool = True) -> FrozenBackboneModule:
        """Lightning calls ``.train()`` before every training epoch; the frozen backbone must stay in eval()."""
        super().train(mode)
        self._set_backbone_modes()
        return self

    def on_train_epoch_start(self) -> None:
        # Second line of defence: Lightning restores per-module modes itself after validation in some versions.
        self._set_backbone_modes()

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that need an optimiser: everything with ``requires_grad`` (heads, unfrozen blocks)."""
        return (p for p in self.parameters() if p.requires_grad)

    def head_optimizer(
        self,
        optimizer: str,
        lr: float,
        weight_decay: float,
        schedule: str,
        warmup_steps: int,
        min_lr_ratio: float,
    ) -> dict[str, Any]:
        """``configure_optimizers`` output for ``trainable_parameters()``: ``"adamw"`` or ``"sgd"`` (momentum 0.9),
        with a per-step ``lr_factor`` schedule over the trainer's estimated steps."""
        params = list(self.trainable_parameters())
        if optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        elif optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
        else:
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, total, warmup_steps, schedule, min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def image_writer(self, every_n_epochs: int) -> Any | None:
        """The logger's TensorBoard writer when images are due (every ``every_n_epochs`` epochs, not during the
        sanity check; ``0``: never), else ``None`` (also for other loggers: nothing to draw on)."""
        if not every_n_epochs or self.trainer.sanity_checking or self.current_epoch % every_n_epochs:
            return None
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):  # not TensorBoard
            return None
        return experiment

    # ------------------------------------------------------------------------------------ running the backbone
    @contextlib.contextmanager
    def backbone_context(self) -> Iterator[None]:
        """``no_grad`` while frozen, bf16 autocast on CUDA (the released DINOv3 models run in bf16)."""
        grad = contextlib.nullcontext() if not self.backbone_frozen and torch.is_grad_enabled() else torch.no_grad()
        device_type = self.device.type
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else contextlib.nullcontext()
        with grad, autocast:
            yield

    def extract(self, images: Tensor) -> dict[str, Tensor]:
        """Final-layer tokens ``{"cls": [B, D], "storage": [B, R, D], "patch": [B, N, D]}`` in float32."""
        with self.backbone_context():
            out = self.backbone(images)
        return {key: value.float() for key, value in out.items()}

    def features(self, images: Tensor, feature_type: str | None = None, n_last_blocks: int | None = None) -> Tensor:
        """Image-level features [B, F] (float32); defaults to the module's ``feature_type`` and ``n_last_blocks``.

        ``"cls"``: class tokens of the last ``n`` blocks concatenated (oldest first); ``"cls_meanpatch"``: the same
        followed by the mean of the last block's patch tokens (upstream ``create_linear_input``); ``"meanpatch"``:
        the mean patch token only. Every token is taken after the backbone's final norm.
        """
        feature_type = feature_type or self.feature_type
        n_last_blocks = n_last_blocks or self.n_last_blocks
        if feature_type not in FEATURE_TYPES:
            raise ValueError(f"feature_type must be one of {FEATURE_TYPES}, got {feature_type!r}")
        with self.backbone_context():
            if n_last_blocks == 1:
                out = self.backbone(images)
                class_tokens, last_patch = [out["cls"]], out["patch"]
            else:
                layers = self.backbone.get_intermediate_layers(images, n=n_last_blocks, return_class_token=True)
                class_tokens = [cls for _, cls in layers]
                last_patch = layers[-1][0]
        if feature_type == "meanpatch":
            parts = [last_patch.mean(dim=1)]
        elif feature_type == "cls":
            parts = class_tokens
        else:
            parts = [*class_tokens, last_patch.mean(dim=1)]
        return torch.cat(parts, dim=-1).float()

    def patch_maps(self, images: Tensor, layers: int | Sequence[int] = 1, concat: bool = True) -> Tensor | list[Tensor]:
        """Patch-token maps for dense heads, each [B, D, H/p, W/p] (float32, after the final norm).

        ``layers``: the last ``n`` blocks (int) or block indices (negative allowed). With ``concat`` the maps are
        concatenated along channels ([B, len·D, h, w], upstream's multi-layer linear segmentation input); else a
        list in the order asked. A ``TimmBackbone``'s layers are its stages: widths ``layer_channels`` and strides
        2, 4, ... ``patch_size``, so maps of different resolutions cannot be concatenated (``concat=False`` returns
        them as they are).
        """
        with self.backbone_context():
            maps = self.backbone.get_intermediate_layers(images, n=layers, reshape=True, norm=True)
        maps = [m.float() for m in maps]
        if not concat:
            return maps
        sizes = [tuple(m.shape[-2:]) for m in maps]
        if len(set(sizes)) > 1:
            raise ValueError(
                f"layers={layers!r} of {self.backbone.arch} give maps of different resolutions {sizes}, which cannot "
                "be concatenated: use one layer (e.g. the last, layers=1) or patch_maps(..., concat=False)"
            )
        return torch.cat(maps, dim=1)

    def patch_map_channels(self, layers: int | Sequence[int] = 1) -> int:
        """Channels of ``patch_maps(images, layers)`` (concatenated): ``len(layers) · embed_dim`` for a ViT, the sum
        of the stages' widths (``layer_channels``) for a ``TimmBackbone``."""
        depth = int(self.backbone.depth)
        indices = list(range(depth - layers, depth)) if isinstance(layers, int) else [int(i) for i in layers]
        channels = getattr(self.backbone, "layer_channels", None)
        if channels is None:
            return len(indices) * self.embed_dim
        return sum(channels[i] for i in indices)

    # ------------------------------------------------------------------------------------ feature cache
    def batch_features(self, batch: dict[str, Any], stage: str, dataloader_idx: int = 0) -> Tensor:
        """``features(batch["images"])``, with the rows seen before served from the bounded feature cache.

        The cache is used while the backbone is frozen, for batches with ``"indices"``, in the validation/test/predict
        stages (``stage`` in {"val", "test", "predict"}) when ``cache_eval_features`` is on, and in ``"train"`` only
        when a subclass sets ``self.cache_train_features = True`` (correct only without random augmentation). Only
        the rows of a batch that are not cached go through the backbone.
        """
        images = batch["images"]
        indices = batch.get("indices")
        enabled = self.cache_train_features if stage == "train" else self.cache_eval_features
        if not enabled or not self.backbone_frozen or indices is None:
            return self.features(images)
        key = (stage, dataloader_idx)
        indices = torch.as_tensor(indices).cpu()
        hits, cached = self._feature_cache.lookup(key, indices)
        if cached is None:
            feats = self.features(images)
            self._feature_cache.store(key, indices, feats)
            return feats
        if bool(hits.all()):
            return cached.to(self.device)
        missing = ~hits
        fresh = self.features(images[missing.to(images.device)])
        self._feature_cache.store(key, indices[missing], fresh)
        merged = cached.to(fresh.device)  # the new rows join on the device they were computed on
        merged[missing.to(fresh.device)] = fresh
        return merged

    def clear_feature_cache(self) -> None:
        """Drops cached eval features (call it if the eval data change between runs)."""
        self._feature_cache.clear()

    # ------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leaves the frozen backbone out of the checkpoint when it can be rebuilt from ``weights``."""
        if self.backbone_frozen and self.backbone_weights is not None:
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k.startswith("backbone.")]:
                del state[key]
            checkpoint[_OMITTED_KEY] = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Puts the backbone (rebuilt from ``weights`` in ``__init__``) back into a checkpoint that omitted it."""
        if checkpoint.get(_OMITTED_KEY):
            state = checkpoint.setdefault("state_dict", {})
            for key, value in self.backbone.state_dict().items():
                state.setdefault(f"backbone.{key}", value)
