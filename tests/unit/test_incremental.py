import pytest
import torch

from pipeline.linalg.decompose import centred_svd, project, reconstruct
from pipeline.linalg.incremental import absorb, change_of_basis, truncate


def _rows(n, d, rank, seed, noise=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, rank, generator=gen) @ torch.randn(rank, d, generator=gen)
        + noise * torch.randn(n, d, generator=gen)
        + 0.5
    )


@pytest.mark.parametrize("shape", [(12, 7, 300), (30, 25, 40)])  # D > N, and D < k + m + 1
def test_untruncated_update_equals_a_full_recompute(shape):
    n_old, n_new, d = shape
    old, new = _rows(n_old, d, 50, seed=0), _rows(n_new, d, 50, seed=1)
    both = torch.cat([old, new])
    full = centred_svd(both)
    updated = absorb(centred_svd(old), new)
    assert updated.count == n_old + n_new
    assert updated.components.shape == full.components.shape
    torch.testing.assert_close(updated.singular_values, full.singular_values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(updated.components, full.components, atol=2e-3, rtol=0)  # same signs too
    torch.testing.assert_close(updated.mean, full.mean, rtol=1e-5, atol=1e-5)
    assert updated.total_variance == pytest.approx(full.total_variance, rel=1e-6)  # float32 products, float64 sums


def test_old_loadings_move_to_the_new_basis_exactly():
    old, new = _rows(10, 200, 50, seed=2), _rows(5, 200, 50, seed=3)
    before = centred_svd(old)
    after = absorb(before, new)
    rotation, shift = change_of_basis(before, after)
    moved = project(old, before.components, before.mean) @ rotation + shift
    torch.testing.assert_close(moved, project(old, after.components, after.mean), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reconstruct(moved, after.components, after.mean), old, atol=1e-4, rtol=1e-4)


def test_truncated_updates_stay_close_to_the_full_recompute():
    rows = _rows(200, 400, 6, seed=4, noise=0.05)
    full = centred_svd(rows, k=6)
    dec = centred_svd(rows[:40], k=6)
    for start in range(40, 200, 40):
        dec = absorb(dec, rows[start : start + 40], k=6)

    def error(d):
        return float(torch.linalg.norm(reconstruct(project(rows, d.components, d.mean), d.components, d.mean) - rows))

    assert error(dec) <= 1.01 * error(full)


def test_variance_threshold_and_truncate():
    rows = _rows(40, 100, 8, seed=5)
    dec = absorb(centred_svd(rows[:20]), rows[20:], threshold=0.5)
    assert dec.components.shape[0] == truncate(centred_svd(rows), threshold=0.5).components.shape[0]
    assert truncate(dec, k=1).components.shape == (1, 100)
