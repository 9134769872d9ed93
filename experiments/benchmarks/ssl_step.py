"""Throughput of the full DINOv3 training step vs. the bare backbone forward+backward on the same crops.

Protocol: crops and masks are generated once and stay in memory (no data loading). Both measurements run in the
same process, alternating in rounds so that machine noise hits both alike:
- "full step": ``DINOSSLModule.compute_losses`` (teacher forward, masked student forward of the global crops,
  student forward of the local crops, DINO/iBOT heads, Sinkhorn-Knopp, DINO + iBOT + KoLeo losses), backward,
  per-module gradient clipping, AdamW step and the EMA teacher update;
- "bare backbone": the student backbone's forward on the global and local crops and a backward of the sum of its
  outputs, plus an AdamW step on the backbone alone.
It prints images/s of each, their ratio (full / bare time), the share of the teacher's forward pass (which the bare
step has no counterpart for), and on CUDA the peak memory and the model FLOP
utilisation (MFU: FLOPs counted by ``torch.utils.flop_counter`` per step / time / the card's bf16 dense peak).

    python experiments/benchmarks/ssl_step.py                      # CPU, small ViT
    python experiments/benchmarks/ssl_step.py --device cuda --preset vits16   # ViT-S/16 recipe, batch 128
    python experiments/benchmarks/ssl_step.py --compile-all        # the module's compile option (all parts)
    python experiments/benchmarks/ssl_step.py --device cuda --sync-debug   # the full step under sync debug "error"

``--compile`` compiles the two backbones whole; ``--compile-all`` is ``DINOSSLModule(compile=True)``: backbone
blocks, heads, Sinkhorn-Knopp and losses of student and teacher. The batch carries the collate's ``mask_indices``
and ``ibot_weights`` (as the DataModule's does), so the step has no ``nonzero``.
"""

from __future__ import annotations

import argparse

import torch
from timing import PRESETS, device_line, make_batch, median_seconds, memory_and_mfu

from dinov3_pl.data.masking import ibot_mask_fields
from dinov3_pl.modules.ssl import DINOSSLModule
from dinov3_pl.modules.ssl_config import BackboneConfig, HeadConfig, OptimConfig
from dinov3_pl.optim import clip_grad_norm_per_module

STEP = 100  # the schedules' step both timed steps use (past warm-up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: tiny, or vits16 on CUDA")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="images per step (overrides the preset)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the student and teacher backbones")
    parser.add_argument(
        "--compile-all", action="store_true", help="DINOSSLModule(compile=True): blocks, heads, Sinkhorn-Knopp, losses"
    )
    parser.add_argument(
        "--sync-debug",
        action="store_true",
        help="CUDA: run one more full step under torch.cuda.set_sync_debug_mode('error') (fails on a host sync)",
    )
    parser.add_argument("--fused", action="store_true", help="fused AdamW kernels (both steps)")
    args = parser.parse_args()
    device = torch.device(args.device)
    preset = dict(PRESETS[args.preset or ("vits16" if device.type == "cuda" else "tiny")])
    if args.batch:
        preset["batch"] = args.batch
    torch.manual_seed(0)
    head = HeadConfig(*preset["head"])
    module = DINOSSLModule(
        backbone=BackboneConfig(preset["arch"], timm_overrides=preset["overrides"], drop_path_rate=0.0),
        dino_head=head,
        ibot_head=head,
        optim=OptimConfig(
            total_steps=10_000, lr_scaling="none", warmup_steps=0, freeze_last_layer_steps=0, fused=args.fused or None
        ),
        training_health=False,
        compile=args.compile_all,
    ).to(device)
    module._build_schedules()
    optimizer = module.configure_optimizers()
    backbone = module.student.backbone
    bare_optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-4, fused=args.fused or None)
    if args.compile:
        module.student.backbone.compile()
        module.teacher.backbone.compile()
    batch = make_batch(
        preset["batch"], preset["global_size"], preset["local_size"], preset["num_local"], backbone.patch_size, device
    )
    fields = ibot_mask_fields(batch["masks"].cpu())  # made on CPU by the collate in training
    batch.update(mask_indices=fields["mask_indices"].to(device), ibot_weights=fields["ibot_weights"].to(device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def full_step() -> None:
        with autocast:
            loss = module.compute_losses(batch, step=STEP)["loss"]
        loss.backward()
        clip_grad_norm_per_module(module.student.trained_modules(), 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module._update_teacher(0.996)

    def bare_step() -> None:
        with autocast:
            global_out = backbone(batch["global_crops"])
            local_out = backbone(batch["local_crops"])
            loss = sum(out[key].float().sum() for out in (global_out, local_out) for key in ("cls", "patch"))
        loss.backward()
        bare_optimizer.step()
        bare_optimizer.zero_grad(set_to_none=True)

    def teacher_step() -> None:  # the part of the full step a bare backbone step has no counterpart for
        with autocast:
            module.teacher.targets(
                batch["global_crops"],
                batch["masks"],
                module.teacher_temperature_schedule(STEP),
                mask_indices=batch["mask_indices"],
            )

    module.train()
    steps = {"full": full_step, "bare": bare_step, "teacher": teacher_step}
    seconds = median_seconds(steps, device, args.rounds, args.steps_per_round)
    full, bare, teacher = seconds["full"], seconds["bare"], seconds["teacher"]
    images = preset["batch"]
    print(device_line(device))
    print(
        f"config: {preset['arch']} {preset['overrides']} batch {images}, 2x{preset['global_size']} + "
        f"{preset['num_local']}x{preset['local_size']} crops, heads {preset['head'][0]} prototypes"
        f"{', bf16 autocast' if device.type == 'cuda' else ', fp32'}{', compiled backbones' if args.compile else ''}"
        f"{', compiled parts (compile=True)' if args.compile_all else ''}"
        f"{', fused AdamW' if args.fused else ''}"
    )
    print(f"median of {args.rounds} rounds x {args.steps_per_round} steps")
    print(f"full DINOv3 step : {images / full:8.1f} images/s  ({full * 1000:.1f} ms/step)")
    print(f"bare backbone f+b: {images / bare:8.1f} images/s  ({bare * 1000:.1f} ms/step)")
    print(f"ratio full/bare time: {full / bare:.2f}")
    print(
        f"of which the teacher forward (global crops + heads + Sinkhorn-Knopp): {teacher * 1000:.1f} ms/step "
        f"= {teacher / bare:.2f} of a bare step; everything else (student heads, losses, EMA, clipping, head "
        f"optimizer): {(full - bare - teacher) / bare:.2f}"
    )
    if device.type == "cuda":
        print(memory_and_mfu(full_step, full, device))
    if args.sync_debug and device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            full_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print("sync debug: the full step ran under set_sync_debug_mode('error') (no host sync)")


if __name__ == "__main__":
    main()
