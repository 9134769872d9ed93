"""Memory-bounded, sync-free losses: the chunked iBOT cross-entropy and the in-place Sinkhorn-Knopp give the values
of the plain formulas, hold at most one fp32 [M, K] block (measured on the CPU allocator with torch.profiler), and
compile with ``torch.compile(fullgraph=True)`` once the mask indices and weights come precomputed from the collate."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

from dinov3_pl.data.masking import ibot_mask_fields
from dinov3_pl.losses.centering import sinkhorn_knopp
from dinov3_pl.losses.ibot import IBOTPatchLoss, masked_patch_weights, soft_cross_entropy_rows
from dinov3_pl.models.heads import DINOHead

RTOL = 1e-6


def peak_allocated_bytes(fn) -> int:
    """Peak CPU bytes allocated by ``fn()`` above what was allocated when it started (the allocator's own trace)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def plain_ibot_rows(student_logits, teacher_probs, student_temp):
    """The unchunked formula, as autograd differentiates it (every [M, K] intermediate materialised)."""
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_probs).sum(dim=-1)


def plain_sinkhorn(logits, temperature, n_iterations=3):
    """Out-of-place single-process Sinkhorn-Knopp (the formulation before the in-place rewrite)."""
    scaled = logits.float() / temperature
    q = torch.exp(scaled - scaled.amax(dim=0)).t()
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / q.shape[0]
        q = q / q.sum(dim=0, keepdim=True) / q.shape[1]
    return (q * q.shape[1]).t()


def random_masks(num_crops=6, num_patches=20, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(num_crops, num_patches, generator=generator) < 0.4
    masks[2] = False  # a crop without mask still counts in C
    return masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_ibot_equals_plain_formula(dtype):
    masks = random_masks()
    num_masked, num_prototypes = int(masks.sum()), 300
    generator = torch.Generator().manual_seed(1)
    student = (torch.randn(num_masked, num_prototypes, generator=generator) * 3).to(dtype)
    teacher = torch.softmax(torch.randn(num_masked, num_prototypes, generator=generator) * 2, dim=-1)
    weights = masked_patch_weights(masks)

    reference = student.clone().requires_grad_()
    expected = (plain_ibot_rows(reference, teacher, 0.1) * weights).sum() / masks.shape[0]
    (expected_grad,) = torch.autograd.grad(expected, reference)
    # 7 does not divide M; 1 is the extreme; M and 10 * M are one chunk; None is the automatic size.
    for chunk_size in (1, 7, num_masked, 10 * num_masked, None):
        chunked = student.clone().requires_grad_()
        loss = IBOTPatchLoss(0.1, chunk_size=chunk_size)(chunked, teacher, masks)
        (grad,) = torch.autograd.grad(loss, chunked)
        assert grad.dtype == dtype
        torch.testing.assert_close(loss, expected, rtol=RTOL, atol=0, msg=f"chunk_size={chunk_size}")
        torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=RTOL, atol=1e-12)
    # The plain path of the module is the same formula.
    plain = IBOTPatchLoss(0.1, chunked=False)(student, teacher, masks, masks_weight=weights)
    torch.testing.assert_close(plain, expected.detach(), rtol=RTOL, atol=0)


def test_soft_cross_entropy_rows_teacher_gradient_and_bad_chunk():
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(5, 9, generator=generator, requires_grad=True)
    teacher = torch.softmax(torch.randn(5, 9, generator=generator), dim=-1).requires_grad_()
    # A teacher that requires grad gets its gradient (plain formula), the student's is unchanged.
    rows = soft_cross_entropy_rows(student, teacher, 0.2, chunk_size=2)
    expected_rows = plain_ibot_rows(student, teacher, 0.2)
    torch.testing.assert_close(rows, expected_rows)
    grads = torch.autograd.grad(rows.sum(), (student, teacher))
    expected_grads = torch.autograd.grad(expected_rows.sum(), (student, teacher))
    for got, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected)
    # No masked patch at all (M = 0): a zero loss and an empty gradient.
    empty = torch.zeros(0, 9, requires_grad=True)
    loss = IBOTPatchLoss(chunk_size=2)(empty, torch.zeros(0, 9), torch.zeros(3, 4, dtype=torch.bool))
    (grad,) = torch.autograd.grad(loss, empty)
    assert loss.item() == 0.0 and grad.shape == (0, 9)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        IBOTPatchLoss(chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        soft_cross_entropy_rows(student, teacher, 0.1, chunk_size=-3)


def test_in_place_sinkhorn_equals_out_of_place():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(50, 40, generator=generator) * 2
    for n_iterations in (1, 3):
        expected = plain_sinkhorn(logits, 0.07, n_iterations)
        torch.testing.assert_close(sinkhorn_knopp(logits, 0.07, n_iterations), expected, rtol=RTOL, atol=1e-12)
    # bf16 input: the copy into fp32 is the result buffer; the input is never written.
    bf16 = logits.bfloat16()
    before = bf16.clone()
    torch.testing.assert_close(sinkhorn_knopp(bf16, 0.07), plain_sinkhorn(bf16, 0.07), rtol=RTOL, atol=1e-12)
    assert torch.equal(bf16, before)
    fp32 = logits.clone()
    sinkhorn_knopp(fp32, 0.07)
    assert torch.equal(fp32, logits)


def test_peak_memory_is_one_fp32_block():
    num_rows, num_prototypes, chunk_size = 600, 2048, 64
    block = num_rows * num_prototypes * 4  # one fp32 [M, K] tensor: 4.9 MB
    chunk = chunk_size * num_prototypes * 4
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(num_rows, num_prototypes, generator=generator)
    teacher_logits = torch.randn(num_rows, num_prototypes, generator=generator)
    teacher = torch.softmax(teacher_logits, dim=-1)
    masks = torch.ones(4, num_rows // 4, dtype=torch.bool)

    def ibot_step(loss_fn):
        leaf = student.clone().requires_grad_()  # allocated before the measurement starts
        return lambda: loss_fn(leaf, teacher, masks).backward()

    # Sinkhorn-Knopp: the result is the only [M, K] allocation (before: 3 blocks live around the exp).
    assert peak_allocated_bytes(lambda: sinkhorn_knopp(teacher_logits, 0.07)) < 1.05 * block
    assert peak_allocated_bytes(lambda: plain_sinkhorn(teacher_logits, 0.07)) > 2.9 * block
    # iBOT forward + backward: the gradient (one block) plus a few chunk-sized temporaries.
    chunked_peak = peak_allocated_bytes(ibot_step(IBOTPatchLoss(chunk_size=chunk_size)))
    assert chunked_peak < block + 3.5 * chunk, (chunked_peak / block, chunk / block)
    plain_peak = peak_allocated_bytes(ibot_step(IBOTPatchLoss(chunked=False)))
    assert plain_peak > 2.9 * block, plain_peak / block


def _compiled_ibot_part(backend: str):
    """Teacher and student iBOT heads on the masked patches, Sinkhorn-Knopp and the iBOT loss, as one graph."""
    masks = random_masks(num_crops=4, num_patches=16, seed=5)
    fields = ibot_mask_fields(masks)
    head = DINOHead(8, num_prototypes=64, hidden_dim=16, bottleneck_dim=8)
    loss_fn = IBOTPatchLoss(0.1, chunk_size=5)

    def ibot_part(student_patch, teacher_patch, mask_indices, ibot_weights, masks):
        with torch.no_grad():
            teacher_logits = head(teacher_patch.flatten(0, 1).index_select(0, mask_indices))
            teacher_probs = sinkhorn_knopp(teacher_logits, 0.07)
        student_logits = head(student_patch.flatten(0, 1).index_select(0, mask_indices))
        return loss_fn(student_logits, teacher_probs, masks, masks_weight=ibot_weights)

    generator = torch.Generator().manual_seed(6)
    student_patch = torch.randn(4, 16, 8, generator=generator, requires_grad=True)
    teacher_patch = torch.randn(4, 16, 8, generator=generator)
    args = (student_patch, teacher_patch, fields["mask_indices"], fields["ibot_weights"], masks)
    torch._dynamo.reset()
    compiled = torch.compile(ibot_part, fullgraph=True, backend=backend)
    loss = compiled(*args)
    (grad,) = torch.autograd.grad(loss, student_patch)
    expected = ibot_part(*args)
    (expected_grad,) = torch.autograd.grad(expected, student_patch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)

    # Without the precomputed weights the loss selects patches by a boolean mask (a data-dependent shape): no
    # single graph, which is why the weights come from the collate.
    torch._dynamo.reset()
    derived = torch.compile(lambda s, t, m: loss_fn(s, t, m), fullgraph=True, backend=backend)
    with pytest.raises(Exception, match="(?i)data.dependent|dynamic shape|nonzero"):
        derived(torch.randn(int(masks.sum()), 64), torch.rand(int(masks.sum()), 64), masks)


def test_ibot_part_compiles_fullgraph_with_precomputed_fields():
    """Graph capture (dynamo + AOT autograd, forward and backward) without code generation: ~6 s on 2 cores."""
    _compiled_ibot_part("aot_eager")


@pytest.mark.compile_backend
def test_ibot_part_compiles_fullgraph_inductor():
    """The same with inductor's C++ code generation: ~95 s on 2 shared CPU cores."""
    _compiled_ibot_part("inductor")
