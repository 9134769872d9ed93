"""KNNAccuracy against brute-force references, and the KNN evaluation module end to end."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier
from torch.utils.data import DataLoader, Dataset

from dinov3_pl.metrics import KNNAccuracy, knn_predict
from dinov3_pl.modules.knn import KNN

TEMPERATURE = 0.07
TINY_BACKBONE = {"depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 4, "img_size": 32}


def _clustered(
    num: int, num_classes: int, dim: int, seed: int, noise: float = 1.5
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    labels = torch.randint(0, num_classes, (num,), generator=generator)
    return centres[labels] + noise * torch.randn(num, dim, generator=generator), labels


def _brute_force_scores(queries: np.ndarray, bank: np.ndarray, bank_labels: np.ndarray, k: int, max_k: int, C: int):
    """Per-query python loop: weight exp(sim / T) / sum over the max_k nearest, summed per class over the k nearest."""
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    all_scores = []
    for query in queries:
        sims = bank @ query
        order = np.argsort(-sims, kind="stable")[:max_k]
        weights = np.exp((sims[order] - sims[order].max()) / TEMPERATURE)
        weights /= weights.sum()
        scores = np.zeros(C)
        for rank in range(min(k, max_k)):
            scores[bank_labels[order[rank]]] += weights[rank]
        all_scores.append(scores)
    return np.stack(all_scores)


@pytest.mark.parametrize("bank_chunk_size, query_chunk_size", [(65536, 1024), (7, 5)])
def test_knn_accuracy_matches_brute_force_loop(bank_chunk_size, query_chunk_size):
    num_classes, ks = 7, (1, 10, 20, 100, 400)
    bank, bank_labels = _clustered(300, num_classes, 16, seed=0)
    queries, query_labels = _clustered(90, num_classes, 16, seed=1)
    metric = KNNAccuracy(
        ks=ks, temperature=TEMPERATURE, bank_chunk_size=bank_chunk_size, query_chunk_size=query_chunk_size
    )
    for part in torch.split(torch.arange(300), 64):  # several updates, as in an epoch
        metric.update(bank[part], bank_labels[part], bank=True)
    metric.update(queries, query_labels, bank=False)
    result = metric.compute()
    assert set(result) == {f"top{t}_k{k}" for k in ks for t in (1, 5)}
    max_k = min(max(ks), 300)
    for k in ks:
        scores = _brute_force_scores(queries.numpy(), bank.numpy(), bank_labels.numpy(), k, max_k, num_classes)
        predictions = scores.argmax(axis=1)
        top5 = np.argsort(-scores, axis=1, kind="stable")[:, :5]
        expected_top1 = (predictions == query_labels.numpy()).mean()
        voted = np.take_along_axis(scores, top5, axis=1) > 0
        expected_top5 = ((top5 == query_labels.numpy()[:, None]) & voted).any(axis=1).mean()
        assert result[f"top1_k{k}"].item() == pytest.approx(expected_top1, abs=1e-6), k
        assert result[f"top5_k{k}"].item() == pytest.approx(expected_top5, abs=1e-6), k
        assert 0.2 < expected_top1 < 1.0  # informative: neither chance nor trivially perfect
    # k=400 exceeds the 300-vector bank: it is clipped, so every bank vector votes (still not a perfect score).
    assert result["top1_k400"] < 1.0


def test_knn_predictions_match_sklearn_weighted_neighbours():
    """With k = max_k, the softmax vote equals sklearn's distance-weighted vote with weight exp(cos_sim / T)."""
    num_classes = 5
    bank, bank_labels = _clustered(400, num_classes, 12, seed=2)
    queries, _ = _clustered(150, num_classes, 12, seed=3)
    bank_n = torch.nn.functional.normalize(bank, dim=1).numpy().astype(np.float64)
    query_n = torch.nn.functional.normalize(queries, dim=1).numpy().astype(np.float64)
    for k in (10, 20):
        sklearn_knn = KNeighborsClassifier(
            n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1.0 - d) / TEMPERATURE)
        )
        expected = sklearn_knn.fit(bank_n, bank_labels.numpy()).predict(query_n)
        ours = knn_predict(queries, bank, bank_labels, ks=(k,), temperature=TEMPERATURE)[k].numpy()
        assert (ours == expected).all(), f"k={k}: {(ours != expected).sum()} predictions differ from sklearn"


def test_knn_accuracy_no_top5_with_few_classes_and_errors():
    metric = KNNAccuracy(ks=(3,))
    with pytest.raises(ValueError, match="empty bank"):
        metric.compute()
    metric.update(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), bank=True)
    with pytest.raises(ValueError, match="no queries"):
        metric.compute()
    metric.update(torch.randn(2, 4), torch.tensor([0, 1]), bank=False)
    assert set(metric.compute()) == {"top1_k3"}  # top-5 of 3 classes would always be 1
    with pytest.raises(ValueError, match="unlabelled"):
        metric.update(torch.randn(2, 4), torch.tensor([0, -1]), bank=True)
    with pytest.raises(ValueError, match="out of range"):
        KNNAccuracy(num_classes=3).update(torch.randn(2, 4), torch.tensor([0, 3]), bank=True)
    with pytest.raises(ValueError, match="ks"):
        KNNAccuracy(ks=())
    with pytest.raises(ValueError, match="temperature"):
        KNNAccuracy(temperature=0.0)


def test_knn_accuracy_identical_queries_are_perfect():
    bank, labels = _clustered(50, 4, 8, seed=4)
    metric = KNNAccuracy(ks=(1,))
    metric.update(bank, labels, bank=True)
    metric.update(bank * 3.0, labels, bank=False)  # scale-invariant: features are L2-normalised
    assert metric.compute()["top1_k1"].item() == 1.0


# ------------------------------------------------------------------------------------------- the KNN module
class _ColourSquares(Dataset):
    """Tiny labelled set whose class is the image's dominant colour channel: easy for any backbone."""

    def __init__(self, num: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (num,), generator=generator)
        self.images = 0.3 * torch.randn(num, 3, 32, 32, generator=generator)
        self.images[torch.arange(num), self.labels] += 2.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"images": self.images[index], "labels": self.labels[index], "indices": index}


class _KNNData(L.LightningDataModule):
    def val_dataloader(self):
        return [DataLoader(_ColourSquares(48, 0), batch_size=16), DataLoader(_ColourSquares(24, 1), batch_size=16)]


def test_knn_module_validate_matches_metric_on_extracted_features():
    torch.manual_seed(0)
    model = KNN(backbone_kwargs=TINY_BACKBONE, feature_type="cls_meanpatch", ks=(5, 10), num_classes=3)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    logged = trainer.validate(model, datamodule=_KNNData())[0]
    # Independent computation from the same backbone's features.
    bank_set, query_set = _ColourSquares(48, 0), _ColourSquares(24, 1)
    with torch.no_grad():
        out_bank = model.backbone(bank_set.images)
        out_query = model.backbone(query_set.images)
    bank = torch.cat([out_bank["cls"], out_bank["patch"].mean(1)], dim=1)
    queries = torch.cat([out_query["cls"], out_query["patch"].mean(1)], dim=1)
    for k in (5, 10):
        predictions = knn_predict(queries, bank, bank_set.labels, ks=(k,), num_classes=3)[k]
        expected = (predictions == query_set.labels).float().mean().item()
        assert logged[f"knn/top1_k{k}"] == pytest.approx(expected, abs=1e-6)
    assert logged["knn/top1_k5"] > 0.9  # the dominant colour survives a random backbone's mean patch token


def test_knn_module_needs_bank_and_queries():
    class OneLoader(L.LightningDataModule):
        def val_dataloader(self):
            return DataLoader(_ColourSquares(16, 0), batch_size=8)

    model = KNN(backbone_kwargs=TINY_BACKBONE, ks=(3,))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(ValueError, match=r"\[bank, queries\]"):
        trainer.validate(model, datamodule=OneLoader())
