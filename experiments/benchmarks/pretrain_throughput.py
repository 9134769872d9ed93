"""End-to-end pretraining throughput: the real data path and the real ``Trainer.fit``, against the bare backbone.

Protocol (one process):
1. ``--images`` JPEGs of ImageNet-like sizes (uniform 500x375 .. 800x600, either orientation, photo-like content:
   smooth colour fields and sharp-edged discs, quality 90) are written to a temporary folder;
2. ``MultiCropDataModule(train=ImageFolder(folder))`` with ``--workers`` loader workers, ``--crops-dtype`` and
   ``--jpeg-draft``, and ``DINOSSLModule`` (the preset's backbone and heads, full recipe: teacher, iBOT masks,
   Sinkhorn-Knopp, KoLeo, clipping, EMA) run ``Trainer.fit`` for ``--warmup + --steps`` steps (bf16-mixed on
   CUDA, fp32 on CPU); the first ``--warmup`` steps (worker start-up, allocator, cudnn) are not timed;
3. over the timed steps: images/s = batch x steps / wall time; data wait = the time spent inside the loader's
   ``next()`` (the fit loop blocked on the workers) / wall time;
4. FLOPs of one training step (``compute_losses`` forward + backward, heads included) from
   ``torch.utils.flop_counter``; MFU = FLOPs per step / seconds per step / the card's bf16 dense peak (CUDA) or
   ``--peak-tflops``;
5. the data ceiling: the same loader alone (workers, collate, transfer, normalisation) for as many batches;
6. the model ceiling: the bare student backbone's forward + backward (+ AdamW) on the same crops, already on the device
   (no data loading, no teacher, no heads), timed in the same process.
Peak memory: CUDA ``max_memory_allocated`` over the fit; CPU: the main process's peak RSS.

    python experiments/benchmarks/pretrain_throughput.py                    # CPU, tiny preset, few steps
    python experiments/benchmarks/pretrain_throughput.py --device cuda --arch vits16 --batch 128 --workers 12
    python experiments/benchmarks/pretrain_throughput.py --crops-dtype float32   # the former float path
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import BF16_PEAK_TFLOPS, PRESETS, device_line, median_seconds  # noqa: E402

from dinov3_pl.data.datasets import ImageFolder  # noqa: E402
from dinov3_pl.data.multicrop import MultiCropDataModule  # noqa: E402
from dinov3_pl.modules.ssl import DINOSSLModule  # noqa: E402
from dinov3_pl.modules.ssl_config import BackboneConfig, HeadConfig, OptimConfig  # noqa: E402


def write_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` photo-like JPEGs of ImageNet-like sizes (500..800 x 375..600, landscape or portrait)."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = int(rng.integers(500, 801)), int(rng.integers(375, 601))
        if rng.random() < 0.25:
            width, height = height, width
        fields = [rng.integers(0, 256, (cells * height // width + 2, cells, 3), dtype=np.uint8) for cells in (4, 32)]
        image = sum(
            np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC), np.float32) * w
            for f, w in zip(fields, (0.7, 0.3), strict=True)
        )
        ys, xs = np.ogrid[0:height, 0:width]
        for _ in range(8):
            y, x, radius = rng.integers(0, height), rng.integers(0, width), rng.integers(10, height // 3)
            image[(ys - y) ** 2 + (xs - x) ** 2 < radius**2] *= rng.uniform(0.5, 1.5, 3)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{index:05d}.jpg", quality=90)


class _TimedLoader:
    """Wraps the training DataLoader: adds the time each ``next()`` takes (the fit loop waiting for data)."""

    def __init__(self, loader, waits: list[float]) -> None:
        self.loader, self.waits = loader, waits

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - start)
            yield batch


class TimedData(MultiCropDataModule):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waits: list[float] = []

    def train_dataloader(self):
        return _TimedLoader(super().train_dataloader(), self.waits)


class StepClock(L.Callback):
    """Wall-clock time at the end of every training batch (device synchronised)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.ends.append(time.perf_counter())


def _on_device(data: MultiCropDataModule, batch: dict, device: torch.device) -> dict:
    """The batch as the training step receives it: moved to ``device`` and normalised there."""
    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return data.on_after_batch_transfer(batch, 0)


def _loader_seconds_per_batch(data: MultiCropDataModule, device: torch.device, warmup: int, batches: int) -> float:
    """The data path alone (workers, collate, pinned copy, transfer, normalisation), seconds per batch."""
    iterator = iter(data.train_dataloader())
    for _ in range(warmup):
        _on_device(data, next(iterator), device)
    start = time.perf_counter()
    for _ in range(batches):
        batch = _on_device(data, next(iterator), device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del batch
    return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(PRESETS), default=None, help="default: tiny on CPU, vits16 on CUDA")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=None, help="images per step (overrides the preset)")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--images", type=int, default=None, help="JPEGs to generate (default: enough for the steps)")
    parser.add_argument("--crops-dtype", choices=("uint8", "float32"), default="uint8")
    parser.add_argument("--jpeg-draft", action="store_true", help="decode the JPEGs at reduced size (PIL draft)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU off known cards")
    args = parser.parse_args()
    device = torch.device(args.device)
    preset = dict(PRESETS[args.arch or ("vits16" if device.type == "cuda" else "tiny")])
    batch_size = args.batch or preset["batch"]
    total_steps = args.warmup + args.steps
    num_images = args.images or batch_size * total_steps

    torch.manual_seed(0)
    prototypes, hidden, bottleneck = preset["head"]
    head = HeadConfig(prototypes, hidden, bottleneck)
    module = DINOSSLModule(
        backbone=BackboneConfig(preset["arch"], timm_overrides=preset["overrides"], drop_path_rate=0.0),
        dino_head=head,
        ibot_head=head,
        optim=OptimConfig(total_steps=10_000, lr_scaling="none", warmup_steps=0, freeze_last_layer_steps=0),
        training_health=False,
    )
    with tempfile.TemporaryDirectory(prefix="pretrain_throughput_") as folder:
        start = time.perf_counter()
        write_jpegs(Path(folder), num_images)
        generation = time.perf_counter() - start
        data_options = dict(
            train=ImageFolder(folder),
            patch_size=module.student.backbone.patch_size,
            global_size=preset["global_size"],
            local_size=preset["local_size"],
            num_local_crops=preset["num_local"],
            batch_size=batch_size,
            num_workers=args.workers,
            persistent_workers=False,
            crops_dtype=args.crops_dtype,
            jpeg_draft=args.jpeg_draft,
        )
        data = TimedData(**data_options)
        clock = StepClock()
        trainer = L.Trainer(
            max_steps=total_steps,
            accelerator=device.type,
            devices=1,
            precision="bf16-mixed" if device.type == "cuda" else "32-true",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[clock],
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.fit(module, datamodule=data)
        peak_fit = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

        timed = clock.ends[args.warmup - 1 :] if args.warmup else [clock.ends[0]]
        seconds = timed[-1] - timed[0]
        steps = len(timed) - 1
        waits = sum(data.waits[args.warmup + 1 : args.warmup + 1 + steps]) if args.warmup else sum(data.waits[1:])
        step_seconds = seconds / steps

        # One batch of the same data, on the device and normalised as the training step receives it (a fresh
        # DataModule: the fitted one would resume after the batches it has trained).
        probe = MultiCropDataModule(**data_options)
        batch = _on_device(probe, next(iter(probe.train_dataloader())), device)
        loader_seconds = _loader_seconds_per_batch(MultiCropDataModule(**data_options), device, args.warmup, steps)

    module.to(device).train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with FlopCounterMode(display=False) as counter:
        with autocast:
            loss = module.compute_losses(batch, step=100)["loss"]
        loss.backward()
    flops = counter.get_total_flops()
    module.zero_grad(set_to_none=True)

    backbone = module.student.backbone
    bare_optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-4)

    def bare_step() -> None:
        with autocast:
            outputs = [backbone(batch["global_crops"]), backbone(batch["local_crops"])]
            loss = sum(out[key].float().sum() for out in outputs for key in ("cls", "patch"))
        loss.backward()
        bare_optimizer.step()
        bare_optimizer.zero_grad(set_to_none=True)

    bare = median_seconds({"bare": bare_step}, device, rounds=3, steps_per_round=2)["bare"]
    with FlopCounterMode(display=False) as counter:
        bare_step()
    bare_flops = counter.get_total_flops()

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak_tflops = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        memory = f"peak memory (fit): {peak_fit:.2f} GiB allocated"
    else:
        peak_tflops = args.peak_tflops
        memory = f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (main process)"

    def mfu(flop: float, seconds: float) -> str:
        achieved = flop / seconds / 1e12
        share = f"MFU {achieved / peak_tflops * 100:.1f}%" if peak_tflops else "MFU n/a (give --peak-tflops)"
        return f"{achieved:.3f} TFLOP/s, {share}"

    print(device_line(device))
    print(
        f"config: {preset['arch']} {preset['overrides']} batch {batch_size}, 2x{preset['global_size']} + "
        f"{preset['num_local']}x{preset['local_size']} crops, heads {prototypes} prototypes, "
        f"{'bf16-mixed' if device.type == 'cuda' else 'fp32'}; data: {num_images} JPEGs 500x375..800x600 "
        f"(generated in {generation:.1f} s), {args.workers} workers, crops {args.crops_dtype}, "
        f"jpeg_draft {'on' if args.jpeg_draft else 'off'}"
    )
    print(f"timed {steps} steps after {args.warmup} warm-up steps: {seconds:.2f} s")
    print(f"Trainer.fit      : {batch_size / step_seconds:8.1f} images/s  ({step_seconds * 1000:.1f} ms/step)")
    print(f"data wait        : {waits / seconds * 100:5.1f}% of the time (in the loader's next())")
    print(f"training step    : {flops / 1e12:.4f} TFLOP (heads included); {mfu(flops, step_seconds)}")
    print(f"bare backbone f+b: {batch_size / bare:8.1f} images/s  ({bare * 1000:.1f} ms/step); {mfu(bare_flops, bare)}")
    print(f"data path alone  : {batch_size / loader_seconds:8.1f} images/s  (workers + transfer + normalisation)")
    print(f"fit / bare time per step: {step_seconds / bare:.2f}")
    print(memory)


if __name__ == "__main__":
    main()
