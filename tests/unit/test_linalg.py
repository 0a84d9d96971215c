import pytest
import torch

from pipeline import synthetic
from pipeline.linalg.decompose import (
    centred_svd,
    choose_route,
    components_for_variance,
    explained_variance,
    project,
    reconstruct,
    sign_flip,
)
from pipeline.linalg.metrics import relative_product_error


def _low_rank(n, d, rank, seed=0, noise=1e-3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=gen) @ torch.randn(rank, d, generator=gen) + noise * torch.randn(
        n, d, generator=gen
    )


@pytest.mark.parametrize("route", ["gram", "covariance", "svd", "randomized"])
@pytest.mark.parametrize("shape", [(40, 300), (300, 40)])
def test_every_route_matches_torch_svd_on_the_centred_matrix(route, shape):
    x = _low_rank(*shape, rank=8)
    centred = x - x.mean(0)
    _, s_ref, vh_ref = torch.linalg.svd(centred.double(), full_matrices=False)
    dec = centred_svd(x, k=5, route=route)
    torch.testing.assert_close(dec.singular_values.double(), s_ref[:5], rtol=1e-4, atol=1e-6)
    # Same subspace: equal projectors (signs and rotations within ties do not matter).
    projector = dec.components.T.double() @ dec.components.double()
    torch.testing.assert_close(projector, vh_ref[:5].T @ vh_ref[:5], atol=1e-4, rtol=0)
    torch.testing.assert_close(dec.mean, x.mean(0))


def _spectra(n, d):
    """Matrices whose top-16 SVD is hard in float32: a shared structure under a flat noise floor,
    one common init plus small drift (a mean 1000x the spread), a geometric spectrum, and the
    drift again around a mean 1e6x its spread (float32 means are then off by ~10% of the spread)."""
    gen = torch.Generator().manual_seed(3)
    shared = 0.02 * torch.randn(n, 6, generator=gen) @ torch.randn(6, d, generator=gen) + 1e-3 * torch.randn(
        n, d, generator=gen
    )
    same_init = torch.randn(d, generator=gen) + 1e-3 * torch.randn(n, 4, generator=gen) @ torch.randn(
        4, d, generator=gen
    )
    same_init += 1e-5 * torch.randn(n, d, generator=gen)
    decay = torch.logspace(0, -4, 30)[:, None] * torch.randn(30, d, generator=gen)
    geometric = torch.randn(n, 30, generator=gen) @ decay
    far_mean = 1e3 * torch.randn(d, generator=gen) + 1e-3 * torch.randn(n, 4, generator=gen) @ torch.randn(
        4, d, generator=gen
    )
    return {"shared": shared, "same-init": same_init, "geometric": geometric, "far-mean": far_mean}


U32, U64 = 2.0**-24, 2.0**-53


def _gamma(n, unit):
    """Higham's gamma_n: the relative error bound of an n-term float sum or dot product, in any
    order and with or without FMA (Higham, Accuracy and Stability, 2nd ed., Lemma 3.1, Sec. 3.1)."""
    assert n * unit < 0.5
    return n * unit / (1 - n * unit)


def _rounding_bounds(x, route, k):
    """Intervals for the k singular values the gram/covariance route returns, and bounds on the
    missed and total variance and the mean, derived from rounding error analysis of what the route
    computes (pipeline/linalg/decompose.py), whatever BLAS kernel, summation order or thread split.

    C = X - mean exactly (float64, from the float32 X), N rows; u = 2^-24. Each step and its bound:
    - float32 column mean hi: |hi - mean| <= d = gamma_{N+1} mean|X| + u |mean|;
    - float32 shift (mean of the residuals X - hi): |hi + shift - mean| <= g, g ~ gamma_{N+1} (mean|C| + d);
    - blocks B = (X - hi) - shift: B = C + 1 (mean - hi - shift)^T + E, |E| <= 2u'|C| + 1 f^T,
      f = u'(d + g); the route removes the column offset in float64 (J = I - 11^T/N), so the
      matrix it decomposes is C_hat = J B, |C_hat - C| <= 2u'|C| + 1 e^T, e = 2u' mean|C| + 2 f:
      ||C_hat - C||_2 <= eps_c = 2u'|||C|||_2 + sqrt(N)||e||, relative to the spread, not the mean;
    - float32 block products (inner length n_b) summed in float64 over B blocks, J applied in
      float64, and the float64 eigensolver (backward error side * u64):
      ||G_hat - C_hat^T C_hat||_2 <= eta = (gamma_{n_b} + 2 gamma64_B + 2 side u64) Omega^2
      + N ||g + f||^2 (the covariance's uncentred offset), Omega >= |||B|||_2;
    - Rayleigh-Ritz on V, the top m = k + OVERSAMPLE eigenvectors of G_hat: the Ritz values theta_i
      of C_hat^T C_hat satisfy lambda_i - min(2 eta, eta^2 / g_i) <= theta_i <= lambda_i, where
      g_i = lambda_i - lambda_{m+1} - 4 eta (Weyl and Cauchy interlacing; the quadratic term is
      Li and Li, LAA 395 (2005), with the off-diagonal block -(I - V V^T) dG V of norm <= eta);
    - float64 projection (X - mean) V, the float64 mean's offset removed by J (eps_p; it refines C,
      not C_hat: + eps_c (2 s_1 + eps_c) to eta), and the m x m float64 eigensolver (eps_h on squares).
    """
    from pipeline.linalg.decompose import BLOCK_BYTES, OVERSAMPLE

    xd = x.double()
    n_rows, d_cols = xd.shape
    mean = xd.mean(0)
    c = xd - mean
    s = torch.linalg.svdvals(c)
    side, other = (n_rows, d_cols) if route == "gram" else (d_cols, n_rows)
    step = max(BLOCK_BYTES // (4 * side), 1)
    n_b, blocks = min(other, step), -(-other // step)
    m = min(k + OVERSAMPLE, side)
    u2 = U32 * (1 + 2 * U32)
    g_n = _gamma(n_rows + 1, U32)
    a = c.abs().mean(0)
    d = g_n * xd.abs().mean(0) + U32 * mean.abs()
    g = (g_n + 2 * U32) * (1 + U32) * (a + d) + U32 * d
    f = u2 * (d + g)
    e = 2 * u2 * a + 2 * f
    root_n = n_rows**0.5
    abs_norm, fro, s1 = float(torch.linalg.matrix_norm(c.abs(), 2)), float(c.norm()), float(s[0])
    eps_c = 2 * u2 * abs_norm + root_n * float(e.norm())
    eps_cf = 2 * u2 * fro + root_n * float(e.norm())
    offset = float((g + f).norm())
    omega, omega_f = (1 + 2 * u2) * abs_norm + root_n * offset, (1 + 2 * u2) * fro + root_n * offset
    gamma_products = _gamma(n_b, U32) + 2 * _gamma(blocks, U64) + 2 * side * U64
    eta = (
        gamma_products * omega**2 + n_rows * offset**2 + eps_c * (2 * s1 + eps_c)
    )  # the step refines X - mean in float64
    eps_p = _gamma(side + 1, U64) * (omega * m**0.5 + (m * n_rows) ** 0.5 * offset) + side * U64 * (s1 + eps_c)
    eps_h = (_gamma(other, U64) + m * U64) * (omega_f + eps_p * m**0.5) ** 2

    padded = torch.cat([s, torch.zeros(m + 1, dtype=s.dtype)])
    lam_up = (padded + eps_c) ** 2
    lam_lo = (padded - eps_c).clamp_min(0) ** 2
    gaps = lam_lo[:k] - lam_up[m] - 4 * eta
    quadratic = torch.where(gaps > 0, eta**2 / gaps.clamp_min(torch.finfo(torch.float64).tiny), torch.inf)
    ritz_drop = torch.minimum(torch.minimum(torch.full_like(gaps, 2 * eta), quadratic), lam_up[:k])
    theta_lo, theta_up = (lam_lo[:k] - ritz_drop).clamp_min(0), lam_up[:k]
    low = ((theta_lo.sqrt() - eps_p).clamp_min(0) ** 2 - eps_h).clamp_min(0).sqrt() * (1 - U32)
    high = ((theta_up.sqrt() + eps_p) ** 2 + eps_h).sqrt() * (1 + U32)

    # Missed variance of span(components): ||C_hat||_F^2 - ||C_hat Q||_F^2 <= optimum(C_hat) + the
    # Ritz drops + the projection and eigensolver terms; C_hat -> C costs eps_cf (Mirsky), and the
    # float32 rounding of the components moves their span by ||dP||_F <= 4 u sqrt(k).
    optimum = float((s[k:] ** 2).sum())
    top = (fro + eps_cf) ** 2
    missed_hat = (optimum**0.5 + eps_cf) ** 2 + float(ritz_drop.sum()) + k * eps_h + 2 * k**0.5 * eps_p * top**0.5
    missed = (missed_hat**0.5 + eps_cf + s1 * 4 * U32 * k**0.5) ** 2
    total = 2 * gamma_products * omega_f**2 + n_rows * offset**2 + eps_cf * (2 * fro + eps_cf)
    mean_error = 2 * U32 * mean.abs() + (1 + 2 * U32) * g
    return s, low, high, optimum, missed, total, mean_error


@pytest.mark.parametrize("route", ["gram", "covariance"])
def test_float32_products_with_refinement_stay_within_their_rounding_bounds(route):
    for name, x in _spectra(*((300, 2000) if route == "gram" else (2000, 300))).items():
        s_ref, low, high, optimum, missed_bound, total_bound, mean_error = _rounding_bounds(x, route, 16)
        centred = x.double() - x.double().mean(0)
        dec = centred_svd(x, k=16, route=route)
        assert dec.route == route
        got = dec.singular_values.double()
        assert len(got) == 16, name
        assert bool(((got >= low) & (got <= high)).all()), (name, low, got, high)
        basis = torch.linalg.qr(dec.components.double().T).Q  # the span the kept directions cover
        missed = float((centred - centred @ basis @ basis.T).pow(2).sum())
        assert missed <= missed_bound, (name, missed, optimum, missed_bound)
        assert abs(dec.total_variance - float(centred.pow(2).sum())) <= total_bound, name
        assert bool(((dec.mean.double() - x.double().mean(0)).abs() <= mean_error).all()), name


def test_the_rounding_bounds_resolve_separated_directions():
    """What the bounds promise where it matters: the largest singular value is pinned to 1e-4 and
    those above a tenth of it to 1e-3 (float32 products, refined in float64); only the noise floor
    under a dominant structure (same-init's 12 smallest, at 7e-4 of the largest) has no lower bound."""
    for route, shape in (("gram", (300, 2000)), ("covariance", (2000, 300))):
        for name, x in _spectra(*shape).items():
            s_ref, low, high, *_ = _rounding_bounds(x, route, 16)
            width = (high - low) / s_ref[:16]
            resolved = s_ref[:16] >= 0.1 * s_ref[0]
            assert float(width[0]) < 1e-4 and float(width[resolved].max()) < 1e-3, (route, name, width)


def test_auto_takes_the_small_side():
    assert centred_svd(torch.randn(10, 50), k=3).route == "gram"
    assert centred_svd(torch.randn(50, 10), k=3).route == "covariance"


def test_components_are_orthonormal_and_signs_deterministic():
    x = _low_rank(30, 200, rank=6)
    a, b = centred_svd(x, k=6, route="gram"), centred_svd(x, k=6, route="svd")
    torch.testing.assert_close(a.components @ a.components.T, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.components, b.components, atol=1e-4, rtol=0)
    assert torch.equal(sign_flip(-a.components), a.components)


def test_total_variance_is_the_whole_spectrum():
    x = _low_rank(20, 50, rank=20, noise=0)
    dec = centred_svd(x)
    assert dec.total_variance == pytest.approx(float((dec.singular_values.double() ** 2).sum()), rel=1e-5)
    assert float(explained_variance(dec.singular_values, dec.total_variance)[-1]) == pytest.approx(1.0, rel=1e-5)


def test_variance_threshold_picks_the_fewest_components():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # variances 9, 4, 1 of 14
    assert components_for_variance(s, 14.0, 0.6) == 1
    assert components_for_variance(s, 14.0, 0.9) == 2
    assert components_for_variance(s, 14.0, 1.0) == 3
    dec = centred_svd(_low_rank(30, 100, rank=10, noise=0), threshold=0.999999)
    assert len(dec.singular_values) == 10  # every data direction, none of the null space


def test_null_directions_are_dropped_and_reconstruction_is_exact_with_all_components():
    x = _low_rank(6, 100, rank=6, noise=0)
    dec = centred_svd(x, k=50)
    assert dec.components.shape == (5, 100)  # rank of the centred 6-row matrix
    torch.testing.assert_close(
        reconstruct(project(x, dec.components, dec.mean), dec.components, dec.mean), x, atol=1e-4, rtol=0
    )


def test_product_error_equals_the_error_of_formed_products():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 4, 30, generator=gen), torch.randn(5, 20, 4, generator=gen)
    a_hat, b_hat = a + 0.1 * torch.randn(a.shape, generator=gen), b + 0.1 * torch.randn(b.shape, generator=gen)
    expected = torch.linalg.norm(b @ a - b_hat @ a_hat, dim=(1, 2)) / torch.linalg.norm(b @ a, dim=(1, 2))
    torch.testing.assert_close(relative_product_error(a, b, a_hat, b_hat), expected, rtol=1e-4, atol=1e-6)
    assert relative_product_error(a, b, a, b).abs().max() < 1e-6


def test_product_error_stays_accurate_when_tiny():
    # An error 1e-6 of ||BA||: the expanded form cancels nothing, so float32 inputs resolve it.
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 8, 300, generator=gen), torch.randn(4, 200, 8, generator=gen)
    a_hat = a + 1e-6 * torch.randn(a.shape, generator=gen)
    expected = torch.linalg.norm(b.double() @ (a.double() - a_hat.double()), dim=(1, 2)) / torch.linalg.norm(
        b.double() @ a.double(), dim=(1, 2)
    )
    torch.testing.assert_close(relative_product_error(a, b, a_hat, b).double(), expected, rtol=1e-3, atol=0)


def test_drift_from_loadings_equals_the_drift_of_rebuilt_products():
    from pipeline.linalg.metrics import Drift, FactorBasis

    gen = torch.Generator().manual_seed(4)
    n, r, d_in, d_out, k = 9, 4, 30, 20, 5

    def basis():
        comps = [torch.linalg.qr(torch.randn(width, k, generator=gen))[0].T for width in (r * d_in, d_out * r)]
        return torch.randn(r * d_in, generator=gen), comps[0], torch.randn(d_out * r, generator=gen), comps[1]

    old, new = basis(), basis()
    loadings = [torch.randn(n, k, generator=gen) for _ in range(4)]

    def rebuilt(b, la, lb):
        return (b[2] + lb @ b[3]).view(n, d_out, r).double() @ (b[0] + la @ b[1]).view(n, r, d_in).double()

    expected = torch.linalg.norm(rebuilt(old, *loadings[:2]) - rebuilt(new, *loadings[2:]), dim=(1, 2))
    old_basis = FactorBasis(*old, (r, d_in), (d_out, r))
    torch.testing.assert_close(
        Drift(old_basis, FactorBasis(*new, (r, d_in), (d_out, r)))(*loadings), expected, rtol=1e-5, atol=0
    )
    assert Drift(old_basis, old_basis)(*loadings[:2], *loadings[:2]).max() < 1e-5 * expected.min()  # no move, no drift


def _structure_stacks(n):
    """lora_A and lora_B stacks (n, 2048) of one module of the benchmark's synthetic structures."""
    spec = synthetic.Preset(1, {"q_proj": (128, 128)}, 16, 32)
    stacks = {}
    for structure in synthetic.STRUCTURES:
        sides = synthetic._collection_sides(spec, structure, torch.Generator().manual_seed(0), 6)
        rows = []
        for i in range(n):
            own = torch.Generator().manual_seed(i)
            weights = synthetic._adapter_weights(sides, structure, 0.05, own)
            if structure == "gauge":
                synthetic._rotate(weights, sides, spec.rank, own)
            rows.append([w.flatten() for w in weights.values()])
        for side, name in enumerate(weights):
            stacks[structure, name.split(".")[-2]] = torch.stack([r[side] for r in rows])
    return stacks


def _missed_variance(x, dec):
    """Captured variance of the float64 optimum minus that of `dec`'s components, over the total."""
    centred = x.double() - x.double().mean(0)
    s = torch.linalg.svdvals(centred)
    captured = (centred @ dec.components.double().T).pow(2).sum()
    return float((s[: len(dec.singular_values)].pow(2).sum() - captured) / s.pow(2).sum())


@pytest.mark.parametrize("threads", [1, 2])
def test_auto_takes_the_randomized_route_for_many_rows_and_misses_under_1e_4_of_the_variance(threads):
    """The stated accuracy of `auto` (decompose.RANDOMIZED_LOSS): on the benchmark's structures the
    randomized route is taken where the factors share structure and captures within 1e-4 of the
    optimum; flat spectra (the gauge collection's factors, plain noise) go to the exact route."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stacks = _structure_stacks(800)
        stacks["noise", "A"] = torch.randn(800, 2048, generator=torch.Generator().manual_seed(1))
        routes = {}
        for key, x in stacks.items():
            dec = centred_svd(x, k=16)
            routes[key] = dec.route
            assert len(dec.singular_values) == 16 and _missed_variance(x, dec) < 1e-4, (key, dec.route)
    finally:
        torch.set_num_threads(before)
    assert {key for key, route in routes.items() if route == "randomized"} >= {
        ("shared", "lora_A"),
        ("shared", "lora_B"),
        ("same-init", "lora_A"),
    }, routes
    assert routes["noise", "A"] == "gram" and routes["gauge", "lora_A"] == "gram", routes


def test_randomized_route_is_the_same_bytes_on_every_run_and_needs_a_k():
    x = _low_rank(900, 400, rank=8)
    first, second = centred_svd(x, k=4, route="randomized"), centred_svd(x.clone(), k=4, route="randomized")
    assert first.route == "randomized" and torch.equal(first.components, second.components)
    with pytest.raises(ValueError, match="explicit k"):
        centred_svd(x, threshold=0.9, route="randomized")


def test_auto_keeps_the_exact_route_for_few_rows_a_threshold_or_a_large_k():
    assert choose_route(545, 14336, 16) == "gram" and choose_route(546, 14336, 16) == "randomized"
    assert choose_route(20000, 14336, None) == "covariance" and choose_route(20000, 512, 16) == "covariance"
    assert choose_route(20000, 20000, 16) == "randomized" and choose_route(1500, 14336, 64) == "gram"
