"""Linear depth (NYU Depth v2 protocol of upstream DINOv3): metrics, losses, bins and schedule against numbers from
upstream's code and direct numpy formulas; the NYU reader on a tiny copy in upstream's layout; the DataModule; the
configs through the CLI; a tiny fit whose RMSE drops."""

from __future__ import annotations

import json
import math
from pathlib import Path
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from dinov3_pl.data.depth import DepthDataModule, NYUDepthV2, SyntheticDepth, depth_collate
from dinov3_pl.losses.depth import GradientLoss, SigLoss
from dinov3_pl.metrics.depth import DEPTH_METRIC_NAMES, DepthMetrics, depth_valid_mask
from dinov3_pl.modules.depth import LinearDepth, LinearDepthHead, WarmupOneCycle, bins_to_depth
from tests.fixtures.nyu import NYU_FIXTURE_SIZE, write_nyu
from tests.helpers import run_cli

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "img_size": 32}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "eval"
# Upstream's outputs on golden_inputs(); see "source" in the file for the repository, commit and calls.
GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "depth_golden.json").read_text())
UPSTREAM_NAMES = {
    "rmse": "rmse",
    "abs_rel": "abs_rel",
    "log10": "log_10",
    "delta1": "a1",
    "delta2": "a2",
    "delta3": "a3",
}


def golden_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets [3, 48, 64] with holes, depths beyond 10 m and below 1 mm, and an image valid only outside Eigen's
    crop; predictions spanning beyond the clamp range; bin logits [2, 8, 3, 4]."""
    rng = np.random.default_rng(20261203)
    target = rng.uniform(0.5, 9.0, size=(3, 48, 64)).astype(np.float32)
    target[rng.random(target.shape) < 0.1] = 0.0
    target[0, 4:8, :] = 12.0
    target[1, 10, :] = 0.0005
    target[2] = 0.0
    target[2, 0:3, 0:3] = 5.0
    prediction = rng.uniform(0.2, 11.0, size=(3, 48, 64)).astype(np.float32)
    logits = rng.normal(size=(2, 8, 3, 4)).astype(np.float32)
    return target, prediction, logits


# ------------------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("crop", ["nyu_eigen", "full"])
def test_metrics_match_upstream_eval(crop):
    target, prediction, _ = golden_inputs()
    metric = DepthMetrics(min_depth=1e-3, max_depth=10.0, eval_crop=crop)
    metric.update(torch.from_numpy(prediction[:2]), torch.from_numpy(target[:2]))  # batches: per image either way
    metric.update(torch.from_numpy(prediction[2:, None]), torch.from_numpy(target[2:]))
    values = metric.compute()
    for name, upstream in UPSTREAM_NAMES.items():
        assert values[name].item() == pytest.approx(GOLDEN[f"metrics_{crop}"][upstream], rel=1e-5), name
    if crop == "nyu_eigen":  # the third image has no valid pixel inside the crop: left out, as upstream's nanmean
        assert math.isnan(GOLDEN["metrics_nyu_eigen_per_image"]["rmse"][2]) and metric.images.item() == 2


def _numpy_metrics(prediction: np.ndarray, target: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    p, t = np.clip(prediction[valid], 1e-3, 10.0).astype(np.float64), target[valid].astype(np.float64)
    ratio = np.maximum(p / t, t / p)
    return {
        "rmse": float(np.sqrt(np.mean((p - t) ** 2))),
        "abs_rel": float(np.mean(np.abs(p - t) / t)),
        "log10": float(np.mean(np.abs(np.log10(p) - np.log10(t)))),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25**2)),
        "delta3": float(np.mean(ratio < 1.25**3)),
    }


def test_metrics_are_per_image_means_over_valid_pixels_of_the_eval_crop():
    # 480x640 frames so Eigen's crop is exact: rows 45..470, columns 41..600.
    target = np.zeros((2, 480, 640), np.float32)
    prediction = np.full((2, 480, 640), 2.0, np.float32)
    target[0, 100:110, 100:120] = 2.5  # 200 pixels, prediction 2.0
    target[0, 200, 300:310] = 11.0  # beyond max_depth: ignored
    target[0, 10, 10:20] = 1.0  # outside the crop: ignored
    prediction[0, 100:102, 100:120] = 20.0  # clamped to 10
    target[1, 300:302, 400:410] = 1.0  # 20 pixels, prediction 2.0: a very different image error
    valid = depth_valid_mask(torch.from_numpy(target), 1e-3, 10.0, "nyu_eigen").numpy()
    assert valid[0].sum() == 200 and valid[1].sum() == 20
    metric = DepthMetrics(1e-3, 10.0, "nyu_eigen")
    metric.update(torch.from_numpy(prediction), torch.from_numpy(target))
    values = metric.compute()
    per_image = [_numpy_metrics(prediction[i], target[i], valid[i]) for i in range(2)]
    pooled = _numpy_metrics(prediction, target, valid)
    for name in per_image[0]:
        expected = (per_image[0][name] + per_image[1][name]) / 2
        assert values[name].item() == pytest.approx(expected, rel=1e-6), name
    assert abs(values["rmse"].item() - pooled["rmse"]) > 0.1  # per image, not pixel-pooled


def test_eigen_crop_scales_with_the_image_as_upstream():
    ones = torch.ones(1, 480, 640)
    mask = depth_valid_mask(ones, 1e-3, 10.0, "nyu_eigen")[0]
    rows, cols = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (45, 470, 41, 600) and mask.sum() == 426 * 560
    small = depth_valid_mask(torch.ones(1, *NYU_FIXTURE_SIZE), 1e-3, 10.0, "nyu_eigen")[0]
    assert small.sum() == (int(471 / 10) - int(45 / 10)) * (int(601 / 10) - int(41 / 10))


# ------------------------------------------------------------------------------------------------ losses
def test_sigloss_matches_upstream_and_the_formula():
    target, prediction, _ = golden_inputs()
    t, p = torch.from_numpy(target)[:, None], torch.from_numpy(prediction)[:, None]
    loss = SigLoss(warmup_steps=100)
    assert loss(p, t, t > 0, step=0).item() == pytest.approx(GOLDEN["sigloss_warmup"], rel=1e-5)
    assert loss(p, t, t > 0, step=100).item() == pytest.approx(GOLDEN["sigloss"], rel=1e-5)
    valid = target > 0
    g = np.log(prediction[valid].astype(np.float64) + 1e-3) - np.log(target[valid].astype(np.float64) + 1e-3)
    assert loss(p, t, t > 0, step=99).item() == pytest.approx(math.sqrt(0.15 * g.mean() ** 2), rel=1e-4)
    assert loss(p, t, t > 0, step=100).item() == pytest.approx(
        math.sqrt(g.var(ddof=1) + 0.15 * g.mean() ** 2), rel=1e-5
    )
    # A perfect prediction: 0, with a finite gradient (sqrt's slope at 0 is infinite).
    perfect = t.clone().requires_grad_(True)
    value = loss(perfect, t, t > 0, step=200)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(perfect.grad).all()


def test_gradient_losses_match_upstream_and_ignore_invalid_pixels():
    target, prediction, _ = golden_inputs()
    t, p = torch.from_numpy(target)[:, None], torch.from_numpy(prediction)[:, None]
    assert GradientLoss()(p, t, t > 0).item() == pytest.approx(GOLDEN["gradient_loss"], rel=1e-5)
    assert GradientLoss(log=True)(p, t, t > 0).item() == pytest.approx(GOLDEN["gradient_log_loss"], rel=1e-5)
    # Direct formula at stride 1 only: |e[i] - e[i+2]| over pairs of valid pixels, per valid pixel.
    e, v = prediction - target, target > 0
    vertical = np.abs(e[:, :-2] - e[:, 2:]) * v[:, :-2] * v[:, 2:]
    horizontal = np.abs(e[:, :, :-2] - e[:, :, 2:]) * v[:, :, :-2] * v[:, :, 2:]
    expected = (vertical.sum() + horizontal.sum()) / v.sum()
    assert GradientLoss(strides=(1,))(p, t, t > 0).item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------ head, schedule
def test_bins_to_depth_matches_upstream_features_to_depth():
    _, _, logits = golden_inputs()
    x = torch.from_numpy(logits)
    for spacing, key in (("linear", "bins_linear"), ("log", "bins_log")):
        torch.testing.assert_close(bins_to_depth(x, 1e-3, 10.0, spacing).flatten(), torch.tensor(GOLDEN[key]))
    torch.testing.assert_close(bins_to_depth(x[:, :1], 1e-3, 10.0).flatten(), torch.tensor(GOLDEN["regression"]))
    head = LinearDepthHead(4, num_bins=256).eval()
    depth = head(torch.randn(2, 4, 3, 5))
    assert depth.shape == (2, 1, 3, 5) and (depth > 1e-3).all() and (depth < 10.0).all()
    assert head.conv.weight.std().item() == pytest.approx(0.01, rel=0.1) and not head.conv.bias.any()


def test_one_cycle_schedule_matches_upstream_warmup_one_cycle_lr():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=3e-4, betas=(0.9, 0.99), weight_decay=1e-4)
    scheduler = WarmupOneCycle(optimizer, total_steps=40, warmup_steps=10)
    lrs, beta1s = [], []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        beta1s.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(lrs, GOLDEN["one_cycle_lr"], rtol=1e-9)
    np.testing.assert_allclose(beta1s, GOLDEN["one_cycle_beta1"], rtol=1e-9)
    assert optimizer.param_groups[0]["betas"][1] == 0.99


# ------------------------------------------------------------------------------------------------ NYU reader
@pytest.fixture(scope="module")
def nyu(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("nyu") / "NYU"
    return root, write_nyu(root)


def test_nyu_reader_reads_upstreams_layout(nyu):
    root, written = nyu
    train, val = NYUDepthV2(root, "train"), NYUDepthV2(root, "val")
    assert len(train) == 3 and len(val) == 2 == len(NYUDepthV2(root, "test"))
    paths = [str(image) for image, _ in train.pairs]
    assert paths == sorted(written["train"]) and set(str(i) for i, _ in val.pairs) == set(written["test"])
    sample = train[0]
    assert sample["image"].shape == (*NYU_FIXTURE_SIZE, 3) and sample["image"].dtype == np.uint8
    np.testing.assert_array_equal(sample["depth"], written["train"][sample["path"]])  # millimetres / 1000


def test_nyu_reader_bad_input_gives_one_clear_line(nyu, tmp_path):
    root, _ = nyu
    with pytest.raises(FileNotFoundError, match=r"nyu_train\.txt does not exist: root must be the NYU folder"):
        NYUDepthV2(tmp_path, "train")
    broken = tmp_path / "NYU"
    broken.mkdir()
    for scene in ("bathroom", "kitchen"):
        (broken / scene).symlink_to(root / scene)
    (broken / "nyu_test.txt").write_text((root / "nyu_test.txt").read_text() + "kitchen/rgb_00099.jpg x.png 518.8\n")
    with pytest.raises(FileNotFoundError, match=r"2 files listed in .*nyu_test\.txt do not exist .*rgb_00099\.jpg"):
        NYUDepthV2(broken, "val")
    (broken / "nyu_test.txt").write_text("bathroom/rgb_00045.jpg bathroom/rgb_00045.jpg 1\n")
    with pytest.raises(ValueError, match="has mode RGB; expected a 16-bit PNG of millimetres"):
        NYUDepthV2(broken, "test")[0]


# ------------------------------------------------------------------------------------------------ data module
def test_datamodule_crops_and_pads_depth_with_no_measurement(nyu):
    root, _ = nyu
    data = DepthDataModule(
        train=NYUDepthV2(root, "train"), val=NYUDepthV2(root, "val"), crop_size=(40, 64), fixed_crop="nyu",
        batch_size=3,
    )  # fmt: skip
    data.setup("fit")
    train = next(iter(data.train_dataloader()))
    # NYU's border crop leaves rows 4..46 and columns 4..59 of 48x64 (43x56); the 40x64 crop pads 4 columns on
    # each side, with depth 0 = no measurement.
    assert train["images"].shape == (3, 3, 40, 64) and train["depths"].shape == (3, 40, 64)
    assert (train["depths"][:, :, :4] == 0).all() and (train["depths"][:, :, 60:] == 0).all()
    assert (train["depths"][:, :, 4:60] > 0).float().mean() > 0.8
    val = next(iter(data.val_dataloader()))
    assert val["depths"].shape == (2, *NYU_FIXTURE_SIZE) and val["depths"].max() > 10  # eval: whole, unfiltered
    collated = depth_collate([{"image": torch.ones(3, 2, 3), "depth": torch.ones(2, 3)}, None])
    assert collated["num_bad_images"] == 1 and collated["depths"].shape == (1, 2, 3)


def test_datamodule_rejects_bad_depth_samples():
    class Negative(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return {"image": np.zeros((8, 8, 3), np.uint8), "depth": -np.ones((8, 8), np.float32)}

    data = DepthDataModule(train=Negative(), val=Negative(), image_size=8)
    data.setup("fit")
    with pytest.raises(ValueError, match="negative depths .* 0 = no measurement"):
        data.val_set[0]


# ------------------------------------------------------------------------------------------------ module
def test_forward_centre_pads_and_flip_tta_is_mirror_symmetric():
    torch.manual_seed(0)
    model = LinearDepth(backbone_kwargs=TINY).eval()
    with torch.no_grad():
        model.head.conv.weight.normal_(0, 1.0)  # a head with an opinion, so the two views differ
        images = torch.randn(2, 3, 30, 36)
        assert model(images).shape == (2, 1, 30, 36)
        plain = model.predict_depth(images, flip=False)
        mirrored = model.predict_depth(images.flip(-1), flip=False).flip(-1)
        assert not torch.allclose(plain, mirrored)
        torch.testing.assert_close(model.predict_depth(images, flip=True), (plain + mirrored) / 2)


def test_training_loss_counts_measured_pixels_only():
    torch.manual_seed(0)
    model = LinearDepth(backbone_kwargs=TINY, sigloss_warmup_steps=0, gradient_loss_weight=0.5).eval()
    images, depths = torch.randn(2, 3, 32, 32), torch.rand(2, 32, 32) * 5 + 0.5
    depths[:, :, :12] = 0.0  # no measurement: log(0 + eps) would dominate the loss if counted
    with torch.no_grad():
        loss = model.training_step({"images": images, "depths": depths}, 0)
        prediction = model(images)[:, 0]
    measured = depths.numpy() > 0
    g = np.log(prediction.double().numpy()[measured] + 1e-3) - np.log(depths.double().numpy()[measured] + 1e-3)
    expected = math.sqrt(g.var(ddof=1) + 0.15 * g.mean() ** 2) + 0.5 * GradientLoss()(prediction, depths, depths > 0)
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)


def test_tiny_fit_lowers_the_rmse_and_test_uses_flip_tta():
    L.seed_everything(0)
    data = DepthDataModule(
        train=SyntheticDepth(64, 32, 0), val=SyntheticDepth(16, 32, 99), image_size=32, batch_size=8, colour_prob=0.0
    )
    model = LinearDepth(backbone_kwargs=TINY, lr=1e-2, schedule="constant", sigloss_warmup_steps=10)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = L.Trainer(
        max_steps=24, val_check_interval=24, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=35.0,
    )  # fmt: skip
    before = trainer.validate(model, data, verbose=False)[0]["val/rmse"]
    trainer.fit(model, data)
    after = trainer.callback_metrics["val/rmse"].item()
    assert after < 0.75 * before, (before, after)
    assert all(torch.equal(v, backbone_before[k]) for k, v in model.backbone.state_dict().items())
    flips = []
    with mock.patch.object(model, "predict_depth", wraps=lambda images, flip: flips.append(flip) or model(images)):
        tested = trainer.test(model, data, verbose=False)[0]
        trainer.validate(model, data, verbose=False)
    assert flips == [True, True, False, False] and set(tested) == {f"test/{name}" for name in DEPTH_METRIC_NAMES}


# ------------------------------------------------------------------------------------------------ configs
def test_nyu_config_follows_upstream_and_runs_on_the_layout(nyu, tmp_path):
    root, _ = nyu
    cli = run_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "depth_nyu.yaml"),
            "--model.init_args.weights=null",
            f"--model.init_args.backbone_kwargs={json.dumps(TINY)}",
            f"--data.init_args.train.init_args.root={root}",
            f"--data.init_args.val.init_args.root={root}",
            "--data.init_args.crop_size=[32, 32]",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
            "--trainer.fast_dev_run=1",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert isinstance(cli.datamodule.datasets["train"], NYUDepthV2) and "val/rmse" in cli.trainer.callback_metrics
    text = (CONFIGS / "depth_nyu.yaml").read_text()
    config = yaml.safe_load(text)
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    # upstream config-nyu.yaml: 38,400 iterations at 2 x 8 images, eval every 1,600, clip 35, seed 321
    assert (trainer["max_steps"], trainer["val_check_interval"], trainer["gradient_clip_val"]) == (38400, 1600, 35.0)
    assert config["seed_everything"] == 321 and data["batch_size"] == 16
    assert (model["num_bins"], model["min_depth"], model["max_depth"], model["n_layers"]) == (256, 1e-3, 10.0, 1)
    assert (model["lr"], model["betas"], model["weight_decay"], model["schedule"], model["warmup_steps"]) == (
        3e-4, [0.9, 0.99], 1e-4, "one_cycle", 12800,
    )  # fmt: skip
    assert (model["sigloss_weight"], model["sigloss_warmup_steps"], model["gradient_loss_weight"]) == (1.0, 100, 0.0)
    assert (model["eval_crop"], model["flip_tta_val"], model["flip_tta_test"]) == ("nyu_eigen", False, True)
    assert (data["crop_size"], data["fixed_crop"], data["brightness_range"]) == ([416, 544], "nyu", [0.75, 1.25])
    assert (data["train"]["init_args"]["split"], data["val"]["init_args"]["split"]) == ("train", "val")
    assert "0.403 (ViT-S/16), 0.399 (ViT-S+/16), 0.373 (ViT-B/16), 0.352 (ViT-L/16)" in text


def test_synthetic_config_runs_through_the_cli(tmp_path):
    cli = run_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "depth_synthetic.yaml"),
            "--trainer.fast_dev_run=1",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert isinstance(cli.model, LinearDepth) and isinstance(cli.datamodule.datasets["train"], SyntheticDepth)
    assert "val/rmse" in cli.trainer.callback_metrics
