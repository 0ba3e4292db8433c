"""sixbit_tune.stats against direct float64 computations of the definitions (Γ = ‖Y − X‖₁/‖X‖₁, Δ = Y − X, ...)."""

from __future__ import annotations

import math

import pytest
import torch

from sixbit_tune.stats import block_stats, delta_change, rel_l2_rows, stream_delta


def _direct_gamma(xs, ys, row):
    num = sum((y[row].double() - x[row].double()).abs().sum().item() for x, y in zip(xs, ys))
    den = sum(x[row].double().abs().sum().item() for x in xs)
    return num / den


def _direct_norm(t):
    return math.sqrt(sum(v * v for v in t.double().flatten().tolist()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dual", [False, True], ids=["single", "dual"])
def test_block_stats_matches_direct(dtype, dual):
    b = 3
    xs = [torch.randn(b, 7, 24).to(dtype)]
    ys = [(xs[0].float() * 0.9 + 0.3 * torch.randn(b, 7, 24)).to(dtype)]
    if dual:
        xs.append(torch.randn(b, 5, 24).to(dtype) * 4)
        ys.append((xs[1].float() + torch.randn(b, 5, 24)).to(dtype))
    s = block_stats(xs, ys)
    assert set(s) == {"gamma", "delta_norm"}
    assert s["gamma"].dtype == torch.float32 and s["gamma"].shape == (b,)
    for r in range(b):
        assert s["gamma"][r].item() == pytest.approx(_direct_gamma(xs, ys, r), rel=1e-5)
        d = torch.cat([(y[r].double() - x[r].double()).flatten() for x, y in zip(xs, ys)])
        assert s["delta_norm"][r].item() == pytest.approx(_direct_norm(d), rel=1e-5)
    # The precomputed-delta path gives the same numbers.
    s2 = block_stats(xs, ys, delta=stream_delta(xs, ys))
    assert torch.equal(s["gamma"], s2["gamma"]) and torch.equal(s["delta_norm"], s2["delta_norm"])


def test_rows_are_independent():
    x = torch.randn(2, 4, 8)
    y = x + torch.randn(2, 4, 8)
    both = block_stats([x], [y])["gamma"]
    one = block_stats([x[1:]], [y[1:]])["gamma"]
    assert both[1].item() == pytest.approx(one[0].item(), rel=1e-6)
    y2 = y.clone()
    y2[0] += 100.0  # change row 0 only
    assert block_stats([x], [y2])["gamma"][1].item() == pytest.approx(both[1].item(), rel=1e-6)


def test_delta_change_matches_direct():
    d0 = torch.randn(4, 6, 16)
    d1 = d0 + 0.1 * torch.randn(4, 6, 16)
    change, cos = delta_change(d1, d0)
    for r in range(4):
        a, b = d1[r].double().flatten(), d0[r].double().flatten()
        assert change[r].item() == pytest.approx(_direct_norm(a - b) / _direct_norm(b), rel=1e-5)
        dot = sum(u * v for u, v in zip(a.tolist(), b.tolist()))
        assert cos[r].item() == pytest.approx(dot / (_direct_norm(a) * _direct_norm(b)), rel=1e-5)
    assert (cos <= 1.0 + 1e-6).all() and (change > 0).all()


def test_delta_change_identical_and_opposite():
    d = torch.randn(2, 32)
    change, cos = delta_change(d, d)
    assert torch.equal(change, torch.zeros(2))
    assert torch.allclose(cos, torch.ones(2), atol=1e-6)
    change, cos = delta_change(-d, d)
    assert torch.allclose(change, torch.full((2,), 2.0), rtol=1e-6)
    assert torch.allclose(cos, -torch.ones(2), atol=1e-6)


def test_degenerate_ratios_are_defined():
    z = torch.zeros(3, 10)
    nz = torch.ones(3, 10)
    # gamma: X = 0 and Y = X -> 0; X = 0 and Y != 0 -> inf.
    assert torch.equal(block_stats([z], [z])["gamma"], torch.zeros(3))
    assert torch.isinf(block_stats([z], [nz])["gamma"]).all()
    change, cos = delta_change(z, z)
    assert torch.equal(change, torch.zeros(3)) and torch.equal(cos, torch.ones(3))
    change, cos = delta_change(nz, z)
    assert torch.isinf(change).all() and torch.equal(cos, torch.zeros(3))
    assert torch.equal(rel_l2_rows(z, z), torch.zeros(3))
    assert torch.isinf(rel_l2_rows(nz, z)).all()


def test_nan_propagates():
    x = torch.randn(2, 8)
    y = x.clone()
    y[1, 3] = float("nan")
    g = block_stats([x], [y])["gamma"]
    assert math.isfinite(g[0].item()) and math.isnan(g[1].item())


def test_rel_l2_rows_matches_direct():
    a = torch.randn(3, 5, 7)
    b = torch.randn(3, 5, 7)
    r = rel_l2_rows(a, b)
    for i in range(3):
        want = _direct_norm(a[i].double() - b[i].double()) / _direct_norm(b[i])
        assert r[i].item() == pytest.approx(want, rel=1e-5)


def test_rel_l2_rows_is_delta_changes_change():
    # The runtime's TDC measures the change with rel_l2_rows (no cosine); the profiler with delta_change. A
    # tolerance fitted on profiled numbers must mean the same at inference: same bits, degenerate rows included.
    d0 = torch.randn(5, 3, 33)
    d1 = d0 + 0.05 * torch.randn(5, 3, 33)
    d0[3] = 0.0
    d1[4] = d0[4]
    assert torch.equal(rel_l2_rows(d1, d0), delta_change(d1, d0)[0])


def test_shape_errors_are_specific():
    with pytest.raises(ValueError, match="differ in shape"):
        block_stats([torch.zeros(2, 3)], [torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="batch rows"):
        block_stats([torch.zeros(2, 3), torch.zeros(3, 3)], [torch.zeros(2, 3), torch.zeros(3, 3)])
    with pytest.raises(ValueError, match="streams"):
        block_stats([], [])
    with pytest.raises(ValueError, match="differ in shape"):
        delta_change(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="shapes differ"):
        rel_l2_rows(torch.zeros(2, 3), torch.zeros(2, 4))
