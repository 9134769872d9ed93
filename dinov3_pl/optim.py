"""AdamW parameter groups as upstream DINOv3 builds them (``dinov3/train/param_groups.py``), and per-module clipping.

Rules, per parameter of each trained module (backbone, DINO head, iBOT head):
- no weight decay only on biases, norm parameters and LayerScale gammas (tokens and the patch-embed weight *do*
  get weight decay);
- layer-wise LR decay ``d`` in the backbone: patch embedding and tokens ``d^(L+1)``, block ``i`` ``d^(L-i)``, the
  final norm ``1``; heads ``1``;
- the patch-embedding LR is multiplied by ``patch_embed_lr_mult`` on top;
- the heads' ``last_layer`` is marked, so the schedule can give it LR 0 while it is frozen.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = ["build_param_groups", "layer_decay_multiplier", "clip_grad_norm_per_module", "is_no_weight_decay"]

_TOKEN_NAMES = ("cls_token", "reg_token", "mask_token", "pos_embed", "patch_embed")
_BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def is_no_weight_decay(name: str) -> bool:
    """Biases, norms and LayerScale gammas get no weight decay (upstream's rule, on timm parameter names)."""
    return name.endswith("bias") or "norm" in name or "gamma" in name


def layer_decay_multiplier(name: str, num_blocks: int, layer_decay: float) -> float:
    """LR multiplier of a backbone parameter under layer-wise decay ``layer_decay`` over ``num_blocks`` blocks."""
    if any(token in name for token in _TOKEN_NAMES):
        layer_id = 0
    elif match := _BLOCK_INDEX.search(name):
        layer_id = int(match.group(1)) + 1
    else:  # final norm (and anything after the blocks)
        layer_id = num_blocks + 1
    return layer_decay ** (num_blocks + 1 - layer_id)


def build_param_groups(
    modules: Mapping[str, nn.Module],
    *,
    backbone_key: str = "backbone",
    num_blocks: int,
    layer_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
) -> list[dict]:
    """AdamW parameter groups for ``modules`` (e.g. ``{"backbone": ..., "dino_head": ..., "ibot_head": ...}``).

    Parameters sharing (module, LR multiplier, WD multiplier, last-layer flag) are fused into one group. Each group
    carries ``module``, ``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer``; the caller sets
    ``lr = schedule * lr_multiplier`` (0 for the last layer while frozen) and ``weight_decay = schedule *
    wd_multiplier`` at every step.
    """
    groups: dict[tuple, dict] = {}
    for module_name, module in modules.items():
        is_backbone = module_name == backbone_key
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            lr_multiplier = layer_decay_multiplier(name, num_blocks, layer_decay) if is_backbone else 1.0
            if is_backbone and "patch_embed" in name:
                lr_multiplier *= patch_embed_lr_mult
            wd_multiplier = 0.0 if is_no_weight_decay(name) else 1.0
            is_last_layer = "last_layer" in name
            key = (module_name, lr_multiplier, wd_multiplier, is_last_layer)
            group = groups.setdefault(
                key,
                {
                    "params": [],
                    "names": [],
                    "module": module_name,
                    "lr_multiplier": lr_multiplier,
                    "wd_multiplier": wd_multiplier,
                    "is_last_layer": is_last_layer,
                },
            )
            group["params"].append(param)
            group["names"].append(name)
    return list(groups.values())


@torch.no_grad()
def clip_grad_norm_per_module(modules: Mapping[str, nn.Module], max_norm: float | None) -> dict[str, torch.Tensor]:
    """Clips each module's gradients to ``max_norm`` separately (upstream clips backbone and heads one by one, not
    the global norm) and returns each module's norm before clipping. ``max_norm=None`` only measures."""
    norms = {}
    for name, module in modules.items():
        grads: Iterable[nn.Parameter] = [p for p in module.parameters() if p.grad is not None]
        if not grads:
            continue
        norms[name] = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm is not None else float("inf"))
    return norms
