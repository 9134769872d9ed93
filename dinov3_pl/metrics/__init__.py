"""Evaluation metrics, one file per task family: kNN (also the SSL module's online monitor), depth, retrieval, video."""

from dinov3_pl.metrics.depth import DepthMetrics, depth_valid_mask, per_image_depth_metrics
from dinov3_pl.metrics.knn import KNNAccuracy, knn_class_scores, knn_predict
from dinov3_pl.metrics.retrieval import per_query_scores, rank_by_cosine, revisited_scores
from dinov3_pl.metrics.video import DavisJF, boundary_f_measure, region_similarity

__all__ = [
    "DavisJF",
    "DepthMetrics",
    "KNNAccuracy",
    "boundary_f_measure",
    "depth_valid_mask",
    "knn_class_scores",
    "knn_predict",
    "per_image_depth_metrics",
    "per_query_scores",
    "rank_by_cosine",
    "region_similarity",
    "revisited_scores",
]
