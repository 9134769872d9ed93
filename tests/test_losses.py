"""DINOv3 losses: golden values from upstream DINOv3 (tests/fixtures/upstream_losses.pt, see
experiments/golden/losses.md) and independent brute-force computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from dinov3_pl.losses.centering import SoftmaxCenter, sinkhorn_knopp
from dinov3_pl.losses.dino import DINOLoss
from dinov3_pl.losses.gram import GramLoss
from dinov3_pl.losses.ibot import IBOTPatchLoss, masked_patch_weights
from dinov3_pl.losses.koleo import KoLeoLoss

FIXTURE = Path(__file__).parent / "fixtures" / "upstream_losses.pt"
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def loss_and_grad(loss_fn, tensor: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    tensor = tensor.clone().requires_grad_()
    loss = loss_fn(tensor, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, tensor)
    return loss.detach(), grad


# ---------------------------------------------------------------- golden values from upstream DINOv3


def test_golden_sinkhorn_knopp(golden):
    temperature = golden["meta"]["teacher_temp"]
    assert_close(sinkhorn_knopp(golden["teacher_cls_logits"], temperature), golden["sk_cls"])
    assert_close(sinkhorn_knopp(golden["teacher_cls_logits"], temperature, n_iterations=10), golden["sk_cls_iter10"])
    assert_close(sinkhorn_knopp(golden["teacher_patch_logits"], temperature), golden["sk_patch"])


def test_golden_softmax_center(golden):
    temperature, num_prototypes = golden["meta"]["teacher_temp"], golden["meta"]["K"]
    center = SoftmaxCenter(num_prototypes, momentum=0.9)
    assert_close(center.probs(golden["center_logits1"], temperature), golden["center_probs1"])
    center.update(golden["center_logits1"])
    assert_close(center.center, golden["center_after1"])
    assert_close(center.probs(golden["center_logits2"], temperature), golden["center_probs2"])
    center.update(golden["center_logits2"])
    assert_close(center.center, golden["center_after2"])
    # iBOT-style centre over patch tokens [C, N, K].
    patch_center = SoftmaxCenter(num_prototypes, momentum=0.9)
    patch_center.update(golden["center_patch_tokens"])
    assert_close(patch_center.center, golden["center_patch_after1"])


@pytest.mark.parametrize(
    ("key", "student_key", "ignore_diagonal"),
    [
        ("dino_local", "student_local_logits", False),
        ("dino_global", "student_global_logits", False),
        ("dino_global_nodiag", "student_global_logits", True),
    ],
)
def test_golden_dino(golden, key, student_key, ignore_diagonal):
    meta = golden["meta"]
    teacher_probs = golden["sk_cls"].unflatten(0, (meta["n_global"], meta["B"]))
    loss, grad = loss_and_grad(
        DINOLoss(meta["student_temp"]), golden[student_key], teacher_probs, ignore_diagonal=ignore_diagonal
    )
    assert_close(loss, golden[key])
    assert_close(grad, golden[key + "_grad"])


def test_golden_ibot(golden):
    masks = golden["masks"]
    assert (~masks).all(dim=1).any(), "the fixture must contain crops without a mask"
    loss_fn = IBOTPatchLoss(golden["meta"]["student_temp"])
    loss, grad = loss_and_grad(loss_fn, golden["student_patch_logits"], golden["sk_patch"], masks)
    assert_close(loss, golden["ibot"])
    assert_close(grad, golden["ibot_grad"])
    # Precomputed weights give the same value.
    loss_pre = loss_fn(
        golden["student_patch_logits"], golden["sk_patch"], masks, masks_weight=masked_patch_weights(masks)
    )
    assert_close(loss_pre, golden["ibot"])


def test_golden_koleo(golden):
    loss, grad = loss_and_grad(KoLeoLoss(), golden["koleo_x"])
    assert_close(loss, golden["koleo"])
    assert_close(grad, golden["koleo_grad"])


@pytest.mark.parametrize("remove_neg", [False, True])
@pytest.mark.parametrize("img_level", [True, False])
def test_golden_gram(golden, remove_neg, img_level):
    key = f"gram_neg{int(remove_neg)}_img{int(img_level)}"
    loss_fn = GramLoss(remove_neg=remove_neg, img_level=img_level)
    loss, grad = loss_and_grad(loss_fn, golden["gram_student"], golden["gram_teacher"])
    assert_close(loss, golden[key])
    assert_close(grad, golden[key + "_grad"])


# ---------------------------------------------------------------- independent computations


def test_sinkhorn_knopp_marginals():
    torch.manual_seed(0)
    num_rows, num_prototypes = 24, 8
    logits = torch.randn(num_rows, num_prototypes) * 3
    probs = sinkhorn_knopp(logits, temperature=0.5, n_iterations=3)
    # The last normalisation is over samples: rows sum to 1 to rounding.
    assert_close(probs.sum(dim=1), torch.ones(num_rows))
    assert (probs >= 0).all()
    # Converged: the matrix is doubly stochastic up to scale, every prototype gets M/K of the mass.
    converged = sinkhorn_knopp(logits, temperature=0.5, n_iterations=500)
    assert_close(converged.sum(dim=1), torch.ones(num_rows))
    assert_close(converged.sum(dim=0), torch.full((num_prototypes,), num_rows / num_prototypes), rtol=1e-4, atol=1e-4)
    # And it keeps the Gibbs form diag(u) exp(x/T) diag(v): log-odds between two prototypes are shifted by a
    # per-prototype constant only.
    log_ratio = (converged.log() - logits / 0.5).double()
    centred = log_ratio - log_ratio.mean(dim=1, keepdim=True)
    assert_close(centred, centred[:1].expand_as(centred), rtol=0, atol=1e-4)
    # Three iterations are not converged on these logits (a check that cannot pass by accident).
    assert not torch.allclose(probs.sum(dim=0), converged.sum(dim=0), atol=1e-3)


def test_sinkhorn_knopp_large_logits_stay_finite():
    # Upstream's exp(logits / T) overflows fp32 here (10 / 0.04 = 250 > 88); ours is shift-invariant per prototype.
    torch.manual_seed(0)
    logits = torch.randn(16, 8)
    assert torch.isinf(torch.exp((logits + 10.0) / 0.04)).any()
    probs = sinkhorn_knopp(logits + 10.0, temperature=0.04)
    assert torch.isfinite(probs).all()
    # Not bit-equal: (x + 10) / 0.04 has ~1e-5 absolute rounding error in fp32.
    assert_close(probs, sinkhorn_knopp(logits, temperature=0.04), rtol=1e-3, atol=1e-4)


def test_sinkhorn_knopp_empty_rows():
    probs = sinkhorn_knopp(torch.zeros(0, 8), temperature=0.1)
    assert probs.shape == (0, 8)


def test_softmax_center_reference():
    torch.manual_seed(0)
    batches = [torch.randn(6, 5) for _ in range(3)]
    center = SoftmaxCenter(5, momentum=0.8)
    expected_center = torch.zeros(5)
    for batch in batches:
        expected_probs = torch.exp((batch - expected_center) / 0.3)
        expected_probs = expected_probs / expected_probs.sum(dim=1, keepdim=True)
        assert_close(center.probs(batch, 0.3), expected_probs)
        center.update(batch)
        expected_center = 0.8 * expected_center + 0.2 * batch.mean(dim=0)
        assert_close(center.center, expected_center)
    assert "center" in center.state_dict()
    center.update(torch.zeros(0, 5))  # empty batch: unchanged
    assert_close(center.center, expected_center)


def dino_loss_loop(student_logits, teacher_probs, student_temp, ignore_diagonal):
    total, count = 0.0, 0
    for b in range(student_logits.shape[1]):
        for s in range(student_logits.shape[0]):
            log_probs = F.log_softmax(student_logits[s, b].double() / student_temp, dim=-1)
            for t in range(teacher_probs.shape[0]):
                if ignore_diagonal and s == t:
                    continue
                total += -(teacher_probs[t, b].double() * log_probs).sum().item()
                count += 1
    return total / count


@pytest.mark.parametrize(
    ("num_student", "num_teacher", "ignore_diagonal"), [(2, 2, True), (2, 2, False), (5, 2, False)]
)
def test_dino_loss_against_loop(num_student, num_teacher, ignore_diagonal):
    torch.manual_seed(1)
    batch_size, num_prototypes = 3, 7
    student = torch.randn(num_student, batch_size, num_prototypes)
    teacher = torch.softmax(torch.randn(num_teacher, batch_size, num_prototypes) * 2, dim=-1)
    loss = DINOLoss(student_temp=0.2)(student, teacher, ignore_diagonal=ignore_diagonal)
    expected = dino_loss_loop(student, teacher, 0.2, ignore_diagonal)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_ibot_loss_against_loop():
    torch.manual_seed(2)
    num_crops, num_patches, num_prototypes = 5, 9, 6
    masks = torch.rand(num_crops, num_patches) < 0.4
    masks[1] = False  # one crop without mask: still counts in the denominator
    masks[3, 0] = True
    num_masked = int(masks.sum())
    student = torch.randn(num_masked, num_prototypes)
    teacher = torch.softmax(torch.randn(num_masked, num_prototypes), dim=-1)
    loss = IBOTPatchLoss(student_temp=0.1)(student, teacher, masks)

    row = 0
    total = 0.0
    for crop in range(num_crops):
        crop_rows = int(masks[crop].sum())
        crop_losses = []
        for _ in range(crop_rows):
            log_probs = F.log_softmax(student[row].double() / 0.1, dim=-1)
            crop_losses.append(-(teacher[row].double() * log_probs).sum().item())
            row += 1
        if crop_rows:
            total += sum(crop_losses) / crop_rows
    assert math.isclose(loss.item(), total / num_crops, rel_tol=1e-5)


def test_ibot_loss_rejects_mismatched_rows():
    masks = torch.zeros(2, 4, dtype=torch.bool)
    masks[0, :3] = True
    with pytest.raises(ValueError, match="3 patches"):
        IBOTPatchLoss()(torch.randn(2, 5), torch.rand(2, 5), masks)


def test_koleo_against_brute_force():
    torch.manual_seed(3)
    features = torch.randn(10, 4) * 5
    normalized = features.double() / features.double().norm(dim=1, keepdim=True)
    expected = 0.0
    for i in range(10):
        distances = [(normalized[i] - normalized[j]).norm().item() for j in range(10) if j != i]
        expected += -math.log(min(distances))
    expected /= 10
    assert math.isclose(KoLeoLoss()(features).item(), expected, rel_tol=1e-5)


def test_gram_against_loops():
    torch.manual_seed(4)
    student, teacher = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    s_norm, t_norm = F.normalize(student.double(), dim=-1), F.normalize(teacher.double(), dim=-1)
    for remove_neg in (False, True):
        clip = (lambda g: g.clamp(min=0)) if remove_neg else (lambda g: g)
        per_image = [((clip(s_norm[b] @ s_norm[b].T) - clip(t_norm[b] @ t_norm[b].T)) ** 2).mean() for b in range(3)]
        expected_img = torch.stack(per_image).mean().item()
        s_flat, t_flat = s_norm.flatten(0, 1), t_norm.flatten(0, 1)
        expected_batch = ((clip(s_flat @ s_flat.T) - clip(t_flat @ t_flat.T)) ** 2).mean().item()
        got_img = GramLoss(remove_neg=remove_neg, img_level=True)(student, teacher).item()
        got_batch = GramLoss(remove_neg=remove_neg, img_level=False)(student, teacher).item()
        assert math.isclose(got_img, expected_img, rel_tol=1e-5)
        assert math.isclose(got_batch, expected_batch, rel_tol=1e-5)
        # Token-flattened input is accepted at batch level.
        assert math.isclose(
            GramLoss(remove_neg=remove_neg, img_level=False)(student.flatten(0, 1), teacher.flatten(0, 1)).item(),
            expected_batch,
            rel_tol=1e-5,
        )


def test_losses_are_fp32_under_bf16_autocast(golden):
    """bf16 inputs under CPU bf16 autocast give the fp32 result on the same values cast up."""
    meta = golden["meta"]
    bf16 = {k: golden[k].bfloat16() for k in ("student_global_logits", "student_patch_logits", "koleo_x")}
    teacher_logits = golden["teacher_cls_logits"].bfloat16()
    gram_student, gram_teacher = golden["gram_student"].bfloat16(), golden["gram_teacher"].bfloat16()
    center = SoftmaxCenter(meta["K"])

    def compute_all():
        probs = sinkhorn_knopp(teacher_logits, meta["teacher_temp"])
        teacher_probs = probs.unflatten(0, (meta["n_global"], meta["B"]))
        patch_probs = sinkhorn_knopp(golden["teacher_patch_logits"].bfloat16(), meta["teacher_temp"])
        return {
            "sk": probs,
            "center": center.probs(teacher_logits, meta["teacher_temp"]),
            "dino": DINOLoss()(bf16["student_global_logits"], teacher_probs.bfloat16(), ignore_diagonal=True),
            "ibot": IBOTPatchLoss()(bf16["student_patch_logits"], patch_probs.bfloat16(), golden["masks"]),
            "koleo": KoLeoLoss()(bf16["koleo_x"]),
            "gram": GramLoss()(gram_student, gram_teacher),
        }

    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = compute_all()
    # Reference: the same bf16 values cast up, no autocast.
    bf16 = {k: v.float() for k, v in bf16.items()}
    teacher_logits = teacher_logits.float()
    gram_student, gram_teacher = gram_student.float(), gram_teacher.float()
    reference = compute_all()
    for name, value in under_autocast.items():
        assert value.dtype == torch.float32, name
        assert_close(value, reference[name], rtol=1e-6, atol=1e-7)
