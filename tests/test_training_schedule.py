"""The lr schedule: linear warm-up then cosine to min_lr, a pure function of the step."""

from __future__ import annotations

import itertools

import pytest

from stcorpus.training.schedule import lr_at

KW: dict = {"lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 10, "max_steps": 110}


def test_warmup_is_linear_up_to_the_peak() -> None:
    values = [lr_at(s, **KW) for s in range(10)]
    assert values[0] == pytest.approx(1e-4)
    assert values[9] == pytest.approx(1e-3)
    steps = [b - a for a, b in itertools.pairwise(values)]
    assert steps == pytest.approx([1e-4] * 9)


def test_cosine_half_way_and_end() -> None:
    assert lr_at(10, **KW) == pytest.approx(1e-3)
    assert lr_at(60, **KW) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(110, **KW) == pytest.approx(1e-5)
    assert lr_at(10_000, **KW) == pytest.approx(1e-5)


def test_decay_is_monotone_and_bounded() -> None:
    values = [lr_at(s, **KW) for s in range(10, 120)]
    assert all(b <= a for a, b in itertools.pairwise(values))
    assert min(values) >= 1e-5


def test_no_warmup_starts_at_peak_and_negative_step_fails() -> None:
    assert lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, **KW)
