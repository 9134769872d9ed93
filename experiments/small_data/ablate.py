"""Small-data ablations: one knob at a time around a base pretraining config, at a fixed number of steps.

    python experiments/small_data/ablate.py --study fashion_mnist                 # every variant, ~6 min each (CPU)
    python experiments/small_data/ablate.py --study fashion_mnist --only base lr_x2
    python experiments/small_data/ablate.py --study embedded --steps 256

Each variant is the base config plus a few ``--key=value`` overrides, trained through the project's CLI in this
process for ``--steps`` optimizer steps (schedules are written for that length), then judged by the online kNN
monitor (the EMA teacher's L2-normalised CLS, weighted vote, T = 0.07) on a fixed labelled bank and query set,
evaluated at half and at the full length. Per variant the script records the kNN curve, the final losses, the
number of prototypes the teacher uses and the wall time into ``<out>/<study>/<variant>.json`` (a finished variant
is not rerun), and rewrites ``<out>/<study>/table.md`` with every finished variant.

The steps are fixed (not the wall time), so a busy machine changes the wall-time column, not the accuracies.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/fashion_mnist/run.py

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from unittest import mock  # noqa: E402

import torch  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from dinov3_pl.cli import main as cli_main  # noqa: E402

MODEL = "--model.init_args."
DATA = "--data.init_args."

# study -> base config, default steps, overrides of every variant (monitor size, pinned values), {variant: (what it
# changes, overrides)}
STUDIES: dict[str, dict] = {
    "fashion_mnist": {
        "config": "configs/pretrain/fashion_mnist_cpu.yaml",
        "steps": 150,
        # a larger monitor than the config's (5k / 1k): 10k train images as the bank, 2k test images as queries;
        # the config's LR before this study moved it to 2e-3 (lr_x2), so every variant here has the base it had
        "base_overrides": [f"{DATA}knn_bank_size=10000", f"{DATA}knn_query_size=2000", f"{MODEL}optim.lr=1.0e-3"],
        "variants": {
            "base": ("configs/pretrain/fashion_mnist_cpu.yaml with LR 1e-3", []),
            "upstream_teacher": (
                "teacher temperature 0.04 -> 0.07 (warm-up 30% of the run), momentum 0.996 -> 1, LayerScale 1e-5",
                [
                    f"{MODEL}teacher.temperature=0.07",
                    f"{MODEL}teacher.temperature_warmup_start=0.04",
                    f"{MODEL}teacher.temperature_warmup_steps=45",
                    f"{MODEL}teacher.momentum=0.996",
                    f"{MODEL}backbone.timm_overrides.init_values=1.0e-5",
                ],
            ),
            "teacher_temp_0.04": (
                "teacher temperature 0.04 constant (base 0.01)",
                [f"{MODEL}teacher.temperature=0.04", f"{MODEL}teacher.temperature_warmup_start=0.04"],
            ),
            "teacher_temp_0.02": (
                "teacher temperature 0.02 constant",
                [f"{MODEL}teacher.temperature=0.02", f"{MODEL}teacher.temperature_warmup_start=0.02"],
            ),
            "momentum_0.99": ("EMA momentum 0.99 -> 1 (base 0.96 -> 1)", [f"{MODEL}teacher.momentum=0.99"]),
            "momentum_0.9": ("EMA momentum 0.9 -> 1", [f"{MODEL}teacher.momentum=0.9"]),
            "layerscale_1e-5": (
                "LayerScale init 1e-5 (base 0.1)",
                [f"{MODEL}backbone.timm_overrides.init_values=1.0e-5"],
            ),
            "layerscale_1": ("LayerScale init 1.0", [f"{MODEL}backbone.timm_overrides.init_values=1.0"]),
            "lr_x2": ("base LR 2e-3 (base 1e-3)", [f"{MODEL}optim.lr=2.0e-3"]),
            "lr_x0.5": ("base LR 5e-4", [f"{MODEL}optim.lr=5.0e-4"]),
            "lr_x4": ("base LR 4e-3", [f"{MODEL}optim.lr=4.0e-3"]),
            "prototypes_256": (
                "256 prototypes per head (base 1024)",
                [f"{MODEL}dino_head.num_prototypes=256", f"{MODEL}ibot_head.num_prototypes=256"],
            ),
            "prototypes_4096": (
                "4096 prototypes per head",
                [f"{MODEL}dino_head.num_prototypes=4096", f"{MODEL}ibot_head.num_prototypes=4096"],
            ),
            "local_crops_8": ("8 local crops (base 4)", [f"{DATA}num_local_crops=8"]),
            "local_crops_2": ("2 local crops", [f"{DATA}num_local_crops=2"]),
            "global_scale_0.6": ("global crop scale 0.6-1 (base 0.4-1)", [f"{DATA}global_scale=[0.6,1.0]"]),
            "global_scale_0.25": ("global crop scale 0.25-1", [f"{DATA}global_scale=[0.25,1.0]"]),
            "local_scale_0.2": ("local crop scale 0.2-0.5 (base 0.1-0.4)", [f"{DATA}local_scale=[0.2,0.5]"]),
            "no_ibot": ("iBOT off (weight 0)", [f"{MODEL}loss.ibot_weight=0.0"]),
            "koleo_0": ("KoLeo off (base 0.1)", [f"{MODEL}loss.koleo_weight=0.0"]),
            "koleo_0.3": ("KoLeo 0.3", [f"{MODEL}loss.koleo_weight=0.3"]),
            "mask_ratio_0.3_0.7": ("iBOT mask ratio 0.3-0.7 (base 0.1-0.5)", [f"{DATA}mask_ratio=[0.3,0.7]"]),
            "mask_all_globals": ("iBOT masks on every global crop (base: half)", [f"{DATA}mask_probability=1.0"]),
            "gram_from_75": (
                "Gram anchoring from step 75 (teacher = EMA snapshot there, weight ramp 0 -> 2 over 25 steps)",
                [f"{MODEL}gram.enabled=true", f"{MODEL}gram.start_step=75", f"{MODEL}gram.ramp_steps=25"],
            ),
            "batch_256": ("batch 256 (base 128; LR follows the sqrt rule)", [f"{DATA}batch_size=256"]),
            # architecture: steps are fixed, so compare the accuracy against the wall-time column
            "depth_8": ("8 blocks (base 4)", [f"{MODEL}backbone.timm_overrides.depth=8"]),
            "width_192": (
                "embed dim 192, 6 heads (base 128, 4)",
                [f"{MODEL}backbone.timm_overrides.embed_dim=192", f"{MODEL}backbone.timm_overrides.num_heads=6"],
            ),
        },
    },
    "embedded": {
        "config": "configs/pretrain/demo_cpu.yaml",
        "steps": 256,
        "base_overrides": [],
        "variants": {
            "base": ("configs/pretrain/demo_cpu.yaml as is", []),
            "upstream_teacher": (
                "teacher temperature 0.04 -> 0.07 (warm-up 30% of the run), momentum 0.996 -> 1, LayerScale 1e-5",
                [
                    f"{MODEL}teacher.temperature=0.07",
                    f"{MODEL}teacher.temperature_warmup_start=0.04",
                    f"{MODEL}teacher.temperature_warmup_steps=77",
                    f"{MODEL}teacher.momentum=0.996",
                    f"{MODEL}backbone.timm_overrides.init_values=1.0e-5",
                ],
            ),
            "teacher_temp_0.04": (
                "teacher temperature 0.04 constant (base 0.01)",
                [f"{MODEL}teacher.temperature=0.04", f"{MODEL}teacher.temperature_warmup_start=0.04"],
            ),
            "momentum_0.996": ("EMA momentum 0.996 -> 1 (base 0.96 -> 1)", [f"{MODEL}teacher.momentum=0.996"]),
            "layerscale_1e-5": (
                "LayerScale init 1e-5 (base 0.1)",
                [f"{MODEL}backbone.timm_overrides.init_values=1.0e-5"],
            ),
            "no_ibot": ("iBOT off (weight 0)", [f"{MODEL}loss.ibot_weight=0.0"]),
            "koleo_0": ("KoLeo off (base 0.1)", [f"{MODEL}loss.koleo_weight=0.0"]),
        },
    },
}


def variant_args(study: dict, overrides: list[str], steps: int, run_dir: Path) -> list[str]:
    """The CLI arguments of one variant: fixed steps, two monitor evaluations, its own log and checkpoint folder."""
    return [
        "fit",
        "--config",
        study["config"],
        f"--trainer.max_steps={steps}",
        "--trainer.max_epochs=-1",
        "--trainer.max_time=null",
        f"--trainer.val_check_interval={steps // 2}",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[]",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.logger.init_args.name=tb",
        "--trainer.logger.init_args.version=",
        f"--checkpoint.dirpath={run_dir}/checkpoints",
        "--checkpoint.every_n_train_steps=0",
        "--checkpoint.filename=last",
        *study["base_overrides"],
        *overrides,
    ]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a TensorBoard run: tag -> [(step, value), ...]."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, float(e.value)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def summarise(series: dict[str, list[tuple[int, float]]], tail: int = 5) -> dict[str, float]:
    """The kNN curve (every evaluation) and the mean of the last ``tail`` logged values of each loss."""
    summary: dict[str, float] = {}
    for tag, points in series.items():
        if tag.startswith("knn/"):
            for step, value in points:
                summary[f"{tag}@{step + 1}"] = value
        elif tag.startswith("train/") or tag.startswith("health/"):
            summary[tag] = sum(v for _, v in points[-tail:]) / len(points[-tail:])
    return summary


def run_variant(study_name: str, name: str, steps: int, out: Path) -> dict:
    study = STUDIES[study_name]
    what, overrides = study["variants"][name]
    run_dir = out / study_name / name
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), mock.patch.object(sys, "argv", sys.argv[:1]):
        cli_main(variant_args(study, overrides, steps, run_dir))
    wall = time.perf_counter() - start
    result = {
        "study": study_name,
        "variant": name,
        "what": what,
        "overrides": overrides,
        "steps": steps,
        "wall_s": round(wall, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "metrics": summarise(scalars(run_dir / "tb")),
    }
    (out / study_name / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def table(study_name: str, out: Path) -> str:
    """Markdown table of every finished variant of a study, in the study's order."""
    rows = []
    for name in STUDIES[study_name]["variants"]:
        path = out / study_name / f"{name}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        metrics = result["metrics"]
        knn = sorted((k for k in metrics if k.startswith("knn/top1_k20@")), key=lambda k: int(k.split("@")[1]))
        curve = " → ".join(f"{100 * metrics[k]:.1f}" for k in knn)
        k10 = [k for k in metrics if k.startswith("knn/top1_k10@")]
        last_k10 = 100 * metrics[max(k10, key=lambda k: int(k.split("@")[1]))] if k10 else math.nan
        losses = " / ".join(
            f"{metrics[t]:.2f}" if t in metrics else "-" for t in ("train/dino_global", "train/ibot", "train/koleo")
        )
        rows.append(
            f"| {name} | {result['what']} | {last_k10:.1f} | {curve} | {losses} | {result['steps']} | "
            f"{result['wall_s'] / 60:.1f} |"
        )
    header = (
        "| variant | change | kNN top-1 k=10 | kNN top-1 k=20 (half → end) | DINO global / iBOT / KoLeo (last 5 logs) "
        "| steps | wall min |\n|---|---|---|---|---|---|---|\n"
    )
    return header + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=sorted(STUDIES), required=True)
    parser.add_argument("--only", nargs="*", help="variants to run (default: all, in order)")
    parser.add_argument("--steps", type=int, help="optimizer steps per variant (default: the study's)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "small_data")
    args = parser.parse_args()
    study = STUDIES[args.study]
    steps = args.steps or study["steps"]
    names = args.only or list(study["variants"])
    unknown = sorted(set(names) - set(study["variants"]))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; the study has {list(study['variants'])}")
    (args.out / args.study).mkdir(parents=True, exist_ok=True)
    for name in names:
        if (args.out / args.study / f"{name}.json").exists():
            print(f"{name}: done before, kept", flush=True)
            continue
        print(f"{name}: running {steps} steps ...", flush=True)
        try:
            result = run_variant(args.study, name, steps, args.out)
        except (Exception, SystemExit) as error:  # one broken variant must not cost the others' machine time
            print(f"{name}: FAILED ({type(error).__name__}: {error}); the next variant runs", flush=True)
            continue
        print(f"{name}: {result['wall_s'] / 60:.1f} min", flush=True)
        (args.out / args.study / "table.md").write_text(table(args.study, args.out))
    print(table(args.study, args.out))


if __name__ == "__main__":
    main()
