"""Fashion-MNIST end to end: DINOv3 pretraining, then frozen-backbone evaluation against baselines, in one command.

    python experiments/fashion_mnist/run.py --budget cpu     # ~30 min on 2 CPU cores
    python experiments/fashion_mnist/run.py --budget gpu     # the full recipe for one GPU

Stages (each writes ``results.json`` as soon as it finishes, so an interruption keeps what was measured):

1. ``pretrain``: ``DINOSSLModule`` on the 60k train images (labels unused) through the project's CLI with
   ``configs/pretrain/fashion_mnist[_cpu].yaml``; the final teacher is saved as ``<out>/final.ckpt``.
2. ``knn`` + ``linear``: frozen features of the train images (bank; a seeded subset under the CPU budget) and of the
   10k test images, for the pretrained teacher, the same backbone at random init and raw pixels. kNN
   (``KNNAccuracy``: cosine, T = 0.07, k = 10/20/200) on L2-normalised CLS and on [CLS, mean patch]; a linear probe
   (13-value LR grid of SGD heads, upstream's) on [CLS, mean patch], its LR picked on 10% of the bank held out.
3. ``seg`` + ``det``: Fashion-MNIST scenes (``dinov3_pl.data.scenes``); ``Segmentation`` (linear head, mIoU) and
   ``Detection`` (feature pyramid + Faster R-CNN, mAP@50) on the frozen pretrained vs random-init backbone.

Everything is logged under one TensorBoard root (``<out>/tb``) with run names that encode the configuration, and
``summary_<budget>/<method>`` runs carry hparams with the final metrics (TensorBoard's HPARAMS tab).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Threads that wait passively: with OpenMP's default spinning, 2 torch threads next to data-loader workers (or other
# processes) on a 2-core machine made small ops 10-30x slower than 1 thread (measured here). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from lightning import Trainer  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from dinov3_pl import viz  # noqa: E402
from dinov3_pl.callbacks.pca import pca_rgb  # noqa: E402
from dinov3_pl.cli import DINOv3CLI  # noqa: E402
from dinov3_pl.data.datasets import FashionMNIST, default_fashion_mnist_root  # noqa: E402
from dinov3_pl.data.dense import (  # noqa: E402
    CocoDetectionDataset,
    DetectionDataModule,
    SegmentationDataModule,
    SegmentationFolder,
)
from dinov3_pl.data.multicrop import EvalDataset, collate_eval  # noqa: E402
from dinov3_pl.data.scenes import ensure_fmnist_scenes  # noqa: E402
from dinov3_pl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform  # noqa: E402
from dinov3_pl.metrics import KNNAccuracy  # noqa: E402
from dinov3_pl.modules.detection import Detection  # noqa: E402
from dinov3_pl.modules.frozen import FrozenBackboneModule  # noqa: E402
from dinov3_pl.modules.linear_probe import DEFAULT_LEARNING_RATES  # noqa: E402
from dinov3_pl.modules.segmentation import Segmentation  # noqa: E402

KNN_KS = (10, 20, 200)
KNN_TEMPERATURE = 0.07
SEED = 0


@dataclass
class Budget:
    """Sizes of one experiment budget. Pretraining numbers live in the YAML config; the rest is evaluation."""

    pretrain_config: str
    pretrain_overrides: list[str] = field(default_factory=list)
    eval_size: int = 28  # eval resolution (the global crop size)
    bank_size: int | None = None  # kNN bank / linear train images (None: all 60k)
    test_size: int | None = None  # test queries (None: all 10k)
    linear_epochs: int = 100
    linear_batch_size: int = 256
    scenes: dict = field(default_factory=dict)  # build_fmnist_scenes arguments
    seg_epochs: int = 10
    seg_lr: float = 3e-3
    det_epochs: int = 12
    det_lr: float = 5e-4
    det_rpn_top_n: int = 300  # proposals kept after NMS (train and test)
    det_box_batch_size: int = 128  # sampled RoIs per image (their RoIAlign backward dominates CPU steps)
    dense_batch_size: int = 32
    pyramid_channels: int = 128
    representation_size: int = 512
    num_workers: int = 2
    batch_size: int = 500  # feature extraction


BUDGETS: dict[str, Budget] = {
    "cpu": Budget(
        pretrain_config="configs/pretrain/fashion_mnist_cpu.yaml",
        bank_size=20_000,
        linear_epochs=30,
        scenes={"num_train": 1000, "num_val": 300, "canvas_size": 56, "items": (1, 3), "scale_range": (0.7, 1.3)},
        seg_epochs=3,
        seg_lr=1e-2,
        det_epochs=2,
        det_lr=1e-3,
        det_rpn_top_n=150,
        det_box_batch_size=64,
        pyramid_channels=64,
        representation_size=128,
    ),
    "gpu": Budget(
        pretrain_config="configs/pretrain/fashion_mnist.yaml",
        eval_size=32,
        linear_epochs=100,
        scenes={"num_train": 2000, "num_val": 500, "canvas_size": 112, "items": (2, 5), "scale_range": (0.7, 1.6)},
        seg_epochs=20,
        det_epochs=24,
        num_workers=8,
        batch_size=1000,
    ),
    # Seconds, for tests: a 1-block ViT, a few steps, tiny scenes (use with small fake idx files).
    "smoke": Budget(
        pretrain_config="configs/pretrain/fashion_mnist_cpu.yaml",
        pretrain_overrides=[
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--trainer.max_time=null",
            "--trainer.log_every_n_steps=1",
            "--checkpoint.every_n_train_steps=3",
            "--model.init_args.backbone.timm_overrides={embed_dim: 32, depth: 1, num_heads: 2, patch_size: 4, "
            "img_size: 28}",
            "--model.init_args.dino_head={num_prototypes: 64, hidden_dim: 32, bottleneck_dim: 16}",
            "--model.init_args.ibot_head={num_prototypes: 64, hidden_dim: 32, bottleneck_dim: 16}",
            "--model.init_args.optim.warmup_steps=1",
            "--model.init_args.optim.freeze_last_layer_steps=1",
            "--model.init_args.teacher.temperature_warmup_steps=1",
            "--data.init_args.batch_size=16",
            "--data.init_args.num_workers=0",
            "--data.init_args.knn_bank_size=64",
            "--data.init_args.knn_query_size=32",
        ],
        bank_size=100,
        test_size=60,
        linear_epochs=2,
        scenes={"num_train": 8, "num_val": 4, "canvas_size": 32, "items": (1, 2), "scale_range": (0.8, 1.0)},
        seg_epochs=1,
        det_epochs=1,
        dense_batch_size=4,
        pyramid_channels=16,
        representation_size=32,
        num_workers=0,
        batch_size=64,
    ),
}


# ------------------------------------------------------------------------------------------------ bookkeeping
class Results:
    """``results.json`` in the format ``notebooks/fashion_mnist_results.ipynb`` reads, rewritten after every stage."""

    def __init__(self, path: Path, budget: str, protocol: dict, tensorboard_dir: str, hardware: str) -> None:
        self.path, self.start = path, time.time()
        self.data: dict[str, Any] = {
            "budget": budget,
            "protocol": protocol,
            "rows": [],
            "stage_times_s": {},
            "details": {},
            "wall_time_s": None,
            "hardware": hardware,
            "tensorboard_dir": tensorboard_dir,
            "complete": False,
        }

    def row(self, method: str) -> dict:
        for row in self.data["rows"]:
            if row["method"] == method:
                return row
        row = {"method": method}
        self.data["rows"].append(row)
        return row

    def update(self, method: str, **metrics: float | None) -> None:
        self.row(method).update({k: None if v is None else round(float(v), 5) for k, v in metrics.items()})
        self.save()

    def detail(self, method: str, **values: Any) -> None:
        """Numbers kept out of the table (best LR, alternative banks, ...)."""
        self.data["details"].setdefault(method, {}).update(values)
        self.save()

    def stage_done(self, stage: str, seconds: float) -> None:
        self.data["stage_times_s"][stage] = round(seconds, 1)
        self.save()

    def save(self, complete: bool = False) -> None:
        self.data["wall_time_s"] = round(time.time() - self.start, 1)
        self.data["complete"] = complete
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def hardware_description() -> str:
    if torch.cuda.is_available():
        return f"1x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return (
        f"CPU only ({os.cpu_count()} cores, {cpu}, torch threads {torch.get_num_threads()}), torch {torch.__version__}"
    )


def _as_dict(value: Any) -> dict:
    return dict(value) if isinstance(value, dict) else asdict(value)


def relative_to_repo(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path.resolve())


# ------------------------------------------------------------------------------------------------ 1. pretraining
def pretrain(budget: Budget, name: str, out: Path, tb_root: Path, fmnist_root: str) -> tuple[Path, dict]:
    """Runs the SSL recipe through the project's CLI; returns the final checkpoint and a summary of the config."""
    args = [
        f"--config={REPO_ROOT / budget.pretrain_config}",
        f"--trainer.default_root_dir={out}",
        f"--data.init_args.train.init_args.root={fmnist_root}",
        f"--data.init_args.knn_queries.init_args.root={fmnist_root}",
        *budget.pretrain_overrides,
    ]
    cli = DINOv3CLI(args=args, run=False)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    timm = dict(model.backbone_config.timm_overrides)
    steps = trainer.max_steps if trainer.max_steps > 0 else f"{trainer.max_epochs}ep"
    dhp = data.hparams
    run_name = (
        f"ssl_{name}_e{timm.get('embed_dim')}d{timm.get('depth')}p{timm.get('patch_size')}"
        f"_g{dhp.global_size}l{dhp.local_size}x{dhp.num_local_crops}_b{dhp.batch_size}_s{steps}"
    )
    # One log root for every run of the experiment; the run name says what was trained.
    trainer.loggers = [TensorBoardLogger(str(tb_root), name=run_name, version="", default_hp_metric=False)]
    trainer.fit(model, datamodule=data)
    final = out / "final.ckpt"
    trainer.save_checkpoint(str(final))
    summary = {
        "run_name": run_name,
        "config": budget.pretrain_config,
        "overrides": budget.pretrain_overrides,
        "arch": model.backbone_config.arch,
        "timm_overrides": timm,
        "optimizer_steps": int(trainer.global_step),
        "max_steps": trainer.max_steps,
        "epochs_seen": round(trainer.global_step * dhp.batch_size / len(data.train_dataset), 2),
        "batch_size": dhp.batch_size,
        "global_size": dhp.global_size,
        "local_size": dhp.local_size,
        "num_local_crops": dhp.num_local_crops,
        "global_scale": list(dhp.global_scale),
        "local_scale": list(dhp.local_scale),
        "dino_head": _as_dict(model.hparams.dino_head),
        "ibot_head": _as_dict(model.hparams.ibot_head),
        "lr_base": model.optim_config.lr,
        "lr_peak_after_sqrt_scaling": getattr(model.lr_schedule, "peak", None),
        "warmup_steps": model.optim_config.warmup_steps,
        "teacher_momentum": [model.teacher_config.momentum, model.teacher_config.momentum_end],
        "teacher_temperature": [model.teacher_config.temperature_warmup_start, model.teacher_config.temperature],
        "loss_weights": {
            "dino": model.loss_config.dino_weight,
            "ibot": model.loss_config.ibot_weight,
            "koleo": model.loss_config.koleo_weight,
        },
    }
    return final, summary


# ------------------------------------------------------------------------------------------------ 2. kNN + linear
def seeded_indices(total: int, size: int | None, seed: int) -> np.ndarray:
    """A sorted seeded subset of ``range(total)`` (everything when ``size`` is None or too large)."""
    if size is None or size >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).permutation(total)[:size])


def build_backbone_module(checkpoint: Path | None, timm_overrides: dict, arch: str):
    """A ``FrozenBackboneModule``: the pretrained teacher from ``checkpoint``, or the same ViT at random init."""
    if checkpoint is not None:
        return FrozenBackboneModule(arch=None, weights=str(checkpoint))
    torch.manual_seed(SEED)
    return FrozenBackboneModule(arch=arch, weights=None, backbone_kwargs=timm_overrides)


@torch.no_grad()
def extract_features(module, dataset, budget: Budget, device: torch.device) -> tuple[Tensor, Tensor]:
    """[CLS, mean patch] features (float32, CPU) and labels of ``dataset`` (``EvalDataset`` samples)."""
    module.to(device).eval()
    loader = DataLoader(
        dataset, batch_size=budget.batch_size, shuffle=False, num_workers=budget.num_workers, collate_fn=collate_eval
    )
    features, labels = [], []
    for batch in loader:
        features.append(module.features(batch["images"].to(device), "cls_meanpatch").cpu())
        labels.append(batch["labels"])
    return torch.cat(features), torch.cat(labels)


def knn_accuracy(bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor) -> dict[str, float]:
    """Top-1 accuracy per k with the project's ``KNNAccuracy`` (cosine, temperature-weighted vote)."""
    metric = KNNAccuracy(ks=KNN_KS, temperature=KNN_TEMPERATURE, num_classes=10)
    metric.update(bank, bank_labels, bank=True)
    metric.update(queries, query_labels, bank=False)
    result = metric.compute()
    return {f"top1_k{k}": float(result[f"top1_k{k}"]) for k in KNN_KS}


def linear_probe(
    train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, epochs: int, batch_size: int
) -> dict[str, float]:
    """Upstream's linear protocol on frozen features: one linear head per LR of the 13-value grid (SGD momentum 0.9,
    no weight decay, cosine to 0, LR × batch/256), the best LR chosen on 10% of the train features held out, then
    evaluated once on the test features. Features are computed once (no augmentation)."""
    generator = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(train), generator=generator)
    num_val = max(1, len(train) // 10)
    val_idx, fit_idx = order[:num_val], order[num_val:]
    x_fit, y_fit, x_val, y_val = train[fit_idx], train_labels[fit_idx], train[val_idx], train_labels[val_idx]
    # All heads as one batched weight tensor [H, D, C]: one matmul per step instead of one per head (on a shared
    # CPU, many tiny ops cost far more than their FLOPs). SGD with momentum written out, one LR per head.
    lrs = torch.tensor([lr * batch_size / 256 for lr in DEFAULT_LEARNING_RATES])
    num_heads, num_classes = len(lrs), int(max(train_labels.max(), test_labels.max())) + 1
    weight = (torch.randn(num_heads, train.shape[1], num_classes, generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(num_heads, 1, num_classes, requires_grad=True)
    buffers = [torch.zeros_like(weight), torch.zeros_like(bias)]
    steps_per_epoch = math.ceil(len(x_fit) / batch_size)
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        permutation = torch.randperm(len(x_fit), generator=generator)
        for start in range(0, len(x_fit), batch_size):
            idx = permutation[start : start + batch_size]
            logits = torch.einsum("nd,hdc->hnc", x_fit[idx], weight) + bias
            # Sum over heads of each head's mean cross-entropy: every head gets its own gradient.
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, num_classes), y_fit[idx].repeat(num_heads), reduction="sum"
            ) / len(idx)
            grads = torch.autograd.grad(loss, [weight, bias])
            factor = 0.5 * (1 + math.cos(math.pi * step / total))
            with torch.no_grad():
                for param, grad, buffer in zip((weight, bias), grads, buffers, strict=True):
                    buffer.mul_(0.9).add_(grad)
                    param.sub_((lrs * factor).view(-1, 1, 1) * buffer)
            step += 1
    with torch.no_grad():
        predict = lambda x: (torch.einsum("nd,hdc->hnc", x, weight) + bias).argmax(-1)
        val_acc = (predict(x_val) == y_val).float().mean(dim=1)
        best = int(val_acc.argmax())
        test_acc = float((predict(test)[best] == test_labels).float().mean())
    return {
        "linear_top1": test_acc,
        "linear_val_top1": float(val_acc[best]),
        "linear_best_lr": DEFAULT_LEARNING_RATES[best],
    }


def log_pca_maps(module, images: Tensor, logger, tag: str, device: torch.device) -> None:
    """Images above the first 3 PCA components of the backbone's patch features, as one TensorBoard image."""
    module.to(device).eval()
    with torch.no_grad():
        patch = module.extract(images.to(device))["patch"].cpu()
    side = images.shape[-1] // module.patch_size
    maps = torch.nn.functional.interpolate(pca_rgb(patch, (side, side)), size=images.shape[-2:], mode="nearest")
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    shown = (images * std + mean).clamp(0, 1)
    logger.experiment.add_image(tag, make_grid(torch.cat([shown, maps]), nrow=len(images), padding=1), 0)
    logger.experiment.flush()


def classification_stage(
    budget: Budget, name: str, fmnist_root: str, checkpoint: Path, backbone: dict, results: Results, tb_root: Path
) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_set, test_set = FashionMNIST(fmnist_root, train=True), FashionMNIST(fmnist_root, train=False)
    bank_idx = seeded_indices(len(train_set), budget.bank_size, SEED)
    test_idx = seeded_indices(len(test_set), budget.test_size, SEED + 1)
    bank_labels = torch.as_tensor(train_set.labels[bank_idx])
    test_labels = torch.as_tensor(test_set.labels[test_idx])

    # Raw pixels (uint8 values as a vector): the classic baseline, on the same bank and on the full train set.
    pixels = lambda data, idx: torch.as_tensor(data.images[idx].reshape(len(idx), -1), dtype=torch.float32)
    raw_bank, raw_test = pixels(train_set, bank_idx), pixels(test_set, test_idx)
    raw = knn_accuracy(raw_bank, bank_labels, raw_test, test_labels)
    metrics = {f"knn_{k}": v for k, v in raw.items()}
    if len(bank_idx) < len(train_set):
        full_idx = np.arange(len(train_set))
        full = knn_accuracy(pixels(train_set, full_idx), torch.as_tensor(train_set.labels), raw_test, test_labels)
        results.detail("raw pixels", knn_full_60k_bank=full)
    linear = linear_probe(
        raw_bank / 255, bank_labels, raw_test / 255, test_labels, budget.linear_epochs, budget.linear_batch_size
    )
    results.update("raw pixels", **metrics, linear_top1=linear.pop("linear_top1"))
    results.detail("raw pixels", **linear)
    print(f"[fashion_mnist] raw pixels: {results.row('raw pixels')}", flush=True)

    transform = EvalTransform(budget.eval_size, resize_size=budget.eval_size)
    bank_data = EvalDataset(Subset(train_set, bank_idx.tolist()), transform)
    test_data = EvalDataset(Subset(test_set, test_idx.tolist()), transform)
    pca_images = torch.stack([test_data[i][0] for i in range(min(8, len(test_data)))])
    pca_logger = TensorBoardLogger(str(tb_root), name=f"pca_{name}", version="", default_hp_metric=False)
    for label, ckpt in (("random init", None), ("DINOv3 pretrained", checkpoint)):
        module = build_backbone_module(ckpt, backbone["timm_overrides"], backbone["arch"])
        log_pca_maps(module, pca_images, pca_logger, "pretrained" if ckpt else "random_init", device)
        bank, bank_y = extract_features(module, bank_data, budget, device)
        test, test_y = extract_features(module, test_data, budget, device)
        dim = module.embed_dim
        cls_knn = knn_accuracy(bank[:, :dim], bank_y, test[:, :dim], test_y)
        both_knn = knn_accuracy(bank, bank_y, test, test_y)
        linear = linear_probe(bank, bank_y, test, test_y, budget.linear_epochs, budget.linear_batch_size)
        results.update(f"{label}, CLS", **{f"knn_{k}": v for k, v in cls_knn.items()})
        method = f"{label}, [CLS, mean patch]"
        results.update(method, **{f"knn_{k}": v for k, v in both_knn.items()}, linear_top1=linear.pop("linear_top1"))
        results.detail(method, **linear)
        print(f"[fashion_mnist] {label}: CLS {cls_knn}, [CLS, mean patch] {results.row(method)}", flush=True)


# ------------------------------------------------------------------------------------------------ 3. seg + det
def dense_stage(
    budget: Budget,
    name: str,
    fmnist_root: str,
    checkpoint: Path,
    backbone: dict,
    results: Results,
    tb_root: Path,
    out: Path,
) -> None:
    """Linear segmentation (mIoU) and Faster R-CNN detection (mAP@50) on Fashion-MNIST scenes, frozen backbones."""

    scenes = dict(budget.scenes)
    canvas = scenes["canvas_size"]
    root = out / f"scenes_{scenes['num_train']}x{scenes['num_val']}_{canvas}px"
    ensure_fmnist_scenes(
        root,
        fmnist_root,
        num_train=scenes.pop("num_train"),
        num_val=scenes.pop("num_val"),
        seed=SEED,
        **{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in scenes.items()},
    )

    def trainer(task: str, version: str, epochs: int) -> Trainer:
        return Trainer(
            max_epochs=epochs,
            accelerator="auto",
            devices=1,
            logger=TensorBoardLogger(str(tb_root), name=f"{task}_{name}", version=version, default_hp_metric=False),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            check_val_every_n_epoch=epochs,  # evaluate once, at the end
            log_every_n_steps=5,
            gradient_clip_val=5.0 if task == "det" else None,
        )

    for label, ckpt in (("random init", None), ("DINOv3 pretrained", checkpoint)):
        version = "pretrained" if ckpt else "random_init"
        spec = {"arch": None, "weights": str(ckpt)} if ckpt else {"arch": backbone["arch"], "weights": None}
        spec["backbone_kwargs"] = None if ckpt else backbone["timm_overrides"]
        method = f"{label}, [CLS, mean patch]"

        torch.manual_seed(SEED)  # the same random-init backbone as in the classification stage
        segmentation = Segmentation(
            num_classes=11,
            **spec,
            inference="whole",
            lr=budget.seg_lr,
            weight_decay=1e-3,
            schedule="cosine",
            warmup_steps=10,
            log_images_every_n_epochs=1,
        )
        seg_data = SegmentationDataModule(
            train=SegmentationFolder(root, "training", num_classes=11),
            val=SegmentationFolder(root, "validation", num_classes=11),
            image_size=canvas,
            scale_range=(0.75, 1.25),
            batch_size=budget.dense_batch_size,
            num_workers=budget.num_workers,
            seed=SEED,
        )
        seg_trainer = trainer("seg", version, budget.seg_epochs)
        seg_trainer.fit(segmentation, datamodule=seg_data)
        results.update(method, seg_miou=float(seg_trainer.callback_metrics["val/mIoU"]))
        results.detail(method, seg_pixel_accuracy=float(seg_trainer.callback_metrics["val/pixel_accuracy"]))

        torch.manual_seed(SEED)
        detection = Detection(
            num_classes=10,
            class_names=list(FashionMNIST.class_names),
            **spec,
            pyramid_channels=budget.pyramid_channels,
            representation_size=budget.representation_size,
            anchor_scale=4.0,
            rpn_post_nms_top_n_train=budget.det_rpn_top_n,
            rpn_post_nms_top_n_test=budget.det_rpn_top_n,
            box_batch_size_per_image=budget.det_box_batch_size,
            lr=budget.det_lr,
            weight_decay=1e-4,
            schedule="cosine",
            warmup_steps=20,
            log_images_every_n_epochs=1,
        )
        det_data = DetectionDataModule(
            train=CocoDetectionDataset(root / "images", root / "instances_train.json"),
            val=CocoDetectionDataset(root / "images", root / "instances_val.json"),
            image_size=canvas,
            scale_range=(0.8, 1.25),
            batch_size=budget.dense_batch_size,
            num_workers=budget.num_workers,
            seed=SEED,
        )
        det_trainer = trainer("det", version, budget.det_epochs)
        det_trainer.fit(detection, datamodule=det_data)
        results.update(method, det_map50=float(det_trainer.callback_metrics["val/mAP50"]))
        results.detail(method, det_map=float(det_trainer.callback_metrics["val/mAP"]))
        print(f"[fashion_mnist] {method}: {results.row(method)}", flush=True)


# ------------------------------------------------------------------------------------------------ hparams, figures
def log_hparams_summary(results: Results, name: str, tb_root: Path, pretrain_summary: dict, budget: Budget) -> None:
    """One ``summary_<budget>/<method>`` run per table row with hparams and final metrics (HPARAMS tab)."""
    timm = pretrain_summary.get("timm_overrides", {})
    for row in results.data["rows"]:
        slug = re.sub(r"[^a-z0-9]+", "_", row["method"].lower()).strip("_")
        params = {
            "budget": name,
            "method": row["method"],
            "pretrain_run": pretrain_summary.get("run_name", ""),
            "pretrain_steps": pretrain_summary.get("optimizer_steps", 0),
            "batch_size": pretrain_summary.get("batch_size", 0),
            "embed_dim": timm.get("embed_dim", 0),
            "depth": timm.get("depth", 0),
            "patch_size": timm.get("patch_size", 0),
            "knn_bank_size": budget.bank_size or 60_000,
        }
        metrics = {f"hp/{k}": v for k, v in row.items() if k != "method" and v is not None}
        logger = TensorBoardLogger(str(tb_root), name=f"summary_{name}", version=slug, default_hp_metric=False)
        logger.log_hyperparams(params, metrics)
        logger.finalize("success")


def render_figures(tb_root: Path, name: str, figures_dir: Path) -> list[Path]:
    """Small PNGs of the TensorBoard logs: pretraining losses, the kNN monitor, PCA maps, seg/det overlays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    pretrain_runs = sorted(p for p in tb_root.glob(f"ssl_{name}_*") if p.is_dir())
    panels = {
        "losses": ["train/loss_total", "train/dino_global", "train/dino_local", "train/ibot", "train/koleo"],
        "knn_monitor": ["knn/top1_k10", "knn/top1_k20"],
        "schedules": ["schedule/lr", "schedule/teacher_temperature", "schedule/momentum"],
    }
    if pretrain_runs:
        scalars = viz.read_tensorboard_scalars(pretrain_runs[-1])
        for panel, tags in panels.items():
            figure = viz.plot_scalars(scalars, tags, columns=min(3, len(tags)))
            if figure is not None:
                figure.set_size_inches(3.2 * min(3, len(tags)), 2.4 * math.ceil(len(tags) / 3))
                figure.tight_layout()
                path = figures_dir / f"{name}_{panel}.png"
                figure.savefig(path, dpi=80)
                plt.close(figure)
                written.append(path)
    images = []
    for run, tag, title in (
        (f"pca_{name}", "random_init", "random init: test images / PCA of patch features"),
        (f"pca_{name}", "pretrained", "DINOv3 pretrained teacher: PCA of patch features"),
        (f"seg_{name}/pretrained", "val/segmentation", "segmentation (pretrained): image | truth | prediction"),
        (f"det_{name}/pretrained", "val/detection", "detection (pretrained): truth | prediction"),
    ):
        folder = tb_root / run
        logged = viz.read_tensorboard_image(folder, tag) if folder.exists() else None
        if logged is not None:
            images.append((logged[0], title, tag))
    for group, keep in (("pca", ("random_init", "pretrained")), ("dense", ("val/segmentation", "val/detection"))):
        chosen = [(image, title) for image, title, tag in images if tag in keep]
        if not chosen:
            continue
        # PCA strips stack vertically; the tall seg/det overlay grids sit side by side.
        shape, size = ((len(chosen), 1), (8, 2.2 * len(chosen))) if group == "pca" else ((1, len(chosen)), (8, 5.5))
        figure, axes = plt.subplots(*shape, figsize=size)
        for axis, (image, title) in zip(np.atleast_1d(axes), chosen, strict=True):
            axis.imshow(image)
            axis.set_title(title, fontsize=9)
            axis.axis("off")
        figure.tight_layout()
        path = figures_dir / f"{name}_{group}.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="cpu: ~30 min on 2 cores; gpu: 1 GPU")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/fashion_mnist/<budget>)")
    parser.add_argument("--fmnist-root", default=None, help="Fashion-MNIST idx files (default: the Debian copy)")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="results.json path (default experiments/fashion_mnist/results/<budget>/results.json; "
        "smoke: <out>/results.json)",
    )
    parser.add_argument(
        "--figures-dir",
        type=Path,
        default=None,
        help="PNG figures (default experiments/fashion_mnist/figures; smoke: <out>/figures)",
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="skip pretraining: evaluate this .ckpt")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=("classification", "dense"),
        default=["classification", "dense"],
        help="evaluation stages to run; with a subset (and --checkpoint), rows already in the results file are kept",
    )
    options = parser.parse_args(argv)

    budget = BUDGETS[options.budget]
    name = options.budget
    out = (options.out or REPO_ROOT / "runs" / "fashion_mnist" / name).resolve()
    publish = name != "smoke"
    results_path = options.results or (
        REPO_ROOT / "experiments" / "fashion_mnist" / "results" / name / "results.json"
        if publish
        else out / "results.json"
    )
    figures_dir = options.figures_dir or (
        REPO_ROOT / "experiments" / "fashion_mnist" / "figures" if publish else out / "figures"
    )
    fmnist_root = options.fmnist_root or default_fashion_mnist_root()
    if fmnist_root is None:
        parser.error("Fashion-MNIST not found: pass --fmnist-root (or apt-get install dataset-fashion-mnist)")
    if options.threads:
        torch.set_num_threads(options.threads)
    out.mkdir(parents=True, exist_ok=True)
    tb_root = out / "tb"

    protocol = {
        "data": "Fashion-MNIST: pretraining on the 60k train images without labels; evaluation on the 10k test images",
        "budget": asdict(budget),
        "knn": {
            "ks": list(KNN_KS),
            "temperature": KNN_TEMPERATURE,
            "similarity": "cosine (L2-normalised)",
            "bank": f"{budget.bank_size or 60_000} train images (seed {SEED})",
            "queries": f"{budget.test_size or 10_000} test images",
        },
        "linear": {
            "features": "[CLS, mean patch] (raw pixels: uint8/255)",
            "learning_rates": list(DEFAULT_LEARNING_RATES),
            "optimizer": "SGD momentum 0.9, no weight decay, cosine to 0, LR x batch/256",
            "epochs": budget.linear_epochs,
            "batch_size": budget.linear_batch_size,
            "selection": "best LR on 10% of the bank held out; test evaluated once",
            "augmentation": "none (features computed once)",
        },
        "eval_transform": f"resize to {budget.eval_size} px (bicubic), ImageNet mean/std",
        "seed": SEED,
    }
    results = Results(results_path, name, protocol, relative_to_repo(tb_root), hardware_description())
    previous = {}
    if len(options.stages) < 2 and results_path.is_file():
        previous = json.loads(results_path.read_text())
        if previous.get("budget") != name:
            parser.error(f"{results_path} holds budget {previous.get('budget')!r}, not {name!r}")
        for key in ("rows", "details", "stage_times_s"):
            results.data[key] = previous.get(key, results.data[key])
        results.start -= previous.get("wall_time_s") or 0.0  # the wall time adds up over the partial runs
    print(f"[fashion_mnist] budget {name}: writing {results_path}, logs under {tb_root}", flush=True)

    start = time.time()
    if options.checkpoint is None:
        checkpoint, summary = pretrain(budget, name, out, tb_root, fmnist_root)
    else:
        checkpoint = options.checkpoint.resolve()
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        summary = {
            "run_name": f"reused {checkpoint.name}",
            **saved.get("backbone_config", {}),
            "optimizer_steps": int(saved.get("global_step", 0)),
        }
    backbone = {"arch": summary.get("arch"), "timm_overrides": summary.get("timm_overrides", {})}
    results.data["protocol"]["pretraining"] = previous.get("protocol", {}).get("pretraining", summary)
    if options.checkpoint is None:
        results.stage_done("pretrain", time.time() - start)

    if "classification" in options.stages:
        start = time.time()
        classification_stage(budget, name, fmnist_root, checkpoint, backbone, results, tb_root)
        results.stage_done("knn_linear", time.time() - start)

    if "dense" in options.stages:
        start = time.time()
        dense_stage(budget, name, fmnist_root, checkpoint, backbone, results, tb_root, out)
        results.stage_done("seg_det", time.time() - start)
    results.data["protocol"]["dense"] = {
        "scenes": budget.scenes,
        "segmentation": f"linear head (BN + 1x1 conv) on last-layer patch tokens, AdamW lr {budget.seg_lr}, "
        f"{budget.seg_epochs} epochs, batch {budget.dense_batch_size}, whole-image inference, mIoU over 11 classes",
        "detection": f"simple feature pyramid + Faster R-CNN (our protocol, not upstream's Plain-DETR), AdamW lr "
        f"{budget.det_lr}, {budget.det_epochs} epochs, batch {budget.dense_batch_size}, COCO mAP@50",
    }

    log_hparams_summary(results, name, tb_root, summary, budget)
    written = render_figures(tb_root, name, figures_dir)
    results.data["figures"] = [relative_to_repo(p) for p in written]
    results.save(complete=True)
    print(f"[fashion_mnist] done in {results.data['wall_time_s'] / 60:.1f} min: {results_path}", flush=True)
    return results.data


if __name__ == "__main__":
    main()
