"""dinov3-pl: DINOv3 self-supervised pretraining and frozen-backbone evaluation with PyTorch Lightning.

The names a user needs first are here; the rest live in the subpackages (``dinov3_pl.models``, ``.losses``,
``.data``, ``.modules``, ``.callbacks``). They are imported on first use, so that importing one submodule (e.g.
``dinov3_pl.models.backbone``) does not pull in Lightning and every DataModule.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "DINOv3Backbone": "dinov3_pl.models",
    "build_backbone": "dinov3_pl.models",
    "DINOSSLModule": "dinov3_pl.modules",
    "KNN": "dinov3_pl.modules",
    "LinearProbe": "dinov3_pl.modules",
    "MultiCropDataModule": "dinov3_pl.data",
}

__all__ = ["KNN", "DINOSSLModule", "DINOv3Backbone", "LinearProbe", "MultiCropDataModule", "build_backbone"]

if TYPE_CHECKING:
    from dinov3_pl.data import MultiCropDataModule
    from dinov3_pl.models import DINOv3Backbone, build_backbone
    from dinov3_pl.modules import KNN, DINOSSLModule, LinearProbe


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'dinov3_pl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
