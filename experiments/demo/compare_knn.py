"""kNN accuracy of the demo's pretrained teacher vs. the same network at random init, on the embedded labels.

Runs ``dinov3-pl validate --config configs/eval/knn_synthetic.yaml`` three times (the kNN protocol of DESIGN.md:
weighted vote, T = 0.07, 2048 labelled bank images, 512 held-out queries) and prints one table:

- pretrained teacher, L2-normalised CLS (the DINOv3 protocol);
- pretrained teacher, [CLS, mean patch];
- random init, [CLS, mean patch] (random-init CLS tokens are almost identical for every image, LayerScale 1e-5).

    python experiments/demo/compare_knn.py --checkpoint runs/demo/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import contextlib
import io

import torch

from dinov3_pl.cli import main as cli_main

KNN_CONFIG = "configs/eval/knn_synthetic.yaml"


def knn_metrics(*overrides: str) -> dict[str, float]:
    args = [
        "validate",
        "--config",
        KNN_CONFIG,
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        *overrides,
    ]
    with contextlib.redirect_stdout(io.StringIO()):  # keep Lightning's per-run tables out of the summary
        cli = cli_main(args)
    return {key: float(value) for key, value in cli.trainer.callback_metrics.items() if key.startswith("knn/")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/demo/checkpoints/last.ckpt")
    args = parser.parse_args()
    record = torch.load(args.checkpoint, map_location="cpu", weights_only=True)["backbone_config"]
    architecture = [
        f"--model.init_args.arch={record['arch']}",
        f"--model.init_args.backbone_kwargs={record['timm_overrides']}",
    ]
    rows = {
        "pretrained teacher, CLS": knn_metrics(
            "--model.init_args.arch=null",
            "--model.init_args.backbone_kwargs=null",
            f"--model.init_args.weights={args.checkpoint}",
            "--model.init_args.feature_type=cls",
        ),
        "pretrained teacher, [CLS, mean patch]": knn_metrics(
            "--model.init_args.arch=null",
            "--model.init_args.backbone_kwargs=null",
            f"--model.init_args.weights={args.checkpoint}",
            "--model.init_args.feature_type=cls_meanpatch",
        ),
        "random init, [CLS, mean patch]": knn_metrics(*architecture, "--model.init_args.feature_type=cls_meanpatch"),
    }
    print(f"\nkNN on SyntheticShapes (8 classes, chance 12.5%), {KNN_CONFIG}, checkpoint {args.checkpoint}")
    print(f"{'features':40s} {'top1 k=10':>10s} {'top1 k=20':>10s} {'top1 k=200':>11s}")
    for name, metrics in rows.items():
        cells = [metrics.get(f"knn/top1_k{k}", float("nan")) * 100 for k in (10, 20, 200)]
        print(f"{name:40s} {cells[0]:9.1f}% {cells[1]:9.1f}% {cells[2]:10.1f}%")
    margin = rows["pretrained teacher, CLS"]["knn/top1_k20"] - rows["random init, [CLS, mean patch]"]["knn/top1_k20"]
    print(f"margin at k=20, pretrained CLS vs random init [CLS, mean patch]: {margin * 100:+.1f} points")


if __name__ == "__main__":
    main()
