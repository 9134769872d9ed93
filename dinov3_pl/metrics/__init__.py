"""Evaluation metrics, one file per task family: ``knn`` (also the SSL module's online monitor)."""

from dinov3_pl.metrics.knn import KNNAccuracy, knn_class_scores, knn_predict

__all__ = ["KNNAccuracy", "knn_class_scores", "knn_predict"]
