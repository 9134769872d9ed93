"""FeatureExtractor: ``dinov3-pl predict`` writes DINOv3 features of a set of images to one file.

Per image it stores the final-norm CLS token and the mean of the patch tokens (the inputs of the linear protocol),
optionally the patch-token maps, together with the image paths, in the order of the dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from dinov3_pl.models.weights import build_backbone

__all__ = ["FeatureExtractor", "load_features"]

_SUFFIXES = (".pt", ".npz")


class FeatureExtractor(L.LightningModule):
    """Runs a frozen DINOv3 backbone over prediction batches and saves the features in one file.

    Batches are ``{"images": [B, 3, H, W], "paths": list[str], "indices": [B]}`` (see
    ``dinov3_pl.data.predict.ImageFolderPredictDataModule``); ``H`` and ``W`` must be multiples of the patch size.

    The output file (``.pt``: ``torch.load``; ``.npz``: ``numpy.load``) holds ``cls`` [N, D'], ``mean_patch``
    [N, D], ``paths`` (N strings), ``skipped_paths`` (unreadable files), ``arch``, and with ``save_patch_maps``
    ``patch_maps`` [N, D, h, w]. Features are float32, computed under bf16 autocast on a GPU. For a DINOv3 ViT
    D' = D; for another timm model (a ``TimmBackbone``) ``cls`` is the model's own pooled feature, which can be
    wider (MobileNetV4: 1280 vs 960), and ``h``, ``w`` are the image size over its total stride (32 for most CNNs).

    Args:
        arch: timm model name: a DINOv3 ViT (``vit_small_patch16_dinov3``) or any other timm model (``resnet50``);
            may be ``None`` when ``weights`` is a dinov3-pl ``.ckpt`` (it records the arch).
        weights: upstream ``.pth``, Hugging Face folder / ``.safetensors``, timm state dict or dinov3-pl ``.ckpt``;
            ``None`` keeps the random initialisation (for smoke tests).
        backbone_kwargs: timm overrides for the backbone, e.g. ``{"depth": 2, "embed_dim": 64}``.
        output: file to write, ending in ``.pt`` or ``.npz``.
        save_patch_maps: also store the patch tokens as [D, h, w] maps (large: D·h·w floats per image).
    """

    def __init__(
        self,
        arch: str | None = "vit_small_patch16_dinov3",
        weights: str | None = None,
        backbone_kwargs: dict | None = None,
        output: str | Path = "features.pt",
        save_patch_maps: bool = False,
    ) -> None:
        super().__init__()
        if Path(output).suffix not in _SUFFIXES:
            raise ValueError(f"output must end in one of {_SUFFIXES} (torch or numpy file), got {str(output)!r}")
        self.save_hyperparameters()
        self.backbone = build_backbone(arch, weights, **(backbone_kwargs or {}))
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.output = Path(output)
        self.save_patch_maps = save_patch_maps
        self._results: list[dict[str, Any]] = []

    @torch.no_grad()
    def extract(self, images: Tensor) -> dict[str, Tensor]:
        """``{"cls": [B, D], "mean_patch": [B, D]}`` (+ ``"patch_maps"`` [B, D, h, w]), float32."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
            tokens = self.backbone(images)
        patch = tokens["patch"].float()
        features = {"cls": tokens["cls"].float(), "mean_patch": patch.mean(dim=1)}
        if self.save_patch_maps:
            height, width = images.shape[-2] // self.backbone.patch_size, images.shape[-1] // self.backbone.patch_size
            features["patch_maps"] = patch.unflatten(1, (height, width)).permute(0, 3, 1, 2).contiguous()
        return features

    def on_predict_epoch_start(self) -> None:
        self._results = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        features = self.extract(batch["images"]) if len(batch["paths"]) else {}
        result = {key: value.cpu() for key, value in features.items()}
        result.update(paths=list(batch["paths"]), skipped_paths=list(batch.get("skipped_paths", [])))
        result["indices"] = batch["indices"].cpu() if "indices" in batch else None
        self._results.append(result)
        return result

    def on_predict_epoch_end(self) -> None:
        results = self._results
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, results)
            results = [result for rank_results in gathered for result in rank_results]
        if self.trainer.is_global_zero:
            collected = _collect(results)
            collected["arch"] = self.backbone.arch
            save_features(collected, self.output)
            rank_zero_info(f"wrote features of {len(collected['paths'])} images to {self.output}")
        self._results = []


def _collect(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenates batches in dataset order; drops the duplicates a distributed sampler pads with."""
    keys = [key for key in ("cls", "mean_patch", "patch_maps") if any(key in r for r in results)]
    rows: dict[int, tuple[str, dict[str, Tensor]]] = {}
    order = 0
    for result in results:
        indices = result["indices"]
        for row, path in enumerate(result["paths"]):
            index = int(indices[row]) if indices is not None else order
            order += 1
            rows.setdefault(index, (path, {key: result[key][row] for key in keys}))
    ordered = [rows[index] for index in sorted(rows)]
    collected: dict[str, Any] = {"paths": [path for path, _ in ordered]}
    for key in keys:
        collected[key] = torch.stack([values[key] for _, values in ordered]) if ordered else torch.empty(0)
    collected["skipped_paths"] = sorted({path for result in results for path in result["skipped_paths"]})
    return collected


def save_features(features: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".pt":
        torch.save(features, output)
    else:
        arrays = {key: value.numpy() for key, value in features.items() if isinstance(value, Tensor)}
        strings = {
            key: np.asarray(value, dtype=str) for key, value in features.items() if not isinstance(value, Tensor)
        }
        np.savez(output, **arrays, **strings)


def load_features(path: str | Path) -> dict[str, Any]:
    """Reads a file written by ``FeatureExtractor`` (``.pt`` or ``.npz``) into a dict of tensors and strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features file not found: {path}")
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    with np.load(path) as data:
        out: dict[str, Any] = {}
        for key in data.files:
            array = data[key]
            if array.dtype.kind == "U":
                out[key] = array.item() if array.ndim == 0 else array.tolist()
            else:
                out[key] = torch.from_numpy(array)
        return out
