"""DINOv3Backbone: timm's DINOv3 ViT with the token contract of upstream DINOv3.

timm owns the transformer (patch embed, blocks, RoPE, norm). This wrapper only adds what the DINOv3 recipe needs
around it and that timm does not expose:

- a learnable ``mask_token`` that replaces masked patch embeddings before the blocks (iBOT);
- dict outputs split into CLS / storage (register) / patch tokens, after the final norm;
- RoPE coordinate rescaling redrawn at every block during training, as upstream does
  (timm draws once per forward and does not expose the option);
- the same drop-path rate in every block (upstream) or timm's linear ramp;
- upstream's ``get_intermediate_layers`` contract;
- upstream's initialisation when built without weights (timm's differs, see ``init_as_upstream``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dinov3_pl.models.drop_path import subset_drop_path_block
from dinov3_pl.models.weights import (
    load_backbone_weights,
    numbers_from_text,
    read_checkpoint,
    resolve_recorded_architecture,
)

__all__ = ["TIMM_DEFAULTS", "DINOv3Backbone", "init_as_upstream"]

# What DINOv3Backbone passes to timm.create_model unless overridden: only the trunk (no classifier, no pooling),
# and any image size (RoPE follows the actual patch grid).
TIMM_DEFAULTS: dict[str, Any] = {"num_classes": 0, "global_pool": "", "dynamic_img_size": True}


class DINOv3Backbone(nn.Module):
    """A timm DINOv3 ViT (``vit_*_patch16_dinov3*``) with DINOv3's token outputs and iBOT mask token.

    Without ``weights`` the parameters are initialised as upstream DINOv3 initialises its ViT (``init_as_upstream``).

    Args:
        arch: timm model name, e.g. ``vit_small_patch16_dinov3`` or ``vit_base_patch16_dinov3_qkvb``. ``None`` with
            a dinov3-pl ``.ckpt``: the architecture the checkpoint records is built.
        weights: optional path to weights (or the loaded file): an upstream DINOv3 ``.pth``, a Hugging Face
            DINOv3ViT folder or ``model.safetensors``, a timm state dict, or a dinov3-pl Lightning ``.ckpt`` (its
            teacher backbone; the arch and overrides it records are used, and given ones must agree with them).
        drop_path_rate: stochastic depth rate.
        drop_path_uniform: the same rate in every block (upstream DINOv3); ``False`` keeps timm's linear ramp.
        drop_path_subset: stochastic depth as upstream trains: each residual branch runs on a random subset of
            the batch only (``dinov3_pl.models.drop_path``), instead of timm's per-sample mask over the whole batch
            (which computes the dropped samples' branches too). Same expectation, less compute.
        rope_rescale: train-time RoPE coordinate rescale factor R: coordinates are multiplied by one log-uniform
            scale in [1/R, R] (shared by both axes, redrawn at every block). Upstream's LVD/7B recipe uses 2;
            ``None`` disables it. Never active in ``eval()`` mode.
        grad_checkpointing: recompute block activations in the backward pass to save memory.
        **timm_overrides: passed to ``timm.create_model``, e.g. ``depth=2, embed_dim=192, patch_size=4``.
    """

    def __init__(
        self,
        arch: str | None = "vit_small_patch16_dinov3",
        weights: str | Path | Mapping[str, Any] | None = None,
        *,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = True,
        drop_path_subset: bool = False,
        rope_rescale: float | None = None,
        grad_checkpointing: bool = False,
        **timm_overrides,
    ) -> None:
        super().__init__()
        # Read once: the file may record the architecture to build, and is then loaded from memory.
        weights = read_checkpoint(weights) if isinstance(weights, str | Path) else weights
        arch, timm_overrides = resolve_recorded_architecture(arch, numbers_from_text(timm_overrides), weights)
        if "dinov3" not in arch:
            raise ValueError(
                f"arch must be a timm DINOv3 ViT (vit_*_patch16_dinov3*), got {arch!r}; for other timm models use "
                "TimmBackbone or build_backbone"
            )
        if rope_rescale is not None and rope_rescale < 1:
            raise ValueError(f"rope_rescale is a factor R >= 1 (scales drawn in [1/R, R]), got {rope_rescale}")
        self.arch = arch
        self.timm_overrides: dict[str, Any] = timm_overrides
        kwargs = {**TIMM_DEFAULTS, "drop_path_rate": drop_path_rate, **timm_overrides}
        self.vit = timm.create_model(arch, pretrained=False, **kwargs)
        if self.vit.rope is None or self.vit.cls_token is None:
            raise ValueError(f"{arch} with {timm_overrides} has no RoPE or no CLS token; it is not a DINOv3 ViT")
        self.embed_dim: int = self.vit.embed_dim
        self.patch_size: int = self.vit.patch_embed.patch_size[0]
        self.num_storage_tokens: int = self.vit.reg_token.shape[1] if self.vit.reg_token is not None else 0
        self.depth: int = len(self.vit.blocks)
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
        self.rope_rescale = rope_rescale
        self.grad_checkpointing = grad_checkpointing
        self.drop_path_subset = drop_path_subset
        if drop_path_uniform:
            self._set_uniform_drop_path(drop_path_rate)
        # timm's RoPE module would otherwise apply its own (once-per-forward) augmentation when training.
        self.vit.rope.aug_active = False
        if weights is None:
            init_as_upstream(self)
        else:
            load_backbone_weights(self, weights)

    # ------------------------------------------------------------------------------------------------ helpers
    def _set_uniform_drop_path(self, rate: float) -> None:
        # timm's ramp starts at 0 and puts nn.Identity in block 0, so every block gets a fresh DropPath here.
        for block in self.vit.blocks:
            for name in ("drop_path1", "drop_path2"):
                setattr(block, name, DropPath(rate) if rate > 0 else nn.Identity())

    def _rope(self, grid_hw: tuple[int, int]) -> Tensor:
        """Rotary embedding for an H×W patch grid; coordinates rescaled at random when training (upstream)."""
        rope = self.vit.rope
        coords = _patch_coords(grid_hw, device=rope.periods.device)
        if self.training and self.rope_rescale is not None:
            log_max = _log_rescale_bound(float(self.rope_rescale))
            scale = torch.empty((), device=coords.device).uniform_(-log_max, log_max).exp()
            coords = coords * scale
        sin, cos = rope._get_pos_embed_from_coords(coords)
        return torch.cat([sin, cos], dim=-1)

    def compile_blocks(self, **compile_options: Any) -> None:
        """``torch.compile`` each transformer block in place (``nn.Module.compile``): the names of parameters and
        state-dict keys stay those of the eager model (no ``_orig_mod.``), so checkpoints, EMA pairing and weight
        loading are unchanged. Blocks rather than the whole forward: the RoPE draw and the mask-token select stay
        eager, and every block of a ViT shares one compiled graph."""
        for block in self.vit.blocks:
            block.compile(**compile_options)

    def _check_size(self, images: Tensor) -> tuple[int, int]:
        if images.ndim != 4:
            raise ValueError(f"images must be a [B, C, H, W] tensor, got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the patch size {self.patch_size}; "
                f"resize or crop to a multiple of {self.patch_size}"
            )
        return height // self.patch_size, width // self.patch_size

    def prepare_tokens(self, images: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """Patch-embed, put mask tokens in, prepend CLS and storage tokens. Returns ([B, 1+R+N, D], (h, w))."""
        grid_hw = self._check_size(images)
        x = self.vit.patch_embed(images)  # [B, h, w, D] with dynamic_img_size
        x = x.flatten(1, 2)
        batch = x.shape[0]
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(f"masks must be [B, N] = {tuple(x.shape[:2])}, got {tuple(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            cls_token = self.vit.cls_token
        else:
            # Keeps mask_token in the graph so DDP sees a gradient (zero) for it on unmasked steps, as upstream.
            cls_token = self.vit.cls_token + 0 * self.mask_token
        prefix = [cls_token.expand(batch, -1, -1)]
        if self.vit.reg_token is not None:
            prefix.append(self.vit.reg_token.expand(batch, -1, -1))
        x = torch.cat([*prefix, x], dim=1)
        return self.vit.norm_pre(x), grid_hw

    def _run_blocks(self, x: Tensor, grid_hw: tuple[int, int], keep: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        """Runs every block; returns the last output and the (pre-norm) outputs of the blocks in ``keep``."""
        redraw = self.training and self.rope_rescale is not None
        rope = None if redraw else self._rope(grid_hw)
        kept = []
        for index, block in enumerate(self.vit.blocks):
            block_rope = self._rope(grid_hw) if redraw else rope
            run = block
            if self.drop_path_subset and self.training and isinstance(block.drop_path1, DropPath):
                run = functools.partial(subset_drop_path_block, block, rate=block.drop_path1.drop_prob)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # The recomputation replays the same subsets: checkpoint restores the RNG state.
                x = checkpoint(run, x, rope=block_rope, use_reentrant=False)
            else:
                x = run(x, rope=block_rope)
            if index in keep:
                kept.append(x)
        return x, kept

    def _split(self, tokens: Tensor) -> dict[str, Tensor]:
        prefix = 1 + self.num_storage_tokens
        return {"cls": tokens[:, 0], "storage": tokens[:, 1:prefix], "patch": tokens[:, prefix:]}

    # ------------------------------------------------------------------------------------------------ API
    def forward(self, images: Tensor, masks: Tensor | None = None) -> dict[str, Tensor]:
        """Returns ``{"cls": [B, D], "storage": [B, R, D], "patch": [B, N, D]}``, all after the final norm.

        ``masks`` ([B, N] bool) replaces those patch embeddings by ``mask_token`` before the blocks.
        """
        x, grid_hw = self.prepare_tokens(images, masks)
        x, _ = self._run_blocks(x, grid_hw)
        return self._split(self.vit.norm(x))

    def get_intermediate_layers(
        self,
        images: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Upstream DINOv3 contract: outputs of the ``n`` last blocks (int) or of the blocks indexed by ``n``.

        Each output is the patch tokens [B, N, D] (or [B, D, h, w] with ``reshape``), optionally with the class
        token ([B, D]) and the storage tokens ([B, R, D]) as a tuple, in that order.
        """
        indices = list(range(self.depth - n, self.depth)) if isinstance(n, int) else [int(i) for i in n]
        bad = [i for i in indices if not -self.depth <= i < self.depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range for a {self.depth}-block backbone")
        indices = [i % self.depth for i in indices]
        x, grid_hw = self.prepare_tokens(images)
        _, kept = self._run_blocks(x, grid_hw, keep=set(indices))
        by_index = dict(zip(sorted(set(indices)), kept, strict=True))
        outputs = []
        for index in indices:
            tokens = by_index[index]
            parts = self._split(self.vit.norm(tokens) if norm else tokens)
            patch = parts["patch"]
            if reshape:
                patch = patch.unflatten(1, grid_hw).permute(0, 3, 1, 2).contiguous()
            item = (patch,)
            if return_class_token:
                item += (parts["cls"],)
            if return_extra_tokens:
                item += (parts["storage"],)
            outputs.append(item if len(item) > 1 else patch)
        return tuple(outputs)


@functools.cache
def _log_rescale_bound(rescale: float) -> float:
    """log(R) as the fp32 CPU op gives it (the value runs so far drew with), computed once per R: no tensor read
    in the step, which would be a graph break under torch.compile."""
    return torch.log(torch.tensor(rescale)).item()


def _patch_coords(grid_hw: tuple[int, int], device: torch.device) -> Tensor:
    """Patch-centre coordinates in [-1, 1], normalised per axis (upstream ``normalize_coords='separate'``)."""
    height, width = grid_hw
    coords_h = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    coords_w = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * grid - 1.0


@torch.no_grad()
def init_as_upstream(backbone: DINOv3Backbone) -> None:
    """Initialises every parameter of ``backbone`` as upstream DINOv3 initialises ``DinoVisionTransformer``.

    Upstream's rule (``dinov3/models/vision_transformer.py``: ``init_weights`` and ``init_weights_vit``; the
    ``reset_parameters`` of ``layers/patch_embed.py``, ``layers/layer_scale.py``): every Linear weight is
    truncated normal with std 0.02 and its bias zero (the fused qkv bias too, whose Q/V parts are timm's
    ``q_bias``/``v_bias``); CLS and storage tokens are normal with std 0.02; the mask token is zero; norms are
    weight 1, bias 0; LayerScale gammas are the init value; the patch-embedding conv is uniform in ±1/sqrt(fan_in),
    bias included. timm departs from this: its Eva divides each block's ``attn.proj`` and ``mlp.fc2`` weights by
    sqrt(2 (block + 1)) (``fix_init_weight``), so a ViT-S would start with std 0.014 … 0.004 there instead of 0.02.
    RoPE periods are fixed buffers that timm computes as upstream does. A parameter this rule does not cover (a
    timm option upstream lacks) raises, so the initialisation can never silently be timm's again.
    """
    vit = backbone.vit
    initialised: set[int] = set()

    def mark(*params: Tensor | None) -> None:
        initialised.update(id(param) for param in params if param is not None)

    for module in vit.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            mark(module.weight, module.bias)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()
            mark(module.weight, module.bias)
    proj = vit.patch_embed.proj
    bound = 1.0 / math.sqrt(proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1])
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.uniform_(proj.bias, -bound, bound)
    mark(proj.weight, proj.bias)
    for block in vit.blocks:
        for bias in (getattr(block.attn, "q_bias", None), getattr(block.attn, "v_bias", None)):
            if bias is not None:
                nn.init.zeros_(bias)
                mark(bias)
        for gamma in (getattr(block, "gamma_1", None), getattr(block, "gamma_2", None)):
            if gamma is not None:
                nn.init.constant_(gamma, block.init_values)
                mark(gamma)
    for token in (vit.cls_token, vit.reg_token):
        if token is not None:
            nn.init.normal_(token, std=0.02)
            mark(token)
    nn.init.zeros_(backbone.mask_token)
    mark(backbone.mask_token)
    unknown = [name for name, param in backbone.named_parameters() if id(param) not in initialised]
    if unknown:
        raise ValueError(
            f"init_as_upstream does not know how upstream DINOv3 initialises {unknown[:5]} "
            f"({len(unknown)} in all) of {backbone.arch} with {backbone.timm_overrides}; drop the timm override "
            "that adds them or load weights"
        )
