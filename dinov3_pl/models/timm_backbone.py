"""TimmBackbone: any timm model (ResNet, ConvNeXt, MobileNetV4, EfficientViT, a timm ViT, ...) behind the output
contract of ``DINOv3Backbone``, so that the evaluation modules and the distillation student can use it.

timm owns the network; this adapter only turns its outputs into ``{"cls", "storage", "patch"}`` and its
``forward_intermediates`` into upstream DINOv3's ``get_intermediate_layers``. Nothing is ever downloaded: the
model is created with ``pretrained=False`` and weights come only from a local file.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from dinov3_pl.models.weights import (
    _check_against,
    _recorded_config,
    _unwrap,
    numbers_from_text,
    read_checkpoint,
    recorded_backbone_kind,
    resolve_recorded_architecture,
)

__all__ = ["TIMM_BACKBONE_DEFAULTS", "TimmBackbone"]

# What TimmBackbone passes to timm.create_model besides pretrained=False: no classifier (forward_head with
# pre_logits then returns the pooled feature). Recorded overrides may repeat these values.
TIMM_BACKBONE_DEFAULTS: dict[str, Any] = {"num_classes": 0}
# Overrides that would download weights, add a classifier or change what the model returns.
_REFUSED_OVERRIDES = {
    "pretrained": "weights come only from a local file: pass weights=<path>",
    "pretrained_cfg": "weights come only from a local file: pass weights=<path>",
    "pretrained_cfg_overlay": "weights come only from a local file: pass weights=<path>",
    "checkpoint_path": "pass the file as weights=<path>",
    "features_only": "the adapter needs the whole model (it calls forward_intermediates itself)",
}
_MODEL_PREFIX = "model."


class TimmBackbone(nn.Module):
    """A timm model by name with ``DINOv3Backbone``'s outputs: ``{"cls": [B, C'], "storage": [B, 0, C],
    "patch": [B, h·w, C]}``.

    - ``"patch"``: the final feature map, ``forward_features`` (for a ConvNeXt after ``norm_pre``, for an
      EfficientNet after ``conv_head``; a ViT's tokens without its prefix tokens), flattened row-major from
      [B, C, h, w] to [B, h·w, C]: token ``i·w + j`` is map pixel (i, j). ``C = embed_dim`` (timm's ``num_features``).
    - ``"cls"``: the pooled feature the model's own classifier reads, ``forward_head(features, pre_logits=True)``,
      so each family pools as designed: global average pool for a ResNet, pool + the head's LayerNorm for a
      ConvNeXt, pool + ``conv_head`` (960 → 1280) for a MobileNetV4, the class token after the norm for a timm ViT.
      Its width ``cls_dim`` (timm's ``head_hidden_size``) can differ from ``embed_dim``.
    - ``"storage"``: always empty ([B, 0, C]); ``num_storage_tokens = 0``. There is no ``mask_token``: masked
      inputs (iBOT) need a token model, ``DINOv3Backbone``.

    ``patch_size`` is the total stride of the final map (from timm's ``feature_info``, 32 for most CNNs); images
    must be a multiple of it. ``depth`` is the number of maps ``forward_intermediates`` returns (a CNN's stages,
    with its stem as map 0; a ViT's blocks). ``layer_channels`` are their widths as ``get_intermediate_layers``
    returns them with ``norm=True``. Models with a fixed input size (a timm ViT or Swin built without
    ``dynamic_img_size=True`` / ``strict_img_size=False``) take only that size.

    State-dict layout: the timm model is ``self.model``, so the keys are timm's own with a ``"model."`` prefix
    (``model.stem.0.weight``, ``model.stages.3.blocks.2.conv_dw.weight``, ...). A dinov3-pl ``.ckpt`` stores such a
    backbone under its recorded prefix (``"<prefix>model.stem.0.weight"``) with the record
    ``{"arch", "timm_overrides", "prefix", "kind": "timm"}`` (``dinov3_pl.models.weights.backbone_record``).

    Args:
        arch: a timm model name (``timm.list_models()``), e.g. ``resnet50``, ``convnext_tiny``,
            ``mobilenetv4_conv_small``. ``None`` with a dinov3-pl ``.ckpt``: the architecture it records.
        weights: optional path (or loaded file): a plain timm state dict of this model (timm's key names; its
            classifier weights, unused with ``num_classes=0``, are dropped), a ``TimmBackbone`` state dict
            (``model.`` keys), or a dinov3-pl ``.ckpt`` recording a backbone of kind ``"timm"``. Keys or shapes that
            do not fit raise an error naming them.
        drop_path_rate: stochastic depth (passed to timm only when non-zero; not recorded: it changes no
            parameter and nothing in ``eval()``).
        grad_checkpointing: timm's activation checkpointing (``set_grad_checkpointing``).
        **timm_overrides: passed to ``timm.create_model``, e.g. ``{"depths": (1, 1, 1, 1)}`` or, for a timm ViT,
            ``{"depth": 2, "img_size": 32, "dynamic_img_size": True}``.
    """

    kind = "timm"

    def __init__(
        self,
        arch: str | None,
        weights: str | Path | Mapping[str, Any] | None = None,
        *,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        **timm_overrides: Any,
    ) -> None:
        super().__init__()
        checkpoint = read_checkpoint(weights) if isinstance(weights, str | Path) else weights
        arch, timm_overrides = _resolve_architecture(arch, numbers_from_text(timm_overrides), checkpoint)
        _check_arch(arch)
        for key, reason in _REFUSED_OVERRIDES.items():
            if key in timm_overrides:
                raise ValueError(f"TimmBackbone does not take the timm option {key}: {reason}")
        if timm_overrides.get("num_classes", 0) != 0:
            raise ValueError(
                f"TimmBackbone builds timm models without a classifier; drop num_classes (got "
                f"{timm_overrides['num_classes']})"
            )
        self.arch = arch
        self.timm_overrides: dict[str, Any] = dict(timm_overrides)
        extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        kwargs = {**TIMM_BACKBONE_DEFAULTS, **extra, **timm_overrides}
        try:
            self.model = timm.create_model(arch, pretrained=False, **kwargs)
        except TypeError as error:  # an option this family's constructor does not have
            raise ValueError(f"timm could not build {arch} with {kwargs}: {error}") from error
        feature_info = getattr(self.model, "feature_info", None)
        if not feature_info or not hasattr(self.model, "forward_intermediates"):
            raise ValueError(
                f"timm's {arch} has no feature_info / forward_intermediates, which TimmBackbone needs for the "
                "stride and the intermediate layers; pick another model"
            )
        self._feature_info = [dict(info) for info in feature_info]
        self.embed_dim: int = int(self.model.num_features)
        self.cls_dim: int = int(getattr(self.model, "head_hidden_size", self.embed_dim))
        self.patch_size: int = int(self._feature_info[-1]["reduction"])
        self.depth: int = len(self._feature_info)
        # With norm=True the last map is the final feature map (forward_features), which may be wider than the last
        # stage (an EfficientNet's conv_head: 320 -> 1280).
        self.layer_channels: tuple[int, ...] = (
            *(int(info["num_chs"]) for info in self._feature_info[:-1]),
            self.embed_dim,
        )
        self.num_storage_tokens: int = 0
        self._output_fmt = str(getattr(self.model, "output_fmt", "NCHW"))
        self._num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if checkpoint is not None:
            self.load_weights(checkpoint)

    # ------------------------------------------------------------------------------------------------ weights
    def load_weights(self, source: str | Path | Mapping[str, Any]) -> None:
        """Loads a plain timm state dict, a ``TimmBackbone`` state dict or a dinov3-pl ``.ckpt`` (kind timm)."""
        checkpoint = read_checkpoint(source) if isinstance(source, str | Path) else source
        state_dict, _ = _unwrap(checkpoint)
        target = self.state_dict()
        # Our own layout has "model." keys; a plain timm state dict does not. The reading that fits the model better
        # wins (a timm model whose own keys start with "model." is read right too); with no fit at all, keys that all
        # start with "model." are taken as ours, so the error lists them as they are.
        as_given = dict(state_dict)
        prefixed = {_MODEL_PREFIX + key: value for key, value in state_dict.items()}
        all_prefixed = all(key.startswith(_MODEL_PREFIX) for key in as_given)
        fit_as_given, fit_prefixed = len(set(as_given) & set(target)), len(set(prefixed) & set(target))
        ours = fit_as_given > fit_prefixed or (fit_as_given == fit_prefixed and all_prefixed)
        state, fmt = (as_given, "TimmBackbone") if ours else (prefixed, "plain timm")
        for name in _classifier_names(self.model):  # unused with num_classes=0; timm drops them the same way
            for suffix in (".weight", ".bias"):
                key = _MODEL_PREFIX + name + suffix
                if key in state and key not in target:
                    del state[key]
        hint = (
            f"Check arch ({self.arch!r}) and the timm overrides the weights were trained with ({self.timm_overrides})."
        )
        _check_against(state, target, fmt, hint)
        self.load_state_dict(state, strict=True)

    # ------------------------------------------------------------------------------------------------ helpers
    def _check_size(self, images: Tensor) -> tuple[int, int]:
        if images.ndim != 4:
            raise ValueError(f"images must be a [B, C, H, W] tensor, got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not divisible by {self.arch}'s total stride {self.patch_size}; "
                f"resize or crop to a multiple of {self.patch_size}"
            )
        fixed = self._fixed_input_size()
        if fixed is not None and (height, width) != fixed:
            raise ValueError(
                f"{self.arch} was built for {fixed[0]}x{fixed[1]} images only, got {height}x{width}: build it with "
                f"img_size=({height}, {width}) or, for any size, dynamic_img_size=True (timm ViTs) / "
                "strict_img_size=False (Swin)"
            )
        return height // self.patch_size, width // self.patch_size

    def _fixed_input_size(self) -> tuple[int, int] | None:
        patch_embed = getattr(self.model, "patch_embed", None)
        img_size = getattr(patch_embed, "img_size", None)
        if img_size is None or not getattr(patch_embed, "strict_img_size", False):
            return None
        return (int(img_size[0]), int(img_size[1]))

    def _to_map(self, features: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """timm's final features (NCHW / NHWC map or [B, prefix + N, C] tokens) as a [B, C, h, w] map."""
        if features.ndim == 3:
            tokens = features[:, self._num_prefix_tokens :]
            if tokens.shape[1] != grid_hw[0] * grid_hw[1]:
                raise ValueError(
                    f"{self.arch} returned {tokens.shape[1]} patch tokens for a {grid_hw[0]}x{grid_hw[1]} grid"
                )
            return tokens.unflatten(1, grid_hw).permute(0, 3, 1, 2)
        if features.ndim != 4:
            raise ValueError(f"{self.arch}'s forward_features returned shape {tuple(features.shape)}, not a map")
        feature_map = features.permute(0, 3, 1, 2) if self._output_fmt == "NHWC" else features
        if tuple(feature_map.shape[-2:]) != grid_hw:
            raise ValueError(
                f"{self.arch}'s final map is {tuple(feature_map.shape[-2:])} for a {grid_hw} grid at stride "
                f"{self.patch_size}; its feature_info stride does not match its output"
            )
        return feature_map

    def _pooled(self, features: Tensor) -> Tensor:
        return self.model.forward_head(features, pre_logits=True)

    # ------------------------------------------------------------------------------------------------ API
    def forward(self, images: Tensor, masks: Tensor | None = None) -> dict[str, Tensor]:
        """``{"cls": [B, cls_dim], "storage": [B, 0, embed_dim], "patch": [B, h·w, embed_dim]}`` (see the class)."""
        if masks is not None:
            raise ValueError(
                f"TimmBackbone({self.arch!r}) has no mask token: masked inputs (iBOT) need a DINOv3Backbone"
            )
        grid_hw = self._check_size(images)
        features = self.model.forward_features(images)
        patch = self._to_map(features, grid_hw).flatten(2).transpose(1, 2)
        return {"cls": self._pooled(features), "storage": patch[:, :0], "patch": patch}

    def get_intermediate_layers(
        self,
        images: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """``DINOv3Backbone.get_intermediate_layers`` on timm's ``forward_intermediates``: the maps of the ``n``
        last layers (int) or of the layers indexed by ``n`` (negative allowed), in the order asked.

        Each output is [B, h_i·w_i, C_i] tokens (or the [B, C_i, h_i, w_i] map with ``reshape``), optionally with a
        pooled "class token" [B, C_i] and the (empty) storage tokens [B, 0, C_i]. Unlike a ViT's, a CNN's layers
        differ in width ``C_i`` (``layer_channels``) and resolution (stride 2, 4, ... 32).

        ``norm=True`` passes timm's ``norm`` (a ViT's final norm on every layer; a ConvNeXt's ``norm_pre`` on the
        last stage) and makes the last layer the final feature map, ``forward_features``, i.e. exactly ``forward``'s
        ``"patch"`` (for an EfficientNet after ``conv_head``). Pooling: the final feature map is pooled by the
        model's own head (``forward``'s ``"cls"``); every other map by a plain global average (the head's pooling
        layers only fit the final features).
        """
        indices = list(range(self.depth - n, self.depth)) if isinstance(n, int) else [int(i) for i in n]
        bad = [i for i in indices if not -self.depth <= i < self.depth]
        if bad or not indices:
            raise ValueError(
                f"layer indices {bad or indices} out of range: {self.arch} has {self.depth} layers "
                f"(0..{self.depth - 1})"
            )
        indices = [i % self.depth for i in indices]
        grid_hw = self._check_size(images)
        wanted = sorted(set(indices))
        final_needed = norm and wanted[-1] == self.depth - 1
        if final_needed:
            final, maps = self.model.forward_intermediates(images, indices=wanted, norm=norm, output_fmt="NCHW")
        else:  # stop after the last layer asked
            final = None
            maps = self.model.forward_intermediates(
                images, indices=wanted, norm=norm, output_fmt="NCHW", stop_early=True, intermediates_only=True
            )
        by_index = dict(zip(wanted, maps, strict=True))
        if final is not None:
            by_index[self.depth - 1] = self._to_map(final, grid_hw)
        outputs = []
        for index in indices:
            feature_map = by_index[index]
            item: tuple[Tensor, ...] = (feature_map if reshape else feature_map.flatten(2).transpose(1, 2),)
            if return_class_token:
                pooled = self._pooled(final) if final is not None and index == self.depth - 1 else None
                item += (pooled if pooled is not None else feature_map.mean(dim=(2, 3)),)
            if return_extra_tokens:
                item += (feature_map.new_zeros(feature_map.shape[0], 0, feature_map.shape[1]),)
            outputs.append(item if len(item) > 1 else item[0])
        return tuple(outputs)

    # ------------------------------------------------------------------------------------------------ layers
    def parameter_layers(self) -> dict[str, int]:
        """Layer of every parameter (by its ``state_dict`` name): ``i`` for what computes map ``i`` (the stem
        belongs to map 0), ``depth`` for what runs after the last map (final conv/norm, pooling head). For
        layer-wise learning-rate decay and for freezing by layer."""
        layers = {}
        for path, module, direct, layer in self._layer_units():
            prefix = _MODEL_PREFIX + (f"{path}." if path else "")
            for name, _ in module.named_parameters(recurse=not direct):
                layers[prefix + name] = layer
        return layers

    def last_layers(self, num_layers: int) -> list[nn.Module]:
        """The modules that compute the last ``num_layers`` maps and everything after them (the final feature
        layers and the pooling head; a ConvNeXt's head norm, a MobileNetV4's ``conv_head``): what fine-tuning the
        top of the network trains. ``num_layers >= depth``: the whole backbone.

        The split follows the model's module registration order, checked against the order in which a forward pass
        calls the modules; a model whose order differs raises instead of unfreezing the wrong modules.
        """
        if num_layers <= 0:
            return []
        if num_layers >= self.depth:
            return [self]
        self._check_execution_order()
        first = self.depth - num_layers
        return [module for _, module, direct, layer in self._layer_units() if not direct and layer >= first]

    def _layer_units(self) -> list[tuple[str, nn.Module, bool, int]]:
        """(path inside the timm model, module, direct, layer) in registration order. The model's children are
        opened down to the ``feature_info`` modules; ``direct`` marks an opened module standing for the parameters
        it holds itself (a ViT's ``cls_token`` and ``pos_embed``, registered before its blocks)."""
        stage_paths = [str(info["module"]) for info in self._feature_info]
        units: list[tuple[str, nn.Module, bool]] = []

        def open_module(path: str, module: nn.Module) -> None:
            if any(True for _ in module.parameters(recurse=False)):
                units.append((path, module, True))
            for name, child in module.named_children():
                child_path = f"{path}.{name}" if path else name
                if child_path not in stage_paths and any(p.startswith(child_path + ".") for p in stage_paths):
                    open_module(child_path, child)
                else:
                    units.append((child_path, child, False))

        open_module("", self.model)
        layer, result = 0, []
        for path, module, direct in units:
            result.append((path, module, direct, layer))
            if not direct and layer < self.depth and path == stage_paths[layer]:
                layer += 1
        if layer < self.depth:
            raise ValueError(
                f"could not find {self.arch}'s feature_info module {stage_paths[layer]!r} among its modules in "
                "registration order; unfreeze the whole backbone (-1) instead"
            )
        return result

    @torch.no_grad()
    def _check_execution_order(self) -> None:
        calls: list[int] = []
        hooks = [
            module.register_forward_pre_hook(lambda _module, _args, layer=layer: calls.append(layer))
            for _, module, direct, layer in self._layer_units()
            if not direct
        ]
        was_training = self.training
        self.eval()
        try:
            size = self._fixed_input_size() or (2 * self.patch_size, 2 * self.patch_size)
            self(torch.zeros(1, 3, *size, device=next(self.parameters()).device))
        finally:
            for hook in hooks:
                hook.remove()
            self.train(was_training)
        if calls != sorted(calls):
            raise ValueError(
                f"{self.arch} runs its modules in another order than it registers them, so its last layers cannot "
                "be told apart; unfreeze the whole backbone (-1) instead"
            )


def _classifier_names(model: nn.Module) -> list[str]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or []
    return [names] if isinstance(names, str) else list(names)


def _check_arch(arch: str) -> None:
    if timm.is_model(arch):
        return
    # timm's own list of names, held locally; nothing is looked up online.
    pattern = f"*{arch.split(':')[-1].split('/')[-1].split('.')[0]}*"
    matches = timm.list_models(pattern)
    close = matches[:8] or difflib.get_close_matches(arch, timm.list_models(), n=8, cutoff=0.6)
    suggestion = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(
        f"timm has no model named {arch!r}: {suggestion}List the names with timm.list_models({pattern!r}) "
        "(hub names such as 'hf-hub:...' would download weights and are not taken)"
    )


def _resolve_architecture(
    arch: str | None, timm_overrides: Mapping[str, Any], checkpoint: Mapping[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """The arch and overrides to build: the given ones, or the ones a dinov3-pl ``.ckpt`` records (which must then
    agree with the given ones)."""
    recorded = _recorded_config(checkpoint)
    if recorded is None:
        if arch is None:
            source = "no weights were given" if checkpoint is None else "these weights record no architecture"
            raise ValueError(
                f"arch is required: {source} (only a dinov3-pl .ckpt records one); give a timm model name such as "
                "resnet50 or convnext_tiny, with the overrides the weights were trained with"
            )
        return arch, dict(timm_overrides)
    if recorded_backbone_kind(None, checkpoint) != "timm":
        raise ValueError(
            f"the checkpoint records a DINOv3Backbone (arch {recorded['arch']!r}, kind 'dinov3'), not a TimmBackbone: "
            "build it with build_backbone(None, weights=path) or DINOv3Backbone(None, weights=path)"
        )
    return resolve_recorded_architecture(arch, timm_overrides, checkpoint, defaults=TIMM_BACKBONE_DEFAULTS)
