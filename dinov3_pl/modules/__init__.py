"""LightningModules: pretraining (DINOv3 SSL, distillation, the shared base), its parts, and the frozen-backbone
evaluations."""

from dinov3_pl.modules.bank_query import BankQueryEvaluation, IndexedRows
from dinov3_pl.modules.depth import LinearDepth
from dinov3_pl.modules.detection import Detection
from dinov3_pl.modules.distillation import DistillationModule, FeatureDistillationModule
from dinov3_pl.modules.feature_cache import FeatureCache
from dinov3_pl.modules.features import FeatureExtractor
from dinov3_pl.modules.frozen import FrozenBackboneModule
from dinov3_pl.modules.knn import KNN
from dinov3_pl.modules.linear_probe import LinearProbe
from dinov3_pl.modules.pretraining import PretrainingModule
from dinov3_pl.modules.retrieval import Retrieval
from dinov3_pl.modules.segmentation import Segmentation
from dinov3_pl.modules.ssl import DINOSSLModule
from dinov3_pl.modules.ssl_config import (
    BackboneConfig,
    DistillationTeacherConfig,
    FeatureLossConfig,
    GramConfig,
    HeadConfig,
    LossConfig,
    OptimConfig,
    StudentConfig,
    TeacherConfig,
)
from dinov3_pl.modules.teachers import EMA, DINOStudent, DINOTeacher
from dinov3_pl.modules.video_propagation import VideoLabelPropagation

__all__ = [
    "EMA",
    "KNN",
    "BackboneConfig",
    "BankQueryEvaluation",
    "DINOSSLModule",
    "DINOStudent",
    "DINOTeacher",
    "Detection",
    "DistillationModule",
    "DistillationTeacherConfig",
    "FeatureCache",
    "FeatureDistillationModule",
    "FeatureExtractor",
    "FeatureLossConfig",
    "FrozenBackboneModule",
    "GramConfig",
    "HeadConfig",
    "IndexedRows",
    "LinearDepth",
    "LinearProbe",
    "LossConfig",
    "OptimConfig",
    "PretrainingModule",
    "Retrieval",
    "Segmentation",
    "StudentConfig",
    "TeacherConfig",
    "VideoLabelPropagation",
]
