"""Reconstruction error of delta W = s * B @ A, computed through r x r products.

A is (r, d_in) and B is (d_out, r), so forming B @ A costs d_out * d_in per adapter; the Frobenius
inner product <B1 A1, B2 A2> = tr((B1^T B2)(A2 A1^T)) needs only r x r matrices.
"""

from __future__ import annotations

import torch


def product_inner(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """<B1 A1, B2 A2>_F for batches: a (N, r, d_in), b (N, d_out, r) -> (N,). float64."""
    a1, b1, a2, b2 = (t.to(torch.float64) for t in (a1, b1, a2, b2))
    return torch.einsum("nij,nji->n", b1.transpose(1, 2) @ b2, a2 @ a1.transpose(1, 2))


def relative_product_error(
    a: torch.Tensor, b: torch.Tensor, a_hat: torch.Tensor, b_hat: torch.Tensor
) -> torch.Tensor:
    """||B A - B' A'||_F / ||B A||_F per adapter (N,); the scale s cancels. 0 where B A = 0 and
    the reconstruction is 0 too."""
    orig = product_inner(a, b, a, b)
    cross = product_inner(a, b, a_hat, b_hat)
    recon = product_inner(a_hat, b_hat, a_hat, b_hat)
    diff = (orig - 2 * cross + recon).clamp_min(0).sqrt()
    norm = orig.sqrt()
    return torch.where(norm > 0, diff / norm.clamp_min(1e-300), diff).to(torch.float32)
