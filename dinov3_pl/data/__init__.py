"""Datasets, multi-crop transforms, iBOT masking and the DataModules of pretraining and evaluation."""

from dinov3_pl.data.benchmarks import ADE20K, COCODetection, ImageNet, PascalVOC
from dinov3_pl.data.classification import ClassificationDataModule
from dinov3_pl.data.datasets import FashionMNIST, ImageFolder, SyntheticShapes
from dinov3_pl.data.decode import jpeg_reduction, read_rgb
from dinov3_pl.data.dense import DenseDataModule
from dinov3_pl.data.depth import DepthDataModule, NYUDepthV2, SyntheticDepth
from dinov3_pl.data.detection import CocoDetectionDataset, DetectionDataModule
from dinov3_pl.data.masking import BlockMaskGenerator, IBOTMaskCollator
from dinov3_pl.data.multicrop import MultiCropDataModule
from dinov3_pl.data.predict import ImageFolderPredictDataModule
from dinov3_pl.data.retrieval import RetrievalDataModule, RevisitedDataset
from dinov3_pl.data.samplers import ShardedEvalSampler
from dinov3_pl.data.scenes import FashionMNISTScenes
from dinov3_pl.data.segmentation import SegmentationDataModule, SegmentationFolder, SyntheticShapeMasks
from dinov3_pl.data.transforms import EvalTransform, MultiCropTransform, normalise_uint8
from dinov3_pl.data.video import DAVIS2017, SyntheticVideos, VideoDataModule

__all__ = [
    "ADE20K",
    "DAVIS2017",
    "BlockMaskGenerator",
    "COCODetection",
    "ClassificationDataModule",
    "CocoDetectionDataset",
    "DenseDataModule",
    "DepthDataModule",
    "DetectionDataModule",
    "EvalTransform",
    "FashionMNIST",
    "FashionMNISTScenes",
    "IBOTMaskCollator",
    "ImageFolder",
    "ImageFolderPredictDataModule",
    "ImageNet",
    "MultiCropDataModule",
    "MultiCropTransform",
    "NYUDepthV2",
    "PascalVOC",
    "RetrievalDataModule",
    "RevisitedDataset",
    "SegmentationDataModule",
    "SegmentationFolder",
    "ShardedEvalSampler",
    "SyntheticDepth",
    "SyntheticShapeMasks",
    "SyntheticShapes",
    "SyntheticVideos",
    "VideoDataModule",
    "jpeg_reduction",
    "normalise_uint8",
    "read_rgb",
]
