"""Distillation on real data (Fashion-MNIST, 2 CPU cores): a teacher pretrained by DINOv3 SSL, distilled into a ViT of
a quarter of its FLOPs and into a small timm CNN, each for a fixed wall time, against the same students pretrained
by SSL from scratch for the same wall time, and at random init.

    python experiments/distillation/run.py --teacher runs/fashion_mnist/cpu/checkpoints/last.ckpt --minutes 10
    python experiments/distillation/run.py --minutes 10    # pretrains the teacher first (the Fashion-MNIST CPU budget)

Stages (``results.json`` is rewritten after each):

1. teacher: ``--teacher`` (a DINOSSLModule checkpoint), or ``configs/pretrain/fashion_mnist_cpu.yaml`` run here.
2. students, ``--minutes`` of training each (``trainer.max_time``; configs in ``experiments/distillation/configs``):
   ``distill_vit`` (DistillationModule, the teacher's heads), ``ssl_vit`` (DINOSSLModule from scratch),
   ``distill_cnn`` (FeatureDistillationModule into timm ``resnet10t``), ``ssl_cnn`` (DINO from scratch, no iBOT).
3. evaluation of each backbone a checkpoint records (the students' EMAs, the SSL runs' EMA teachers) and of the
   student architectures at random init, with the Fashion-MNIST CPU protocol (experiments/fashion_mnist/run.py):
   kNN (k = 10, 20; cosine, T = 0.07) on CLS and on [CLS, mean patch] with a 20k seeded train bank and the 10k test
   images; a linear probe on [CLS, mean patch] (13-value LR grid, 30 epochs); FLOPs per image
   (``torch.utils.flop_counter``) and images/s of a batch-256 forward. ViTs see 28 px images, the CNN 32 px.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/fashion_mnist/run.py

import torch  # noqa: E402
from torch.utils.data import Subset  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dinov3_pl.cli import main as cli_main  # noqa: E402
from dinov3_pl.data.datasets import FashionMNIST, default_fashion_mnist_root  # noqa: E402
from dinov3_pl.data.multicrop import EvalDataset  # noqa: E402
from dinov3_pl.data.transforms import EvalTransform  # noqa: E402
from dinov3_pl.modules.frozen import FrozenBackboneModule  # noqa: E402
from experiments.fashion_mnist.run import (  # noqa: E402
    BUDGETS,
    SEED,
    extract_features,
    hardware_description,
    knn_accuracy,
    linear_probe,
    seeded_indices,
)

CONFIGS = REPO_ROOT / "experiments" / "distillation" / "configs"
STUDENTS = {  # run name -> (config, architecture for the random-init row, eval image size)
    "distill_vit": ("distill_vit.yaml", "vit", 28),
    "ssl_vit": ("ssl_vit.yaml", "vit", 28),
    "distill_cnn": ("distill_cnn.yaml", "cnn", 32),
    "ssl_cnn": ("ssl_cnn.yaml", "cnn", 32),
}
ARCHITECTURES = {
    "vit": (
        "vit_small_patch16_dinov3",
        {"embed_dim": 64, "depth": 4, "num_heads": 2, "patch_size": 4, "img_size": 28, "init_values": 0.1},
    ),
    "cnn": ("resnet10t", {"output_stride": 16}),
}


def train(name: str, config: str, out: Path, minutes: float, teacher: Path | None, extra: list[str]) -> Path:
    args = [
        "fit",
        f"--config={CONFIGS / '_trainer.yaml'}",
        f"--config={CONFIGS / '_data.yaml'}",
        f"--config={CONFIGS / config}",
        f"--trainer.max_time=00:00:{int(minutes):02d}:{int(minutes % 1 * 60):02d}",
        f"--trainer.default_root_dir={out / name}",
        f"--trainer.logger={{class_path: lightning.pytorch.loggers.TensorBoardLogger, init_args: "
        f"{{save_dir: {out / 'tb'}, name: {name}, version: ''}}}}",
        f"--checkpoint.dirpath={out / name / 'checkpoints'}",
        *extra,
    ]
    if teacher is not None and "distill" in name:
        args.append(f"--model.init_args.teacher.weights={teacher}")
    started = time.perf_counter()
    cli = cli_main(args)
    seconds = time.perf_counter() - started
    print(f"[distillation] {name}: {cli.trainer.global_step} steps in {seconds:.0f} s", flush=True)
    # The state when max_time stopped the run (the periodic last.ckpt can be up to 100 steps older).
    final = out / name / "final.ckpt"
    cli.trainer.save_checkpoint(final)
    return final


def throughput_and_flops(module: FrozenBackboneModule, size: int) -> dict[str, float]:
    images = torch.randn(256, 3, size, size)
    module.eval()
    with torch.no_grad():
        module.extract(images)  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            module.extract(images)
            times.append(time.perf_counter() - start)
        with FlopCounterMode(display=False) as counter:
            module.extract(images[:1])
    return {"mflops_per_image": counter.get_total_flops() / 1e6, "images_per_s": 256 / sorted(times)[1]}


def evaluate(label: str, module: FrozenBackboneModule, size: int, data: dict, results: dict) -> None:
    budget = BUDGETS["cpu"]
    transform = EvalTransform(size, resize_size=size)
    train_set, test_set, bank_idx, test_idx = data["train"], data["test"], data["bank_idx"], data["test_idx"]
    bank_data = EvalDataset(Subset(train_set, bank_idx.tolist()), transform)
    test_data = EvalDataset(Subset(test_set, test_idx.tolist()), transform)
    device = torch.device("cpu")
    bank, bank_y = extract_features(module, bank_data, budget, device)
    test, test_y = extract_features(module, test_data, budget, device)
    cls_dim = bank.shape[1] - module.embed_dim  # [CLS, mean patch]: the CLS part may be wider (timm CNN heads)
    row = {f"cls_knn_{k}": v for k, v in knn_accuracy(bank[:, :cls_dim], bank_y, test[:, :cls_dim], test_y).items()}
    row.update({f"both_knn_{k}": v for k, v in knn_accuracy(bank, bank_y, test, test_y).items()})
    linear = linear_probe(bank, bank_y, test, test_y, budget.linear_epochs, budget.linear_batch_size)
    row["linear_top1"] = linear["linear_top1"]
    row.update(throughput_and_flops(module, size))
    results["rows"][label] = row
    print(f"[distillation] {label}: {row}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, default=None, help="a DINOSSLModule checkpoint (default: pretrain one)")
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall time of each student run")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "distillation")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "experiments" / "distillation" / "results.json")
    parser.add_argument("--fmnist-root", default=None)
    parser.add_argument("--only", nargs="+", choices=sorted(STUDENTS), default=sorted(STUDENTS))
    parser.add_argument(
        "--extra", action="append", default=[], help="a CLI argument for every training run, e.g. --extra=--x.y=1"
    )
    parser.add_argument("--bank-size", type=int, default=BUDGETS["cpu"].bank_size)
    parser.add_argument("--test-size", type=int, default=None)
    options = parser.parse_args(argv)
    root = options.fmnist_root or default_fashion_mnist_root()
    if root is None:
        parser.error("Fashion-MNIST not found: pass --fmnist-root (or apt-get install dataset-fashion-mnist)")
    out = options.out.resolve()
    results = {
        "hardware": hardware_description(),
        "minutes_per_student": options.minutes,
        "protocol": __doc__.split("Stages")[1].strip(),
        "runs": {},
        "rows": {},
    }

    def save() -> None:
        options.results.parent.mkdir(parents=True, exist_ok=True)
        options.results.write_text(json.dumps(results, indent=2) + "\n")

    teacher = options.teacher
    if teacher is None:
        started = time.perf_counter()
        cli = cli_main(
            [
                "fit",
                "--config=configs/pretrain/fashion_mnist_cpu.yaml",
                f"--trainer.default_root_dir={out / 'teacher'}",
                f"--checkpoint.dirpath={out / 'teacher' / 'checkpoints'}",
                f"--trainer.logger.init_args.save_dir={out / 'tb'}",
                f"--data.init_args.train.init_args.root={root}",
                f"--data.init_args.knn_queries.init_args.root={root}",
                *options.extra,
            ]
        )
        teacher = Path(cli.trainer.checkpoint_callback.last_model_path)
        results["runs"]["teacher"] = {"steps": cli.trainer.global_step, "seconds": time.perf_counter() - started}
    else:
        recorded = torch.load(teacher, map_location="cpu", weights_only=True)
        results["runs"]["teacher"] = {"steps": recorded.get("global_step")}  # None: not a Lightning checkpoint
    results["teacher"] = str(teacher)
    checkpoints = {}
    for name in options.only:
        config, _, _ = STUDENTS[name]
        started = time.perf_counter()
        # The training data is the same Fashion-MNIST copy as the evaluation's.
        data_root = [f"--data.init_args.train.init_args.root={root}"]
        checkpoints[name] = train(name, config, out, options.minutes, teacher, data_root + options.extra)
        step = torch.load(checkpoints[name], map_location="cpu", weights_only=True)["global_step"]
        results["runs"][name] = {"steps": step, "seconds": time.perf_counter() - started}
        save()

    train_set, test_set = FashionMNIST(root, train=True), FashionMNIST(root, train=False)
    data = {
        "train": train_set,
        "test": test_set,
        "bank_idx": seeded_indices(len(train_set), options.bank_size, SEED),
        "test_idx": seeded_indices(len(test_set), options.test_size, SEED + 1),
    }
    evaluate("teacher (DINOv3 SSL)", FrozenBackboneModule(arch=None, weights=str(teacher)), 28, data, results)
    save()
    for name, checkpoint in checkpoints.items():
        _, architecture, size = STUDENTS[name]
        evaluate(name, FrozenBackboneModule(arch=None, weights=str(checkpoint)), size, data, results)
        save()
    for architecture, size in sorted({(STUDENTS[name][1], STUDENTS[name][2]) for name in checkpoints}):
        arch, overrides = ARCHITECTURES[architecture]
        torch.manual_seed(SEED)
        module = FrozenBackboneModule(arch=arch, weights=None, backbone_kwargs=overrides)
        evaluate(f"random init {architecture}", module, size, data, results)
        save()
    return results


if __name__ == "__main__":
    main()
