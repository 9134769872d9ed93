"""Throughput of the distillation step vs. the student's bare forward+backward on the same crops.

Protocol (as ssl_step.py): crops and masks are made once and stay in memory; the variants are timed in alternating
rounds in one process and the medians compared.
- "distillation step": ``DistillationModule.compute_losses`` (the frozen teacher's forward of the global crops with
  its DINO/iBOT heads and Sinkhorn-Knopp, the student's masked global and local forwards, its heads and the DINO +
  iBOT + KoLeo losses), backward, per-module clipping, AdamW step and the student's EMA update;
- "bare student": the student backbone's forward on the global and local crops, a backward of the sum of its
  outputs and an AdamW step on the backbone;
- "teacher": the teacher's part alone (no grad, eval mode; bf16 autocast on CUDA like the rest).
The teacher is a ViT about 4x the student's FLOPs (random weights: speed does not depend on them).

    python experiments/benchmarks/distill_step.py                               # CPU
    python experiments/benchmarks/distill_step.py --device cuda --preset vitb16_to_vits16
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from timing import device_line, make_batch, median_seconds, memory_and_mfu

from dinov3_pl.modules.distillation import DistillationModule
from dinov3_pl.modules.ssl import DINOSSLModule
from dinov3_pl.modules.ssl_config import (
    BackboneConfig,
    DistillationTeacherConfig,
    HeadConfig,
    OptimConfig,
    StudentConfig,
)
from dinov3_pl.optim import clip_grad_norm_per_module

PRESETS = {
    # Teacher ViT 192 wide, student 96 wide (4 blocks each): seconds per step on 2 CPU cores.
    "cpu": dict(
        teacher=("vit_small_patch16_dinov3", dict(depth=4, embed_dim=192, num_heads=3)),
        student=("vit_small_patch16_dinov3", dict(depth=4, embed_dim=96, num_heads=3)),
        batch=8,
        global_size=96,
        local_size=48,
        num_local=4,
        head=(4096, 512, 128),
    ),
    # ViT-B/16 into ViT-S/16 with upstream's crops and 65536-prototype heads.
    "vitb16_to_vits16": dict(
        teacher=("vit_base_patch16_dinov3", {}),
        student=("vit_small_patch16_dinov3", {}),
        batch=128,
        global_size=224,
        local_size=96,
        num_local=8,
        head=(65536, 2048, 256),
    ),
}


def teacher_checkpoint(preset: dict, folder: Path) -> str:
    """A DINOSSLModule checkpoint of the teacher's architecture with its heads (random weights)."""
    arch, overrides = preset["teacher"]
    head = HeadConfig(*preset["head"])
    module = DINOSSLModule(backbone=BackboneConfig(arch, timm_overrides=overrides), dino_head=head, ibot_head=head)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path = folder / "teacher.ckpt"
    torch.save(checkpoint, path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="default: cpu, or the ViT preset on CUDA"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="images per step (overrides the preset)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    preset = dict(PRESETS[args.preset or ("vitb16_to_vits16" if device.type == "cuda" else "cpu")])
    if args.batch:
        preset["batch"] = args.batch
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        arch, overrides = preset["student"]
        student = StudentConfig(
            name="student",
            backbone=BackboneConfig(arch, timm_overrides=overrides),
            optim=OptimConfig(total_steps=10_000, lr_scaling="none", warmup_steps=0, freeze_last_layer_steps=0),
        )
        teacher = DistillationTeacherConfig(weights=teacher_checkpoint(preset, Path(folder)))
        module = DistillationModule(teacher=teacher, students=[student]).to(device)
    module._build_schedules()
    optimizer = module.configure_optimizers()
    backbone = module.students["student"].backbone
    bare_optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-4)
    batch = make_batch(
        preset["batch"], preset["global_size"], preset["local_size"], preset["num_local"], backbone.patch_size, device
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def distillation_step() -> None:
        with autocast:
            loss = module.compute_losses(batch, step=100)["loss"]
        loss.backward()
        clip_grad_norm_per_module(module.students["student"].trained_modules(), 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.after_optimizer_step(100)

    def bare_step() -> None:
        with autocast:
            outputs = (backbone(batch["global_crops"]), backbone(batch["local_crops"]))
            loss = sum(out[key].float().sum() for out in outputs for key in ("cls", "patch"))
        loss.backward()
        bare_optimizer.step()
        bare_optimizer.zero_grad(set_to_none=True)

    def teacher_step() -> None:
        with autocast:
            module.teacher.targets(batch["global_crops"], batch["masks"], 0.07)

    module.train()
    steps = {"distillation": distillation_step, "bare": bare_step, "teacher": teacher_step}
    seconds = median_seconds(steps, device, args.rounds, args.steps_per_round)
    full, bare, teacher = seconds["distillation"], seconds["bare"], seconds["teacher"]
    images = preset["batch"]
    print(device_line(device))
    print(
        f"teacher {preset['teacher']} -> student {preset['student']}, batch {images}, 2x{preset['global_size']} + "
        f"{preset['num_local']}x{preset['local_size']} crops, heads {preset['head'][0]} prototypes"
        f"{', bf16 autocast' if device.type == 'cuda' else ', fp32'}"
    )
    print(f"median of {args.rounds} rounds x {args.steps_per_round} steps")
    print(f"distillation step: {images / full:8.1f} images/s  ({full * 1000:.1f} ms/step)")
    print(f"bare student f+b : {images / bare:8.1f} images/s  ({bare * 1000:.1f} ms/step)")
    print(f"ratio distillation/bare time: {full / bare:.2f}")
    print(
        f"of which the teacher (forward, heads, Sinkhorn-Knopp): {teacher * 1000:.1f} ms/step = {teacher / bare:.2f} "
        f"of a bare student step; everything else (student heads, losses, EMA, clipping, head optimizer): "
        f"{(full - bare - teacher) / bare:.2f}"
    )
    if device.type == "cuda":
        print(memory_and_mfu(distillation_step, full, device))


if __name__ == "__main__":
    main()
