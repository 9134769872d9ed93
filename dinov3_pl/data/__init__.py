"""Datasets, multi-crop transforms, iBOT masking and the DataModules of pretraining and evaluation."""

from dinov3_pl.data.benchmarks import ADE20K, COCODetection, ImageNet, PascalVOC
from dinov3_pl.data.classification import ClassificationDataModule
from dinov3_pl.data.datasets import FashionMNIST, ImageFolder, SyntheticShapes
from dinov3_pl.data.decode import read_rgb
from dinov3_pl.data.dense import (
    CocoDetectionDataset,
    DetectionDataModule,
    SegmentationDataModule,
    SegmentationFolder,
    SyntheticShapeMasks,
)
from dinov3_pl.data.masking import BlockMaskGenerator, IBOTMaskCollator
from dinov3_pl.data.multicrop import MultiCropDataModule
from dinov3_pl.data.predict import ImageFolderPredictDataModule
from dinov3_pl.data.samplers import ShardedEvalSampler
from dinov3_pl.data.scenes import FashionMNISTScenes
from dinov3_pl.data.transforms import EvalTransform, MultiCropTransform

__all__ = [
    "ADE20K",
    "BlockMaskGenerator",
    "COCODetection",
    "ClassificationDataModule",
    "CocoDetectionDataset",
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
    "PascalVOC",
    "SegmentationDataModule",
    "SegmentationFolder",
    "ShardedEvalSampler",
    "SyntheticShapeMasks",
    "SyntheticShapes",
    "read_rgb",
]
