"""LinearProbe: linear classifiers on frozen DINOv3 features, a grid of learning rates trained in one pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from dinov3_pl.modules.frozen import FeatureType, FrozenBackboneModule, lr_factor

__all__ = ["DEFAULT_LEARNING_RATES", "LinearProbe"]

# Upstream dinov3/eval/linear.py grid (before scaling by batch size / 256).
DEFAULT_LEARNING_RATES: tuple[float, ...] = (
    1e-5,
    2e-5,
    5e-5,
    1e-4,
    2e-4,
    5e-4,
    1e-3,
    2e-3,
    5e-3,
    1e-2,
    2e-2,
    5e-2,
    0.1,
)


class LinearProbe(FrozenBackboneModule):
    """Linear classification on frozen features (upstream protocol): one ``nn.Linear`` head per learning rate.

    Every head sees the same features ([CLS, mean patch] by default) and is trained with its own learning rate
    (cross-entropy, SGD momentum 0.9 without weight decay, cosine decay to 0 per step, as upstream); the heads are
    independent because the backbone is frozen, so a grid of 13 learning rates costs one backbone pass per batch.
    At the end of each validation the best head is picked: ``linear/top1`` and ``linear/top5`` are its accuracies,
    ``linear/best_lr`` its learning rate, and ``linear/lr_<lr>/top1`` each head's. ``test`` reports
    ``linear/test_top1`` / ``linear/test_top5`` of the head that was best on the last validation (or of the best
    test head, with a warning, when there was no validation), plus per-head numbers.

    Fine-tuning: ``finetune_last_blocks=k`` (k > 0 the last k blocks and the final norm, -1 the whole backbone)
    trains those blocks too, with layer-wise learning-rate decay; it needs a single learning rate.

    Args:
        num_classes: number of classes.
        arch, weights, backbone_kwargs, feature_type, n_last_blocks, cache_eval_features: see
            ``FrozenBackboneModule`` (``feature_type="cls_meanpatch"`` and ``n_last_blocks=1`` are upstream's).
        learning_rates: one head per value; multiplied by global batch size / 256 when ``scale_lr_with_batch_size``.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adamw"``.
        weight_decay: on weights (not biases, norms, LayerScale gammas).
        warmup_steps: linear warm-up before the cosine decay.
        max_steps: steps of the cosine schedule; ``None`` takes the trainer's estimate.
        finetune_last_blocks: 0 = frozen probe; k > 0 or -1 unfreezes blocks (see above).
        layer_decay: fine-tuning LR factor per block below the top (upstream convention: block i of L gets
            ``layer_decay ** (L - i)``, patch embedding and tokens ``layer_decay ** (L + 1)``).
        cache_train_features: reuse train features across epochs; only correct when the train loader is not
            augmented (``ClassificationDataModule(train_augmentation=False)``).
        feature_cache_gb, feature_cache_dtype: bound (GiB per process, train and eval caches together) and storage
            type of the cached features; see ``FrozenBackboneModule``. ImageNet-1k train in bfloat16 takes 1.97 GB
            for ViT-S/16 and 5.25 GB for ViT-L/16 (``cls_meanpatch``); what does not fit is embedded every epoch.
    """

    def __init__(
        self,
        num_classes: int,
        arch: str | None = "vit_small_patch16_dinov3",
        weights: str | None = None,
        backbone_kwargs: dict | None = None,
        feature_type: FeatureType = "cls_meanpatch",
        n_last_blocks: int = 1,
        learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        scale_lr_with_batch_size: bool = True,
        warmup_steps: int = 0,
        max_steps: int | None = None,
        finetune_last_blocks: int = 0,
        layer_decay: float = 0.75,
        cache_train_features: bool = False,
        cache_eval_features: bool = False,
        feature_cache_gb: float = 4.0,
        feature_cache_dtype: Literal["float32", "bfloat16"] = "float32",
    ) -> None:
        super().__init__(
            arch=arch,
            weights=weights,
            backbone_kwargs=backbone_kwargs,
            feature_type=feature_type,
            n_last_blocks=n_last_blocks,
            cache_eval_features=cache_eval_features,
            feature_cache_gb=feature_cache_gb,
            feature_cache_dtype=feature_cache_dtype,
        )
        self.save_hyperparameters()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        learning_rates = [float(lr) for lr in learning_rates]
        if not learning_rates or min(learning_rates) <= 0:
            raise ValueError(f"learning_rates must be a non-empty list of positive numbers, got {learning_rates}")
        if finetune_last_blocks != 0 and len(learning_rates) != 1:
            raise ValueError("fine-tuning (finetune_last_blocks != 0) trains the backbone: give one learning rate")
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        self.num_classes = num_classes
        self.learning_rates = learning_rates
        self.cache_train_features = cache_train_features
        self.heads = nn.ModuleList(nn.Linear(self.feature_dim, num_classes) for _ in learning_rates)
        for head in self.heads:  # upstream init
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
        self.unfreeze_last_blocks(finetune_last_blocks)
        top_ks = (1, 5) if num_classes > 5 else (1,)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_top{k}": nn.ModuleList(
                    MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro") for _ in learning_rates
                )
                for stage in ("val", "test")
                for k in top_ks
            }
        )
        self.top_ks = top_ks
        self.register_buffer("best_head", torch.tensor(-1), persistent=True)

    # ------------------------------------------------------------------------------------ steps
    def forward(self, images: Tensor) -> Tensor:
        """Logits of the best head (the first before any validation) [B, C]."""
        head = self.heads[max(int(self.best_head), 0)]
        return head(self.features(images))

    def _check_labels(self, labels: Tensor) -> None:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"labels must be in [0, {self.num_classes}) for num_classes={self.num_classes}; "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labels = batch["labels"]
        self._check_labels(labels)
        features = self.batch_features(batch, "train")  # cached only with cache_train_features
        losses = [F.cross_entropy(head(features), labels) for head in self.heads]
        # Heads are independent (frozen features), so the sum trains each with its own gradient.
        loss = torch.stack(losses).sum()
        self.log("linear/train_loss", loss.detach() / len(losses), prog_bar=True, batch_size=len(labels))
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str, dataloader_idx: int) -> None:
        labels = batch["labels"]
        self._check_labels(labels)
        features = self.batch_features(batch, stage, dataloader_idx)
        for index, head in enumerate(self.heads):
            logits = head(features)
            for k in self.top_ks:
                self.metrics[f"{stage}_top{k}"][index].update(logits, labels)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val", dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test", dataloader_idx)

    def _collect(self, stage: str) -> dict[int, Tensor]:
        results = {}
        for k in self.top_ks:
            metrics = self.metrics[f"{stage}_top{k}"]
            results[k] = torch.stack([metric.compute() for metric in metrics])
            for metric in metrics:
                metric.reset()
        return results

    def _lr_name(self, index: int) -> str:
        return f"{self.learning_rates[index]:g}"

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for metrics in self.metrics.values():
                for metric in metrics:
                    metric.reset()
            return
        results = self._collect("val")
        best = int(results[1].argmax())
        self.best_head.fill_(best)
        logged = {"linear/top1": results[1][best], "linear/best_lr": float(self.learning_rates[best])}
        if 5 in results:
            logged["linear/top5"] = results[5][best]
        for index in range(len(self.heads)):
            logged[f"linear/lr_{self._lr_name(index)}/top1"] = results[1][index]
        # Already global (torchmetrics syncs); "max" of identical values stays exact, a mean over 3 ranks may not.
        self.log_dict(logged, sync_dist=True, reduce_fx="max")

    def on_test_epoch_end(self) -> None:
        results = self._collect("test")
        best = int(self.best_head)
        if best < 0:
            best = int(results[1].argmax())
            self.print("LinearProbe: no validation ran, so the reported head is the best on the test set itself")
        logged = {"linear/test_top1": results[1][best], "linear/test_best_lr": float(self.learning_rates[best])}
        if 5 in results:
            logged["linear/test_top5"] = results[5][best]
        for index in range(len(self.heads)):
            logged[f"linear/lr_{self._lr_name(index)}/test_top1"] = results[1][index]
        # Already global (torchmetrics syncs); "max" of identical values stays exact, a mean over 3 ranks may not.
        self.log_dict(logged, sync_dist=True, reduce_fx="max")

    # ------------------------------------------------------------------------------------ optimisation
    def _global_batch_size(self) -> int | None:
        datamodule = getattr(self.trainer, "datamodule", None)
        batch_size = getattr(datamodule, "batch_size", None)
        if batch_size is None:
            return None
        return int(batch_size) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def _lr_scale(self) -> float:
        if not self.hparams.scale_lr_with_batch_size:
            return 1.0
        batch_size = self._global_batch_size()
        if batch_size is None:
            self.print("LinearProbe: the datamodule has no `batch_size`; learning rates are used unscaled")
            return 1.0
        return batch_size / 256.0

    def _backbone_param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Layer-wise LR decay over the unfrozen backbone; no weight decay on biases, norms and gammas."""
        depth = self.backbone.depth
        decay = self.hparams.layer_decay
        # A TimmBackbone knows the stage of each parameter; a DINOv3 ViT's block is in the name.
        layers = self.backbone.parameter_layers() if hasattr(self.backbone, "parameter_layers") else None
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, param in self.backbone.named_parameters():
            if not param.requires_grad:
                continue
            if layers is not None:
                layer_scale = decay ** (depth - layers[name])
            elif name.startswith("vit.blocks."):
                layer_scale = decay ** (depth - int(name.split(".")[2]))
            elif name.startswith("vit.norm.") or name.startswith("vit.fc_norm."):
                layer_scale = 1.0
            else:  # patch embedding, cls/storage/mask tokens
                layer_scale = decay ** (depth + 1)
            no_decay = param.ndim < 2 or "gamma" in name or "norm" in name
            wd = 0.0 if no_decay else self.hparams.weight_decay
            groups.setdefault((base_lr * layer_scale, wd), []).append(param)
        return [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]

    def configure_optimizers(self) -> dict[str, Any]:
        scale = self._lr_scale()
        groups = []
        for head, lr in zip(self.heads, self.learning_rates, strict=True):
            groups.append({"params": [head.weight], "lr": lr * scale, "weight_decay": self.hparams.weight_decay})
            groups.append({"params": [head.bias], "lr": lr * scale, "weight_decay": 0.0})
        if not self.backbone_frozen:
            groups += self._backbone_param_groups(self.learning_rates[0] * scale)
        if self.hparams.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, momentum=self.hparams.momentum)
        else:
            optimizer = torch.optim.AdamW(groups)
        total = self.hparams.max_steps or int(self.trainer.estimated_stepping_batches)
        warmup = self.hparams.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, "cosine"))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and int(data_classes) != self.num_classes:
            raise ValueError(f"LinearProbe has num_classes={self.num_classes} but the data have {data_classes}")
