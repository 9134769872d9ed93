"""PCA feature maps: the projection against numpy's SVD, and the callback writing an image to TensorBoard."""

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dinov3_pl.callbacks.pca import PCAFeatureMaps, pca_rgb
from tests.test_ssl_fit import tiny_data, tiny_module


def test_pca_rgb_matches_numpy_svd_up_to_sign():
    torch.manual_seed(0)
    features = torch.randn(2, 12, 6) * torch.tensor([5.0, 3.0, 2.0, 0.1, 0.1, 0.1])  # 3 dominant directions
    maps = pca_rgb(features, (3, 4))
    assert maps.shape == (2, 3, 3, 4) and maps.min() >= 0 and maps.max() <= 1
    flat = features.reshape(-1, 6).numpy()
    flat = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    for component in range(3):
        expected = flat @ vt[component]
        expected = (expected - expected.min()) / (expected.max() - expected.min())
        got = maps[:, component].reshape(-1).numpy()
        assert min(np.abs(got - expected).max(), np.abs(got - (1 - expected)).max()) < 1e-4


def test_callback_logs_pca_image_to_tensorboard(tmp_path):
    L.seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="pca")
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PCAFeatureMaps(every_n_epochs=1, num_images=4)],
    )
    trainer.fit(tiny_module(), tiny_data())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "pca_patch_features" in events.Tags()["images"]
    image = events.Images("pca_patch_features")[-1]
    assert image.width > 4 * 16 and image.height > 2 * 16  # 4 images over their 4 PCA maps


def test_callback_shows_images_with_the_datamodules_normalisation():
    class FakeTrainer:
        datamodule = tiny_data()

    callback = PCAFeatureMaps()
    FakeTrainer.datamodule.hparams["mean"], FakeTrainer.datamodule.hparams["std"] = (0.5, 0.5, 0.5), (0.25,) * 3
    mean, std = callback._normalisation(FakeTrainer())
    assert torch.equal(mean.flatten(), torch.full((3,), 0.5)) and torch.equal(std.flatten(), torch.full((3,), 0.25))
    # An explicit mean/std wins; no DataModule means ImageNet's statistics.
    mean, _ = PCAFeatureMaps(mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))._normalisation(FakeTrainer())
    assert torch.allclose(mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    mean, std = PCAFeatureMaps()._normalisation(object())
    assert torch.allclose(mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
