"""Lightning callbacks."""

from dinov3_pl.callbacks.pca import PCAFeatureMaps
from dinov3_pl.callbacks.resume import ExactResume

__all__ = ["ExactResume", "PCAFeatureMaps"]
