"""The DMPQ and TDC rules of sixbit_tune.rules, case by case."""

import math
import subprocess
import sys

import pytest

from sixbit_tune import rules

# ------------------------------------------------------------------------------------------------ DMPQ


def test_dmpq_fast_iff_prediction_at_most_threshold_for_every_row():
    # 2 * 0.1 + 0.05 = 0.25: equal to the threshold is fast, above it is not.
    assert rules.dmpq_fast(2.0, 0.05, [0.1], 0.25) is True
    assert rules.dmpq_fast(2.0, 0.05, [0.1], 0.2499) is False
    # One row above the threshold makes the whole batch robust (conservative joint decision).
    assert rules.dmpq_fast(1.0, 0.0, [0.1, 0.3], 0.2) is False
    assert rules.dmpq_fast(1.0, 0.0, [0.1, 0.2], 0.2) is True
    # A negative slope: larger Γ predicts a smaller error.
    assert rules.dmpq_fast(-1.0, 0.5, [0.4], 0.1) is True
    assert rules.dmpq_fast(-1.0, 0.5, [0.3], 0.1) is False


def test_dmpq_without_gamma_is_not_fast_and_uses_first_step_format():
    for missing in (None, []):
        assert rules.dmpq_fast(0.0, -1.0, missing, 1.0) is False
        assert rules.dmpq_format(0.0, -1.0, missing, 1.0) == "int8"
        assert rules.dmpq_format(0.0, -1.0, missing, 1.0, "nvfp4") == "nvfp4"
        assert rules.dmpq_format(0.0, -1.0, missing, 1.0, "int8") == "int8"
    # With a Γ, the first-step format plays no part.
    assert rules.dmpq_format(1.0, 0.0, [5.0], 1.0, "nvfp4") == "int8"
    assert rules.dmpq_format(1.0, 0.0, [0.5], 1.0, "int8") == "nvfp4"


def test_dmpq_infinite_thresholds_and_nan():
    assert rules.dmpq_fast(3.0, 1.0, [1e30], math.inf) is True
    assert rules.dmpq_fast(0.0, -1e30, [0.0], -math.inf) is False
    assert rules.dmpq_fast(1.0, 0.0, [math.nan], 1.0) is False


def test_dmpq_formats_per_layer_and_custom_route_names():
    got = rules.dmpq_formats([1.0, 10.0, 0.0], [0.0, 0.0, 0.3], [0.05, 0.02], 0.25)
    assert got == ["nvfp4", "int8", "int8"]
    assert rules.dmpq_formats([1.0, 2.0], [0.0, 0.0], None, 0.25, "nvfp4") == ["nvfp4", "nvfp4"]
    assert rules.dmpq_format(1.0, 0.0, [0.1], 0.2, fast="fp4", robust="bf16") == "fp4"
    with pytest.raises(ValueError, match="2 alphas but 1 betas"):
        rules.dmpq_formats([1.0, 2.0], [0.0], [0.1], 0.2)


# ------------------------------------------------------------------------------------------------ TDC window


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, False), (2, False), (3, True), (7, True), (8, False), (9, False)],
)
def test_window_excludes_warmup_and_cooldown(step, expected):
    # 10 steps, warmup 3, cooldown 2: steps 3..7 may skip.
    assert rules.tdc_in_window(step, 3, 2, 10) is expected


def test_window_with_unknown_number_of_steps():
    assert rules.tdc_in_window(5, 3, 0, None) is True
    assert rules.tdc_in_window(2, 3, 0, None) is False
    assert rules.tdc_in_window(50, 3, 1, None) is False  # cooldown > 0 and the end unknown: never


def test_may_skip_later():
    # 10 steps, cooldown 2: the last step that may skip is 7, so a block computed at 6 keeps its Δ, at 7 not.
    assert rules.tdc_may_skip_later(6, 2, 10) is True
    assert rules.tdc_may_skip_later(7, 2, 10) is False
    assert rules.tdc_may_skip_later(0, 0, None) is True
    assert rules.tdc_may_skip_later(0, 1, None) is False


def test_rate_spreads_the_change_over_the_gap():
    assert rules.tdc_rate([0.6, 0.3], 3) == pytest.approx([0.2, 0.1])
    assert rules.tdc_rate([0.6], 0) == [0.6]  # a gap below 1 counts as 1


# ------------------------------------------------------------------------------------------------ TDC skip


def _skip(acc, rate, consec, **kw):
    opts = {"tolerance": 0.5, "max_skips": 2, "in_window": True, "has_cache": True}
    opts.update(kw)
    return rules.tdc_skip(acc, rate, consec, **opts)


def test_skip_accumulates_and_compares_every_row():
    assert _skip(None, [0.2, 0.1], 0) == pytest.approx([0.2, 0.1])
    assert _skip([0.2, 0.1], [0.2, 0.1], 1) == pytest.approx([0.4, 0.2])
    # Equal to the tolerance still skips; one row above it does not.
    assert _skip([0.25], [0.25], 0) == [0.5]
    assert _skip([0.3, 0.0], [0.3, 0.0], 0) is None


def test_skip_needs_everything_it_names():
    assert _skip(None, [0.1], 0) is not None
    assert _skip(None, [0.1], 0, tolerance=0.0) is None  # tolerance 0 never skips, even with no change at all
    assert _skip(None, [0.0], 0, tolerance=0.0) is None
    assert _skip(None, [0.1], 0, in_window=False) is None
    assert _skip(None, [0.1], 0, has_cache=False) is None
    assert _skip(None, [0.1], 0, cacheable=False) is None
    assert _skip(None, None, 0) is None  # no rate measured yet
    assert _skip(None, [0.1], 2) is None  # max_skips reached
    assert _skip(None, [0.1], 0, max_skips=0) is None
    assert _skip(None, [0.1, 0.1], 0, rows=1) is None  # the rate belongs to another batch
    assert _skip(None, [0.1, 0.1], 0, rows=2) is not None
    assert _skip(None, [math.nan], 0) is None


def test_skip_rows_mismatch_is_an_error():
    with pytest.raises(ValueError, match="1 rows but the change rate has 2"):
        _skip([0.0], [0.1, 0.1], 0)


def test_skip_never_forever():
    """With no change at all and an infinite tolerance, a block still runs after max_skips skips in a row."""
    acc, consec, pattern = None, 0, []
    for _ in range(12):
        new = rules.tdc_skip(acc, [0.0], consec, tolerance=math.inf, max_skips=3, in_window=True, has_cache=True)
        if new is None:
            acc, consec = None, 0
        else:
            acc, consec = new, consec + 1
        pattern.append(new is not None)
    assert pattern == [True, True, True, False] * 3


def test_rules_import_nothing_heavy():
    code = "import sys, sixbit_tune.rules; print(sorted(m for m in ('torch', 'numpy', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------ TDC output and refresh


def test_refresh_robust_puts_every_dynamic_layer_on_the_robust_route():
    fast = rules.dmpq_formats([1.0, 1.0], [0.0, 0.0], [0.01], 0.25)
    assert fast == ["nvfp4", "nvfp4"]
    assert rules.dmpq_formats([1.0, 1.0], [0.0, 0.0], [0.01], 0.25, refresh_robust=True) == ["int8", "int8"]
    # Also at the first step, whatever the first-step format.
    assert rules.dmpq_formats([1.0], [0.0], None, 0.25, "nvfp4", refresh_robust=True) == ["int8"]


@pytest.mark.parametrize(("last", "prev", "since", "gap", "expected"), [
    (2.0, 1.0, 1, 1, 3.0),    # one step after two consecutive computations: last + (last - prev)
    (2.0, 1.0, 2, 1, 4.0),    # two steps on
    (2.0, 1.0, 1, 2, 2.5),    # the computations were 2 steps apart: half the slope per step
    (1.0, 3.0, 3, 2, -2.0),   # a falling Δ
    (5.0, 5.0, 4, 3, 5.0),    # no change, no extrapolation
])
def test_tdc_extrapolate_first_order(last, prev, since, gap, expected):
    assert rules.tdc_extrapolate(last, prev, since, gap) == expected


def test_tdc_extrapolate_refuses_steps_below_one():
    for since, gap in ((0, 1), (1, 0), (-1, 2)):
        with pytest.raises(ValueError, match="since >= 1 and gap >= 1"):
            rules.tdc_extrapolate(1.0, 0.0, since, gap)
