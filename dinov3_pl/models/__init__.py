"""The DINOv3 backbone (a timm ViT wrapper), any timm model behind the same outputs (TimmBackbone), weight loading,
the DINO/iBOT head and the dense evaluation heads."""

from dinov3_pl.models.backbone import DINOv3Backbone, init_as_upstream
from dinov3_pl.models.dense_heads import LinearSegmentationHead, SimpleFeaturePyramid
from dinov3_pl.models.heads import DINOHead
from dinov3_pl.models.timm_backbone import TimmBackbone
from dinov3_pl.models.weights import build_backbone, load_backbone_weights, read_state_dict

__all__ = [
    "DINOHead",
    "DINOv3Backbone",
    "LinearSegmentationHead",
    "SimpleFeaturePyramid",
    "TimmBackbone",
    "build_backbone",
    "init_as_upstream",
    "load_backbone_weights",
    "read_state_dict",
]
