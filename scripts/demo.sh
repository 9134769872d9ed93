#!/usr/bin/env bash
# The demo: sets up .venv if needed, pretrains a tiny DINOv3 ViT on the embedded SyntheticShapes data (CPU,
# minutes), then compares the kNN accuracy of its EMA teacher with the same network at random init.
# TensorBoard: .venv/bin/tensorboard --logdir runs/demo
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
rm -rf runs/demo/checkpoints
.venv/bin/dinov3-pl fit --config configs/pretrain/demo_cpu.yaml "$@"
.venv/bin/python experiments/demo/compare_eval.py --checkpoint runs/demo/checkpoints/last.ckpt
