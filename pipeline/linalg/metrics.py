"""Reconstruction error of delta W = s * B @ A, computed through r x r products.

A is (r, d_in) and B is (d_out, r), so forming B @ A costs d_out * d_in per adapter; Frobenius
inner products <B1 A1, B2 A2> = tr((B1^T B2)(A2 A1^T)) need only r x r matrices.

The difference is expanded as B A - B' A' = B (A - A') + (B - B') A', so every term is as small
as the error itself and nothing cancels: float32 products give it to float32 precision even when
it is 1e-6 of ||B A||, where ||BA||^2 - 2<BA, B'A'> + ||B'A'||^2 would need float64 throughout.
"""

from __future__ import annotations

import numpy as np
import torch


def _trace_of_products(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """tr(P_n Q_n) for batches of r x r matrices, in float64."""
    return torch.einsum("nij,nji->n", p.to(torch.float64), q.to(torch.float64))


def product_error(
    a: torch.Tensor, b: torch.Tensor, a_hat: torch.Tensor, b_hat: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(||B A - B' A'||_F, ||B A||_F) per adapter, float64 (N,), for batches a (N, r, d_in) and
    b (N, d_out, r); the scale s is left out (it cancels in relative errors)."""
    da, db = a - a_hat, b - b_hat
    bt = b.transpose(1, 2)
    btb = bt @ b
    diff2 = (
        _trace_of_products(btb, da @ da.transpose(1, 2))
        + 2 * _trace_of_products(bt @ db, a_hat @ da.transpose(1, 2))
        + _trace_of_products(db.transpose(1, 2) @ db, a_hat @ a_hat.transpose(1, 2))
    )
    norm2 = _trace_of_products(btb, a @ a.transpose(1, 2))
    return diff2.clamp_min(0).sqrt(), norm2.clamp_min(0).sqrt()


def relative(diff: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """diff / norm, and diff itself where norm is 0 (so 0 when both are)."""
    return torch.where(norm > 0, diff / norm.clamp_min(1e-300), diff)


def relative_product_error(a: torch.Tensor, b: torch.Tensor, a_hat: torch.Tensor, b_hat: torch.Tensor) -> torch.Tensor:
    """||B A - B' A'||_F / ||B A||_F per adapter (N,); 0 where B A = 0 and the reconstruction is 0 too."""
    return relative(*product_error(a, b, a_hat, b_hat)).to(torch.float32)


class FactorBasis:
    """One module's bases as matrices: lora_A = sum_i u_i A_i and lora_B = sum_j v_j B_j, with
    u = [1, loadings on A] and A_0 the mean (likewise for B). Inner products of rebuilt products
    B A are then quadratic forms in the loadings, so they cost O(k^2 r^2) per adapter instead of
    O(r (d_in + d_out) k) to rebuild the factors first."""

    def __init__(self, mean_a, components_a, mean_b, components_b, a_shape, b_shape):
        self.a = torch.cat([mean_a[None], components_a]).to(torch.float64).reshape(-1, *a_shape)  # (1+k_a, r, d_in)
        self.b = torch.cat([mean_b[None], components_b]).to(torch.float64).reshape(-1, *b_shape)  # (1+k_b, d_out, r)


def _augmented(loadings: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones(len(loadings), 1, dtype=torch.float64), loadings.to(torch.float64)], dim=1)


def _quadratic(u1: torch.Tensor, u2: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """sum_ij u1_i u2_j grams[i, j] per row: (n, r, r)."""
    n, r = len(u1), grams.shape[-1]
    outer = (u1[:, :, None] * u2[:, None, :]).reshape(n, -1)
    return (outer @ grams.reshape(-1, r * r)).view(n, r, r)


def pair_grams(basis1: FactorBasis, basis2: FactorBasis) -> tuple[torch.Tensor, torch.Tensor]:
    """The r x r products of every pair of basis matrices: (A2_j A1_i^T, B1_i^T B2_j), indexed [i, j]."""
    return torch.einsum("ixd,jyd->ijyx", basis1.a, basis2.a), torch.einsum("iox,joy->ijxy", basis1.b, basis2.b)


def rebuilt_inner(grams: tuple[torch.Tensor, torch.Tensor], a1, b1, a2, b2) -> torch.Tensor:
    """<B1 A1, B2 A2>_F per adapter (n,) float64, for factors rebuilt from loadings a1, b1 (n, k)
    on one basis and a2, b2 on another, given their pair_grams: tr((B1^T B2)(A2 A1^T))."""
    aa = _quadratic(_augmented(a1), _augmented(a2), grams[0])
    bb = _quadratic(_augmented(b1), _augmented(b2), grams[1])
    return torch.einsum("nxy,nyx->n", bb, aa)


class Drift:
    """||B_old A_old - B_new A_new||_F per adapter, float64, from loadings only: how far a move
    to a new basis shifts each rebuilt delta W. In float64 the expansion resolves drifts down to
    ~1e-7 of ||B A||."""

    def __init__(self, old: FactorBasis, new: FactorBasis):
        self.old_old, self.old_new, self.new_new = pair_grams(old, old), pair_grams(old, new), pair_grams(new, new)

    def __call__(self, old_a, old_b, new_a, new_b) -> torch.Tensor:
        squared = (
            rebuilt_inner(self.old_old, old_a, old_b, old_a, old_b)
            - 2 * rebuilt_inner(self.old_new, old_a, old_b, new_a, new_b)
            + rebuilt_inner(self.new_new, new_a, new_b, new_a, new_b)
        )
        return squared.clamp_min(0).sqrt()


def error_summary(means: np.ndarray, maxes: np.ndarray) -> dict[str, float]:
    if not len(means):
        return {}
    return {
        "mean": float(means.mean()),
        "p50": float(np.median(means)),
        "p95": float(np.quantile(means, 0.95)),
        "max": float(maxes.max()),
    }
