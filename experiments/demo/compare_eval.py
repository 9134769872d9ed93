"""The demo's pretrained teacher vs. the same network at random init, on the embedded SyntheticShapes tasks.

Each task runs its own config from ``configs/eval/`` through the CLI, once with the checkpoint's EMA teacher and
once with a random-init backbone of the same architecture, and the script prints one table:

- ``knn`` (``dinov3-pl validate``, knn_synthetic.yaml): weighted vote, T = 0.07, 2048-image bank, 512 held-out
  queries; pretrained with L2-normalised CLS (the DINOv3 protocol) and [CLS, mean patch]; random init with
  [CLS, mean patch] only (its CLS tokens are almost identical for every image);
- ``linear`` (``fit``, linear_synthetic.yaml): the 13-LR grid of linear heads on [CLS, mean patch], best head;
- ``segmentation`` (``fit``, segmentation_synthetic.yaml): BN + 1x1 conv on the last patch tokens, mIoU;
- ``detection`` (``fit``, detection_synthetic.yaml): simple feature pyramid + Faster R-CNN, mAP, mAP50, mAP75 and
  mAP of small boxes (the distractor shapes).

    python experiments/demo/compare_eval.py --checkpoint runs/demo/checkpoints/last.ckpt            # kNN only
    python experiments/demo/compare_eval.py --tasks knn linear segmentation detection              # ~18 min CPU
    python experiments/demo/compare_eval.py --tasks detection --override=--seed_everything=1        # another seed
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from unittest import mock

import torch

from dinov3_pl.cli import main as cli_main

# task -> (subcommand, config, [(metric key, label)])
TASKS: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "knn": (
        "validate",
        "configs/eval/knn_synthetic.yaml",
        [("knn/top1_k10", "top-1 k=10"), ("knn/top1_k20", "top-1 k=20"), ("knn/top1_k200", "top-1 k=200")],
    ),
    "linear": ("fit", "configs/eval/linear_synthetic.yaml", [("linear/top1", "top-1"), ("linear/top5", "top-5")]),
    "segmentation": ("fit", "configs/eval/segmentation_synthetic.yaml", [("val/mIoU", "mIoU")]),
    "detection": (
        "fit",
        "configs/eval/detection_synthetic.yaml",
        [("val/mAP", "mAP"), ("val/mAP50", "mAP50"), ("val/mAP75", "mAP75"), ("val/mAP_small", "mAP small")],
    ),
}


def run_task(task: str, root: str, *overrides: str) -> dict[str, float]:
    """Runs one task's config with ``overrides``; returns its final metrics (Lightning's callback metrics)."""
    subcommand, config, _ = TASKS[task]
    args = [subcommand, "--config", config, "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    if subcommand == "fit":  # keep the heads' checkpoints out of the working tree, one folder per run
        run_root = tempfile.mkdtemp(prefix=f"{task}_", dir=root)
        args += [f"--trainer.default_root_dir={run_root}", f"--checkpoint.dirpath={run_root}/checkpoints"]
    # Lightning's per-run tables stay out of the summary; this script's own argv is not the CLI's (LightningCLI
    # warns when it sees both).
    with contextlib.redirect_stdout(io.StringIO()), mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = cli_main([*args, *overrides])
    return {key: float(value) for key, value in cli.trainer.callback_metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/demo/checkpoints/last.ckpt")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["knn"])
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="a CLI argument added to every run, e.g. --override=--seed_everything=1",
    )
    args = parser.parse_args()
    record = torch.load(args.checkpoint, map_location="cpu", weights_only=True)["backbone_config"]
    pretrained = [
        "--model.init_args.arch=null",
        "--model.init_args.backbone_kwargs=null",
        f"--model.init_args.weights={args.checkpoint}",
    ]
    random_init = [
        f"--model.init_args.arch={record['arch']}",
        f"--model.init_args.backbone_kwargs={record['timm_overrides']}",
    ]
    rows: list[tuple[str, str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as root:
        for task in args.tasks:
            variants = (  # (row name, backbone arguments)
                [
                    ("pretrained teacher, CLS", [*pretrained, "--model.init_args.feature_type=cls"]),
                    (
                        "pretrained teacher, [CLS, mean patch]",
                        [*pretrained, "--model.init_args.feature_type=cls_meanpatch"],
                    ),
                    ("random init, [CLS, mean patch]", [*random_init, "--model.init_args.feature_type=cls_meanpatch"]),
                ]
                if task == "knn"
                else [("pretrained teacher", pretrained), ("random init", random_init)]
            )
            for name, backbone in variants:
                rows.append((task, name, run_task(task, root, *backbone, *args.override)))

    print(f"\nSyntheticShapes (8 classes, chance 12.5%), checkpoint {args.checkpoint}")
    if args.override:
        print(f"overrides: {' '.join(args.override)}")
    for task in args.tasks:
        metrics = TASKS[task][2]
        print(f"\n{task} ({TASKS[task][1]})")
        print(f"{'backbone':40s}" + "".join(f"{label:>13s}" for _, label in metrics))
        task_rows = [(name, values) for row_task, name, values in rows if row_task == task]
        for name, values in task_rows:
            print(f"{name:40s}" + "".join(f"{values.get(key, float('nan')) * 100:12.1f}%" for key, _ in metrics))
        key, label = metrics[1] if task == "knn" else metrics[0]  # the margin is reported at k = 20 for kNN
        margin = task_rows[0][1].get(key, float("nan")) - task_rows[-1][1].get(key, float("nan"))
        print(f"margin ({label}), {task_rows[0][0]} - {task_rows[-1][0]}: {margin * 100:+.1f} points")


if __name__ == "__main__":
    main()
