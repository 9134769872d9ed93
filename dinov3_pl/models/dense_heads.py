"""Dense heads on frozen ViT patch maps: a linear segmentation head and a ViTDet-style simple feature pyramid.

Both are plain ``nn.Module``s on ``[B, D, h, w]`` patch maps (stride = the ViT patch size); the Lightning
modules in ``dinov3_pl.modules`` put them on top of a frozen ``DINOv3Backbone``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["LayerNorm2d", "LinearSegmentationHead", "SimpleFeaturePyramid"]


class LinearSegmentationHead(nn.Module):
    """Dropout + BatchNorm + 1×1 convolution from patch features to per-patch class logits, in that order.

    This is upstream DINOv3's linear segmentation probe (``LinearHead``: ``Dropout2d(0.1)``, then the norm, then the
    conv; weights drawn from N(0, 0.01²), zero bias). Upstream's norm is a SyncBatchNorm; ``Segmentation`` converts
    this one to it under multi-GPU DDP. Several layers' maps are concatenated on the channel axis by the caller.

    Checkpoints of the earlier order (BatchNorm, then dropout) have the same parameters under the same names and
    load unchanged; they evaluate identically (dropout is the identity in ``eval()``), and training them further
    continues in the new order.

    Args:
        in_channels: channels of the input patch map (embed_dim × number of concatenated layers).
        num_classes: output classes (logit channels).
        dropout: ``Dropout2d`` rate applied to the features (before the norm) during training.
        use_batchnorm: normalise the (frozen) features with a trainable BatchNorm first.
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.1, use_batchnorm: bool = True) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
        self.norm = nn.BatchNorm2d(in_channels) if use_batchnorm else nn.Identity()
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, patch_map: Tensor) -> Tensor:
        """``[B, C, h, w]`` patch features → ``[B, num_classes, h, w]`` logits (at patch resolution)."""
        return self.classifier(self.norm(self.dropout(patch_map)))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a ``[B, C, H, W]`` map (ViTDet normalises its pyramid convs so)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    # Bias-free conv followed by a norm, as ViTDet's Conv2d(norm=LN) blocks.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        LayerNorm2d(out_channels),
    )


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: multi-scale maps from the single last-layer ViT map.

    From a map at stride ``patch_size`` it builds one level per entry of ``strides``: up-sampling by stride-2
    transposed convolutions (LayerNorm + GELU between two of them), identity, or down-sampling by 2×2 max pooling;
    then a 1×1 conv and a 3×3 conv (each with LayerNorm) to ``out_channels``. With ``top_pool`` an extra ``"pool"``
    level (max pool of the coarsest level, stride ×2) is added, as ViTDet's ``LastLevelMaxPool``.

    The output is an ``OrderedDict`` (names ``"p2"``, ``"p3"``, … for strides 4, 8, …), the format torchvision's
    ``FasterRCNN``/``MultiScaleRoIAlign`` expect; ``out_channels`` is an attribute for the same reason.

    Args:
        in_channels: channels of the ViT patch map (embed_dim).
        patch_size: stride of the input map in pixels.
        out_channels: channels of every pyramid level.
        strides: output strides; each ``patch_size / stride`` must be a power of two.
        top_pool: add the extra ``"pool"`` level.
    """

    def __init__(
        self,
        in_channels: int,
        patch_size: int = 16,
        out_channels: int = 256,
        strides: Sequence[int] = (4, 8, 16, 32),
        top_pool: bool = False,
    ) -> None:
        super().__init__()
        if not strides or list(strides) != sorted(set(strides)):
            raise ValueError(f"strides must be a non-empty increasing sequence, got {list(strides)}")
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.strides = [int(s) for s in strides]
        self.level_names = [f"p{int(math.log2(s))}" if _is_power_of_two(s) else f"s{s}" for s in self.strides]
        self.top_pool = top_pool
        self.rescales = nn.ModuleList()
        self.outputs = nn.ModuleList()
        for stride in self.strides:
            rescale, channels = self._rescale(in_channels, patch_size, stride)
            self.rescales.append(rescale)
            self.outputs.append(
                nn.Sequential(_conv_norm(channels, out_channels, 1), _conv_norm(out_channels, out_channels, 3))
            )

    @staticmethod
    def _rescale(in_channels: int, patch_size: int, stride: int) -> tuple[nn.Module, int]:
        """Module taking the stride-``patch_size`` map to stride ``stride``, and its output channels."""
        ratio = patch_size / stride
        if ratio <= 0 or not _is_power_of_two(ratio if ratio >= 1 else 1 / ratio):
            raise ValueError(f"patch_size / stride must be a power of two, got {patch_size} / {stride}")
        if ratio == 1:
            return nn.Identity(), in_channels
        if ratio < 1:
            steps = int(round(math.log2(1 / ratio)))
            return nn.Sequential(*[nn.MaxPool2d(kernel_size=2, stride=2) for _ in range(steps)]), in_channels
        # Up-sampling: ViTDet halves the channels at each ×2 step (D → D/2 → D/4), LN + GELU between steps.
        layers: list[nn.Module] = []
        channels = in_channels
        steps = int(round(math.log2(ratio)))
        for step in range(steps):
            next_channels = max(channels // 2, 1)
            layers.append(nn.ConvTranspose2d(channels, next_channels, kernel_size=2, stride=2))
            if step < steps - 1:
                layers += [LayerNorm2d(next_channels), nn.GELU()]
            channels = next_channels
        return nn.Sequential(*layers), channels

    def forward(self, patch_map: Tensor) -> OrderedDict[str, Tensor]:
        """``[B, D, h, w]`` → ``OrderedDict(name → [B, out_channels, h·p/s, w·p/s])`` for each stride s."""
        levels: OrderedDict[str, Tensor] = OrderedDict()
        for name, rescale, output in zip(self.level_names, self.rescales, self.outputs, strict=True):
            levels[name] = output(rescale(patch_map))
        if self.top_pool:
            levels["pool"] = F.max_pool2d(levels[self.level_names[-1]], kernel_size=1, stride=2)
        return levels

    @property
    def output_strides(self) -> list[int]:
        """Strides (pixels) of the output levels, in output order."""
        return self.strides + ([self.strides[-1] * 2] if self.top_pool else [])


def _is_power_of_two(value: float) -> bool:
    return value >= 1 and float(value).is_integer() and (int(value) & (int(value) - 1)) == 0


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear up-sampling of ``[B, C, h, w]`` logits to the label size (``align_corners=False``)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def sliding_window_logits(predict, images: Tensor, num_classes: int, window: int, stride: int) -> Tensor:
    """Logits for images larger than the training crop: ``predict`` on ``window``×``window`` crops taken every
    ``stride`` pixels (the last window of a row/column is aligned with the border), averaged where they overlap.

    ``predict(crops [B, 3, window, window]) -> logits [B, num_classes, window, window]``. Images smaller than the
    window along an axis are handled with a single window of the image size on that axis.
    """
    if stride < 1 or window < 1:
        raise ValueError(f"window and stride must be >= 1, got window={window}, stride={stride}")
    batch, _, height, width = images.shape
    window_h, window_w = min(window, height), min(window, width)
    logits_sum = images.new_zeros((batch, num_classes, height, width))
    counts = images.new_zeros((1, 1, height, width))
    for top in _window_starts(height, window_h, stride):
        for left in _window_starts(width, window_w, stride):
            crop = images[:, :, top : top + window_h, left : left + window_w]
            logits_sum[:, :, top : top + window_h, left : left + window_w] += predict(crop)
            counts[:, :, top : top + window_h, left : left + window_w] += 1
    return logits_sum / counts


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    starts = list(range(0, max(length - window, 0) + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts
