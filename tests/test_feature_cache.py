"""FeatureCache: the memory bound holds, cached rows come back as stored, bfloat16 storage halves the memory within
bf16 rounding, and a frozen-backbone module sends only the uncached rows of a batch through the backbone."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from dinov3_pl.modules.feature_cache import FeatureCache
from dinov3_pl.modules.linear_probe import LinearProbe
from tests.test_frozen import TINY, _HeadModule, _Images, _trainer

WIDTH, BLOCK_ROWS = 8, 4
BLOCK_BYTES_FP32 = BLOCK_ROWS * (WIDTH * 4 + 1)  # features + one "filled" flag per row


def test_bound_holds_and_cached_rows_come_back_exactly():
    cache = FeatureCache(max_bytes=2 * BLOCK_BYTES_FP32 + 10, block_rows=BLOCK_ROWS)
    features = torch.randn(16, WIDTH)
    with pytest.warns(UserWarning, match="feature cache is full"):
        cache.store("train", torch.arange(16), features)
    assert cache.nbytes == 2 * BLOCK_BYTES_FP32 <= cache.max_bytes
    assert len(cache) == 8  # two blocks of four rows; the other two blocks did not fit

    order = torch.tensor([13, 2, 7, 0, 9, 5])  # shuffled, across kept and dropped blocks
    hits, cached = cache.lookup("train", order)
    assert hits.tolist() == [False, True, True, True, False, True]
    torch.testing.assert_close(cached[hits], features[order[hits]], rtol=0, atol=0)

    other_hits, other = cache.lookup("val", order)  # keys do not mix
    assert not other_hits.any() and other is None
    cache.store("train", torch.tensor([1]), torch.full((1, WIDTH), 7.0))  # a held block takes updates
    assert cache.lookup("train", torch.tensor([1]))[1].eq(7.0).all()
    cache.clear()
    assert cache.nbytes == 0 and len(cache) == 0


def test_bfloat16_storage_halves_memory_within_bf16_rounding():
    features = torch.randn(64, WIDTH) * 10 ** torch.linspace(-3, 3, 64)[:, None]
    caches = {dtype: FeatureCache(2**20, dtype, block_rows=BLOCK_ROWS) for dtype in ("float32", "bfloat16")}
    for cache in caches.values():
        cache.store("val", torch.arange(64), features)
    assert caches["bfloat16"].nbytes == 16 * BLOCK_ROWS * (WIDTH * 2 + 1)
    assert caches["float32"].nbytes == 16 * BLOCK_BYTES_FP32
    hits, stored = caches["bfloat16"].lookup("val", torch.arange(64))
    assert hits.all() and stored.dtype == torch.float32
    # round to nearest with 8 significant bits (7 stored): relative error at most 2^-8
    assert ((stored - features).abs() <= features.abs() * 2**-8).all()
    assert not torch.equal(stored, features)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="dtype"):
        FeatureCache(100, "float16")
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureCache(-1)


def test_module_embeds_only_the_uncached_rows_of_a_batch():
    torch.manual_seed(0)
    module = _HeadModule(backbone_kwargs=TINY, cache_eval_features=True)
    rows_seen: list[int] = []
    module.backbone.register_forward_hook(lambda _module, args, _out: rows_seen.append(args[0].shape[0]))
    images = torch.randn(12, 3, 32, 32)
    reference = module.features(images)
    rows_seen.clear()

    first = module.batch_features({"images": images[:8], "indices": torch.arange(8)}, "val")
    mixed_order = torch.tensor([10, 3, 11, 0, 7, 9])  # rows 3, 0, 7 cached, 10, 11, 9 new
    mixed = module.batch_features({"images": images[mixed_order], "indices": mixed_order}, "val")
    again = module.batch_features({"images": images[mixed_order], "indices": mixed_order}, "val")

    assert rows_seen == [8, 3]  # the second batch embedded its three new rows only, the third none
    torch.testing.assert_close(first, reference[:8])
    torch.testing.assert_close(mixed, reference[mixed_order])
    torch.testing.assert_close(again, reference[mixed_order])


def test_module_cache_respects_its_bound_in_bfloat16():
    torch.manual_seed(0)
    # room for one 4096-row block of 64 bf16 features (0.50 MiB), not two
    module = _HeadModule(
        backbone_kwargs=TINY, cache_eval_features=True, feature_cache_gb=0.75 / 1024, feature_cache_dtype="bfloat16"
    )
    images = torch.randn(4, 3, 32, 32)
    far_apart = torch.tensor([0, 1, 5000, 5001])  # two blocks
    with pytest.warns(UserWarning, match="feature cache is full"):
        module.batch_features({"images": images, "indices": far_apart}, "val")
    assert len(module._feature_cache) == 2 and module._feature_cache.nbytes <= 0.75 * 2**20
    served = module.batch_features({"images": images, "indices": far_apart}, "val")
    torch.testing.assert_close(served, module.features(images), rtol=2**-8, atol=1e-6)


def test_linear_probe_with_cached_train_features_embeds_each_image_once_and_trains_as_without():
    heads = {}
    for cached in (False, True):
        torch.manual_seed(0)
        probe = LinearProbe(3, backbone_kwargs=TINY, learning_rates=[0.1, 0.01], cache_train_features=cached)
        rows_seen: list[int] = []
        probe.backbone.register_forward_hook(lambda _module, args, _out, seen=rows_seen: seen.append(len(args[0])))
        loader = DataLoader(_Images(24), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
        _trainer(max_epochs=3).fit(probe, train_dataloaders=loader)
        assert sum(rows_seen) == (24 if cached else 72)
        heads[cached] = probe.heads.state_dict()
    for name, value in heads[False].items():
        torch.testing.assert_close(heads[True][name], value, rtol=1e-5, atol=1e-6)
