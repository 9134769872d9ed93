"""Image retrieval: revisitop's metric against its own numbers, the revisited Oxford / Paris reader on a copy of the
distributed layout, the [database, queries] DataModule, the Retrieval module on hand-made features with a known
answer, and the three configs through the CLI."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dinov3_pl.cli import main as cli_main
from dinov3_pl.data.retrieval import RetrievalDataModule, RetrievalTransform, RevisitedDataset, retrieval_collate
from dinov3_pl.metrics.retrieval import (
    EASY,
    HARD,
    JUNK,
    PROTOCOLS,
    average_precision,
    precision_at_k,
    rank_by_cosine,
    relevance_from_labels,
    revisited_scores,
)
from dinov3_pl.modules.bank_query import BankQueryEvaluation
from dinov3_pl.modules.retrieval import Retrieval
from tests.fixtures.revisited import DATABASE_SHAPES, GROUND_TRUTH, QUERY_BOXES, write_revisited
from tests.test_bank_query import simulate_ranks

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "eval"
GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "revisited_golden.json").read_text())
TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "img_size": 32}


def relevance_of(ground_truth: list[dict], num_database: int) -> torch.Tensor:
    codes = torch.zeros(len(ground_truth), num_database, dtype=torch.uint8)
    for query, truth in enumerate(ground_truth):
        for key, code in (("easy", EASY), ("hard", HARD), ("junk", JUNK)):
            codes[query, list(truth[key])] = code
    return codes


def trainer(**kwargs) -> L.Trainer:
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    return L.Trainer(enable_model_summary=False, enable_checkpointing=False, **{**options, **kwargs})


# ------------------------------------------------------------------------------------------------ the metric
@pytest.mark.parametrize("case", sorted(GOLDEN["cases"]))
def test_revisited_scores_equal_revisitops_compute_map(case):
    """Per-query AP (NaN where a protocol has no positive), mAP and mP@k of every protocol, as revisitop computed
    them on the same rankings (tests/fixtures/revisited_golden.json says where the numbers come from)."""
    ranking = torch.tensor(GOLDEN["cases"][case]["ranking"])
    relevance = relevance_of(GOLDEN["gnd"], ranking.shape[1])
    scores = revisited_scores(ranking, relevance, ks=GOLDEN["ks"])
    for protocol in ("easy", "medium", "hard"):
        golden = GOLDEN["cases"][case][protocol]
        assert float(scores[f"mAP_{protocol}"]) == pytest.approx(golden["mAP"], abs=1e-12)
        for k, value in zip(GOLDEN["ks"], golden["mP"], strict=True):
            assert float(scores[f"mP@{k}_{protocol}"]) == pytest.approx(value, abs=1e-12)
        positive_codes, ignored_codes = PROTOCOLS[protocol]
        ranked = relevance.long().gather(1, ranking)
        positive = torch.isin(ranked, torch.tensor(positive_codes))
        per_query = average_precision(positive, torch.isin(ranked, torch.tensor(ignored_codes)))
        expected = torch.tensor([float("nan") if ap is None else ap for ap in golden["aps"]], dtype=torch.float64)
        assert torch.allclose(per_query, expected, atol=1e-12, equal_nan=True)


def test_average_precision_by_hand_and_junk_ranked_first_changes_nothing():
    # One positive at 0-based rank 1: revisitop's trapezoid gives (0/1 + 1/2) / 2 = 0.25 (non-interpolated AP: 0.5).
    assert average_precision(torch.tensor([[False, True, False]])).item() == pytest.approx(0.25)
    # Positives at ranks 0 and 2 of 4: (1 + 1) / 2 / 2 + (1/2 + 2/3) / 2 / 2 = 0.5 + 0.291666...
    assert average_precision(torch.tensor([[True, False, True, False]])).item() == pytest.approx(0.5 + 7 / 24)
    positive = torch.tensor([[True, False, True, False, False]])
    clean = average_precision(positive).item()
    # The same positives behind a junk image (the query's own duplicate, say): ignored, AP unchanged; counted as a
    # negative it would lower AP.
    with_junk_first = torch.tensor([[False, True, False, True, False, False]])
    junk = torch.tensor([[True, False, False, False, False, False]])
    assert average_precision(with_junk_first, junk).item() == pytest.approx(clean)
    assert average_precision(with_junk_first).item() < clean
    assert precision_at_k(with_junk_first, junk, 1).item() == 1.0
    assert precision_at_k(with_junk_first, None, 1).item() == 0.0
    # All positives on top: 1; no positive: NaN (left out of the mean).
    assert average_precision(torch.tensor([[True, True, False]])).item() == 1.0
    assert torch.isnan(average_precision(torch.tensor([[False, False]]))).all()


def test_precision_at_k_stops_at_the_last_positive_as_revisitop():
    # Positives at 1-based ranks 1 and 3: P@1 = 1, P@5 = 2 / min(5, 3) = 2/3 (not 2/5).
    positive = torch.tensor([[True, False, True, False, False, False]])
    assert precision_at_k(positive, None, 1).item() == 1.0
    assert precision_at_k(positive, None, 5).item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k >= 1"):
        precision_at_k(positive, None, 0)


def test_rank_by_cosine_ignores_feature_scale_and_breaks_ties_by_database_order():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0]])
    queries = torch.tensor([[10.0, 0.0], [0.0, 0.5]])
    # Rows 0 and 2 have the same direction (a tie): the lower index first.
    assert rank_by_cosine(queries, bank).tolist() == [[0, 2, 3, 1], [1, 3, 0, 2]]
    assert rank_by_cosine(queries, bank, chunk_size=1).equal(rank_by_cosine(queries, bank))
    relevance = relevance_from_labels(torch.tensor([3, 1]), torch.tensor([3, 1, 1, 3]))
    assert relevance.tolist() == [[EASY, 0, 0, EASY], [0, EASY, EASY, 0]]


def test_revisited_scores_refuse_mismatched_shapes_and_unknown_protocols():
    with pytest.raises(ValueError, match=r"must both be \[queries, bank\]"):
        revisited_scores(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"unknown protocols \['medum'\]"):
        revisited_scores(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.uint8), ("medum",))


# ------------------------------------------------------------------------------------------------ the reader
@pytest.fixture(scope="module")
def oxford(tmp_path_factory) -> dict:
    return write_revisited(tmp_path_factory.mktemp("roxford5k"), "roxford5k")


def test_reader_gives_database_images_and_cropped_queries_with_their_ground_truth(oxford):
    root = oxford["root"]
    database = RevisitedDataset(root, split="database")
    queries = RevisitedDataset(root, split="queries")
    assert database.name == "roxford5k" and len(database) == len(DATABASE_SHAPES) and len(queries) == 2
    for index, stem in enumerate(oxford["imlist"]):
        sample = database[index]
        expected = np.asarray(Image.open(root / "jpg" / f"{stem}.jpg").convert("RGB"))
        assert sample["label"] == -1 and "relevance" not in sample
        np.testing.assert_array_equal(sample["image"], expected)
    for index, stem in enumerate(oxford["qimlist"]):
        sample = queries[index]
        # revisitop's example_process_images.py: pil_loader(path).crop(gnd[i]["bbx"]).
        expected = np.asarray(Image.open(root / "jpg" / f"{stem}.jpg").convert("RGB").crop(QUERY_BOXES[index]))
        np.testing.assert_array_equal(sample["image"], expected)
        codes = sample["relevance"]
        assert codes.dtype == np.uint8 and codes.shape == (len(DATABASE_SHAPES),)
        for key, code in (("easy", EASY), ("hard", HARD), ("junk", JUNK)):
            assert sorted(np.flatnonzero(codes == code).tolist()) == GROUND_TRUTH[index][key]
    whole = RevisitedDataset(root, split="queries", crop_queries=False)[0]["image"]
    assert whole.shape[:2] == (30, 40)


def test_reader_finds_the_dataset_below_revisitops_data_folder(tmp_path):
    write_revisited(tmp_path / "rparis6k", "rparis6k")
    assert RevisitedDataset(tmp_path, split="queries", name="rparis6k").name == "rparis6k"
    assert RevisitedDataset(tmp_path / "rparis6k", split="database").num_database == len(DATABASE_SHAPES)


def test_reader_errors_say_what_to_change(tmp_path):
    written = write_revisited(tmp_path / "roxford5k", with_pickle=False)
    root = written["root"]
    with pytest.raises(FileNotFoundError, match=r"needs exactly one ground-truth file gnd_<name>.pkl \(found none\)"):
        RevisitedDataset(root)
    with pytest.raises(FileNotFoundError, match=r"no gnd_roxford5k.pkl in .* \(expected root/gnd_roxford5k.pkl and"):
        RevisitedDataset(root, name="roxford5k")
    content = {key: written[key] for key in ("imlist", "qimlist", "gnd")}
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(content))
    missing = root / "jpg" / f"{written['imlist'][2]}.jpg"
    missing.unlink()
    with pytest.raises(
        FileNotFoundError, match=r"1 of the 6 database images listed in gnd_roxford5k.pkl \(imlist\) are"
    ):
        RevisitedDataset(root, split="database")
    assert len(RevisitedDataset(root, split="queries")) == 2  # the queries are all there
    with pytest.raises(ValueError, match="split must be 'database' or 'queries'"):
        RevisitedDataset(root, split="query")
    (root / "gnd_other.pkl").write_bytes(pickle.dumps({"imlist": []}))
    with pytest.raises(FileNotFoundError, match=r"found gnd_other.pkl, gnd_roxford5k.pkl"):
        RevisitedDataset(root)
    with pytest.raises(ValueError, match=r"must hold a dict with 'imlist', 'qimlist' and 'gnd'.*got \['imlist'\]"):
        RevisitedDataset(root, name="other")
    bad = dict(content, gnd=[dict(content["gnd"][0], junk=np.array([6])), content["gnd"][1]])
    (root / "gnd_other.pkl").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match=r"gnd\[0\]\['junk'\] holds database index 6, outside the 6 images"):
        RevisitedDataset(root, name="other")


# ------------------------------------------------------------------------------------------------ the DataModule
def test_transform_keeps_the_aspect_ratio_on_whole_patches():
    transform = RetrievalTransform(image_size=224, size_multiple=16)
    assert transform.output_size(1024, 640) == (224, 144)  # 140 px: the nearest multiple of 16
    assert transform.output_size(1024, 768) == (224, 176)  # 168 px, half-way: up
    assert transform.output_size(500, 1000) == (112, 224)
    assert transform.output_size(10, 1000) == (16, 224)  # never below one patch
    image = np.zeros((36, 18, 3), dtype=np.uint8)
    assert RetrievalTransform(32, 8)(image).shape == (3, 32, 16)
    with pytest.raises(ValueError, match=r"image_size \(4\) must be at least size_multiple \(8\)"):
        RetrievalTransform(4, 8)


def test_datamodule_gives_database_and_query_loaders_of_the_benchmark(oxford):
    root = oxford["root"]
    data = RetrievalDataModule(
        database=RevisitedDataset(root, split="database"),
        queries=RevisitedDataset(root, split="queries"),
        image_size=32,
        size_multiple=8,
    )
    database_loader, query_loader = data.val_dataloader()
    assert len(data.test_dataloader()) == 2
    database_batches, query_batches = list(database_loader), list(query_loader)
    assert [int(b["indices"]) for b in database_batches] == list(range(len(DATABASE_SHAPES)))
    assert all("relevance" not in b and int(b["labels"]) == -1 for b in database_batches)
    assert tuple(database_batches[4]["images"].shape) == (1, 3, 32, 16)  # 36 x 18 -> 32 x 16
    assert tuple(query_batches[0]["images"].shape) == (1, 3, 16, 32)  # the 25 x 15 crop of query 0
    assert query_batches[1]["relevance"].tolist() == [[JUNK, 0, HARD, JUNK, 0, HARD]]
    with pytest.raises(ValueError, match="set the data's batch_size: 1"):
        retrieval_collate([data.split("database")[0], data.split("database")[1]])


def test_datamodule_needs_both_datasets_and_defaults_to_synthetic_shapes(oxford):
    with pytest.raises(ValueError, match="RetrievalDataModule got database but no queries: pass both"):
        RetrievalDataModule(database=RevisitedDataset(oxford["root"]))
    data = RetrievalDataModule(image_size=64, size_multiple=8, batch_size=16)
    assert (len(data.split("database")), len(data.split("queries"))) == (512, 128)
    batch = next(iter(data.val_dataloader()[1]))
    assert tuple(batch["images"].shape) == (16, 3, 64, 64) and bool((batch["labels"] >= 0).all())


# ------------------------------------------------------------------------------------------------ the module
# Cosine similarity of query q (a unit axis) to database image i (unit norm), chosen so that each query's ranking
# puts a junk image among its positives: query 0 ranks [1 junk, 0 easy, 3 easy, 4 hard, 2, 5], query 1 ranks
# [2 hard, 0 junk, 5 hard, 3 junk, 1, 4].
SIMILARITY = torch.tensor([[0.6, 0.69, 0.3, 0.5, 0.4, 0.2], [0.6, 0.3, 0.69, 0.4, 0.2, 0.5]])


def hand_made_features(similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_queries, num_database = similarity.shape
    database = torch.zeros(num_database, num_queries + num_database)
    database[:, :num_queries] = similarity.T
    database[:, num_queries:] = torch.diag((1 - similarity.pow(2).sum(dim=0)).sqrt())
    return database, torch.eye(num_queries, num_queries + num_database)


class HandMadeRetrieval(Retrieval):
    """Features looked up by (loader, dataset index) instead of computed; scaled by an arbitrary factor per row,
    which cosine ranking must ignore."""

    def __init__(self, database: torch.Tensor, queries: torch.Tensor) -> None:
        super().__init__(backbone_kwargs=TINY)
        self.table = (database * torch.arange(1, len(database) + 1)[:, None], 3 * queries)
        self.batches: list[int] = []

    def batch_features(self, batch: dict, stage: str, dataloader_idx: int = 0) -> torch.Tensor:
        self.batches.append(dataloader_idx)
        return self.table[dataloader_idx][batch["indices"]]


def test_retrieval_scores_the_revisited_protocols_and_ignores_junk_ranked_first(oxford):
    root = oxford["root"]
    data = RetrievalDataModule(
        RevisitedDataset(root, split="database"),
        RevisitedDataset(root, split="queries"),
        image_size=32,
        size_multiple=8,
    )
    model = HandMadeRetrieval(*hand_made_features(SIMILARITY))
    scores = trainer().validate(model, datamodule=data)[0]
    assert model.batches == [0] * 6 + [1] * 2
    # Junk is ignored and hard positives are ignored in Easy / easy ones in Hard: every ranking is perfect. Query 1
    # has no easy positive, so Easy is query 0's alone.
    assert {name: scores[f"retrieval/mAP_{name}"] for name in ("easy", "medium", "hard")} == {
        "easy": 1.0,
        "medium": 1.0,
        "hard": 1.0,
    }
    assert scores["retrieval/mP@1_hard"] == scores["retrieval/mP@10_medium"] == 1.0
    # An easy positive of query 0 moved below two negatives lowers Easy and Medium, not Hard (it is ignored there).
    moved = SIMILARITY.clone()
    moved[0, 3] = 0.1  # easy positive 3 now last for query 0: ranking [1 junk, 0, 4, 2, 5, 3]
    scores = trainer().validate(HandMadeRetrieval(*hand_made_features(moved)), datamodule=data)[0]
    # Medium, query 0 without junk: positives at ranks 0 (0), 1 (4), 4 (3): (1 + 1)/2 + (1 + 1)/2 + (2/4 + 3/5)/2,
    # over 3 positives; query 1 stays 1.
    query_0 = (1 + 1 + (2 / 4 + 3 / 5) / 2) / 3
    assert scores["retrieval/mAP_medium"] == pytest.approx((query_0 + 1) / 2)
    # Easy, query 0 alone, junk 1 and hard 4 out: [0, 2, 5, 3], positives at ranks 0 and 3.
    assert scores["retrieval/mAP_easy"] == pytest.approx((1 + (1 / 3 + 2 / 4) / 2) / 2)
    # Hard ignores easy 3: unchanged.
    assert scores["retrieval/mAP_hard"] == 1.0


def test_scores_do_not_depend_on_batch_order_or_query_chunks():
    """The gathered rows come in dataset order whatever order (or rank) the batches came from; queries ranked one
    at a time (query_chunk_size=1) score as when ranked together."""
    database, queries = hand_made_features(SIMILARITY.flip(1))
    relevance = relevance_of(list(GROUND_TRUTH), len(database))

    def scores(order: list[int], query_chunk_size: int = 1024) -> dict:
        model = Retrieval(backbone_kwargs=TINY, query_chunk_size=query_chunk_size)
        for index in order:
            model.update(database[[index]], {"indices": torch.tensor([index]), "labels": torch.tensor([-1])}, True)
        for index in (1, 0):
            batch = {"indices": torch.tensor([index]), "relevance": relevance[[index]]}
            model.update(queries[[index]], batch, False)
        return model.compute()

    reference = scores([0, 1, 2, 3, 4, 5])
    assert 0 < float(reference["mAP_medium"]) < 1
    for other in (scores([4, 1, 5, 0, 3, 2]), scores([0, 1, 2, 3, 4, 5], query_chunk_size=1)):
        assert other.keys() == reference.keys()
        assert all(torch.equal(other[name], reference[name]) for name in reference)


def test_every_simulated_rank_scores_the_whole_database():
    """Two simulated DDP ranks, each fed its strided shard (ShardedEvalSampler's split) of the database and of the
    queries: both compute the single-process scores, from the rows the base class gathers."""
    database, queries = hand_made_features(SIMILARITY.flip(1))  # a ranking with imperfect scores
    relevance = relevance_of(list(GROUND_TRUTH), len(database))
    labels = torch.full((len(database),), -1)

    def scores(rank: int, world: int, all_gather) -> dict:
        model = Retrieval(backbone_kwargs=TINY)
        model._all_gather = lambda: all_gather
        bank_shard, query_shard = torch.arange(rank, len(database), world), torch.arange(rank, len(queries), world)
        model.update(database[bank_shard], {"indices": bank_shard, "labels": labels[bank_shard]}, is_bank=True)
        batch = {"indices": query_shard, "relevance": relevance[query_shard]}
        model.update(queries[query_shard], batch, is_bank=False)
        return model.compute()

    single = scores(0, 1, lambda tensor: tensor)
    assert 0 < float(single["mAP_medium"]) < 1
    for result in simulate_ranks(2, lambda rank, all_gather: scores(rank, 2, all_gather)):
        assert not isinstance(result, Exception), result
        assert all(torch.equal(result[name], single[name]) for name in single)


class LabelFeatures(Retrieval):
    """Features: the one-hot label plus noise (``noise`` large: features say nothing about the label)."""

    def __init__(self, noise: float) -> None:
        super().__init__(backbone_kwargs=TINY)
        self.noise = noise

    def batch_features(self, batch: dict, stage: str, dataloader_idx: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(batch["indices"][0]) + 1000 * dataloader_idx)
        noise = torch.randn(len(batch["labels"]), 8, generator=generator)
        return torch.nn.functional.one_hot(batch["labels"], 8).float() + self.noise * noise


def test_labelled_retrieval_positives_share_the_query_label():
    from dinov3_pl.data import SyntheticShapes

    def data() -> RetrievalDataModule:
        database, queries = SyntheticShapes(64, image_size=16, seed=0), SyntheticShapes(16, image_size=16, seed=1)
        return RetrievalDataModule(database, queries, image_size=16, size_multiple=8, batch_size=32)

    informative = trainer().validate(LabelFeatures(noise=0.1), datamodule=data())[0]
    assert informative == {"retrieval/mAP": 1.0, "retrieval/mP@1": 1.0, "retrieval/mP@5": 1.0, "retrieval/mP@10": 1.0}
    uninformative = trainer().validate(LabelFeatures(noise=100.0), datamodule=data())[0]
    assert uninformative["retrieval/mAP"] < 0.4  # chance: about 1/8 of the database shares a query's label


def test_unlabelled_queries_without_ground_truth_are_one_clear_error(oxford):
    model = Retrieval(backbone_kwargs=TINY)
    model.update(torch.randn(2, 4), {"indices": torch.tensor([0, 1]), "labels": torch.tensor([-1, -1])}, True)
    model.update(torch.randn(1, 4), {"indices": torch.tensor([0]), "labels": torch.tensor([-1])}, False)
    with pytest.raises(ValueError, match="the database has unlabelled images .* or queries with a 'relevance'"):
        model.compute()
    with pytest.raises(ValueError, match=r"needs 'labels' in the queries batches \(or 'relevance'"):
        model.update(torch.randn(1, 4), {"indices": torch.tensor([0])}, False)
    assert isinstance(model, BankQueryEvaluation) and model.metric_prefix == "retrieval"
    images = {"images": torch.zeros(1, 3, 24, 36), "indices": torch.tensor([0])}
    with pytest.raises(
        ValueError, match=r"a 24x36 image is not made of whole 8-pixel patches: set the data's size_mul"
    ):
        model.batch_features(images, "val")
    with pytest.raises(ValueError, match="ks must be a non-empty list of cut-offs >= 1"):
        Retrieval(backbone_kwargs=TINY, ks=[0])


# ------------------------------------------------------------------------------------------------ the configs
def run_config(config: str, tmp_path: Path, *overrides: str) -> dict:
    cli = cli_main(
        [
            "validate",
            "--config",
            str(CONFIGS / f"{config}.yaml"),
            "--model.init_args.weights=null",
            f"--model.init_args.backbone_kwargs={json.dumps(TINY)}",
            "--model.init_args.arch=vit_small_patch16_dinov3",
            "--data.init_args.num_workers=0",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
            *overrides,
        ]
    )
    return {name: float(value) for name, value in cli.trainer.callback_metrics.items()}


@pytest.mark.parametrize("config, name", [("retrieval_roxford", "roxford5k"), ("retrieval_rparis", "rparis6k")])
def test_benchmark_config_names_the_released_backbone_and_runs_on_the_layout(config, name, tmp_path):
    printed = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())
    model, data = printed["model"]["init_args"], printed["data"]["init_args"]
    assert (
        model["arch"] == "vit_small_patch16_dinov3_qkvb" and model["weights"] == "dinov3_vits16_pretrain_lvd1689m.pth"
    )
    assert (model["feature_type"], data["size_multiple"], data["batch_size"]) == ("cls", 16, 1)
    # facebookresearch/dino's README commands: Oxford --imsize 224 --multiscale 0, Paris --imsize 512 --multiscale 1
    size, scales = (224, [1.0]) if name == "roxford5k" else (512, [1.0, 2**-0.5, 0.5])
    assert data["image_size"] == size and model["scales"] == pytest.approx(scales)
    database, queries = data["database"]["init_args"], data["queries"]["init_args"]
    assert database["root"] == queries["root"] and (database["split"], queries["split"]) == ("database", "queries")
    header = (CONFIGS / f"{config}.yaml").read_text()
    assert all(number in header for number in ("49.5", "50.0", "58.5", "63.1"))  # the model card's Oxford-H

    root = write_revisited(tmp_path / name, name)["root"]
    roots = [f"--data.init_args.{split}.init_args.root={root}" for split in ("database", "queries")]
    small = ["--data.init_args.image_size=32", "--data.init_args.size_multiple=8"]
    if config == "retrieval_roxford":
        metrics = run_config(config, tmp_path, *roots, *small)
        assert {f"retrieval/mAP_{protocol}" for protocol in ("easy", "medium", "hard")} <= metrics.keys()
        assert all(0 <= value <= 1 for value in metrics.values())
    else:  # fast_dev_run: one batch of each loader, so a database of one image; still scored
        metrics = run_config(config, tmp_path, *roots, *small, "--trainer.fast_dev_run=1")
        assert "retrieval/mAP_medium" in metrics


def test_synthetic_config_validates(tmp_path):
    metrics = run_config(
        "retrieval_synthetic",
        tmp_path,
        "--data.init_args.database.init_args.num_samples=48",
        "--data.init_args.queries.init_args.num_samples=12",
        "--data.init_args.image_size=32",
        "--data.init_args.size_multiple=8",
    )
    assert set(metrics) == {"retrieval/mAP", "retrieval/mP@1", "retrieval/mP@5", "retrieval/mP@10"}
    assert all(0 <= value <= 1 for value in metrics.values())


def test_multiscale_features_average_the_scales_as_dinos_retrieval_script():
    """scales [1, 1/sqrt(2), 1/2]: the mean of the CLS features of the bilinearly resized image (floored sides), each
    cut to whole patches (what a strided patch embedding sees), against sizes worked out by hand for a 45x61 image."""
    torch.manual_seed(0)
    model = Retrieval(backbone_kwargs=TINY, scales=[1.0, 2**-0.5, 0.5])
    images = torch.randn(2, 3, 45, 61)
    by_hand = []
    for size, kept in (((45, 61), (40, 56)), ((31, 43), (24, 40)), ((22, 30), (16, 24))):
        resized = torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
        by_hand.append(model.backbone(resized[..., : kept[0], : kept[1]])["cls"])
    torch.testing.assert_close(model.features(images), torch.stack(by_hand).mean(0))
    single = Retrieval(backbone_kwargs=TINY)
    single.load_state_dict(model.state_dict())
    torch.testing.assert_close(single.features(images[..., :40, :56]), by_hand[0])
    with pytest.raises(ValueError, match="scales"):
        Retrieval(backbone_kwargs=TINY, scales=[1.0, 2.0])
    with pytest.raises(ValueError, match="smaller than one"):
        Retrieval(backbone_kwargs=TINY, scales=[0.1]).features(images)
