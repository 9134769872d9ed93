"""dinov3-pl: DINOv3 self-supervised pretraining and frozen-backbone evaluation with PyTorch Lightning."""

__version__ = "0.1.0"
