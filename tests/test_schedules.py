"""Schedules agree with upstream DINOv3's array-based schedulers, rebuilt here with numpy."""

import numpy as np
import pytest

from dinov3_pl.schedules import ConstantSchedule, CosineSchedule, LinearRampSchedule


def upstream_cosine_array(base, final, total, warmup=0, start_warmup=0.0, freeze=0):
    """The array upstream's CosineScheduler precomputes (freeze zeros, linspace warm-up, half cosine)."""
    iters = np.arange(total - warmup - freeze)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate([np.zeros(freeze), np.linspace(start_warmup, base, warmup), cosine])


@pytest.mark.parametrize(("warmup", "freeze", "start"), [(0, 0, 0.0), (10, 0, 0.0), (7, 3, 0.04)])
def test_cosine_matches_upstream_array(warmup, freeze, start):
    schedule = CosineSchedule(
        peak=2e-3, end=1e-6, total_steps=100, warmup_steps=warmup, warmup_start=start, freeze_steps=freeze
    )
    expected = upstream_cosine_array(2e-3, 1e-6, 100, warmup, start, freeze)
    np.testing.assert_allclose([schedule(step) for step in range(100)], expected, rtol=1e-12, atol=1e-15)
    assert schedule(100) == schedule(10_000) == 1e-6  # upstream returns the final value past the end


def test_known_values():
    momentum = CosineSchedule(peak=0.992, end=1.0, total_steps=1000)
    assert momentum(0) == pytest.approx(0.992)
    assert momentum(500) == pytest.approx(0.996)  # half-way through a half cosine: the mean
    lr = CosineSchedule(peak=1.0, end=0.0, total_steps=20, warmup_steps=10)
    assert lr(0) == 0.0 and lr(9) == pytest.approx(1.0) and lr(10) == pytest.approx(1.0)


def test_teacher_temperature_warmup_then_constant():
    schedule = ConstantSchedule(value=0.07, warmup_steps=30, warmup_start=0.04)
    expected = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(20, 0.07)])
    np.testing.assert_allclose([schedule(step) for step in range(50)], expected, rtol=1e-12)


def test_gram_weight_cosine_ramp_matches_upstream():
    """Upstream's linear_warmup_cosine_decay(start=0, peak=0, end=2, warmup=W, cosine=C): 0, cosine up, then 2."""
    begin, ramp, total = 40, 25, 100
    cosine = (np.cos(np.linspace(0, np.pi, ramp)) + 1) / 2
    expected = np.concatenate([np.zeros(begin), (0.0 - 2.0) * cosine + 2.0, np.full(total - begin - ramp, 2.0)])
    schedule = LinearRampSchedule(start=0.0, end=2.0, ramp_steps=ramp, begin_step=begin, cosine=True)
    np.testing.assert_allclose([schedule(step) for step in range(total)], expected, atol=1e-12)


def test_linear_ramp():
    schedule = LinearRampSchedule(start=1.0, end=0.5, ramp_steps=10, begin_step=5)
    assert [schedule(s) for s in (0, 5, 10, 15, 99)] == pytest.approx([1.0, 1.0, 0.75, 0.5, 0.5])


def test_inconsistent_lengths_rejected():
    with pytest.raises(ValueError, match="exceed"):
        CosineSchedule(peak=1.0, end=0.0, total_steps=10, warmup_steps=8, freeze_steps=5)
