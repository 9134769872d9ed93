"""What the step benchmarks share: in-memory multi-crop batches, alternating timed rounds, the device line and MFU.

Both benchmarks time their steps in alternating rounds in one process, so that machine noise hits every variant
alike, and report medians and ratios (ratios, not absolute numbers, are what transfers between machines).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

# The pretraining recipes both step benchmarks time; head = (prototypes, hidden, bottleneck) of the DINO and iBOT heads.
PRESETS = {
    # A small ViT: seconds per step on 2 CPU cores.
    "tiny": dict(
        arch="vit_small_patch16_dinov3",
        overrides=dict(depth=4, embed_dim=192, num_heads=3),
        batch=8,
        global_size=96,
        local_size=48,
        num_local=4,
        head=(4096, 512, 128),
    ),
    # The upstream ViT-S/16 recipe: 2x224 + 8x96 crops, 65536-prototype heads.
    "vits16": dict(
        arch="vit_small_patch16_dinov3",
        overrides={},
        batch=128,
        global_size=224,
        local_size=96,
        num_local=8,
        head=(65536, 2048, 256),
    ),
}


def make_batch(batch: int, global_size: int, local_size: int, num_local: int, patch: int, device) -> dict:
    """Random crops and masks with upstream's iBOT statistics (half the global crops masked, ratios 0.1-0.5)."""
    generator = torch.Generator().manual_seed(0)
    num_patches = (global_size // patch) ** 2
    masks = torch.zeros(2 * batch, num_patches, dtype=torch.bool)
    num_masked = int(2 * batch * 0.5)
    ratios = torch.linspace(0.1, 0.5, num_masked + 1)[1:]
    for crop, ratio in enumerate(ratios):
        masks[crop, torch.randperm(num_patches, generator=generator)[: int(num_patches * ratio)]] = True
    masks = masks[torch.randperm(2 * batch, generator=generator)]
    return {
        "global_crops": torch.randn(2 * batch, 3, global_size, global_size, generator=generator).to(device),
        "local_crops": torch.randn(num_local * batch, 3, local_size, local_size, generator=generator).to(device),
        "masks": masks.to(device),
    }


def median_seconds(
    steps: dict[str, Callable[[], None]], device: torch.device, rounds: int, steps_per_round: int
) -> dict[str, float]:
    """Median seconds per step of each named step, timed in alternating rounds after one warm-up call each."""

    def timed(step: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps_per_round):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps_per_round

    for step in steps.values():  # warm-up (allocations, compilation)
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(timed(step))
    return {name: statistics.median(values) for name, values in times.items()}


def device_line(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"device: {name}; threads {torch.get_num_threads()}; torch {torch.__version__}"


def memory_and_mfu(step: Callable[[], None], seconds: float, device: torch.device) -> str:
    """Peak memory, FLOPs per step (torch.utils.flop_counter) and MFU against the card's bf16 dense peak (CUDA)."""
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    name = torch.cuda.get_device_name(device)
    peak_tflops = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    mfu = f"{flops / seconds / (peak_tflops * 1e12) * 100:.1f}%" if peak_tflops else "n/a (unknown card)"
    return f"peak memory: {peak:.1f} GiB; {flops / 1e12:.2f} TFLOP per step; MFU {mfu}"
