"""The benchmark configs (configs/eval/<task>_<benchmark>.yaml) state upstream's protocol numbers, and each runs a
``fast_dev_run`` through the CLI on a tiny copy of its benchmark in the distributed on-disk layout
(tests/fixtures/benchmarks.py), with only the backbone size, image sizes, batch sizes and data roots overridden."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml

from dinov3_pl.cli import main as cli_main
from dinov3_pl.data import ADE20K, COCODetection, ImageNet, PascalVOC
from dinov3_pl.modules.linear_probe import DEFAULT_LEARNING_RATES
from tests.fixtures.benchmarks import write_ade20k, write_coco, write_imagenet, write_voc

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "eval"
TINY_BACKBONE = {"depth": 2, "embed_dim": 48, "num_heads": 3, "patch_size": 8, "img_size": 32}


# ------------------------------------------------------------------------------------------------ benchmark copies
# One copy per layout for the whole module: the configs only read them.
@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    return write_imagenet(tmp_path_factory.mktemp("imagenet"), "folders")["root"]


@pytest.fixture(scope="module")
def ade20k_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ade")
    write_ade20k(root)
    return root / "ADEChallengeData2016"


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc")
    write_voc(root, aug="mmseg")  # the config trains on trainaug
    return root / "VOCdevkit"


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, "train")
    write_coco(root, "val")
    return root


# config, subcommand, its root fixture, the tiny-run overrides, a metric the run must log
SEGMENTATION_TINY = [
    "--data.init_args.image_size=32",
    "--data.init_args.eval_size=32",
    "--model.init_args.window_size=32",
    "--model.init_args.window_stride=24",
    "--model.init_args.warmup_steps=0",
]
CASES = {
    "knn_imagenet": ("validate", "imagenet_root", ["--model.init_args.num_classes=3"], "knn/top1_k10"),
    "linear_imagenet": (
        "fit",
        "imagenet_root",
        ["--model.init_args.num_classes=3", "--model.init_args.learning_rates=[0.001, 0.01]"],
        "linear/top1",
    ),
    "segmentation_ade20k": ("fit", "ade20k_root", SEGMENTATION_TINY, "val/mIoU"),
    "segmentation_voc": ("fit", "voc_root", SEGMENTATION_TINY, "val/mIoU"),
    "detection_coco": (
        "fit",
        "coco_root",
        [
            "--model.init_args.num_classes=3",  # the fixture's three categories (COCO: 80)
            "--model.init_args.pyramid_channels=16",
            "--model.init_args.representation_size=32",
            "--model.init_args.rpn_post_nms_top_n_train=50",
            "--model.init_args.rpn_post_nms_top_n_test=50",
            "--model.init_args.box_batch_size_per_image=32",
            "--model.init_args.anchor_scale=4.0",
            "--model.init_args.warmup_steps=0",
            "--data.init_args.image_size=32",
        ],
        "val/mAP",
    ),
}


def _printed(config: str) -> dict:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / f"{config}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(printed.getvalue())


@pytest.mark.parametrize("config", sorted(CASES))
def test_config_names_a_released_backbone_and_placeholder_roots(config):
    """Weights and roots are the two things a user passes; the config's own must be the released file name and
    the train/val roots one folder (so the header's command line, which sets both, is complete)."""
    printed = _printed(config)
    model, data = printed["model"]["init_args"], printed["data"]["init_args"]
    # The released S/B/L checkpoints carry q/v biases: only the _qkvb archs load them.
    assert model["arch"] == "vit_small_patch16_dinov3_qkvb"
    assert model["weights"] == "dinov3_vits16_pretrain_lvd1689m.pth" and model["backbone_kwargs"] is None
    train, val = data["train"]["init_args"], data["val"]["init_args"]
    assert train["root"] == val["root"] and (train["split"], val["split"]) in (("train", "val"), ("trainaug", "val"))


def test_classification_configs_follow_upstream():
    knn, linear = _printed("knn_imagenet"), _printed("linear_imagenet")
    knn_model, knn_data = knn["model"]["init_args"], knn["data"]["init_args"]
    assert knn_model["ks"] == [10, 20, 100, 200] and knn_model["temperature"] == 0.07
    assert knn_model["feature_type"] == "cls" and knn_data["knn_mode"] is True
    assert (knn_data["image_size"], knn_data["eval_crop_ratio"], knn_data["batch_size"]) == (224, 0.875, 256)
    model, data = linear["model"]["init_args"], linear["data"]["init_args"]
    assert model["learning_rates"] == list(DEFAULT_LEARNING_RATES) and model["feature_type"] == "cls_meanpatch"
    assert (model["optimizer"], model["momentum"], model["weight_decay"], model["warmup_steps"]) == ("sgd", 0.9, 0, 0)
    assert model["scale_lr_with_batch_size"] is True and linear["trainer"]["max_epochs"] == 10
    assert (data["image_size"], data["crop_scale"], data["eval_crop_ratio"], data["batch_size"]) == (
        224,
        [0.08, 1.0],
        0.875,
        128,
    )


@pytest.mark.parametrize("config", ["segmentation_ade20k", "segmentation_voc"])
def test_segmentation_configs_follow_upstreams_ade20k_linear_recipe(config):
    """config-ade20k-linear-training.yaml: 40k iterations, 1.5k warm-up, AdamW 1e-3 / wd 1e-3, 2 x 8 images,
    512 crops at ratio 0.5-2 with cat_max_ratio 0.75, flip and photometric distortion, slide 512 / 341, evaluation
    every 5k iterations."""
    printed = _printed(config)
    trainer, model, data = printed["trainer"], printed["model"]["init_args"], printed["data"]["init_args"]
    assert (trainer["max_steps"], trainer["val_check_interval"], trainer["check_val_every_n_epoch"]) == (
        40000,
        5000,
        None,
    )
    optimiser = (model["optimizer"], model["lr"], model["weight_decay"], model["warmup_steps"])
    assert optimiser == ("adamw", 1e-3, 1e-3, 1500)
    assert (model["schedule"], model["dropout"], model["n_layers"]) == ("cosine", 0.1, 1)
    assert (model["inference"], model["window_size"], model["window_stride"]) == ("slide", 512, 341)
    sizes = (data["image_size"], data["eval_size"], data["scale_range"], data["batch_size"])
    assert sizes == (512, 512, [0.5, 2.0], 16)
    assert (data["cat_max_ratio"], data["flip_prob"], data["photometric_distortion"]) == (0.75, 0.5, True)
    assert model["num_classes"] == {"segmentation_ade20k": ADE20K, "segmentation_voc": PascalVOC}[config].num_classes


# ------------------------------------------------------------------------------------------------ fast_dev_run
@pytest.mark.parametrize("config", sorted(CASES))
def test_config_runs_on_its_benchmark_layout(config, request, tmp_path):
    subcommand, root_fixture, overrides, metric = CASES[config]
    root = request.getfixturevalue(root_fixture)
    cli = cli_main(
        [
            subcommand,
            "--config",
            str(CONFIGS / f"{config}.yaml"),
            "--model.init_args.weights=null",
            f"--model.init_args.backbone_kwargs={json.dumps(TINY_BACKBONE)}",
            f"--data.init_args.train.init_args.root={root}",
            f"--data.init_args.val.init_args.root={root}",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
            *overrides,
            "--trainer.fast_dev_run=1",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    expected = {"knn": ImageNet, "linear": ImageNet, "segmentation": (ADE20K, PascalVOC), "detection": COCODetection}
    assert isinstance(cli.datamodule.datasets["train"], expected[config.split("_")[0]])
    assert metric in cli.trainer.callback_metrics, sorted(cli.trainer.callback_metrics)


# ------------------------------------------------------------------------------------------------ video (val only)
@pytest.fixture(scope="module")
def davis_root(tmp_path_factory) -> Path:
    from tests.fixtures.davis import write_davis

    root = tmp_path_factory.mktemp("davis")
    write_davis(root)
    return root / "DAVIS"


def test_video_davis_config_follows_dinos_protocol():
    printed = _printed("video_davis")
    model, data = printed["model"]["init_args"], printed["data"]["init_args"]
    assert model["arch"] == "vit_small_patch16_dinov3_qkvb" and model["backbone_kwargs"] is None
    assert model["weights"] == "dinov3_vits16_pretrain_lvd1689m.pth"
    assert (model["n_last_frames"], model["neighbourhood_size"], model["topk"], model["temperature"]) == (7, 12, 5, 0.1)
    assert (data["short_side"], data["size_multiple"], data["val"]["init_args"]["split"]) == (480, 64, "val")


def test_video_davis_config_runs_on_its_benchmark_layout(davis_root, tmp_path):
    from dinov3_pl.data.video import DAVIS2017

    cli = cli_main(
        [
            "validate",
            "--config",
            str(CONFIGS / "video_davis.yaml"),
            "--model.init_args.weights=null",
            f"--model.init_args.backbone_kwargs={json.dumps(TINY_BACKBONE)}",
            f"--data.init_args.val.init_args.root={davis_root}",
            "--data.init_args.short_side=16",
            "--data.init_args.size_multiple=8",
            "--data.init_args.num_workers=0",
            "--trainer.fast_dev_run=1",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert isinstance(cli.datamodule.datasets["val"], DAVIS2017)
    assert "davis/JF_mean" in cli.trainer.callback_metrics
