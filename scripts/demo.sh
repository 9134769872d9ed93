#!/usr/bin/env bash
# The demo: sets up .venv if needed, pretrains a tiny DINOv3 ViT on the embedded SyntheticShapes data (CPU,
# minutes), then compares the kNN accuracy of its EMA teacher with the same network at random init.
# TensorBoard: .venv/bin/tensorboard --logdir runs/demo
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
rm -rf runs/demo/checkpoints runs/demo/suite   # a retrained checkpoint is refused in an old suite folder
.venv/bin/dinov3-pl fit --config configs/pretrain/demo_cpu.yaml "$@"
# kNN of the EMA teacher vs. the same network at random init; the whole suite continues in these folders (README)
knn=(--suite configs/suite/embedded.yaml --tasks knn_cls knn_cls_meanpatch --weights runs/demo/checkpoints/last.ckpt)
.venv/bin/dinov3-pl evaluate "${knn[@]}" --output runs/demo/suite/teacher > /dev/null
.venv/bin/dinov3-pl evaluate "${knn[@]}" --random-init --output runs/demo/suite/random > /dev/null
.venv/bin/dinov3-pl evaluate --compare runs/demo/suite/teacher runs/demo/suite/random
