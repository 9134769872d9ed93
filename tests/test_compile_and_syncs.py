"""DINOSSLModule's ``compile`` option and its sync-free training step.

- compiled parts keep the eager names (no ``_orig_mod.``): checkpoints load either way, the EMA pairs by name;
- three compiled training steps (student, teacher, Gram teacher, heads, Sinkhorn-Knopp, losses) give the eager
  losses, and a compiled fit resumes;
- a whole Lightning training step with fused AdamW dispatches no op that reads a device value back to the host
  (``aten._local_scalar_dense`` behind ``.item()`` / ``bool()``, ``aten.nonzero``), recorded by a TorchDispatchMode,
  while a NaN step is still dropped whole (weights, AdamW moments and step counts, EMA teacher untouched).

Compiled tests use the ``eager`` backend (dynamo's graph capture, no code generation) or ``aot_eager`` (+ AOT
autograd's forward and backward graphs) to stay within seconds.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils._python_dispatch import TorchDispatchMode

from dinov3_pl.data.masking import ibot_mask_fields
from dinov3_pl.modules.ssl import DINOSSLModule
from dinov3_pl.modules.ssl_config import BackboneConfig, GramConfig, HeadConfig, OptimConfig
from dinov3_pl.optim import clip_grad_norm_per_module
from tests.test_ssl_fit import InjectNaN, tiny_data, trainer

TINY = dict(depth=2, embed_dim=32, num_heads=2, patch_size=4, img_size=16)
FAST_COMPILE = {"backend": "aot_eager"}
DYNAMO_ONLY = {"backend": "eager"}
# Ops that copy a device value to the host (a sync on CUDA) or give a data-dependent shape.
HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero", "aten::masked_select"}


def make_module(compile=False, gram: bool = False, **optim) -> DINOSSLModule:
    torch.manual_seed(0)
    return DINOSSLModule(
        backbone=BackboneConfig(timm_overrides=TINY, rope_rescale=2.0),
        dino_head=HeadConfig(num_prototypes=64, hidden_dim=48, bottleneck_dim=16),
        ibot_head=HeadConfig(num_prototypes=32, hidden_dim=48, bottleneck_dim=16),
        optim=OptimConfig(
            **{"total_steps": 12, "warmup_steps": 1, "freeze_last_layer_steps": 0, "lr_scaling": "none", **optim}
        ),
        gram=GramConfig(enabled=gram, start_step=0, ramp_steps=2),
        training_health=False,
        compile=compile,
    )


def make_batch(seed: int) -> dict:
    """Multi-crop batch of 4 images with the collate's precomputed iBOT fields (no nonzero in the step)."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(8, 16, generator=generator) < 0.3
    masks[0, 0] = True
    return {
        "global_crops": torch.randn(8, 3, 16, 16, generator=generator),
        "local_crops": torch.randn(8, 3, 8, 8, generator=generator),
        "masks": masks,
        **ibot_mask_fields(masks),
    }


def test_compiled_parts_keep_eager_names_and_checkpoints_interchange():
    eager, compiled = make_module(), make_module(compile=FAST_COMPILE, gram=True)
    assert compiled.compiled and compiled.student.backbone.vit.blocks[0]._compiled_call_impl is not None
    assert compiled.gram_teacher.vit.blocks[1]._compiled_call_impl is not None
    names = [name for name, _ in compiled.named_parameters()]
    assert not any("_orig_mod" in name for name in names)
    eager_gram = make_module(gram=True)
    assert list(compiled.state_dict()) == list(eager_gram.state_dict())
    # Either way round, strictly.
    compiled.load_state_dict(eager_gram.state_dict())
    eager_gram.load_state_dict(compiled.state_dict())
    assert [name for name, _ in eager.student.named_parameters()] == [
        name for name, _ in compiled.student.named_parameters()
    ]
    with pytest.raises(ValueError, match="compile must be true, false or a dict"):
        make_module(compile="yes")


def run_steps(module: DINOSSLModule, num_steps: int = 3) -> list[float]:
    """The optimizer steps a Trainer runs (schedules, Gram refresh, losses, backward, clipping, AdamW, EMA)."""
    module._build_schedules()
    optimizer = module.configure_optimizers()
    module.train()
    losses = []
    for step in range(num_steps):
        torch.manual_seed(100 + step)  # RoPE rescaling draws from it, as in a Trainer's seeded batches
        module._apply_schedules(optimizer, step)
        module.on_optimizer_step_start(step)
        terms = module.compute_losses(make_batch(step), step)
        terms["loss"].backward()
        clip_grad_norm_per_module(module.student.trained_modules(), 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.after_optimizer_step(step)
        losses.append([float(terms[name]) for name in sorted(terms)])
    return losses


@pytest.mark.parametrize(
    "backend",
    [
        # dynamo's capture of every part with the eager backend: ~6 s on 2 cores.
        "eager",
        # + AOT autograd's forward/backward graphs: 22-48 s on 2 shared cores.
        pytest.param("aot_eager", marks=pytest.mark.compile_backend),
    ],
)
def test_three_compiled_steps_give_the_eager_losses(backend):
    """Student, teacher and Gram teacher blocks, heads, Sinkhorn-Knopp and the losses compiled."""
    torch._dynamo.reset()
    eager = run_steps(make_module(gram=True))
    compiled = run_steps(make_module(compile={"backend": backend}, gram=True))
    assert len(eager[0]) == 6  # dino_global, dino_local, gram, ibot, koleo, loss
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=1e-7)
    # The steps trained: the losses moved.
    assert eager[0] != eager[-1]


class RecordHostReads(TorchDispatchMode):
    """Every aten op dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


class RecordStep(L.Callback):
    """Records the ops of training batch ``batch_index`` from its start to its end (losses, backward, clipping,
    the finite check, AdamW and the EMA), and snapshots the state around batch ``snapshot_index``."""

    def __init__(self, batch_index: int, snapshot_index: int) -> None:
        self.batch_index, self.snapshot_index = batch_index, snapshot_index
        self.recorder = RecordHostReads()
        self.states: dict[str, dict[str, torch.Tensor]] = {}

    def _state(self, trainer, module) -> dict[str, torch.Tensor]:
        state = {f"model.{k}": v.clone() for k, v in module.state_dict().items() if k != "skipped_steps"}
        for index, moments in trainer.optimizers[0].state_dict()["state"].items():
            state.update({f"adamw.{index}.{name}": value.clone() for name, value in moments.items()})
        return state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.snapshot_index:
            self.states["before"] = self._state(trainer, pl_module)
        if batch_idx == self.batch_index:
            self.recorder.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_index:
            self.recorder.__exit__(None, None, None)
        if batch_idx == self.snapshot_index:
            self.states["after"] = self._state(trainer, pl_module)


def test_the_fused_step_reads_nothing_back_and_still_drops_a_nan_step_whole(tmp_path):
    L.seed_everything(0)
    module = make_module(fused=True, gram=True)  # the Gram schedule runs in the recorded step too
    record = RecordStep(batch_index=1, snapshot_index=2)
    fit = trainer(tmp_path, max_steps=4, enable_checkpointing=False, callbacks=[InjectNaN({2}), record])
    fit.fit(module, tiny_data())
    ops = record.recorder.ops
    assert "aten::_fused_adamw_" in ops and len(ops) > 200  # the recorder saw the whole step
    assert HOST_READS.isdisjoint(ops), sorted(HOST_READS.intersection(ops))
    # The NaN step (batch 2) was dropped on the device: nothing changed, and the host learnt it.
    assert int(module.skipped_steps) == 1 and module.consecutive_bad_steps == 0  # step 3 was good again
    before, after = record.states["before"], record.states["after"]
    changed = [key for key, value in before.items() if not torch.equal(after[key], value)]
    assert changed == []
    # Without the device verdict (found_inf) the fused AdamW would have stepped on the NaN gradients.
    assert fit.global_step == 4 and torch.isfinite(module.student.dino_head.last_layer.weight).all()


def test_a_run_of_dropped_fused_steps_stops_with_the_error(tmp_path):
    L.seed_everything(0)
    module = DINOSSLModule(**{**make_module(fused=True).hparams, "max_consecutive_bad_steps": 2})
    fit = trainer(tmp_path, max_steps=4, enable_checkpointing=False, callbacks=[InjectNaN({1, 2})])
    with pytest.raises(FloatingPointError, match=r"2 consecutive optimizer steps skipped at step 2"):
        fit.fit(module, tiny_data())
    assert int(module.skipped_steps) == 2


def test_a_compiled_module_resumes_a_fit(tmp_path):
    """The fit / resume wiring with compiled parts (dynamo, eager backend: the numerics are checked above)."""
    torch._dynamo.reset()
    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    no_validation = dict(limit_val_batches=0, num_sanity_val_steps=0)
    first = trainer(tmp_path, max_steps=1, callbacks=[checkpoint], **no_validation)
    first.fit(make_module(), tiny_data())  # an eager checkpoint: the compiled module resumes from it
    resumed = make_module(compile=DYNAMO_ONLY)
    fit = trainer(tmp_path, max_steps=2, enable_checkpointing=False, **no_validation)
    fit.fit(resumed, tiny_data(), ckpt_path=checkpoint.last_model_path)
    assert fit.global_step == 2 and torch.isfinite(resumed.student.dino_head.last_layer.weight).all()
    assert resumed.compiled and resumed.student.backbone.vit.blocks[0]._compiled_call_impl is not None


def test_the_head_and_loss_part_compiles_as_one_graph():
    """After the backbones, the step (teacher heads + Sinkhorn-Knopp, student heads + DINO / iBOT / KoLeo losses)
    has no graph break: nothing is read back from the device and no shape depends on data."""
    module = make_module()
    module._build_schedules()
    batch = make_batch(0)
    generator = torch.Generator().manual_seed(7)
    teacher_out, student_global = (
        {"cls": torch.randn(8, 32, generator=generator), "patch": torch.randn(8, 16, 32, generator=generator)}
        for _ in range(2)
    )
    cls_local = torch.randn(8, 32, generator=generator)

    def head_and_losses(teacher_out, student_global, cls_local, batch):
        targets = module.teacher.targets_from_outputs(teacher_out, batch["masks"], 0.07, batch["mask_indices"])
        return module.student.head_losses(student_global, cls_local, batch, targets)

    torch._dynamo.reset()
    compiled = torch.compile(head_and_losses, fullgraph=True, backend="eager")
    got = compiled(teacher_out, student_global, cls_local, batch)
    expected = head_and_losses(teacher_out, student_global, cls_local, batch)
    assert set(got) == {"dino_global", "dino_local", "ibot", "koleo", "loss"}
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=0, msg=name)


class SyncDebugError(L.Callback):
    """From batch 1 on (batch 0 creates AdamW's state), each training batch runs under CUDA's sync debug mode
    "error": any host sync between the batch's start and its end raises."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx >= 1:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_on_cuda_the_fused_training_step_runs_under_sync_debug_error(tmp_path):
    """Not run on the CPU-only development machine: the device check of the step (losses, backward, clipping, the
    finite check, fused AdamW, EMA, Gram schedule) for a machine with a GPU."""
    L.seed_everything(0)
    module = make_module(fused=True, gram=True)
    fit = trainer(
        tmp_path,
        accelerator="gpu",
        max_steps=4,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[SyncDebugError(), InjectNaN({2})],
    )
    try:
        fit.fit(module, tiny_data())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert fit.global_step == 4 and int(module.skipped_steps) == 1


def test_distillation_compiles_its_students_and_teacher_with_the_eager_names(tmp_path_factory):
    from tests.test_distillation import distillation, teacher_ckpt

    path = teacher_ckpt.__wrapped__(tmp_path_factory)
    eager, compiled = distillation(path), distillation(path, compile=DYNAMO_ONLY)
    assert compiled.students["small"].backbone.vit.blocks[0]._compiled_call_impl is not None
    assert compiled.teacher.dino_head._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    # The compiled parts are DINOSSLModule's (their numerics are checked above); the EMAs stay eager.
    assert compiled.student_emas["small"].average.backbone.vit.blocks[0]._compiled_call_impl is None
