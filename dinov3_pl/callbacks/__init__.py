"""Lightning callbacks."""

from dinov3_pl.callbacks.pca import PCAFeatureMaps

__all__ = ["PCAFeatureMaps"]
