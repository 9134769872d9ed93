"""FrozenBackboneModule: features against hand-rolled computations, freezing during fit, cache, checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from dinov3_pl.models.backbone import DINOv3Backbone
from dinov3_pl.modules.frozen import FrozenBackboneModule

TINY = {"depth": 3, "embed_dim": 64, "num_heads": 2, "patch_size": 4, "img_size": 32}


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    return L.Trainer(**{**defaults, **kwargs})


class _Images(Dataset):
    def __init__(self, num: int = 24, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(num, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, 3, (num,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"images": self.images[index], "labels": self.labels[index], "indices": index}


class _HeadModule(FrozenBackboneModule):
    """Smallest useful subclass: a linear head on the features; records the backbone mode in every step."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.head = nn.Linear(self.feature_dim, 3)
        self.backbone_modes: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.backbone_modes.append(self.backbone.training)
        return F.cross_entropy(self.head(self.features(batch["images"])), batch["labels"])

    def validation_step(self, batch, batch_idx):
        self.head(self.batch_features(batch, "val"))

    def configure_optimizers(self):
        return torch.optim.SGD(self.trainable_parameters(), lr=0.1)


def _blocks_by_hand(backbone: DINOv3Backbone, images: torch.Tensor, upto: int) -> torch.Tensor:
    """Tokens after block ``upto`` (exclusive end), final norm applied; independent of get_intermediate_layers."""
    x, grid = backbone.prepare_tokens(images)
    rope = backbone._rope(grid)
    for block in backbone.vit.blocks[:upto]:
        x = block(x, rope=rope)
    return backbone.vit.norm(x)


def test_features_match_hand_computation():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    module = FrozenBackboneModule(backbone_kwargs=TINY, feature_type="cls_meanpatch", n_last_blocks=2)
    backbone = module.backbone
    prefix = 1 + backbone.num_storage_tokens
    last = _blocks_by_hand(backbone, images, 3)
    second_last = _blocks_by_hand(backbone, images, 2)
    with torch.no_grad():
        expected = torch.cat([second_last[:, 0], last[:, 0], last[:, prefix:].mean(1)], dim=1)
        torch.testing.assert_close(module.features(images), expected, rtol=1e-5, atol=1e-5)
        assert module.feature_dim == expected.shape[1] == 3 * 64
        torch.testing.assert_close(module.features(images, "cls", 1), last[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module.features(images, "meanpatch"), last[:, prefix:].mean(1), rtol=1e-5, atol=1e-5)
        maps = module.patch_maps(images, 1)
        assert maps.shape == (4, 64, 8, 8)
        # Map pixel (i, j) is patch token i * w + j.
        torch.testing.assert_close(maps[:, :, 2, 5], last[:, prefix + 2 * 8 + 5], rtol=1e-5, atol=1e-5)
        pair = module.patch_maps(images, [-2, -1], concat=False)
        torch.testing.assert_close(pair[0][:, :, 0, 0], second_last[:, prefix], rtol=1e-5, atol=1e-5)
        assert module.patch_maps(images, 2).shape == (4, 128, 8, 8)
    assert module.extract(images)["cls"].dtype == torch.float32
    assert not module.features(images).requires_grad  # frozen: no graph through the backbone


def test_backbone_frozen_and_in_eval_during_fit():
    torch.manual_seed(0)
    module = _HeadModule(backbone_kwargs=TINY, feature_type="cls_meanpatch")
    before = {name: value.clone() for name, value in module.backbone.state_dict().items()}
    head_before = module.head.weight.detach().clone()
    loader = DataLoader(_Images(), batch_size=8)
    _trainer(max_epochs=2, num_sanity_val_steps=1).fit(module, loader, DataLoader(_Images(8, 1), batch_size=8))
    # 2 epochs x 3 steps, with validation in between (Lightning calls .train() again after it).
    assert module.backbone_modes == [False] * 6
    for name, value in module.backbone.state_dict().items():
        assert torch.equal(value, before[name]), f"backbone {name} changed during fit"
    assert not torch.equal(module.head.weight, head_before)
    assert all(p.grad is None for p in module.backbone.parameters())
    assert {id(p) for p in module.trainable_parameters()} == {id(p) for p in module.head.parameters()}
    module.train()  # a plain .train() (user code, other Lightning versions) must not wake the backbone
    assert module.training and module.head.training and not module.backbone.training
    assert not any(m.training for m in module.backbone.modules())


def test_unfreeze_last_blocks_trains_only_those():
    torch.manual_seed(0)
    module = _HeadModule(backbone_kwargs=TINY)
    module.unfreeze_last_blocks(1)
    before = {name: value.clone() for name, value in module.backbone.named_parameters()}
    _trainer(max_steps=2).fit(module, DataLoader(_Images(), batch_size=8))
    changed = {name for name, value in module.backbone.named_parameters() if not torch.equal(value, before[name])}
    assert changed and all(name.startswith(("vit.blocks.2.", "vit.norm.")) for name in changed), changed
    assert any(name.startswith("vit.blocks.2.") for name in changed)
    module.train()
    assert not module.backbone.training and module.backbone.vit.blocks[2].training
    assert not module.backbone.vit.blocks[1].training
    module.unfreeze_last_blocks(-1)
    assert all(p.requires_grad for p in module.backbone.parameters())
    module.unfreeze_last_blocks(0)
    assert not any(p.requires_grad for p in module.backbone.parameters()) and module.backbone_frozen
    with pytest.raises(ValueError, match="num_blocks"):
        module.unfreeze_last_blocks(4)


def test_eval_feature_cache_skips_backbone_and_gives_same_features():
    torch.manual_seed(0)
    module = _HeadModule(backbone_kwargs=TINY, cache_eval_features=True)
    calls = []
    module.backbone.register_forward_hook(lambda *args: calls.append(1))
    data = _Images(12)
    batch = {"images": data.images, "labels": data.labels, "indices": torch.arange(12)}
    first = module.batch_features(batch, "val")
    assert len(calls) == 1
    second = module.batch_features(batch, "val")
    assert len(calls) == 1  # served from the cache
    torch.testing.assert_close(first, second)
    module.batch_features(batch, "train")  # training batches are augmented: not cached unless asked
    module.batch_features(batch, "train")
    module.batch_features(batch, "test")  # another stage: its own cache
    assert len(calls) == 4
    module.clear_feature_cache()
    module.batch_features(batch, "val")
    assert len(calls) == 5
    module.cache_train_features = True
    module.batch_features(batch, "train")
    module.batch_features(batch, "train")
    assert len(calls) == 6
    module.unfreeze_last_blocks(1)  # a trained backbone changes its features: no cache
    module.batch_features(batch, "val")
    assert len(calls) == 7


def test_checkpoint_leaves_out_frozen_backbone_and_restores_it(tmp_path):
    torch.manual_seed(0)
    source = DINOv3Backbone("vit_small_patch16_dinov3", **TINY)
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    module = _HeadModule(backbone_kwargs=TINY, weights=str(tmp_path / "backbone.pth"))
    trainer = _trainer(max_steps=1)
    trainer.fit(module, DataLoader(_Images(8), batch_size=8))
    trainer.save_checkpoint(tmp_path / "probe.ckpt")
    checkpoint = torch.load(tmp_path / "probe.ckpt", weights_only=False)
    assert not any(key.startswith("backbone.") for key in checkpoint["state_dict"])
    assert set(checkpoint["state_dict"]) == {"head.weight", "head.bias"}
    restored = _HeadModule.load_from_checkpoint(
        tmp_path / "probe.ckpt", backbone_kwargs=TINY, weights=str(tmp_path / "backbone.pth")
    )
    torch.testing.assert_close(restored.head.weight, module.head.weight)
    for name, value in source.state_dict().items():
        assert torch.equal(restored.backbone.state_dict()[name], value)


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="feature_type"):
        FrozenBackboneModule(backbone_kwargs=TINY, feature_type="patch")
    with pytest.raises(ValueError, match="n_last_blocks"):
        FrozenBackboneModule(backbone_kwargs=TINY, n_last_blocks=4)
    with pytest.raises(ValueError, match="n_last_blocks"):
        FrozenBackboneModule(backbone_kwargs=TINY, n_last_blocks=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_frozen_features_run_in_bf16_on_gpu_and_come_back_float32():
    torch.manual_seed(0)
    module = _HeadModule(backbone_kwargs=TINY).cuda()
    block_dtypes = []
    module.backbone.vit.blocks[0].register_forward_hook(lambda _m, _a, out: block_dtypes.append(out.dtype))
    images = torch.randn(4, 3, 32, 32, device="cuda")
    features = module.features(images)
    assert block_dtypes == [torch.bfloat16] and features.dtype == torch.float32
    with torch.autocast("cuda", enabled=False):
        reference = module.backbone(images)["cls"]
    torch.testing.assert_close(features, reference, rtol=0.05, atol=0.05)


def test_skipped_images_are_counted_logged_and_warned_per_stage():
    """Batches that report dropped unreadable images (``num_bad_images``, as the DataModules' collates do): the
    evaluation logs how many per stage and warns; a clean epoch logs nothing."""

    def loader(bad_per_batch: list[int]) -> DataLoader:
        data = _Images(4 * len(bad_per_batch))

        def collate(samples):
            batch = torch.utils.data.default_collate(samples)
            return {**batch, "num_bad_images": bad_per_batch[int(batch["indices"][0]) // 4]}

        return DataLoader(data, batch_size=4, collate_fn=collate)

    torch.manual_seed(0)
    module = _HeadModule(backbone_kwargs=TINY)
    trainer = _trainer(max_epochs=1, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match=r"val: 3 unreadable image\(s\) were skipped"):
        trainer.fit(module, train_dataloaders=loader([1, 0]), val_dataloaders=loader([2, 0, 1]))
    assert trainer.callback_metrics["data/bad_images_train"] == 1
    assert trainer.callback_metrics["data/bad_images_val"] == 3
    clean = _trainer()
    clean.validate(_HeadModule(backbone_kwargs=TINY), loader([0, 0]))
    assert "data/bad_images_val" not in clean.callback_metrics
