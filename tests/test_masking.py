"""Tests for dinov3_pl.data.masking against upstream DINOv3's iBOT masking statistics.

tests/fixtures/ibot_mask_stats.json holds numbers measured by running upstream ``MaskingGenerator`` +
``collate_data_and_cast`` (mask_probability 0.5, ratio (0.1, 0.5)): the exact masked-patch counts per batch and the
mean number of 4-connected components / fraction of masked patches with a masked 4-neighbour (block structure).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from dinov3_pl.data.masking import BlockMaskGenerator, IBOTMaskCollator, ibot_mask_counts, ibot_mask_fields
from dinov3_pl.data.multicrop import MultiCropCollate

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "ibot_mask_stats.json").read_text())


@pytest.mark.parametrize("key", sorted(FIXTURE))
def test_counts_per_batch_match_upstream(key):
    reference = FIXTURE[key]
    grid, num_crops = reference["grid"], reference["num_crops"]
    collator = IBOTMaskCollator(grid, mask_probability=0.5, mask_ratio=(0.1, 0.5))
    rng = np.random.default_rng(0)
    for _ in range(3):
        masks = collator(num_crops, rng)
        assert masks.dtype == torch.bool and masks.shape == (num_crops, grid * grid)
        assert sorted(masks.sum(1).tolist()) == reference["sorted_counts"]
        # int(C * 0.5) crops masked, the rest empty.
        assert int((masks.sum(1) > 0).sum()) == int(num_crops * 0.5)


def test_counts_formula_is_upper_end_of_linspace_intervals():
    # Independent float64 computation; differs from float32 only at exact integer boundaries, not here.
    num_patches, num_crops = 196, 64
    n = int(num_crops * 0.5)
    expected = [int(num_patches * r) for r in np.linspace(0.1, 0.5, n + 1)[1:]]
    assert ibot_mask_counts(num_crops, num_patches) == expected
    assert ibot_mask_counts(num_crops, num_patches)[-1] == 98  # the largest mask is max_ratio * N
    assert ibot_mask_counts(2, 64, mask_probability=0.5) == [32]  # one masked crop gets the top ratio
    assert ibot_mask_counts(8, 64, mask_probability=0.0) == []


def _block_statistics(masks: torch.Tensor, grid: int) -> tuple[list[int], list[float]]:
    components, neighbour_fractions = [], []
    for mask in masks.reshape(-1, grid, grid).numpy():
        if not mask.any():
            continue
        components.append(ndimage.label(mask)[1])
        padded = np.pad(mask, 1)
        has_neighbour = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        neighbour_fractions.append((has_neighbour & mask).sum() / mask.sum())
    return components, neighbour_fractions


def test_block_structure_matches_upstream_statistics():
    reference = FIXTURE["grid8_crops16"]
    grid, num_crops = reference["grid"], reference["num_crops"]
    collator = IBOTMaskCollator(grid)
    rng = np.random.default_rng(1)
    components, neighbour_fractions = [], []
    for _ in range(150):
        c, f = _block_statistics(collator(num_crops, rng), grid)
        components += c
        neighbour_fractions += f
    n_ours, n_ref = len(components), reference["masks_measured"]
    for ours, mean_key, std_key in (
        (components, "upstream_mean_components", "upstream_std_components"),
        (neighbour_fractions, "upstream_mean_neighbour_fraction", "upstream_std_neighbour_fraction"),
    ):
        standard_error = np.sqrt(np.var(ours) / n_ours + reference[std_key] ** 2 / n_ref)
        assert abs(np.mean(ours) - reference[mean_key]) < 4 * standard_error + 1e-3, mean_key
    # Block masks, not scattered patches: a random scatter of the same counts has far more components.
    assert np.mean(components) < 2.5


def test_masks_shuffled_over_crops_and_seedable():
    collator = IBOTMaskCollator(4)
    rng = np.random.default_rng(0)
    masked = torch.stack([collator(8, rng).any(1) for _ in range(400)]).float()
    # Every crop position is masked about half the time (not always the first half).
    assert torch.all((masked.mean(0) > 0.4) & (masked.mean(0) < 0.6))
    a = IBOTMaskCollator(8)(16, np.random.default_rng(7))
    b = IBOTMaskCollator(8)(16, np.random.default_rng(7))
    c = IBOTMaskCollator(8)(16, np.random.default_rng(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generator_exact_count_and_block_limits():
    generator = BlockMaskGenerator((6, 10))
    rng = np.random.default_rng(0)
    for count in (0, 1, 3, 4, 17, 30, 45, 60):
        mask = generator(count, rng)
        assert mask.shape == (6, 10) and mask.dtype == bool and int(mask.sum()) == count
    with pytest.raises(ValueError, match="num_masked_patches"):
        generator(61, rng)
    # A single block never covers more than max_num_patches (half the grid) or the full width/height.
    for _ in range(50):
        mask = np.zeros((6, 10), dtype=bool)
        added = generator._add_block(mask, generator.max_num_patches, rng)
        assert added == mask.sum() <= 30
        if added:
            rows, cols = np.nonzero(mask)
            assert rows.max() - rows.min() + 1 < 6 and cols.max() - cols.min() + 1 < 10


def test_circular_shift_keeps_counts():
    collator = IBOTMaskCollator(8, random_circular_shift=True)
    masks = collator(16, np.random.default_rng(0))
    assert sorted(masks.sum(1).tolist()) == FIXTURE["grid8_crops16"]["sorted_counts"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="mask_probability"):
        IBOTMaskCollator(8, mask_probability=1.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        IBOTMaskCollator(8, mask_ratio=(0.5, 0.1))


def test_mask_fields_precomputed_on_cpu_match_the_masks():
    """The collate's mask_indices / ibot_weights / num_masked_patches are what the step would derive on device."""
    samples = [
        {"global_crops": [torch.zeros(3, 8, 8)] * 2, "local_crops": [], "index": index, "epoch": 0}
        for index in range(4)
    ]
    batch = MultiCropCollate(global_size=8, patch_size=2)(samples)
    masks = batch["masks"]
    assert masks.shape == (8, 16) and masks.any()
    assert batch["mask_indices"].dtype == torch.long and batch["ibot_weights"].dtype == torch.float32
    # Independent: rows of the masked patches by a Python loop, weight 1 / (masked patches of the crop).
    expected_rows, expected_weights = [], []
    for crop, mask in enumerate(masks.tolist()):
        count = sum(mask)
        for patch, masked in enumerate(mask):
            if masked:
                expected_rows.append(crop * masks.shape[1] + patch)
                expected_weights.append(1.0 / count)
    assert batch["mask_indices"].tolist() == expected_rows
    assert batch["num_masked_patches"] == len(expected_rows) == int(masks.sum())
    torch.testing.assert_close(batch["ibot_weights"], torch.tensor(expected_weights))
    with pytest.raises(ValueError, match="bool tensor"):
        ibot_mask_fields(masks.float())
