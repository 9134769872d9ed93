"""iBOT block masking with upstream DINOv3's statistics (``dinov3/data/masking.py`` and ``collate.py``).

Per batch of C = 2B global crops (local crops are never masked):

- ``n = int(C * mask_probability)`` crops get a mask, the other ``C - n`` get an empty one;
- ``ratios = linspace(min_ratio, max_ratio, n + 1)`` (float32, as ``torch.linspace``); masked crop ``i`` gets
  exactly ``int(N * ratios[i + 1])`` patches: the upper end of its interval, no random draw (upstream passes
  ``probs[i + 1]`` to the generator);
- each mask is built from rectangular blocks (area uniform in [min_num_patches, remaining budget capped at
  max_num_patches = 0.5 N], log-uniform aspect ratio in [0.3, 1/0.3], up to 10 placement tries per block, a block
  must add at least one new patch and not exceed the budget) until no block fits, then topped up with uniformly
  random unmasked patches to the exact count;
- the C masks are shuffled over the crops.

:func:`ibot_mask_fields` adds what the training step would otherwise derive on the device with a host sync (as
upstream's collate does): the flat indices of the masked patches, their iBOT weights and their count.

All randomness comes from a ``np.random.Generator`` so data-loader workers are deterministic given their seed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from dinov3_pl.losses.ibot import masked_patch_weights

__all__ = ["BlockMaskGenerator", "IBOTMaskCollator", "ibot_mask_counts", "ibot_mask_fields"]


class BlockMaskGenerator:
    """Boolean [H, W] masks of an exact number of patches made of random rectangular blocks.

    ``grid_size``: patch grid (H, W) or one int for a square grid. ``max_num_patches`` caps one block's area
    (upstream: half the patches). ``min_aspect``/``max_aspect``: block aspect-ratio range (``max_aspect``
    defaults to ``1 / min_aspect``), sampled log-uniformly.
    """

    def __init__(
        self,
        grid_size: int | tuple[int, int],
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"grid_size must be positive, got {grid_size}")
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, budget: float, rng: np.random.Generator) -> int:
        """Try (up to 10 times) to mask one random block adding 1..budget new patches; returns how many it added."""
        for _ in range(10):
            # Like Python's random.uniform, also valid when the budget is below min_num_patches.
            target_area = self.min_num_patches + (budget - self.min_num_patches) * rng.random()
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_range))
            block_height = int(round(math.sqrt(target_area * aspect_ratio)))
            block_width = int(round(math.sqrt(target_area / aspect_ratio)))
            if block_width < self.width and block_height < self.height:
                top = int(rng.integers(0, self.height - block_height + 1))
                left = int(rng.integers(0, self.width - block_width + 1))
                block = mask[top : top + block_height, left : left + block_width]
                new_patches = block.size - int(block.sum())
                if 0 < new_patches <= budget:
                    block[...] = True
                    return new_patches
        return 0

    def __call__(self, num_masked_patches: int, rng: np.random.Generator) -> np.ndarray:
        if not 0 <= num_masked_patches <= self.num_patches:
            raise ValueError(f"num_masked_patches must be in [0, {self.num_patches}], got {num_masked_patches}")
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masked_patches:
            added = self._add_block(mask, min(num_masked_patches - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        # Top up with random patches so every masked crop has exactly the requested count.
        flat = mask.reshape(-1)
        unmasked = np.flatnonzero(~flat)
        flat[rng.choice(unmasked, size=num_masked_patches - count, replace=False)] = True
        return mask


def ibot_mask_counts(
    num_crops: int, num_patches: int, mask_probability: float = 0.5, mask_ratio: tuple[float, float] = (0.1, 0.5)
) -> list[int]:
    """Masked-patch count of each masked crop, in upstream's order (before shuffling), for ``num_crops`` crops."""
    num_masked_crops = int(num_crops * mask_probability)
    ratios = torch.linspace(float(mask_ratio[0]), float(mask_ratio[1]), num_masked_crops + 1)
    # Same float32 arithmetic as upstream (int(N * probs[i + 1]) on a float32 tensor).
    return [int(num_patches * ratios[i + 1]) for i in range(num_masked_crops)]


def ibot_mask_fields(masks: torch.Tensor) -> dict[str, Any]:
    """The batch fields derived from the ``[C, N]`` bool iBOT masks, computed here on CPU so the training step needs
    no ``nonzero`` (a host sync with a data-dependent shape) on the device:

    - ``mask_indices`` long ``[M]``: ``masks.flatten().nonzero()``, the rows of the masked patches in the
      crop-major ``[C * N]`` patch tokens (upstream ``mask_indices_list``);
    - ``ibot_weights`` float32 ``[M]``: ``1 / (masked patches of the row's crop)``, the ``masks_weight`` of
      :class:`dinov3_pl.losses.IBOTPatchLoss` (upstream ``masks_weight``);
    - ``num_masked_patches`` int: ``M``, known on the host (upstream ``n_masked_patches``).
    """
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor [C, N], got {masks.dtype} {tuple(masks.shape)}")
    mask_indices = masks.flatten().nonzero().squeeze(-1)
    return {
        "mask_indices": mask_indices,
        "ibot_weights": masked_patch_weights(masks),
        "num_masked_patches": int(mask_indices.shape[0]),
    }


class IBOTMaskCollator:
    """Makes the iBOT masks of one batch: bool [C, N] for C global crops on a patch grid of N patches.

    Args:
        grid_size: patch grid of a global crop, ``global_size // patch_size`` (int or (H, W)).
        mask_probability: fraction of the global crops that get a mask (upstream 0.5).
        mask_ratio: (min, max) mask ratio spread over the masked crops (upstream (0.1, 0.5)).
        random_circular_shift: roll each mask by a random offset (upstream option, off by default).
    """

    def __init__(
        self,
        grid_size: int | tuple[int, int],
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        random_circular_shift: bool = False,
    ) -> None:
        if not 0.0 <= mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
        if not 0.0 <= mask_ratio[0] < mask_ratio[1] <= 1.0:
            raise ValueError(f"mask_ratio must satisfy 0 <= min < max <= 1, got {tuple(mask_ratio)}")
        self.generator = BlockMaskGenerator(grid_size, min_num_patches=min_num_patches, min_aspect=min_aspect)
        self.mask_probability = float(mask_probability)
        self.mask_ratio = (float(mask_ratio[0]), float(mask_ratio[1]))
        self.random_circular_shift = bool(random_circular_shift)

    @property
    def num_patches(self) -> int:
        return self.generator.num_patches

    def __call__(self, num_crops: int, rng: np.random.Generator) -> torch.Tensor:
        counts = ibot_mask_counts(num_crops, self.num_patches, self.mask_probability, self.mask_ratio)
        masks = []
        for count in counts:
            mask = self.generator(count, rng)
            if self.random_circular_shift:
                shift = (int(rng.integers(mask.shape[0])), int(rng.integers(mask.shape[1])))
                mask = np.roll(mask, shift, axis=(0, 1))
            masks.append(mask.reshape(-1))
        masks += [np.zeros(self.num_patches, dtype=bool)] * (num_crops - len(counts))
        order = rng.permutation(num_crops)
        return torch.from_numpy(
            np.stack([masks[i] for i in order]) if num_crops else np.zeros((0, self.num_patches), bool)
        )
