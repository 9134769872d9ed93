"""Lightning callbacks."""

from dinov3_pl.callbacks.bad_images import BadImageCount
from dinov3_pl.callbacks.pca import PCAFeatureMaps
from dinov3_pl.callbacks.resume import ExactResume
from dinov3_pl.callbacks.training_health import TrainingHealth, TrainingHealthWarning

__all__ = ["BadImageCount", "ExactResume", "PCAFeatureMaps", "TrainingHealth", "TrainingHealthWarning"]
