"""Video label propagation: DAVIS J/F against davis2017-evaluation's numbers, propagation on hand-made features,
the DAVIS 2017 reader on a copy of its layout, and the synthetic config through the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov3_pl.cli import main as cli_main
from dinov3_pl.data.video import DAVIS2017, SyntheticVideos, VideoDataModule, resized_frame_size
from dinov3_pl.metrics.video import DavisJF, boundary_f_measure, region_similarity, video_object_scores
from dinov3_pl.modules.video_propagation import (
    VideoLabelPropagation,
    davis_palette,
    normalise_channels,
    propagate_labels,
    propagation_weights,
    resize_ids,
)
from tests.fixtures.benchmarks import voc_palette
from tests.fixtures.davis import DAVIS_SPLITS, DAVIS_VIDEOS, write_davis

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "eval"
TINY_BACKBONE = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "img_size": 32}


# ------------------------------------------------------------------------------------------------ metrics
def _disk_vs_box() -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[:48, :64]
    ground_truth = (rows - 20) ** 2 + (cols - 30) ** 2 <= 12**2
    prediction = np.zeros((48, 64), bool)
    prediction[10:34, 16:40] = True
    return ground_truth, prediction


def _blobs() -> tuple[np.ndarray, np.ndarray]:
    coarse = np.random.default_rng(0).random((12, 16)) > 0.5
    ground_truth = np.kron(coarse, np.ones((4, 4), dtype=bool))
    return ground_truth, np.roll(ground_truth, (2, 3), axis=(0, 1))


def _video() -> tuple[np.ndarray, np.ndarray]:
    """6 frames, 2 objects and a void strip; object 2 missed in frame 3, a stray object-1 blob in frame 4."""
    ground_truth = np.zeros((6, 40, 56), np.uint8)
    prediction = np.zeros((6, 40, 56), np.uint8)
    for t in range(6):
        ground_truth[t, 5:20, 4 + 3 * t : 20 + 3 * t] = 1
        ground_truth[t, 22:36, 30 - 2 * t : 44 - 2 * t] = 2
        ground_truth[t, 0:2, :] = 255
        prediction[t, 6:20, 5 + 3 * t : 20 + 3 * t] = 1
        if t != 3:
            prediction[t, 22:34, 32 - 2 * t : 44 - 2 * t] = 2
    prediction[4, 0:4, 0:4] = 1
    return ground_truth, prediction


# davis2017-evaluation (github.com/davisvideochallenge/davis2017-evaluation, commit ac7c43fc): db_eval_iou and
# db_eval_boundary of davis2017/metrics.py on the pairs above; the video through
# DAVISEvaluation._evaluate_semisupervised and utils.db_statistics as evaluate() calls them (void read as background,
# frames 1..T-2), run in a scratch folder.
GOLDEN_PAIRS = {
    _disk_vs_box: (0.6699507389162561, 0.32225063938618925),
    _blobs: (0.41098169717138106, 0.5504469584764546),
}
GOLDEN_VIDEO = {
    "J": (0.861328125, 0.5510204081632654),
    "F": (0.9778662004316115, 0.38942307692307687),
    "JF_mean": 0.6949094526294884,
}


@pytest.mark.parametrize("pair", list(GOLDEN_PAIRS), ids=lambda f: f.__name__)
def test_j_and_f_match_davis2017_evaluation(pair):
    ground_truth, prediction = pair()
    region, boundary = GOLDEN_PAIRS[pair]
    assert region_similarity(ground_truth, prediction) == pytest.approx(region, abs=1e-12)
    assert boundary_f_measure(ground_truth, prediction) == pytest.approx(boundary, abs=1e-12)


def test_video_scores_match_davis2017_evaluation():
    region, boundary = video_object_scores(*_video())
    np.testing.assert_allclose(region, GOLDEN_VIDEO["J"], atol=1e-12)
    np.testing.assert_allclose(boundary, GOLDEN_VIDEO["F"], atol=1e-12)
    metric = DavisJF()
    metric.update(*_video())
    assert float(metric.compute()["JF_mean"]) == pytest.approx(GOLDEN_VIDEO["JF_mean"], abs=1e-12)


def test_j_and_f_hand_made_cases():
    ground_truth, _ = _disk_vs_box()
    empty = np.zeros_like(ground_truth)
    assert region_similarity(ground_truth, ground_truth) == boundary_f_measure(ground_truth, ground_truth) == 1.0
    # DAVIS: nothing to find and nothing found is perfect; one side empty scores 0.
    assert region_similarity(empty, empty) == boundary_f_measure(empty, empty) == 1.0
    assert region_similarity(ground_truth, empty) == boundary_f_measure(ground_truth, empty) == 0.0
    assert region_similarity(empty, ground_truth) == boundary_f_measure(empty, ground_truth) == 0.0
    # The boundary tolerance is ceil(0.008 * diagonal) = 1 px here: a 1 px shift keeps F at 1, J drops.
    shifted = np.roll(ground_truth, 1, axis=1)
    assert boundary_f_measure(ground_truth, shifted) == 1.0
    assert region_similarity(ground_truth, shifted) < 0.95
    assert boundary_f_measure(ground_truth, np.roll(ground_truth, 3, axis=1)) < 1.0


def test_scores_are_means_over_objects_summed_across_processes():
    """Two videos of 1 and 2 objects: the means are over the 3 objects, and two metric copies (two ranks) merged give
    the same numbers as one that saw both videos."""
    ground_truth, prediction = _video()
    single, single_prediction = ground_truth.copy(), prediction.copy()
    single[single == 2] = 0
    single_prediction[single_prediction == 2] = 0
    one_region, one_boundary = video_object_scores(single, single_prediction)
    two_region, two_boundary = video_object_scores(ground_truth, prediction)
    assert len(one_region) == 1 and len(two_region) == 2
    both, rank0, rank1 = DavisJF(), DavisJF(), DavisJF()
    both.update(single, single_prediction)
    both.update(ground_truth, prediction)
    rank0.update(single, single_prediction)
    rank1.update(ground_truth, prediction)
    rank0.merge_state(rank1)  # the states' dist_reduce_fx="sum", as a DDP sync applies it
    expected_j = (one_region.sum() + two_region.sum()) / 3
    expected_f = (one_boundary.sum() + two_boundary.sum()) / 3
    for scores in (both.compute(), rank0.compute()):
        assert float(scores["J_mean"]) == pytest.approx(expected_j)
        assert float(scores["F_mean"]) == pytest.approx(expected_f)
        assert float(scores["JF_mean"]) == pytest.approx((expected_j + expected_f) / 2)
    assert expected_j != pytest.approx((one_region.mean() + two_region.mean()) / 2)  # not a mean over videos


def test_video_scores_skip_first_and_last_frame_and_refuse_unknown_ids():
    ground_truth, prediction = _video()
    spoiled = prediction.copy()
    spoiled[0] = 0  # frame 0 is given, the last frame is not scored either
    spoiled[-1] = 0
    np.testing.assert_array_equal(
        video_object_scores(ground_truth, spoiled)[0], video_object_scores(ground_truth, prediction)[0]
    )
    spoiled[2, 0, 0] = 3
    with pytest.raises(ValueError, match="object id 3, but the first frame has 2"):
        video_object_scores(ground_truth, spoiled, "clip")


# ------------------------------------------------------------------------------------------------ propagation
def _moving_positions(frames: int, height: int, width: int) -> torch.Tensor:
    """Features [T, N, D]: one-hot of the scene position a patch shows; the scene moves one patch right per frame
    (new positions enter on the left), so a patch matches exactly one patch of every earlier frame that shows its
    position."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    scene_width = width + frames
    features = []
    for t in range(frames):
        position = rows * scene_width + cols - t + frames
        features.append(torch.nn.functional.one_hot(position.flatten(), height * scene_width).float())
    return torch.stack(features)


@pytest.mark.parametrize("topk, neighbourhood_size", [(1, 0), (5, 12), (5, 1)])
def test_one_hot_positions_propagate_a_translated_mask_perfectly(topk, neighbourhood_size):
    """With a 1-patch neighbourhood the first frame is out of reach after frame 1: the labels must come through the
    queue of predicted frames."""
    frames, height, width = 5, 4, 10
    first = torch.zeros(height, width, dtype=torch.long)
    first[1:3, 3:5] = 1
    first[3, 3:6] = 2
    labels = torch.nn.functional.one_hot(first.flatten(), 3).T.float()
    soft = propagate_labels(
        _moving_positions(frames, height, width), labels, (height, width), 7, neighbourhood_size, topk, 0.1
    )
    for t in range(frames):
        expected = torch.roll(first, t, dims=1)  # the objects stay inside the frame: nothing wraps round
        assert torch.equal(soft[t].argmax(dim=0).reshape(height, width), expected), t


def _dino_reference_weights(target, context, size, grid, topk, temperature):
    """The affinity of DINO's label_propagation written as it is there: exp(cos / T) times a 0/1 neighbourhood from
    explicit loops, values below the top-k-th of each column zeroed, columns normalised."""
    height, width = grid
    mask = torch.zeros(height, width, height, width)
    for i in range(height):
        for j in range(width):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    a, b = i - size + p, j - size + q
                    if 0 <= a < height and 0 <= b < width:
                        mask[i, j, a, b] = 1
    mask = mask.reshape(height * width, height * width)
    affinity = torch.exp(torch.bmm(target[None].repeat(len(context), 1, 1), context.transpose(1, 2)) / temperature)
    affinity = affinity * mask[None]  # [S, queries, keys]
    affinity = affinity.transpose(2, 1).reshape(-1, height * width)
    kth = torch.topk(affinity, dim=0, k=topk).values.min(dim=0).values
    affinity[affinity < kth] = 0
    return affinity / affinity.sum(dim=0, keepdim=True)


def test_propagation_weights_match_dinos_formula():
    from dinov3_pl.modules.video_propagation import neighbourhood_mask

    generator = torch.Generator().manual_seed(0)
    grid, dim = (5, 6), 16
    target = torch.nn.functional.normalize(torch.randn(30, dim, generator=generator, dtype=torch.float64), dim=-1)
    context = torch.nn.functional.normalize(torch.randn(3, 30, dim, generator=generator, dtype=torch.float64), dim=-1)
    ours = propagation_weights(target, context, neighbourhood_mask(*grid, 2), topk=5, temperature=0.1)
    reference = _dino_reference_weights(target, context, 2, grid, 5, 0.1)
    torch.testing.assert_close(ours, reference)
    assert ((ours > 0).sum(dim=0) == 5).all()


def test_propagation_runs_in_float32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(4, 20, 16, generator=generator)
    labels = torch.nn.functional.one_hot(torch.randint(0, 3, (20,), generator=generator), 3).T.float()
    reference = propagate_labels(features, labels, (4, 5), neighbourhood_size=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = propagate_labels(features, labels, (4, 5), neighbourhood_size=2)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference)


def test_normalise_channels_as_dinos_norm_mask():
    scores = torch.tensor([[[0.2, 0.6]], [[0.0, 0.0]], [[0.1, 0.05]]])
    out = normalise_channels(scores)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]], [[1.0, 0.0]]]))


def test_ids_resize_as_pils_nearest_filter():
    """DINO resizes the first annotation to the patch grid and the predictions to the annotation size with PIL's
    nearest filter; sizes that do not divide too."""
    ids = np.random.default_rng(0).integers(0, 4, size=(37, 53)).astype(np.uint8)
    for grid in ((4, 6), (5, 7), (37, 53), (40, 61)):
        expected = np.asarray(Image.fromarray(ids).resize(grid[::-1], Image.NEAREST))
        np.testing.assert_array_equal(resize_ids(torch.from_numpy(ids), grid).numpy(), expected)


def test_predict_video_follows_a_translated_object_at_full_resolution(monkeypatch):
    """The module's path (patch-grid first mask, up-sampling, arg-max, resize to the annotation) on features that
    match perfectly: every patch centre gets its object; only the bilinear up-sampling rounds the corners."""
    torch.manual_seed(0)
    model = VideoLabelPropagation(backbone_kwargs=TINY_BACKBONE, neighbourhood_size=2)
    frames, height, width, patch = 4, 4, 8, 8
    first = torch.zeros(height * patch, width * patch, dtype=torch.uint8)
    first[8:24, 24:40] = 1
    first[24:32, 16:32] = 2
    monkeypatch.setattr(model, "frame_features", lambda images: _moving_positions(frames, height, width))
    video = torch.zeros(frames, height * patch, width * patch, 3, dtype=torch.uint8)
    predictions = model.predict_video(video, first)
    ground_truth = torch.stack([torch.roll(first, t * patch, dims=1) for t in range(frames)])
    assert torch.equal(predictions[:, 4::patch, 4::patch], ground_truth[:, 4::patch, 4::patch])
    region, boundary = video_object_scores(ground_truth.numpy(), predictions.numpy())
    assert (region > 0.85).all() and (boundary > 0.85).all(), (region, boundary)
    assert torch.equal(predictions[0], first)


def test_frames_must_fit_the_patch_grid():
    model = VideoLabelPropagation(backbone_kwargs=TINY_BACKBONE)
    with pytest.raises(ValueError, match="not multiples of the patch size 8"):
        model.predict_video(torch.zeros(3, 20, 24, 3, dtype=torch.uint8), torch.zeros(20, 24, dtype=torch.uint8))


def test_result_pngs_use_the_davis_palette(tmp_path):
    assert davis_palette() == voc_palette()
    model = VideoLabelPropagation(backbone_kwargs=TINY_BACKBONE, output_dir=str(tmp_path))
    model._write_results("clip", np.array([[[0, 1], [2, 0]]] * 3, np.uint8))
    with Image.open(tmp_path / "clip" / "00002.png") as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image), [[0, 1], [2, 0]])


# ------------------------------------------------------------------------------------------------ data
def test_davis_reader_reads_the_distributed_layout(tmp_path):
    written = write_davis(tmp_path)
    for root in (tmp_path, tmp_path / "DAVIS"):  # the DAVIS folder or the one holding it
        dataset = DAVIS2017(root, split="val")
        assert dataset.names == list(DAVIS_SPLITS["val"])
        for index, name in enumerate(DAVIS_SPLITS["val"]):
            item = dataset[index]
            frames, height, width, _ = DAVIS_VIDEOS[name]
            assert item["name"] == name and item["frames"].shape == (frames, height, width, 3)
            assert item["frames"].dtype == np.uint8
            np.testing.assert_array_equal(item["masks"], written[name])
    assert DAVIS2017(tmp_path, split="train").names == ["bear"]


@pytest.mark.parametrize(
    "broken, message",
    [
        ({"with_val_list": False}, r"DAVIS video list .*ImageSets/2017/val.txt not found"),
        (
            {"unannotated_video": "dogs-jump"},
            r"DAVIS video 'dogs-jump' has 3 frames but none in .*Annotations/480p/dogs-jump",
        ),
    ],
)
def test_davis_reader_bad_layouts_are_one_clear_line(tmp_path, broken, message):
    write_davis(tmp_path, **broken)
    with pytest.raises(FileNotFoundError, match=message) as error:
        DAVIS2017(tmp_path, split="val")
    assert "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="has no JPEGImages"):
        DAVIS2017(tmp_path / "elsewhere")


def test_data_module_resizes_frames_as_dino_and_keeps_masks(tmp_path):
    assert resized_frame_size(480, 854, 480, 64) == (480, 832)  # DAVIS 480p landscape
    assert resized_frame_size(854, 480, 480, 64) == (832, 480)
    assert resized_frame_size(24, 40, None, 8) == (24, 40)
    written = write_davis(tmp_path)
    data = VideoDataModule(val=DAVIS2017(tmp_path), short_side=16, size_multiple=8)
    data.setup("validate")
    batches = list(data.val_dataloader())
    assert [batch["name"] for batch in batches] == list(DAVIS_SPLITS["val"])
    assert batches[0]["frames"].shape == (4, 16, 24, 3) and batches[0]["frames"].dtype == torch.uint8
    np.testing.assert_array_equal(batches[0]["masks"].numpy(), written["bike-packing"])
    assert data.test_dataloader().dataset is data.val_set  # test falls back to val


def test_data_module_takes_pil_frames():
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 16, 24, 3), dtype=np.uint8)
    video = {"frames": [Image.fromarray(f) for f in frames], "masks": np.zeros((3, 16, 24), np.uint8), "name": "v"}
    data = VideoDataModule(val=[video], short_side=None)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    np.testing.assert_array_equal(batch["frames"].numpy(), frames)
    assert batch["name"] == "v" and batch["masks"].shape == (3, 16, 24)


def test_data_module_refuses_items_outside_the_contract():
    data = VideoDataModule(val=[{"frames": np.zeros((3, 8, 8, 3), np.uint8)}], short_side=None)
    data.setup("validate")
    with pytest.raises(ValueError, match=r"a video needs 'frames' .* and 'masks'"):
        next(iter(data.val_dataloader()))


def test_synthetic_videos_are_seeded_and_keep_every_object_visible():
    videos = SyntheticVideos(num_videos=4, num_frames=5, image_size=48, seed=3)
    again = SyntheticVideos(num_videos=4, num_frames=5, image_size=48, seed=3)
    for index in range(4):
        item = videos[index]
        np.testing.assert_array_equal(item["frames"], again[index]["frames"])
        objects = int(item["masks"][0].max())
        assert 1 <= objects <= 3
        for masks in item["masks"]:
            assert set(np.unique(masks)) == set(range(objects + 1))
    assert not np.array_equal(videos[0]["masks"], SyntheticVideos(4, 5, 48, seed=4)[0]["masks"])


def video_model() -> VideoLabelPropagation:
    """The tiny propagation model of the 2-process check (tests/ddp_eval_worker.py builds the same)."""
    torch.manual_seed(0)
    return VideoLabelPropagation(backbone_kwargs=TINY_BACKBONE, neighbourhood_size=3)


def video_data() -> VideoDataModule:
    """3 synthetic videos: 2 ranks take 2 and 1 of them."""
    return VideoDataModule(
        val=SyntheticVideos(num_videos=3, num_frames=4, image_size=48), short_side=None, size_multiple=8
    )


def test_the_loaders_shard_whole_videos_over_ranks():
    from dinov3_pl.data.samplers import ShardedEvalSampler

    data = video_data()
    data.setup("validate")
    assert isinstance(data.val_dataloader().sampler, ShardedEvalSampler)
    shards = [list(ShardedEvalSampler(data.val_set, num_replicas=2, rank=rank)) for rank in range(2)]
    assert shards == [[0, 2], [1]]


# ------------------------------------------------------------------------------------------------ CLI
def test_validate_the_synthetic_config(tmp_path):
    cli = cli_main(
        [
            "validate",
            "--config",
            str(CONFIGS / "video_synthetic.yaml"),
            "--data.init_args.val.init_args.num_videos=3",
            "--data.init_args.val.init_args.num_frames=4",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    metrics = cli.trainer.callback_metrics
    for name in ("J_mean", "F_mean", "JF_mean"):
        assert 0.0 <= float(metrics[f"davis/{name}"]) <= 1.0
    assert float(metrics["davis/JF_mean"]) == pytest.approx(
        (float(metrics["davis/J_mean"]) + float(metrics["davis/F_mean"])) / 2
    )
    assert not math.isnan(float(metrics["davis/JF_mean"]))
