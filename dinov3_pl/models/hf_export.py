"""Write a ``DINOv3Backbone`` as a Hugging Face ``DINOv3ViTModel``: its ``config.json`` fields and its state dict.

The key mapping is the exact inverse of ``dinov3_pl.models.weights._hf_to_timm`` (the reader), so an exported folder
loads back into the same backbone bit for bit. transformers is not needed to write the folder, only to use it.

Only what ``DINOv3ViTModel`` can compute is written: a timm option it has no counterpart for (absolute position
embeddings, q/k norms, a norm inside the MLP, other RoPE periods, ...) raises instead of being dropped, because the
exported model would compute something else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from dinov3_pl.models.backbone import DINOv3Backbone

__all__ = ["hf_config", "hf_state_dict"]

# timm activation -> the name transformers' ACT2FN gives the same function.
_GELU_NAMES = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}


def _unsupported(backbone: DINOv3Backbone, reason: str) -> ValueError:
    return ValueError(
        f"{backbone.arch} with {backbone.timm_overrides} cannot be written as a Hugging Face DINOv3ViTModel: {reason}"
    )


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _activation_name(backbone: DINOv3Backbone, activation: nn.Module) -> str:
    if isinstance(activation, nn.GELU) and activation.approximate in _GELU_NAMES:
        return _GELU_NAMES[activation.approximate]
    if isinstance(activation, nn.SiLU):
        return "silu"
    raise _unsupported(backbone, f"its MLP activation {activation} has no transformers counterpart")


def _layer_norm_eps(backbone: DINOv3Backbone) -> float:
    """The one LayerNorm epsilon every norm shares (DINOv3ViTConfig has a single ``layer_norm_eps``)."""
    vit = backbone.vit
    norms = [vit.norm] + [norm for block in vit.blocks for norm in (block.norm1, block.norm2)]
    for norm in norms:
        if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine or norm.bias is None:
            raise _unsupported(backbone, f"{norm} is not a LayerNorm with weight and bias")
    eps = {norm.eps for norm in norms}
    if len(eps) != 1:
        raise _unsupported(backbone, f"its LayerNorms use several epsilons {sorted(eps)}")
    return eps.pop()


def hf_config(backbone: DINOv3Backbone) -> dict[str, Any]:
    """The ``config.json`` of the ``DINOv3ViTModel`` that computes what ``backbone`` computes.

    Train-time RoPE augmentation (``pos_embed_rescale`` and friends) is off: the folder is an inference export, and
    transformers draws one scale per forward where dinov3-pl redraws it in every block. Set
    ``pos_embed_rescale: 2.0`` in the file for upstream-style fine-tuning.
    """
    vit = backbone.vit
    first = vit.blocks[0]
    attention, mlp = first.attn, first.mlp
    problems = []
    if getattr(vit, "pos_embed", None) is not None:
        problems.append("absolute position embeddings (use_abs_pos_emb)")
    if not _is_identity(getattr(vit, "norm_pre", None)):
        problems.append("a norm before the blocks (use_pre_transformer_norm)")
    for index, block in enumerate(vit.blocks):
        attn = block.attn
        if not all(_is_identity(getattr(attn, name, None)) for name in ("q_norm", "k_norm", "norm")):
            problems.append(f"norms inside the attention of block {index} (qk_norm / scale_attn_inner)")
        if not _is_identity(getattr(block.mlp, "norm", None)):
            problems.append(f"a norm inside the MLP of block {index} (scale_mlp)")
        if getattr(block, "gamma_1", None) is None or getattr(block, "gamma_2", None) is None:
            problems.append(f"no LayerScale in block {index} (init_values=None)")
    if problems:
        raise _unsupported(backbone, "it has " + ", ".join(dict.fromkeys(problems)))

    embed_dim, num_heads = backbone.embed_dim, attention.num_heads
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise _unsupported(backbone, f"its head dim times {num_heads} heads is not embed_dim {embed_dim}")
    rope = vit.rope
    theta = float(rope.temperature)
    # transformers derives the RoPE periods from rope_theta and the head dim alone; timm's min/max periods do not.
    expected_periods = theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float64)
    if rope.periods.shape != expected_periods.shape or not torch.allclose(
        rope.periods.double(), expected_periods, rtol=1e-6
    ):
        raise _unsupported(backbone, "its RoPE periods are not rope_theta ** (4 i / head_dim)")

    gated = hasattr(mlp, "fc1_g")
    up = mlp.fc1_g if gated else mlp.fc1
    has_qv_bias = getattr(attention, "q_bias", None) is not None
    if has_qv_bias != (getattr(attention, "v_bias", None) is not None):
        raise _unsupported(backbone, "it has a query bias without a value bias or the reverse")
    patch_embed = vit.patch_embed
    if patch_embed.proj.bias is None:
        raise _unsupported(backbone, "its patch embedding has no bias")
    patch_h, patch_w = patch_embed.patch_size
    if patch_h != patch_w:
        raise _unsupported(backbone, f"its patches are not square ({patch_h}x{patch_w})")
    image_h, image_w = patch_embed.img_size
    mlp_linears = [mlp.fc1_g, mlp.fc1_x, mlp.fc2] if gated else [mlp.fc1, mlp.fc2]
    mlp_bias = {linear.bias is not None for linear in mlp_linears}
    if len(mlp_bias) != 1:
        raise _unsupported(backbone, "some of its MLP layers have a bias and others not")
    return {
        "architectures": ["DINOv3ViTModel"],
        "model_type": "dinov3_vit",
        "hidden_size": embed_dim,
        "intermediate_size": up.out_features,
        "num_hidden_layers": len(vit.blocks),
        "num_attention_heads": num_heads,
        "hidden_act": _activation_name(backbone, mlp.act),
        "use_gated_mlp": gated,
        "mlp_bias": mlp_bias.pop(),
        "query_bias": has_qv_bias,
        "key_bias": False,  # timm's DINOv3 ViT has none (its k_bias is a fixed zero buffer)
        "value_bias": has_qv_bias,
        "proj_bias": attention.proj.bias is not None,
        "layer_norm_eps": _layer_norm_eps(backbone),
        "layerscale_value": float(getattr(first, "init_values", None) or 1.0),
        "rope_theta": theta,
        "patch_size": patch_h,
        "image_size": image_h if image_h == image_w else [image_h, image_w],
        "num_channels": patch_embed.proj.in_channels,
        "num_register_tokens": backbone.num_storage_tokens,
        "pos_embed_shift": None,
        "pos_embed_jitter": None,
        "pos_embed_rescale": None,
        "drop_path_rate": 0.0,
        "attention_dropout": 0.0,
        "dtype": str(vit.cls_token.dtype).removeprefix("torch."),
    }


def _block_key(backbone: DINOv3Backbone, index: str, rest: str, value: Tensor, gated: bool) -> dict[str, Tensor]:
    """One timm block parameter as ``DINOv3ViTModel`` names it (``layer.N.…``); the fused qkv is split."""
    layer = f"layer.{index}."
    if rest == "attn.qkv.weight":
        return {f"{layer}attention.{name}_proj.weight": part for name, part in zip("qkv", value.chunk(3), strict=True)}
    renames = {
        "attn.q_bias": "attention.q_proj.bias",
        "attn.v_bias": "attention.v_proj.bias",
        "gamma_1": "layer_scale1.lambda1",
        "gamma_2": "layer_scale2.lambda1",
    }
    if rest in renames:
        return {layer + renames[rest]: value}
    prefixes = {
        "attn.proj.": "attention.o_proj.",
        "norm1.": "norm1.",
        "norm2.": "norm2.",
        "mlp.fc2.": "mlp.down_proj.",
        # Plain MLP: fc1 is transformers' up_proj; SwiGLU: silu(fc1_g) * fc1_x is silu(gate_proj) * up_proj.
        **({"mlp.fc1_g.": "mlp.gate_proj.", "mlp.fc1_x.": "mlp.up_proj."} if gated else {"mlp.fc1.": "mlp.up_proj."}),
    }
    for prefix, replacement in prefixes.items():
        if rest.startswith(prefix):
            return {layer + replacement + rest[len(prefix) :]: value}
    raise _unsupported(backbone, f"its parameter blocks.{index}.{rest} has no DINOv3ViTModel counterpart")


def hf_state_dict(backbone: DINOv3Backbone) -> dict[str, Tensor]:
    """``backbone``'s parameters under ``DINOv3ViTModel``'s names, each its own contiguous tensor (safetensors
    refuses tensors that share memory, as the q/k/v views of the fused qkv weight would)."""
    hf_config(backbone)  # refuses what transformers cannot compute before anything is renamed
    vit_state = backbone.vit.state_dict()
    gated = any(".mlp.fc1_g." in key for key in vit_state)
    embed_dim = backbone.embed_dim
    out: dict[str, Tensor] = {
        "embeddings.mask_token": backbone.mask_token.detach().reshape(1, 1, embed_dim),
        # transformers always holds the register tokens, an empty [1, 0, D] tensor when there are none.
        "embeddings.register_tokens": vit_state.pop("reg_token", backbone.mask_token.new_zeros(1, 0, embed_dim)),
    }
    for key, value in vit_state.items():
        if key == "cls_token":
            out["embeddings.cls_token"] = value
        elif key.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings." + key[len("patch_embed.proj.") :]] = value
        elif key.startswith("norm."):
            out[key] = value
        elif key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            out.update(_block_key(backbone, index, rest, value, gated))
        else:
            raise _unsupported(backbone, f"its parameter {key} has no DINOv3ViTModel counterpart")
    return {key: value.detach().contiguous().clone() for key, value in out.items()}
