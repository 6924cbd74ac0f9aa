"""The learning-rate schedule: linear warm-up then cosine decay, a pure function of the step."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based).

    Linear warm-up from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` steps, then a
    half cosine from ``lr`` down to ``min_lr`` at ``max_steps``; ``min_lr`` after that.

    >>> lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=110)
    0.1
    >>> lr_at(60, lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=110)
    0.5
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    decay_steps = max_steps - warmup_steps
    progress = (step - warmup_steps) / decay_steps
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + coeff * (lr - min_lr)
