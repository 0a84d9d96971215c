"""Reconstruction error of delta W = s * B @ A, computed through r x r products.

A is (r, d_in) and B is (d_out, r), so forming B @ A costs d_out * d_in per adapter; Frobenius
inner products <B1 A1, B2 A2> = tr((B1^T B2)(A2 A1^T)) need only r x r matrices.

The difference is expanded as B A - B' A' = B (A - A') + (B - B') A', so every term is as small
as the error itself and nothing cancels: float32 products give it to float32 precision even when
it is 1e-6 of ||B A||, where ||BA||^2 - 2<BA, B'A'> + ||B'A'||^2 would need float64 throughout.
"""

from __future__ import annotations

import torch


def _trace_of_products(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """tr(P_n Q_n) for batches of r x r matrices, in float64."""
    return torch.einsum("nij,nji->n", p.to(torch.float64), q.to(torch.float64))


def product_error(a: torch.Tensor, b: torch.Tensor, a_hat: torch.Tensor, b_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||B A - B' A'||_F, ||B A||_F) per adapter, float64 (N,), for batches a (N, r, d_in) and
    b (N, d_out, r); the scale s is left out (it cancels in relative errors)."""
    da, db = a - a_hat, b - b_hat
    bt = b.transpose(1, 2)
    diff2 = (
        _trace_of_products(bt @ b, da @ da.transpose(1, 2))
        + 2 * _trace_of_products(bt @ db, a_hat @ da.transpose(1, 2))
        + _trace_of_products(db.transpose(1, 2) @ db, a_hat @ a_hat.transpose(1, 2))
    )
    norm2 = _trace_of_products(bt @ b, a @ a.transpose(1, 2))
    return diff2.clamp_min(0).sqrt(), norm2.clamp_min(0).sqrt()


def relative_product_error(a: torch.Tensor, b: torch.Tensor, a_hat: torch.Tensor, b_hat: torch.Tensor) -> torch.Tensor:
    """||B A - B' A'||_F / ||B A||_F per adapter (N,); 0 where B A = 0 and the reconstruction is 0 too."""
    diff, norm = product_error(a, b, a_hat, b_hat)
    return torch.where(norm > 0, diff / norm.clamp_min(1e-300), diff).to(torch.float32)
