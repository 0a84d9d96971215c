import pytest
import torch

from pipeline.linalg.decompose import (
    centred_svd,
    components_for_variance,
    explained_variance,
    project,
    reconstruct,
    sign_flip,
)
from pipeline.linalg.metrics import relative_product_error


def _low_rank(n, d, rank, seed=0, noise=1e-3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=gen) @ torch.randn(rank, d, generator=gen) + noise * torch.randn(n, d, generator=gen)


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
    one common init plus small drift (a mean 1000x the spread), and a geometric spectrum."""
    gen = torch.Generator().manual_seed(3)
    shared = 0.02 * torch.randn(n, 6, generator=gen) @ torch.randn(6, d, generator=gen) + 1e-3 * torch.randn(n, d, generator=gen)
    same_init = torch.randn(d, generator=gen) + 1e-3 * torch.randn(n, 4, generator=gen) @ torch.randn(4, d, generator=gen)
    same_init += 1e-5 * torch.randn(n, d, generator=gen)
    decay = torch.logspace(0, -4, 30)[:, None] * torch.randn(30, d, generator=gen)
    geometric = torch.randn(n, 30, generator=gen) @ decay
    return {"shared": shared, "same-init": same_init, "geometric": geometric}


@pytest.mark.parametrize("route", ["gram", "covariance"])
def test_float32_products_with_refinement_match_a_float64_svd(route):
    for name, x in _spectra(*((300, 2000) if route == "gram" else (2000, 300))).items():
        centred = x.double() - x.double().mean(0)
        _, s_ref, vh_ref = torch.linalg.svd(centred, full_matrices=False)
        dec = centred_svd(x, k=16, route=route)
        assert dec.route == route
        # Float32 products resolve singular values to 1e-4 down to 1e-2 of the largest; below
        # that, directions are noise floor (same-init's are at 7e-4) and within 1e-3.
        large = s_ref[:16] >= 1e-2 * s_ref[0]
        torch.testing.assert_close(dec.singular_values.double()[large], s_ref[:16][large], rtol=1e-4, atol=0, msg=name)
        torch.testing.assert_close(dec.singular_values.double(), s_ref[:16], rtol=1e-3, atol=0, msg=name)
        # What reconstruction depends on: the variance the kept directions miss, within 1e-4 of
        # the least any 16 directions can miss.
        basis = dec.components.double()
        missed = (centred - centred @ basis.T @ basis).pow(2).sum()
        optimum = (s_ref[16:] ** 2).sum()
        assert float((missed - optimum) / optimum) < 1e-4, name
        assert dec.total_variance == pytest.approx(float(centred.pow(2).sum()), rel=1e-6)


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
    torch.testing.assert_close(reconstruct(project(x, dec.components, dec.mean), dec.components, dec.mean), x, atol=1e-4, rtol=0)


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
    expected = torch.linalg.norm(b.double() @ (a.double() - a_hat.double()), dim=(1, 2)) / torch.linalg.norm(b.double() @ a.double(), dim=(1, 2))
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
    torch.testing.assert_close(Drift(old_basis, FactorBasis(*new, (r, d_in), (d_out, r)))(*loadings), expected, rtol=1e-5, atol=0)
    assert Drift(old_basis, old_basis)(*loadings[:2], *loadings[:2]).max() < 1e-5 * expected.min()  # no move, no drift
