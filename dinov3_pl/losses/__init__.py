"""The DINOv3 losses, pure PyTorch (no Lightning), all computed in fp32."""

from dinov3_pl.losses.centering import SoftmaxCenter, sinkhorn_knopp
from dinov3_pl.losses.depth import GradientLoss, SigLoss
from dinov3_pl.losses.dino import DINOLoss
from dinov3_pl.losses.gram import GramLoss
from dinov3_pl.losses.ibot import IBOTPatchLoss
from dinov3_pl.losses.koleo import KoLeoLoss

__all__ = [
    "DINOLoss",
    "GradientLoss",
    "GramLoss",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "SigLoss",
    "SoftmaxCenter",
    "sinkhorn_knopp",
]
