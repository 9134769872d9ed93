"""Read DINOv3 weights from any of the formats they ship in and load them into a ``DINOv3Backbone``.

Every format is converted to timm's key names (the ``vit.`` part of ``DINOv3Backbone``) plus the iBOT
``mask_token``. The format is detected from the keys, never guessed: a state dict that matches none, or that does
not fit the target architecture exactly, raises an error naming the keys or shapes at fault.

Formats (names returned by :func:`detect_format`):

- ``"upstream"``: DINOv3's own ``DinoVisionTransformer`` state dict (``storage_tokens``, ``blocks.N.ls1.gamma``,
  ``attn.qkv.bias_mask``, ``rope_embed.periods``, ...), also inside training dumps ``{"teacher": {"backbone.…"}}``
  or full-model dumps ``{"model": {"teacher.backbone.…"}}``.
- ``"huggingface"``: transformers' ``DINOv3ViTModel`` (``embeddings.cls_token``, ``layer.N.attention.q_proj``, ...),
  a folder with ``config.json`` + ``model.safetensors`` or a bare ``.safetensors`` file.
- ``"timm"``: a timm Eva DINOv3 state dict (``reg_token``, ``blocks.N.gamma_1``, ``attn.q_bias``, ...).
- ``"dinov3_pl"``: a ``DINOv3Backbone`` state dict (``vit.…`` + ``mask_token``), e.g. the teacher backbone of a
  dinov3-pl Lightning ``.ckpt``.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dinov3_pl.models.backbone import DINOv3Backbone
    from dinov3_pl.models.timm_backbone import TimmBackbone

__all__ = [
    "BACKBONE_KINDS",
    "backbone_record",
    "recorded_backbone_kind",
    "recorded_backbones",
    "select_backbone",
    "build_backbone",
    "detect_format",
    "load_backbone_weights",
    "read_checkpoint",
    "read_state_dict",
    "resolve_recorded_architecture",
]

FORMATS = ("upstream", "huggingface", "timm", "dinov3_pl")
# What a recorded backbone is: "dinov3" a DINOv3Backbone (timm DINOv3 ViT + mask token), "timm" a TimmBackbone (any
# timm model behind the same outputs).
BACKBONE_KINDS = ("dinov3", "timm")
_HF_WEIGHTS = "model.safetensors"
_HF_INDEX = "model.safetensors.index.json"
# Where the backbone sits inside a training checkpoint that does not record it (a dinov3-pl .ckpt records it as
# backbone_config["prefix"]), in order of preference: the EMA teacher is the model that upstream evaluates and
# releases; the student is only used when nothing else is there.
_BACKBONE_PREFIXES = ("teacher.backbone.", "model_ema.backbone.", "backbone.", "student.backbone.")
# timm overrides that may be given over a dinov3-pl .ckpt although it does not record them: they change no parameter
# and nothing the loaded network computes. img_size only sets timm's nominal grid; DINOv3Backbone builds timm with
# dynamic_img_size, so any image size divisible by the patch size runs and RoPE follows the actual grid.
HARMLESS_OVERRIDES = frozenset({"img_size"})


def _describe(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}{', ...' if len(keys) > limit else ''} ({len(keys)} in all)"


# ------------------------------------------------------------------------------------------------ reading files
def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a weights file or Hugging Face folder as it is stored (on CPU, never from the network).

    A folder must hold ``model.safetensors`` (or a sharded ``model.safetensors.index.json``); its ``config.json``,
    when present, is returned under the key ``"__hf_config__"``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path} does not exist")
    if path.is_dir():
        return _read_hf_folder(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path)


def _read_hf_folder(folder: Path) -> dict[str, Any]:
    if (folder / _HF_WEIGHTS).is_file():
        state_dict = _read_safetensors(folder / _HF_WEIGHTS)
    elif (folder / _HF_INDEX).is_file():
        weight_map = json.loads((folder / _HF_INDEX).read_text())["weight_map"]
        state_dict = {}
        for shard in sorted(set(weight_map.values())):
            state_dict.update(_read_safetensors(folder / shard))
    else:
        raise FileNotFoundError(
            f"{folder} is a folder without {_HF_WEIGHTS} or {_HF_INDEX}; give a Hugging Face DINOv3ViT folder "
            "or the path of a weights file (.pth, .ckpt, .safetensors)"
        )
    config_path = folder / "config.json"
    if config_path.is_file():
        state_dict["__hf_config__"] = json.loads(config_path.read_text())
    return state_dict


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own error type for truncated/corrupt files
        raise ValueError(
            f"could not read {path}: it is not a valid safetensors file (truncated or corrupt?): {error}"
        ) from error


def _read_torch(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "Weights only load failed" in str(error) and path.suffix == ".ckpt":
            # Lightning checkpoints may pickle hyper-parameters (paths, namespaces) beside the tensors; they come
            # from the user's own training runs, so unpickling them fully is acceptable.
            warnings.warn(f"{path} holds non-tensor objects; loading it with weights_only=False", stacklevel=3)
            return torch.load(path, map_location="cpu", weights_only=False)
        if "Weights only load failed" in str(error):
            raise ValueError(
                f"could not read {path} with torch.load(weights_only=True): it holds pickled objects other than "
                f"tensors. Re-save its state dict (torch.save(model.state_dict(), ...)) and load that. ({error})"
            ) from error
        raise ValueError(
            f"could not read {path}: the file is truncated, corrupt or not a PyTorch checkpoint "
            f"({type(error).__name__}: {error})"
        ) from error


# ------------------------------------------------------------------------------------------------ unwrapping
def _unwrap(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Finds the backbone state dict inside a checkpoint. Returns (state dict, metadata).

    Metadata holds what the checkpoint records besides tensors: ``backbone_config`` (dinov3-pl ``.ckpt``) and
    ``hf_config`` (Hugging Face ``config.json``).
    """
    metadata: dict[str, Any] = {}
    if "__hf_config__" in checkpoint:
        metadata["hf_config"] = checkpoint["__hf_config__"]
    if "backbone_config" in checkpoint:
        metadata["backbone_config"] = checkpoint["backbone_config"]
    tensors: Mapping[str, Any] = checkpoint
    # Lightning: {"state_dict": ...}; upstream eval dumps: {"teacher": ...}; upstream/timm training dumps: "model".
    for wrapper in ("state_dict", "teacher", "model_ema", "model", "module", "student"):
        inner = tensors.get(wrapper)
        if isinstance(inner, Mapping) and inner and not isinstance(inner, Tensor):
            tensors = inner
            break
    state_dict = {
        _strip(key, "module."): value for key, value in tensors.items() if isinstance(value, Tensor)
    }  # DDP wraps keys in "module."
    if not state_dict:
        raise ValueError(f"no tensors found in the checkpoint (top-level keys: {_describe(checkpoint)})")
    recorded_prefix = (_recorded_config(checkpoint) or {}).get("prefix")
    if recorded_prefix is not None and not any(key.startswith(recorded_prefix) for key in state_dict):
        raise ValueError(
            f"the checkpoint records its backbone under {recorded_prefix!r} but holds no such keys "
            f"({_describe(state_dict)})"
        )
    for prefix in [recorded_prefix] if recorded_prefix is not None else _BACKBONE_PREFIXES:
        if any(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
            break
    # Hugging Face checkpoints of wrapping models put the ViT under a prefix (e.g. "dinov3."); find it.
    hf_cls = [key for key in state_dict if key.endswith("embeddings.cls_token")]
    if len(hf_cls) == 1 and hf_cls[0] != "embeddings.cls_token":
        prefix = hf_cls[0][: -len("embeddings.cls_token")]
        state_dict = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    return state_dict, metadata


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Reads the backbone state dict (its native key names) from a file or Hugging Face folder."""
    state_dict, _ = _unwrap(read_checkpoint(path))
    return state_dict


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """Names the format of a backbone state dict from its keys: one of ``FORMATS``. Raises if none matches."""
    keys = set(state_dict)
    if "vit.cls_token" in keys:
        return "dinov3_pl"
    if "embeddings.cls_token" in keys and any(key.startswith(("layer.", "model.layer.")) for key in keys):
        return "huggingface"
    if "cls_token" in keys and any(key.startswith("blocks.") for key in keys):
        upstream_marks = ("storage_tokens", "rope_embed.periods")
        if any(key in keys for key in upstream_marks) or any(
            key.endswith((".ls1.gamma", ".bias_mask")) for key in keys
        ):
            return "upstream"
        if "reg_token" in keys or any(key.endswith((".gamma_1", ".q_bias")) for key in keys):
            return "timm"
    raise ValueError(
        "could not recognise the weights format from the state dict keys "
        f"({_describe(keys)}); expected an upstream DINOv3 .pth, a Hugging Face DINOv3ViT model, a timm "
        "DINOv3 ViT state dict or a dinov3-pl checkpoint"
    )


# ------------------------------------------------------------------------------------------------ conversion
def _split_qkv_bias(key: str, bias: Tensor, bias_mask: Tensor | None, has_bias: bool) -> dict[str, Tensor]:
    """Upstream's fused qkv bias -> timm's q_bias / v_bias (timm's K bias is a fixed zero)."""
    effective = bias * bias_mask.to(bias.dtype) if bias_mask is not None else bias
    q_bias, k_bias, v_bias = effective.chunk(3)
    if k_bias.abs().max() > 0:
        # Without bias_mask upstream adds the K bias, and with RoPE it changes the attention (the bias is rotated
        # with each patch position), so dropping it would silently change the model.
        raise ValueError(
            f"{key} has a non-zero key (K) bias that the source model applies (upstream: no bias_mask zeroes it, "
            "i.e. it was trained with mask_k_bias=False like upstream's IN-1k recipe; Hugging Face: key_bias=True). "
            "timm's DINOv3 ViT has no K bias, so these weights cannot be loaded exactly"
        )
    prefix = key[: -len("qkv.bias")]
    if not has_bias:
        if q_bias.abs().max() > 0 or v_bias.abs().max() > 0:
            raise ValueError(
                f"{key} has non-zero query/value biases but the target architecture has no qkv bias; "
                "use the '_qkvb' variant of the arch (e.g. vit_small_patch16_dinov3_qkvb)"
            )
        return {}  # all-zero biases: dropping them is exact
    return {prefix + "q_bias": q_bias, prefix + "v_bias": v_bias}


def _upstream_to_timm(state_dict: Mapping[str, Tensor], target_keys: set[str]) -> tuple[dict, Tensor | None, dict]:
    """Returns (timm state dict, mask_token or None, extra tensors to check: {"rope_periods": ...})."""
    out: dict[str, Tensor] = {}
    mask_token, extras = None, {}
    for key, value in state_dict.items():
        if key == "mask_token":
            mask_token = value
        elif key == "rope_embed.periods":
            extras["rope_periods"] = value
        elif key.endswith(".bias_mask") or key.startswith("local_cls_norm."):
            continue  # bias_mask is folded into the bias below; local_cls_norm is used on training crops only
        elif key.endswith("qkv.bias"):
            has_bias = key.replace("qkv.bias", "q_bias") in target_keys
            out.update(_split_qkv_bias(key, value, state_dict.get(key + "_mask"), has_bias))
        else:
            key = key.replace("storage_tokens", "reg_token").replace(".ls1.gamma", ".gamma_1")
            key = key.replace(".ls2.gamma", ".gamma_2")
            key = re.sub(r"\.mlp\.w1\.", ".mlp.fc1_g.", key)
            key = re.sub(r"\.mlp\.w2\.", ".mlp.fc1_x.", key)
            key = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key)
            out[key] = value
    return out, mask_token, extras


_HF_RENAMES = (
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
    (r"^(?:model\.)?layer\.(\d+)\.", r"blocks.\1."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"\.layer_scale1\.lambda1$", ".gamma_1"),
    (r"\.layer_scale2\.lambda1$", ".gamma_2"),
    (r"\.mlp\.gate_proj\.", ".mlp.fc1_g."),
    (r"\.mlp\.down_proj\.", ".mlp.fc2."),
)


def _hf_to_timm(state_dict: Mapping[str, Tensor], target_keys: set[str]) -> tuple[dict, Tensor | None, dict]:
    gated = any(".mlp.gate_proj." in key for key in state_dict)
    out: dict[str, Tensor] = {}
    mask_token = None
    attention: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if key == "embeddings.mask_token":
            mask_token = value.reshape(1, -1)
            continue
        if key == "embeddings.register_tokens" and value.numel() == 0:
            continue  # transformers saves an empty [1, 0, D] tensor for a model without register tokens
        for pattern, replacement in _HF_RENAMES:
            key = re.sub(pattern, replacement, key)
        # Plain MLP: up -> fc1; gated (SwiGLU): silu(gate) * up, i.e. timm's fc1_g / fc1_x.
        key = key.replace(".mlp.up_proj.", ".mlp.fc1_x." if gated else ".mlp.fc1.")
        match = re.match(r"^(blocks\.\d+\.)attention\.([qkv])_proj\.(weight|bias)$", key)
        if match:
            attention.setdefault(match.group(1), {})[match.group(2) + "_" + match.group(3)] = value
        else:
            out[key] = value
    for block, parts in attention.items():
        missing = [name for name in ("q_weight", "k_weight", "v_weight") if name not in parts]
        if missing:
            raise ValueError(f"Hugging Face weights of {block} lack attention {missing}")
        out[block + "attn.qkv.weight"] = torch.cat([parts["q_weight"], parts["k_weight"], parts["v_weight"]])
        zeros = torch.zeros_like(parts["q_weight"][:, 0])
        fused = torch.cat([parts.get(name, zeros) for name in ("q_bias", "k_bias", "v_bias")])
        has_bias = block + "attn.q_bias" in target_keys
        if any(name in parts for name in ("q_bias", "k_bias", "v_bias")) or has_bias:
            out.update(_split_qkv_bias(block + "attn.qkv.bias", fused, None, has_bias))
    return out, mask_token, {}


def _timm_to_timm(state_dict: Mapping[str, Tensor], target_keys: set[str]) -> tuple[dict, Tensor | None, dict]:
    out = {key: value for key, value in state_dict.items() if key != "mask_token"}
    _fill_zero_biases(out, target_keys)
    return out, state_dict.get("mask_token"), {}


def _fill_zero_biases(out: dict[str, Tensor], target_keys: set[str]) -> None:
    """A state dict without qkv biases loads exactly into a ``_qkvb`` arch: its biases are zero."""
    for key in list(out):
        if key.endswith("attn.qkv.weight"):
            prefix = key[: -len("qkv.weight")]
            if prefix + "q_bias" in target_keys and prefix + "q_bias" not in out:
                dim = out[key].shape[0] // 3
                out[prefix + "q_bias"] = out[key].new_zeros(dim)
                out[prefix + "v_bias"] = out[key].new_zeros(dim)


# ------------------------------------------------------------------------------------------------ recorded arch
# A dinov3-pl .ckpt records the backbone to evaluate and export under "backbone_config":
#   {"arch": timm name, "timm_overrides": {...}, "prefix": its state-dict prefix, e.g. "teacher.backbone.",
#    "kind": "dinov3" or "timm" (optional: without it, a timm DINOv3 ViT name is a DINOv3Backbone, any other a
#    TimmBackbone)}
# and, when it holds several (a distillation run's students), every one of them by name under "backbone_configs".
def _recorded_config(checkpoint: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``backbone_config`` a dinov3-pl ``.ckpt`` records (``{"arch", "timm_overrides", "prefix"}``), else
    ``None``."""
    recorded = checkpoint.get("backbone_config") if checkpoint is not None else None
    return recorded if isinstance(recorded, Mapping) and recorded.get("arch") else None


def recorded_backbones(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every backbone a dinov3-pl ``.ckpt`` records, by name (``{}`` for other files)."""
    named = checkpoint.get("backbone_configs")
    if isinstance(named, Mapping) and named:
        return {str(name): dict(record) for name, record in named.items()}
    default = _recorded_config(checkpoint)
    return {"default": dict(default)} if default is not None else {}


def backbone_record(backbone: Any, prefix: str) -> dict[str, Any]:
    """The record a dinov3-pl ``.ckpt`` keeps for ``backbone`` (a ``DINOv3Backbone`` or ``TimmBackbone``) stored under
    ``prefix`` (e.g. ``"student.backbone."``): ``{"arch", "timm_overrides", "prefix", "kind"}``."""
    return {
        "arch": backbone.arch,
        "timm_overrides": dict(backbone.timm_overrides),
        "prefix": prefix,
        "kind": getattr(backbone, "kind", "dinov3"),
    }


def _is_dinov3_arch(arch: str) -> bool:
    return "dinov3" in arch  # the timm DINOv3 ViTs: vit_*_patch16_dinov3*


def recorded_backbone_kind(arch: str | None, checkpoint: Mapping[str, Any] | None) -> str:
    """Which backbone class builds ``arch`` / ``checkpoint``: ``"dinov3"`` or ``"timm"`` (``BACKBONE_KINDS``).

    A dinov3-pl ``.ckpt``'s record decides (its ``"kind"``, else its arch); without a record ``arch`` does: a timm
    DINOv3 ViT name (or no name, which ``DINOv3Backbone`` then reports) is ``"dinov3"``, any other timm name ``"timm"``.
    """
    recorded = _recorded_config(checkpoint)
    if recorded is not None:
        kind = recorded.get("kind")
        if kind is not None:
            if kind not in BACKBONE_KINDS:
                raise ValueError(f"the checkpoint records a backbone of unknown kind {kind!r}; known: {BACKBONE_KINDS}")
            return str(kind)
        arch = recorded["arch"]
    return "dinov3" if arch is None or _is_dinov3_arch(arch) else "timm"


def select_backbone(checkpoint: Mapping[str, Any], name: str | None) -> Mapping[str, Any]:
    """``checkpoint`` with the backbone recorded as ``name`` as its backbone (``None``: the recorded default)."""
    if name is None:
        return checkpoint
    recorded = recorded_backbones(checkpoint)
    if name not in recorded:
        known = ", ".join(sorted(recorded)) or "none: it is not a dinov3-pl checkpoint"
        raise ValueError(f"the checkpoint records no backbone named {name!r} (it records {known})")
    return {**checkpoint, "backbone_config": recorded[name]}


def _rebuild_hint(recorded: Mapping[str, Any]) -> str:
    kind = recorded_backbone_kind(None, {"backbone_config": recorded})
    backbone_class = "TimmBackbone" if kind == "timm" else "DINOv3Backbone"
    return (
        f"The checkpoint records its architecture (arch {recorded['arch']!r}, timm overrides "
        f"{dict(recorded.get('timm_overrides') or {})}): pass arch: null and drop backbone_kwargs "
        f"(in Python: {backbone_class}(None, weights=path) or build_backbone(None, path))."
    )


def _comparable(value: Any) -> Any:
    # YAML gives lists where the recorded Python value may be a tuple (e.g. img_size).
    return [_comparable(item) for item in value] if isinstance(value, list | tuple) else value


def resolve_recorded_architecture(
    arch: str | None,
    timm_overrides: Mapping[str, Any],
    checkpoint: Mapping[str, Any] | None,
    *,
    defaults: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The timm arch and overrides to build a backbone for ``checkpoint`` (a loaded file, or ``None``).

    A dinov3-pl ``.ckpt`` records the architecture it was trained with, and that record is the architecture:
    ``arch`` may be ``None`` or must name the recorded arch, and each override must repeat the recorded value.
    An override the record does not hold is allowed only when it is in ``HARMLESS_OVERRIDES``; any other would
    build a different network than the one trained (``num_heads`` changes no parameter shape, so the weights would
    even load). Without a record, ``arch`` is required and returned with the overrides unchanged.

    ``defaults``: what the backbone class passes to ``timm.create_model`` in every build (repeating them contradicts
    nothing); ``None`` is ``DINOv3Backbone``'s, and then a record of kind ``"timm"`` is refused (it is a
    ``TimmBackbone``'s).
    """
    from dinov3_pl.models.backbone import TIMM_DEFAULTS

    recorded = _recorded_config(checkpoint)
    if defaults is None and recorded is not None and recorded_backbone_kind(None, checkpoint) == "timm":
        raise ValueError(
            f"the checkpoint records a timm model (arch {recorded['arch']!r}, kind 'timm'), not a DINOv3 ViT: build "
            "it with build_backbone(None, weights=path) or TimmBackbone(None, weights=path)"
        )
    if recorded is None:
        if arch is None:
            source = "no weights were given" if checkpoint is None else "these weights record no architecture"
            raise ValueError(
                f"arch is required: {source} (only a dinov3-pl .ckpt records one); give arch, a timm DINOv3 ViT "
                "name such as vit_small_patch16_dinov3, with the overrides the weights were trained with"
            )
        return arch, dict(timm_overrides)
    hint = _rebuild_hint(recorded)
    if arch is not None and arch != recorded["arch"]:
        raise ValueError(f"arch={arch!r} differs from the checkpoint's recorded arch {recorded['arch']!r}. {hint}")
    recorded_overrides = dict(recorded.get("timm_overrides") or {})
    # DINOv3Backbone's own defaults hold in every recorded build, so repeating them contradicts nothing.
    effective = {**(TIMM_DEFAULTS if defaults is None else defaults), **recorded_overrides}
    conflicts = []
    for key, value in timm_overrides.items():
        if key in effective:
            if _comparable(value) != _comparable(effective[key]):
                conflicts.append(f"{key}: recorded {effective[key]!r}, given {value!r}")
        elif key not in HARMLESS_OVERRIDES:
            conflicts.append(f"{key}: not recorded (the arch's default was trained), given {value!r}")
    if conflicts:
        raise ValueError(
            "the backbone overrides contradict the architecture recorded in the checkpoint ("
            + "; ".join(conflicts)
            + f"). {hint}"
        )
    return recorded["arch"], {**recorded_overrides, **timm_overrides}


# ------------------------------------------------------------------------------------------------ loading
def load_backbone_weights(backbone: DINOv3Backbone, source: str | Path | Mapping[str, Any]) -> None:
    """Loads weights into ``backbone`` in place. ``source``: a path (file or HF folder) or a loaded checkpoint.

    A dinov3-pl ``.ckpt`` must have been trained with the backbone's arch and timm overrides (it records them).
    """
    checkpoint = read_checkpoint(source) if isinstance(source, str | Path) else source
    recorded = _recorded_config(checkpoint)
    if recorded is not None:
        resolve_recorded_architecture(backbone.arch, getattr(backbone, "timm_overrides", {}), checkpoint)
    state_dict, metadata = _unwrap(checkpoint)
    fmt = detect_format(state_dict)
    target = backbone.vit.state_dict()
    target_keys = set(target)
    if fmt == "dinov3_pl":
        vit_state = {key[len("vit.") :]: value for key, value in state_dict.items() if key.startswith("vit.")}
        others = set(state_dict) - {f"vit.{key}" for key in vit_state} - {"mask_token"}
        if others:
            raise ValueError(f"unexpected keys in the dinov3_pl state dict: {_describe(others)}")
        if "mask_token" not in state_dict:
            raise ValueError("missing keys in the dinov3_pl state dict: mask_token (1 in all)")
        mask_token, extras = state_dict["mask_token"], {}
    else:
        convert = {"upstream": _upstream_to_timm, "huggingface": _hf_to_timm, "timm": _timm_to_timm}[fmt]
        vit_state, mask_token, extras = convert(state_dict, target_keys)
        if fmt == "upstream":
            _fill_zero_biases(vit_state, target_keys)
    hint = _rebuild_hint(recorded) if recorded is not None else None
    _check_against(vit_state, target, fmt, hint)
    _check_rope(backbone, extras.get("rope_periods"), metadata.get("hf_config"), fmt)
    if mask_token is not None and mask_token.numel() != backbone.mask_token.numel():
        raise ValueError(
            f"shape mismatch ({fmt} format): mask_token {tuple(mask_token.shape)} vs "
            f"{tuple(backbone.mask_token.shape)}. {hint or 'Check arch and overrides (embed_dim).'}"
        )
    backbone.vit.load_state_dict(vit_state, strict=True)
    if mask_token is not None:
        with torch.no_grad():
            backbone.mask_token.copy_(mask_token.reshape(backbone.mask_token.shape))


def _check_against(
    state_dict: Mapping[str, Tensor], target: Mapping[str, Tensor], fmt: str, hint: str | None = None
) -> None:
    missing = set(target) - set(state_dict)
    unexpected = set(state_dict) - set(target)
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(target[key].shape)}"
        for key in sorted(set(target) & set(state_dict))
        if state_dict[key].shape != target[key].shape
    ]
    problems = []
    if mismatched:
        shown = "; ".join(mismatched[:5])
        problems.append(f"shape mismatches: {shown}{'; ...' if len(mismatched) > 5 else ''} ({len(mismatched)} in all)")
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if problems:
        raise ValueError(
            f"the weights (read as {fmt} format, in timm key names) do not fit the backbone architecture: "
            + "; ".join(problems)
            + ". "
            + (hint or "Check arch and overrides (depth, embed_dim, patch_size, qkv bias, SwiGLU, storage tokens).")
        )


def _check_rope(backbone: DINOv3Backbone, periods: Tensor | None, hf_config: dict | None, fmt: str) -> None:
    """RoPE periods are not learned; a mismatch means another RoPE base, which the keys alone would not reveal."""
    rope = backbone.vit.rope
    if periods is not None:
        expected = rope.periods.float()
        # Released upstream models store the periods in bf16, hence the loose tolerance.
        if periods.shape != expected.shape or not torch.allclose(periods.float(), expected, rtol=1e-2):
            raise ValueError(
                f"rope_embed.periods in the {fmt} weights differ from the backbone's RoPE periods (another RoPE base "
                f"or head dim?): {periods.float()[:4].tolist()}... vs {expected[:4].tolist()}..."
            )
    if hf_config is not None:
        theta, eps = hf_config.get("rope_theta"), hf_config.get("layer_norm_eps")
        temperature = getattr(rope, "temperature", None)
        if theta is not None and temperature is not None and abs(theta - temperature) > 1e-6 * temperature:
            raise ValueError(f"config.json has rope_theta={theta} but the backbone uses a RoPE base of {temperature}")
        if eps is not None and abs(eps - backbone.vit.norm.eps) > 1e-12:
            raise ValueError(f"config.json has layer_norm_eps={eps} but the backbone uses {backbone.vit.norm.eps}")


def build_backbone(
    arch: str | None = None,
    weights: str | Path | Mapping[str, Any] | None = None,
    *,
    backbone_name: str | None = None,
    **overrides: Any,
) -> DINOv3Backbone | TimmBackbone:
    """Builds the backbone and loads ``weights``: a ``DINOv3Backbone`` for a timm DINOv3 ViT, a ``TimmBackbone``
    for any other timm model (``resnet50``, ``convnext_tiny``, ...) or a record of kind ``"timm"`` (see
    :func:`recorded_backbone_kind`).

    Given a dinov3-pl ``.ckpt`` (which records ``backbone_config = {"arch", "timm_overrides", "prefix", "kind"}``),
    ``arch`` may be left out: the recorded architecture is rebuilt (see :func:`resolve_recorded_architecture` for
    the overrides that may still be given); ``backbone_name`` picks another recorded backbone than the default
    (see :func:`recorded_backbones`). ``overrides`` also take the backbone class's own options
    (``drop_path_rate``, ...).
    """
    from dinov3_pl.models.backbone import DINOv3Backbone
    from dinov3_pl.models.timm_backbone import TimmBackbone

    checkpoint = read_checkpoint(weights) if isinstance(weights, str | Path) else weights
    if backbone_name is not None:
        if checkpoint is None:
            raise ValueError(f"backbone_name={backbone_name!r} needs weights: a dinov3-pl .ckpt that records it")
        checkpoint = select_backbone(checkpoint, backbone_name)
    if recorded_backbone_kind(arch, checkpoint) == "timm":
        return TimmBackbone(arch, weights=checkpoint, **overrides)
    return DINOv3Backbone(arch, weights=checkpoint, **overrides)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def numbers_from_text(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """timm overrides with numbers written as text turned into numbers: a free-form dict option given on the
    command line (``--...timm_overrides.init_values=1e-5``) reaches us as the string ``'1e-5'``, which timm would
    pass on to ``fill_`` and fail far from the cause. Other strings (``act_layer: gelu``) are kept."""
    converted = {}
    for key, value in overrides.items():
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            text = value.strip()
            value = int(text) if text.lstrip("+-").isdigit() else float(text)
        converted[key] = value
    return converted
