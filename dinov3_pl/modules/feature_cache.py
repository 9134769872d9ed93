"""FeatureCache: per-sample frozen features kept in CPU memory under a hard bound, so a probe embeds each image once.

Rows live in fixed blocks of ``block_rows`` consecutive dataset indices (one ``[block_rows, F]`` tensor each), so
the memory is a few large allocations rather than one small tensor per sample, and it is bounded: a block is only
allocated while the blocks held (features and their "filled" flags) stay within ``max_bytes``. Rows of blocks that
do not fit are simply not cached; the caller computes them again (per row, so a partly cached batch still saves
the cached part). The bound therefore holds whatever the dataset size, the shuffling or the number of epochs.

Sizes, for planning (``cls_meanpatch`` features are 2 x embed dim wide): the 1,281,167 ImageNet-1k train images
take 1,281,167 x 768 x 2 B = 1.97 GB for ViT-S/16 and x 2048 x 2 B = 5.25 GB for ViT-L/16 in bfloat16 (twice that
in float32); the 50,000 val images 0.15 GB (ViT-S) / 0.41 GB (ViT-L) in float32.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

__all__ = ["CACHE_DTYPES", "FeatureCache"]

CACHE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class FeatureCache:
    """Features of samples by ``(key, dataset index)`` in CPU memory, at most ``max_bytes`` in all.

    ``key`` separates what must not mix (e.g. ``("val", dataloader_idx)``). ``lookup`` returns which rows of a batch
    are cached and their features (float32); ``store`` keeps what fits. ``dtype`` is the storage type: bfloat16
    halves the memory and keeps 8 significant bits (relative error ≤ 2^-8 per value), float32 is exact.

    Args:
        max_bytes: bound on the memory of every block held (features + one flag byte per row).
        dtype: ``"float32"`` or ``"bfloat16"``.
        block_rows: dataset indices per block (the allocation unit).
    """

    def __init__(
        self, max_bytes: int, dtype: Literal["float32", "bfloat16"] = "float32", block_rows: int = 4096
    ) -> None:
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"feature cache dtype must be one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
        if max_bytes < 0 or block_rows < 1:
            raise ValueError(f"need max_bytes >= 0 and block_rows >= 1, got {max_bytes} and {block_rows}")
        self.max_bytes = int(max_bytes)
        self.dtype = CACHE_DTYPES[dtype]
        self.block_rows = int(block_rows)
        self._features: dict[tuple[Hashable, int], Tensor] = {}
        self._filled: dict[tuple[Hashable, int], Tensor] = {}
        self.nbytes = 0
        self._warned = False

    def __len__(self) -> int:
        """Number of cached rows."""
        return sum(int(filled.sum()) for filled in self._filled.values())

    def clear(self) -> None:
        self._features.clear()
        self._filled.clear()
        self.nbytes = 0

    def _split(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        return indices // self.block_rows, indices % self.block_rows

    def lookup(self, key: Hashable, indices: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(hits [B] bool, features [B, F] float32 or None)``: rows with ``hits`` hold cached features, the others
        are undefined. ``None`` when no row is cached."""
        blocks, offsets = self._split(indices)
        hits = torch.zeros(len(blocks), dtype=torch.bool)
        features: Tensor | None = None
        for block in blocks.unique().tolist():
            if (key, block) not in self._features:
                continue
            rows = blocks == block
            stored, filled = self._features[key, block], self._filled[key, block]
            if features is None:
                features = torch.empty(len(blocks), stored.shape[1], dtype=torch.float32)
            hits[rows] = filled[offsets[rows]]
            features[rows] = stored[offsets[rows]].float()
        return hits, (features if hits.any() else None)

    def store(self, key: Hashable, indices: Tensor, features: Tensor) -> None:
        """Keeps the rows (``features`` [B, F]) whose blocks are held or still fit under the bound."""
        features = features.detach().to("cpu", self.dtype)
        blocks, offsets = self._split(indices)
        for block in blocks.unique().tolist():
            if (key, block) not in self._features and not self._allocate(key, block, features.shape[1]):
                continue
            rows = blocks == block
            self._features[key, block][offsets[rows]] = features[rows]
            self._filled[key, block][offsets[rows]] = True

    def _allocate(self, key: Hashable, block: int, width: int) -> bool:
        size = self.block_rows * (width * self.dtype.itemsize + 1)
        if self.nbytes + size > self.max_bytes:
            if not self._warned:
                self._warned = True
                rank_zero_warn(
                    f"the feature cache is full ({self.nbytes / 2**30:.2f} of {self.max_bytes / 2**30:.2f} GiB): "
                    "the remaining samples are embedded again at every pass. Raise `feature_cache_gb` or use "
                    "`feature_cache_dtype: bfloat16` (half the memory) to cache them all."
                )
            return False
        self._features[key, block] = torch.zeros(self.block_rows, width, dtype=self.dtype)
        self._filled[key, block] = torch.zeros(self.block_rows, dtype=torch.bool)
        self.nbytes += size
        return True
