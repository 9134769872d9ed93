"""LightningModules: SSL pretraining and the frozen-backbone evaluations."""

from dinov3_pl.modules.detection import Detection
from dinov3_pl.modules.features import FeatureExtractor
from dinov3_pl.modules.frozen import FrozenBackboneModule
from dinov3_pl.modules.knn import KNN
from dinov3_pl.modules.linear_probe import LinearProbe
from dinov3_pl.modules.segmentation import Segmentation
from dinov3_pl.modules.ssl import DINOSSLModule
from dinov3_pl.modules.ssl_config import (
    BackboneConfig,
    GramConfig,
    HeadConfig,
    LossConfig,
    OptimConfig,
    TeacherConfig,
)

__all__ = [
    "KNN",
    "BackboneConfig",
    "DINOSSLModule",
    "Detection",
    "FeatureExtractor",
    "FrozenBackboneModule",
    "GramConfig",
    "HeadConfig",
    "LinearProbe",
    "LossConfig",
    "OptimConfig",
    "Segmentation",
    "TeacherConfig",
]
