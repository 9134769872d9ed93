from dinov3_pl.models.backbone import DINOv3Backbone
from dinov3_pl.models.heads import DINOHead

__all__ = ["DINOv3Backbone", "DINOHead"]
