"""Step-based schedules (learning rate, weight decay, EMA momentum, teacher temperature, loss-weight ramps).

Every schedule is a pure function of the optimizer step, so resuming from a checkpoint at step k gives exactly the
value an uninterrupted run had at step k. Upstream DINOv3 states schedules in "epochs" of ``OFFICIAL_EPOCH_LENGTH``
= 1250 iterations; our configs state them in steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CosineSchedule", "ConstantSchedule", "LinearRampSchedule", "Schedule"]


class Schedule:
    """A value per optimizer step."""

    def __call__(self, step: int) -> float:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """``freeze_steps`` at 0, linear warm-up from ``warmup_start`` to ``peak`` over ``warmup_steps``, then a
    half-cosine from ``peak`` to ``end`` until ``total_steps``; ``end`` afterwards (upstream ``CosineScheduler``)."""

    peak: float
    end: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 0.0
    freeze_steps: int = 0

    def __post_init__(self) -> None:
        if self.freeze_steps + self.warmup_steps > self.total_steps:
            raise ValueError(
                f"freeze ({self.freeze_steps}) + warm-up ({self.warmup_steps}) steps exceed the "
                f"{self.total_steps} total steps"
            )

    def __call__(self, step: int) -> float:
        if step < self.freeze_steps:
            return 0.0
        step -= self.freeze_steps
        if step < self.warmup_steps:
            return _linspace_value(self.warmup_start, self.peak, step, self.warmup_steps)
        step -= self.warmup_steps
        cosine_steps = self.total_steps - self.freeze_steps - self.warmup_steps
        if step >= cosine_steps:
            return self.end
        return self.end + 0.5 * (self.peak - self.end) * (1 + math.cos(math.pi * step / cosine_steps))


@dataclass(frozen=True)
class ConstantSchedule(Schedule):
    """Linear warm-up from ``warmup_start`` to ``value`` over ``warmup_steps``, then constant (upstream 7B recipe)."""

    value: float
    warmup_steps: int = 0
    warmup_start: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _linspace_value(self.warmup_start, self.value, step, self.warmup_steps)
        return self.value


@dataclass(frozen=True)
class LinearRampSchedule(Schedule):
    """``start`` before ``begin_step``, then a ramp to ``end`` over ``ramp_steps``, then ``end``.

    The ramp is linear, or with ``cosine=True`` a half-cosine whose first and last steps take exactly ``start``
    and ``end`` (upstream's ``linear_warmup_cosine_decay`` cosine part, used for the Gram loss weight 0 -> 2 and
    the local DINO weight 1 -> 0.5).
    """

    start: float
    end: float
    ramp_steps: int
    begin_step: int = 0
    cosine: bool = False

    def __call__(self, step: int) -> float:
        if step < self.begin_step:
            return self.start
        step -= self.begin_step
        if step >= self.ramp_steps:
            return self.end
        if not self.cosine:
            return self.start + (self.end - self.start) * step / self.ramp_steps
        progress = step / (self.ramp_steps - 1) if self.ramp_steps > 1 else 1.0
        return self.start + (self.end - self.start) * 0.5 * (1 - math.cos(math.pi * progress))


def _linspace_value(start: float, stop: float, index: int, num: int) -> float:
    """``np.linspace(start, stop, num)[index]``: upstream warm-ups include both end points."""
    if num == 1:
        return start
    return start + (stop - start) * index / (num - 1)
