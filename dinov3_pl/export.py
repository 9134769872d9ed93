"""``dinov3-pl export``: one backbone out of any supported weights, as a slim dinov3-pl checkpoint, a timm state
dict or a Hugging Face ``DINOv3ViTModel`` folder (docs/export.md).

    dinov3-pl export WEIGHTS --format {ckpt,timm,hf} --out PATH [--backbone NAME] [--arch A --timm-overrides JSON]
    python -m dinov3_pl.export ...   (the same)

WEIGHTS is a dinov3-pl ``.ckpt`` (it records its backbones: ``--backbone`` picks one by name, the default is the
one evaluation uses, the EMA teacher of an SSL run) or any weights ``build_backbone`` reads (upstream ``.pth``,
Hugging Face folder or ``.safetensors``, timm state dict), which record no architecture: give ``--arch`` and the
``--timm-overrides`` they were trained with. The backbone is a ``DINOv3Backbone`` (timm DINOv3 ViT) or, for any other
timm model (a distillation student such as ``convnext_tiny``), a ``TimmBackbone``. Every export is exact: the
tensors written are the backbone's own.

- ``ckpt``: ``{"state_dict": {"backbone.…"}, "backbone_config": {"arch", "timm_overrides", "prefix"}}``, readable
  with ``torch.load(weights_only=True)``, loaded by every eval module and ``predict`` with ``arch: null``.
- ``timm``: the timm model's own state dict, which ``timm.create_model(arch, pretrained=True,
  pretrained_cfg_overlay=dict(file=out), **overrides)`` loads (``.safetensors`` when the name ends so, else
  ``torch.save``; the command prints the call). A DINOv3 ViT's holds no ``mask_token`` (iBOT's, not part of timm's
  model): timm's loader reads a state dict with a ``mask_token`` but without upstream's ``storage_tokens`` as a
  masked-image-modelling checkpoint and moves the final norm to ``fc_norm``.
- ``hf``: a folder with ``config.json`` + ``model.safetensors`` that ``transformers.AutoModel.from_pretrained``
  loads as ``DINOv3ViTModel`` (DINOv3 ViTs only).

Bad input ends in one line on stderr (``error: …``, exit status 2) that says what to change.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dinov3_pl.models.weights import build_backbone, read_checkpoint, recorded_backbones, select_backbone

__all__ = ["EXPORT_FORMATS", "SLIM_PREFIX", "export_backbone", "main"]

EXPORT_FORMATS = ("ckpt", "timm", "hf")
# Where a slim checkpoint keeps its one backbone (recorded as its backbone_config["prefix"]).
SLIM_PREFIX = "backbone."
_HF_WEIGHTS, _HF_CONFIG = "model.safetensors", "config.json"


# ------------------------------------------------------------------------------------------------ the source
def _default_name(checkpoint: Mapping[str, Any]) -> str:
    """The name under which a checkpoint records its default backbone (the one ``backbone_config`` holds)."""
    default = checkpoint.get("backbone_config") or {}
    for name, record in recorded_backbones(checkpoint).items():
        if record.get("prefix") == default.get("prefix") and record.get("arch") == default.get("arch"):
            return name
    return "default"


def _selected_record(checkpoint: Mapping[str, Any], backbone_name: str | None, source: Path) -> dict[str, Any] | None:
    """The record of the backbone to export (``None`` for weights that record none)."""
    recorded = recorded_backbones(checkpoint)
    if not recorded:
        if backbone_name is not None:
            raise ValueError(
                f"--backbone {backbone_name}: {source} records no named backbones (only a dinov3-pl .ckpt does); "
                "drop --backbone"
            )
        return None
    return dict(select_backbone(checkpoint, backbone_name)["backbone_config"])


# ------------------------------------------------------------------------------------------------ writing
def _check_out(out: Path, overwrite: bool, folder: bool, source: Path) -> None:
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the input WEIGHTS; choose another path")
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it or choose another path")
        if folder and not out.is_dir():
            raise FileExistsError(f"--out {out} is a file; --format hf writes a folder, choose another path")
        if not folder and out.is_dir():
            raise FileExistsError(f"--out {out} is a folder; --format ckpt/timm write one file, give a file path")


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Writes through a temporary file beside ``path`` and renames it: an interrupted export leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _save_tensors(state: Mapping[str, Tensor], path: Path) -> None:
    """``.safetensors`` by name, else ``torch.save``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        _write_atomically(path, lambda target: save_file(dict(state), str(target), metadata={"format": "pt"}))
    else:
        _write_atomically(path, lambda target: torch.save(dict(state), target))


def _slim_checkpoint(state: Mapping[str, Tensor], record: Mapping[str, Any], name: str) -> dict[str, Any]:
    slim_record = {**record, "prefix": SLIM_PREFIX}
    return {
        "state_dict": {SLIM_PREFIX + key: value for key, value in state.items()},
        "backbone_config": slim_record,
        "backbone_configs": {name: slim_record},
    }


def _write_hf(backbone: Any, out: Path) -> None:
    from safetensors.torch import save_file

    from dinov3_pl.models.hf_export import hf_config, hf_state_dict

    config, tensors = hf_config(backbone), hf_state_dict(backbone)  # both raise before anything is written
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(out / _HF_WEIGHTS, lambda target: save_file(tensors, str(target), metadata={"format": "pt"}))
    _write_atomically(out / _HF_CONFIG, lambda target: target.write_text(json.dumps(config, indent=2) + "\n"))
    stale_index = out / "model.safetensors.index.json"
    if stale_index.exists():  # a sharded model overwritten here would otherwise be read from its old shards
        stale_index.unlink()


def _not_a_vit(name: str, arch: str) -> ValueError:
    return ValueError(
        f"--format hf writes DINOv3 ViTs only; backbone {name!r} is timm's {arch}: use --format timm or ckpt"
    )


def _timm_create_kwargs(kind: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """What ``timm.create_model`` needs besides the arch to build the exported model: TimmBackbone also drops the
    classifier (num_classes=0), which timm's strict loading would otherwise miss."""
    if kind == "dinov3":
        return dict(overrides)
    from dinov3_pl.models.timm_backbone import TIMM_BACKBONE_DEFAULTS

    return {**TIMM_BACKBONE_DEFAULTS, **overrides}


def _python_call(arch: str, overrides: Mapping[str, Any], out: Path) -> str:
    arguments = "".join(f", {key}={value!r}" for key, value in overrides.items())
    return f"timm.create_model({arch!r}, pretrained=True, pretrained_cfg_overlay=dict(file={str(out)!r}){arguments})"


# ------------------------------------------------------------------------------------------------ the API
def export_backbone(
    weights: str | Path,
    format: str,
    out: str | Path,
    *,
    backbone_name: str | None = None,
    arch: str | None = None,
    timm_overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Exports one backbone of ``weights`` to ``out`` in ``format`` (one of ``EXPORT_FORMATS``).

    Returns a line saying what was written and how to load it. Raises ``ValueError`` / ``OSError`` with a message
    that says what to change.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"--format {format}: choose one of {', '.join(EXPORT_FORMATS)}")
    source, out = Path(weights).expanduser(), Path(out).expanduser()
    overrides = dict(timm_overrides or {})
    _check_out(out, overwrite, folder=format == "hf", source=source)
    checkpoint = read_checkpoint(source)
    record = _selected_record(checkpoint, backbone_name, source)
    name = backbone_name or (_default_name(checkpoint) if record is not None else "default")
    if record is None and arch is None:
        raise ValueError(
            f"{source} records no architecture (only a dinov3-pl .ckpt does): give --arch, a timm model name such "
            "as vit_small_patch16_dinov3, and --timm-overrides with the values the weights were trained with"
        )

    if record is not None and arch is not None and arch != record["arch"]:
        raise ValueError(f"--arch {arch} differs from the arch {record['arch']!r} the checkpoint records; drop --arch")
    backbone = build_backbone(arch, checkpoint, backbone_name=backbone_name, **overrides).eval()
    # DINOv3Backbone (a timm DINOv3 ViT + mask token) or TimmBackbone (any other timm model, its kind is "timm").
    kind = getattr(backbone, "kind", "dinov3")
    arch, overrides = backbone.arch, dict(backbone.timm_overrides)
    slim_record = {**(record or {}), "arch": arch, "timm_overrides": overrides, "kind": kind}

    if format == "hf":
        if kind != "dinov3":
            raise _not_a_vit(name, arch)
        _write_hf(backbone, out)
        return f"wrote {out}/ ({_HF_CONFIG}, {_HF_WEIGHTS}); load it with transformers.AutoModel.from_pretrained"
    if format == "timm":
        # The timm model itself: DINOv3Backbone's .vit (its mask_token stays behind), TimmBackbone's .model.
        timm_model = backbone.vit if kind == "dinov3" else backbone.model
        _save_tensors(timm_model.state_dict(), out)
        return f"wrote {out}; load it with {_python_call(arch, _timm_create_kwargs(kind, overrides), out)}"
    state = backbone.state_dict()
    _write_atomically(out, lambda target: torch.save(_slim_checkpoint(state, slim_record, name), target))
    return f"wrote {out} (backbone {name!r}, {arch}); evaluate it with arch: null"


# ------------------------------------------------------------------------------------------------ the command
def _overrides(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg}); write e.g. '{{\"depth\": 2}}'") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 2}}', got {text}")
    return value


class _OneLineParser(argparse.ArgumentParser):
    """argparse's usage text and error, with the error last on one line (as the rest of the CLI ends)."""

    def error(self, message: str):  # type: ignore[override]
        _fail(f"{message} (`{self.prog} --help` lists the options)")


def _fail(message: str) -> None:
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    raise SystemExit(2)


def build_parser(prog: str = "dinov3-pl export") -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=prog,
        description="Export one backbone as a slim dinov3-pl checkpoint, a timm state dict or a Hugging Face folder.",
    )
    parser.add_argument(
        "weights",
        metavar="WEIGHTS",
        help="a dinov3-pl .ckpt, an upstream .pth, a HF folder/.safetensors or a timm state dict",
    )
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="what to write")
    parser.add_argument("--out", required=True, metavar="PATH", help="the file (ckpt, timm) or folder (hf) to write")
    parser.add_argument(
        "--backbone", metavar="NAME", help="a backbone the .ckpt records by name (default: the one evaluation uses)"
    )
    parser.add_argument(
        "--arch", metavar="ARCH", help="timm arch of weights that record none, e.g. vit_small_patch16_dinov3"
    )
    parser.add_argument(
        "--timm-overrides",
        type=_overrides,
        default={},
        metavar="JSON",
        help="JSON object of timm overrides, e.g. '{\"depth\": 2}'",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "dinov3-pl export") -> None:
    """The ``dinov3-pl export`` command; ``argv`` without the subcommand (``sys.argv[1:]`` when ``None``)."""
    args = build_parser(prog).parse_args(argv)
    try:
        message = export_backbone(
            args.weights,
            args.format,
            args.out,
            backbone_name=args.backbone,
            arch=args.arch,
            timm_overrides=args.timm_overrides,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as error:
        _fail(str(error))
    print(message)


if __name__ == "__main__":
    main(prog="python -m dinov3_pl.export")
