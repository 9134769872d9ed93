"""Peak memory of the iBOT loss path: Sinkhorn-Knopp and the iBOT cross-entropy, plain formulas vs. the in-place /
chunked ones of ``dinov3_pl.losses``.

Protocol: M masked-patch rows and K prototypes (default M = 64 images x 2 global crops x 196 patches x 0.3 = 7526,
K = 65536: the ViT-S/16 recipe at 64 images/GPU). The inputs (teacher logits, teacher probabilities, student
logits) are made before the measurement and are not counted. Measured:
- Sinkhorn-Knopp (3 iterations): "before" is the out-of-place formulation (``scaled = logits / T``, ``exp(scaled -
  max)``, then normalisations; the code before the in-place rewrite, reproduced below), "after" is
  ``sinkhorn_knopp``;
- iBOT forward + backward w.r.t. the student logits: "before" is ``IBOTPatchLoss(chunked=False)`` (the plain
  formula under autograd), "after" ``IBOTPatchLoss()`` (row chunks, recomputing backward).
The peak is the highest number of bytes allocated above the start of the measured call: on CPU from the allocator's
own trace (``torch.profiler`` with ``profile_memory=True``, every allocation and free in order), on CUDA from
``torch.cuda.max_memory_allocated``. It is printed in GB and in fp32 [M, K] blocks (one block = 4·M·K bytes).
Memory grows linearly in M, so a smaller ``--rows`` gives the same ratios on a small machine.

Measured (2026-12-03, 2 shared CPU cores, torch 2.14.1, the defaults M = 7526, K = 65536, automatic chunks of
256 rows; one fp32 [M, K] block = 1.97 GB; in brackets: blocks). ``--rows 1882`` gives the same block counts except
the chunk share (3 x 256 / M rows: 0.41 instead of 0.10 blocks):

    =========================================  ================  ================  =====
    peak above the inputs                      before            after             ratio
    Sinkhorn-Knopp (3 iterations)              5.92 GB (3.00)    1.97 GB (1.00)    3.00
    iBOT fwd+bwd, fp32 student logits          5.92 GB (3.00)    2.17 GB (1.10)    2.72
    iBOT fwd+bwd, bf16 student logits          5.92 GB (3.00)    1.19 GB (0.60)    4.98
    =========================================  ================  ================  =====

"after" is the result itself (Sinkhorn) or the gradient (one fp32 block, half of one in bf16) plus three chunks.

    python experiments/benchmarks/loss_memory.py                      # M = 7526, K = 65536 (needs ~12 GB on CPU)
    python experiments/benchmarks/loss_memory.py --rows 1882          # a quarter: the same ratios, ~3 GB
    python experiments/benchmarks/loss_memory.py --device cuda --student-dtype bfloat16
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from dinov3_pl.losses.centering import sinkhorn_knopp
from dinov3_pl.losses.ibot import IBOTPatchLoss

DEFAULT_ROWS = int(64 * 2 * 196 * 0.3)


def out_of_place_sinkhorn(logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp as it was before the in-place rewrite (single process)."""
    scaled = logits.float() / temperature
    q = torch.exp(scaled - scaled.amax(dim=0)).t()
    q /= q.sum()
    rows = torch.tensor([q.shape[1]], dtype=torch.float32, device=logits.device)
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= q.shape[0]
        q /= q.sum(dim=0, keepdim=True)
        q /= rows
    q *= rows
    return q.t()


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``fn()`` above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == torch.autograd.DeviceType.CPU:
            current += event.nbytes()
            peak = max(peak, current)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="M, masked patches per GPU")
    parser.add_argument("--prototypes", type=int, default=65536, help="K, iBOT head prototypes")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: automatic)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--student-dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    device = torch.device(args.device)
    num_rows, num_prototypes = args.rows, args.prototypes
    block = 4 * num_rows * num_prototypes
    generator = torch.Generator(device=device).manual_seed(0)
    # Only the inputs of the measurement being run are alive, so the whole run needs about 6 blocks.
    teacher_probs = torch.randn(num_rows, num_prototypes, device=device, generator=generator)  # logits for now
    masks = torch.zeros(128, -(-num_rows // 128) * 2, dtype=torch.bool, device=device)
    masks.view(-1)[:num_rows] = True  # any [C, N] masks with M masked patches: the weights do not change memory

    print(
        f"M = {num_rows} rows, K = {num_prototypes} prototypes, student {args.student_dtype}, device {device}; "
        f"one fp32 [M, K] block = {block / 1e9:.2f} GB"
    )
    print(f"{'':28s} {'before GB':>10s} {'blocks':>7s} {'after GB':>10s} {'blocks':>7s} {'ratio':>6s}")

    def report(name: str, before: int, after: int) -> None:
        print(
            f"{name:28s} {before / 1e9:10.2f} {before / block:7.2f} {after / 1e9:10.2f} {after / block:7.2f} "
            f"{before / after:6.2f}"
        )

    report(
        "Sinkhorn-Knopp (3 iter.)",
        peak_bytes(lambda: out_of_place_sinkhorn(teacher_probs, 0.07), device),
        peak_bytes(lambda: sinkhorn_knopp(teacher_probs, 0.07), device),
    )
    teacher_probs = torch.softmax(teacher_probs, dim=-1)
    student_logits = torch.randn(num_rows, num_prototypes, device=device, generator=generator)
    student_logits = student_logits.to(getattr(torch, args.student_dtype)).requires_grad_()

    def ibot_step(loss_fn: IBOTPatchLoss) -> int:
        student_logits.grad = None

        def step() -> None:
            loss_fn(student_logits, teacher_probs, masks).backward()

        return peak_bytes(step, device)

    report(
        "iBOT loss forward+backward",
        ibot_step(IBOTPatchLoss(chunked=False)),
        ibot_step(IBOTPatchLoss(chunk_size=args.chunk_size)),
    )


if __name__ == "__main__":
    main()
