"""Gauge-invariant bases: canonical and aligned factors, and joint U/V bases with factored cores.
Replacing each adapter's factors by R A, B R^-1 (random invertible R, condition numbers up to 50)
must not change what they rebuild."""

import pytest
import torch

from pipeline.linalg.budget import fit_within, fits
from pipeline.linalg.gauge import align, canonical_factors, fit_joint, joint_cores, joint_rebuild, pad_rank


def _collection(n=12, r=4, d_in=40, d_out=32, shared=3, seed=0):
    """Factors sharing a low-dimensional structure in delta W, float64."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d_out, shared, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(d_in, shared, generator=g, dtype=torch.float64)).Q
    b = u @ torch.randn(n, shared, r, generator=g, dtype=torch.float64) + 0.01 * torch.randn(
        n, d_out, r, generator=g, dtype=torch.float64
    )
    a = torch.randn(n, r, shared, generator=g, dtype=torch.float64) @ v.T + 0.01 * torch.randn(
        n, r, d_in, generator=g, dtype=torch.float64
    )
    return a, b


def _regauge(a, b, seed=1, condition=50.0):
    """Each adapter's factors as R A, B R^-1 for its own random R of the given condition number."""
    g = torch.Generator().manual_seed(seed)
    n, r = a.shape[0], a.shape[1]
    q1 = torch.linalg.qr(torch.randn(n, r, r, generator=g, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(n, r, r, generator=g, dtype=torch.float64)).Q
    sigma = torch.logspace(0, torch.log10(torch.tensor(condition)), r, dtype=torch.float64)
    rotation = q1 @ torch.diag_embed(sigma.expand(n, r)) @ q2
    return rotation @ a, b @ torch.linalg.inv(rotation)


def _relative(x, y):
    return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))


def test_canonical_factors_rebuild_delta_w_and_ignore_the_gauge():
    a, b = _collection()
    a_hat, b_hat, s = canonical_factors(a, b)
    assert _relative(b_hat @ a_hat, b @ a) < 1e-12
    assert (s[:, :-1] >= s[:, 1:]).all()
    a2, b2 = _regauge(a, b)
    assert _relative(b2 @ a2, b @ a) < 1e-10  # the same adapters
    a2_hat, b2_hat, _ = canonical_factors(a2, b2)
    assert _relative(a2_hat, a_hat) < 1e-8 and _relative(b2_hat, b_hat) < 1e-8


def test_aligned_factors_keep_delta_w_and_ignore_the_gauge():
    a, b = _collection()
    aligned_a, aligned_b = align(a, b)
    assert _relative(aligned_b @ aligned_a, b @ a) < 1e-12
    other_a, other_b = align(*_regauge(a, b, seed=7))
    assert _relative(other_a, aligned_a) < 1e-6 and _relative(other_b, aligned_b) < 1e-6
    # Refined towards a rank-k structure: still the same factors in any gauge, B A unchanged, and
    # a flat fit of k components leaves less.
    refined_a, refined_b = align(a, b, components=3)
    again_a, again_b = align(*_regauge(a, b, seed=7), components=3)
    assert _relative(again_a, refined_a) < 1e-4 and _relative(again_b, refined_b) < 1e-4
    assert _relative(refined_b @ refined_a, b @ a) < 1e-12

    def flat_residual(x):
        flat = x.reshape(len(x), -1)
        centred = flat - flat.mean(dim=0)
        s = torch.linalg.svdvals(centred)
        return float(s[3:].pow(2).sum() / s.pow(2).sum())

    assert flat_residual(refined_a) + flat_residual(refined_b) < flat_residual(aligned_a) + flat_residual(aligned_b)


def test_joint_bases_and_cores_rebuild_the_same_delta_w_in_any_gauge():
    a, b = _collection()
    basis = fit_joint(a, b, c=6)
    core_a, core_b, error, _ = joint_cores(basis, a, b, q=3)
    rebuilt_a, rebuilt_b = joint_rebuild(basis, core_a, core_b, rank=4)
    assert rebuilt_a.shape == a.shape and rebuilt_b.shape == b.shape
    rebuilt = rebuilt_b.double() @ rebuilt_a.double()
    a2, b2 = _regauge(a, b)
    basis2 = fit_joint(a2, b2, c=6)
    core_a2, core_b2, error2, _ = joint_cores(basis2, a2, b2, q=3)
    rebuilt2 = torch.matmul(*reversed(joint_rebuild(basis2, core_a2, core_b2, rank=4))).double()
    assert _relative(rebuilt2, rebuilt) < 1e-6
    assert torch.allclose(error2, error, rtol=1e-6, atol=1e-9)
    # The recorded error is the one formed directly.
    dw = b @ a
    direct = torch.linalg.norm(dw - rebuilt, dim=(1, 2)) / torch.linalg.norm(dw, dim=(1, 2))
    assert torch.allclose(error, direct, rtol=1e-4, atol=1e-6)
    # The structure is 3-dimensional plus noise (~5% of each delta W): 6 shared directions and
    # rank-3 cores keep all but the noise.
    assert float(error.max()) < 0.1


def test_joint_special_cases_and_monotone_fit():
    a, b = _collection(n=6, d_in=10, d_out=8)
    full = fit_joint(a, b, c=8)  # c = d_out: nothing shared is lost, only V's width
    error = joint_cores(full, a, b, q=4)[2]
    narrow = fit_joint(a, b, c=2)
    narrow_error = joint_cores(narrow, a, b, q=4)[2]
    assert (narrow_error >= error - 1e-9).all()
    one, many = fit_joint(a, b, c=3, iterations=1), fit_joint(a, b, c=3, iterations=10)
    assert many.energy >= one.energy - 1e-12 and many.energy <= many.total + 1e-9
    warm = fit_joint(a, b, c=3, iterations=1, init=many)
    assert warm.energy >= many.energy * (1 - 1e-9)
    # Each adapter's own rank-q SVD is the case c = d_out = d_in: exact at q = r.
    square_a, square_b = _collection(n=6, d_in=10, d_out=10)
    exact = fit_joint(square_a, square_b, c=10)
    assert float(joint_cores(exact, square_a, square_b, q=4)[2].max()) < 1e-6


def test_mixed_ranks_by_zero_padding():
    a, b = _collection(r=4)
    low_a, low_b = a[:4, :2], b[:4, :, :2]  # rank-2 adapters next to rank-4 ones
    padded_a, padded_b = pad_rank(low_a, low_b, 4)
    assert padded_a.shape == (4, 4, 40) and _relative(padded_b @ padded_a, low_b @ low_a) < 1e-15
    mixed_a, mixed_b = torch.cat([padded_a, a[4:]]), torch.cat([padded_b, b[4:]])
    basis = fit_joint(mixed_a, mixed_b, c=6)
    error = joint_cores(basis, mixed_a, mixed_b, q=4)[2]
    assert float(error.max()) < 0.1


def test_the_budget_check_agrees_with_what_a_fit_within_the_budget_tries():
    """plan refuses a budget up front with `fits`; a budget it lets through must fit in the task
    (the groups of 2 adapters of the trained step once reached fit_within with 102 floats, which
    `fits` passed at a core rank fit_within does not try)."""
    gen = torch.Generator().manual_seed(0)
    n, (r, d_in, d_out) = 2, (8, 32, 32)
    xa, xb = torch.randn(n, r * d_in, generator=gen), torch.randn(n, d_out * r, generator=gen)
    for budget in range(1, 700, 7):
        for methods in (("flat",), ("joint",), ("flat", "joint")):
            if fits(budget, n, r, d_in, d_out, methods):
                fit_within(xa, xb, ((r, d_in), (d_out, r)), budget, methods)
            else:
                with pytest.raises(ValueError, match="no method"):
                    fit_within(xa, xb, ((r, d_in), (d_out, r)), budget, methods)
