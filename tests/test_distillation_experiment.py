"""experiments/distillation/run.py end to end on tiny fake Fashion-MNIST files: a feature-distillation run into the
timm CNN for a few seconds, then the evaluation table (teacher, student EMA, random init) in results.json."""

from __future__ import annotations

import json

import torch

from dinov3_pl.modules import DINOSSLModule
from dinov3_pl.modules.ssl_config import BackboneConfig, HeadConfig
from experiments.distillation.run import main
from tests.test_fashion_mnist_experiment import fake_fashion_root  # noqa: F401 - the fixture


def test_a_short_distillation_run_writes_the_table(tmp_path, fake_fashion_root):  # noqa: F811
    torch.manual_seed(0)
    head = HeadConfig(num_prototypes=64, hidden_dim=32, bottleneck_dim=16)
    overrides = {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 4, "img_size": 28}
    teacher = DINOSSLModule(backbone=BackboneConfig(timm_overrides=overrides), dino_head=head, ibot_head=head)
    checkpoint = {"state_dict": teacher.state_dict()}
    teacher.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "teacher.ckpt")
    results = main(
        [
            f"--teacher={tmp_path / 'teacher.ckpt'}",
            "--minutes=0.05",
            f"--out={tmp_path / 'runs'}",
            f"--results={tmp_path / 'results.json'}",
            f"--fmnist-root={fake_fashion_root}",
            "--only",
            "distill_cnn",
            "--bank-size=40",
            "--test-size=20",
            "--extra=--data.init_args.num_workers=0",
            "--extra=--data.init_args.batch_size=8",
        ]
    )
    assert set(results["rows"]) == {"teacher (DINOv3 SSL)", "distill_cnn", "random init cnn"}
    assert results["runs"]["distill_cnn"]["steps"] >= 1
    row = results["rows"]["distill_cnn"]
    assert 0 <= row["cls_knn_top1_k10"] <= 1 and row["mflops_per_image"] > 0 and row["images_per_s"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == results["rows"]
