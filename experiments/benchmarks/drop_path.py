"""Subset stochastic depth (upstream's) vs. timm's per-sample DropPath: student forward+backward, same crops.

    python experiments/benchmarks/drop_path.py                      # CPU, a narrow ViT on the recipe's crop sizes
    python experiments/benchmarks/drop_path.py --device cuda --preset vits16 --bf16

Protocol: one DINOv3 ViT, the student's two forwards of the recipe (global crops, then local crops) and one backward,
with drop path at ``--rate`` (0.3: the IN-1k ViT-L recipe) done by timm's ``DropPath`` (every sample's residual is
computed, dropped ones are zeroed) and by the subset (``drop_path_subset=True``); no drop path as the floor. The
variants are timed in alternating rounds in one process; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dinov3_pl.models.backbone import DINOv3Backbone  # noqa: E402
from experiments.benchmarks.timing import device_line, make_batch, median_seconds  # noqa: E402

PRESETS = {  # name -> (arch overrides, batch, global size, local size, local crops)
    "cpu": ({"embed_dim": 192, "depth": 6, "num_heads": 3}, 16, 112, 48, 8),
    "vits16": ({}, 64, 224, 96, 8),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--rate", type=float, default=0.3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    options = parser.parse_args(argv)
    device = torch.device(options.device)
    overrides, batch_size, global_size, local_size, num_local = PRESETS[options.preset]
    batch = make_batch(batch_size, global_size, local_size, num_local, 16, device)
    torch.manual_seed(0)
    variants = {
        "no drop path": dict(drop_path_rate=0.0),
        "timm DropPath": dict(drop_path_rate=options.rate),
        "subset": dict(drop_path_rate=options.rate, drop_path_subset=True),
    }
    reference = None
    models = {}
    for name, kwargs in variants.items():
        model = DINOv3Backbone("vit_small_patch16_dinov3", **overrides, **kwargs).to(device).train()
        if reference is None:
            reference = model.state_dict()
        model.load_state_dict(reference)
        models[name] = model

    def step(model: DINOv3Backbone):
        def run() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.bf16):
                out_global = model(batch["global_crops"], masks=batch["masks"])
                out_local = model(batch["local_crops"])
                loss = out_global["cls"].float().square().mean() + out_local["cls"].float().square().mean()
                loss = loss + out_global["patch"].float().square().mean()
            loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    seconds = median_seconds(
        {name: step(model) for name, model in models.items()}, device, options.rounds, options.steps_per_round
    )
    print(device_line(device))
    print(
        f"preset {options.preset}: batch {batch_size}, 2 x {global_size} px + {num_local} x {local_size} px crops, "
        f"drop-path rate {options.rate}, {'bf16' if options.bf16 else 'fp32'}, "
        f"{options.rounds} rounds x {options.steps_per_round} steps"
    )
    floor = seconds["no drop path"]
    for name, value in seconds.items():
        print(f"{name:14s} {value * 1e3:8.1f} ms/step  {value / floor:.2f}x of no drop path")
    print(f"subset / timm DropPath: {seconds['subset'] / seconds['timm DropPath']:.2f}")


if __name__ == "__main__":
    main()
