"""``dinov3-pl predict``: FeatureExtractor + ImageFolderPredictDataModule write the features of an image folder."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from dinov3_pl.data.predict import ImageFolderPredictDataModule
from dinov3_pl.models.backbone import DINOv3Backbone
from dinov3_pl.modules.features import FeatureExtractor, load_features

CONFIG = Path(__file__).parents[1] / "configs" / "predict_demo.yaml"
BACKBONE = dict(depth=2, embed_dim=64, num_heads=2, patch_size=8)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def make_folder(root: Path) -> list[Path]:
    """Five images of different sizes and modes (one in a sub-folder) and one corrupt file."""
    rng = np.random.default_rng(0)
    sizes = [(32, 32, "RGB"), (40, 56, "RGB"), (64, 36, "L"), (33, 47, "RGB"), (32, 80, "RGBA")]
    paths = []
    for i, (height, width, mode) in enumerate(sizes):
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8).squeeze()
        path = root / ("sub" if i == 3 else "") / f"image_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array, mode=mode).save(path)
        paths.append(path)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return paths


@pytest.fixture
def weights(tmp_path) -> Path:
    torch.manual_seed(0)
    backbone = DINOv3Backbone("vit_small_patch16_dinov3", **BACKBONE)
    with torch.no_grad():  # non-trivial weights so that features differ between images
        for param in backbone.parameters():
            param.add_(0.1 * torch.randn_like(param))
    path = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), path)
    return path


def direct_features(root: Path, weights: Path) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    data = ImageFolderPredictDataModule(root, image_size=32, patch_size=8, batch_size=4, num_workers=0)
    data.setup("predict")
    items = [data.dataset[i] for i in range(len(data.dataset))]
    kept = [(path, image) for _, image, path in items if image is not None]
    backbone = DINOv3Backbone("vit_small_patch16_dinov3", weights=weights, **BACKBONE).eval()
    with torch.no_grad():
        out = backbone(torch.stack([image for _, image in kept]))
    return [path for path, _ in kept], out["cls"], out["patch"].mean(1), out["patch"]


def test_predict_cli_writes_features_of_the_folder(tmp_path, weights):
    from dinov3_pl.cli import main

    paths = make_folder(tmp_path / "images")
    output = tmp_path / "out" / "features.pt"
    main(
        args=[
            "predict",
            "--config", str(CONFIG),
            "--data.init_args.root", str(tmp_path / "images"),
            "--model.init_args.output", str(output),
            "--model.init_args.weights", str(weights),
            "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.accelerator", "cpu",
        ]
    )  # fmt: skip
    features = load_features(output)
    expected_paths, cls, mean_patch, _ = direct_features(tmp_path / "images", weights)
    assert features["paths"] == expected_paths
    assert sorted(features["paths"]) == sorted(str(p) for p in paths)
    assert features["skipped_paths"] == [str(tmp_path / "images" / "broken.png")]
    assert features["cls"].shape == (5, 64) and features["mean_patch"].shape == (5, 64)
    assert features["cls"].dtype == torch.float32 and "patch_maps" not in features
    torch.testing.assert_close(features["cls"], cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features["mean_patch"], mean_patch, atol=1e-5, rtol=1e-5)
    assert (features["cls"][0] - features["cls"][1]).abs().max() > 1e-3  # images really differ


def test_npz_output_with_patch_maps(tmp_path, weights):
    make_folder(tmp_path / "images")
    output = tmp_path / "features.npz"
    module = FeatureExtractor("vit_small_patch16_dinov3", str(weights), BACKBONE, output, save_patch_maps=True)
    data = ImageFolderPredictDataModule(tmp_path / "images", image_size=32, patch_size=8, batch_size=2, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.predict(module, datamodule=data, return_predictions=False)
    features = load_features(output)
    expected_paths, cls, mean_patch, patch = direct_features(tmp_path / "images", weights)
    assert features["paths"] == expected_paths and features["arch"] == "vit_small_patch16_dinov3"
    assert features["patch_maps"].shape == (5, 64, 4, 4)
    torch.testing.assert_close(
        features["patch_maps"], patch.reshape(5, 4, 4, 64).permute(0, 3, 1, 2), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(features["patch_maps"].mean(dim=(2, 3)), mean_patch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features["cls"], cls, atol=1e-5, rtol=1e-5)


def test_preprocessing_normalises_with_imagenet_statistics(tmp_path):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    data = ImageFolderPredictDataModule(tmp_path, image_size=32, resize_size=32, patch_size=8, num_workers=0)
    batch = next(iter(data.predict_dataloader()))
    expected = torch.from_numpy(((array / 255.0 - MEAN) / STD).transpose(2, 0, 1)).float()
    torch.testing.assert_close(batch["images"][0], expected, atol=1e-5, rtol=1e-5)
    assert batch["paths"] == [str(tmp_path / "a.png")] and batch["indices"].tolist() == [0]
    # A non-square image is resized on its shorter side then centre-cropped to the square crop.
    Image.fromarray(rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    data = ImageFolderPredictDataModule(tmp_path, image_size=32, patch_size=8, num_workers=0)
    assert next(iter(data.predict_dataloader()))["images"].shape == (2, 3, 32, 32)


def test_bad_settings_are_reported(tmp_path):
    with pytest.raises(ValueError, match="image_size=30 must be a positive multiple of the patch size 16"):
        ImageFolderPredictDataModule(tmp_path, image_size=30)
    with pytest.raises(ValueError, match="output must end in one of"):
        FeatureExtractor("vit_small_patch16_dinov3", None, BACKBONE, tmp_path / "features.csv")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        FeatureExtractor("vit_small_patch16_dinov3", str(tmp_path / "missing.pth"), BACKBONE)


def test_two_process_prediction_writes_each_image_once(tmp_path, weights):
    """A distributed sampler splits (and pads) the images over ranks; rank 0 gathers them back in order."""
    make_folder(tmp_path / "images")
    output = tmp_path / "features.pt"
    module = FeatureExtractor("vit_small_patch16_dinov3", str(weights), BACKBONE, output)
    data = ImageFolderPredictDataModule(tmp_path / "images", image_size=32, patch_size=8, batch_size=2, num_workers=0)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.predict(module, datamodule=data, return_predictions=False)
    features = load_features(output)
    expected_paths, cls, _, _ = direct_features(tmp_path / "images", weights)
    assert features["paths"] == expected_paths
    torch.testing.assert_close(features["cls"], cls, atol=1e-5, rtol=1e-5)
