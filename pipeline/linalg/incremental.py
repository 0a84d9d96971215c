"""Exact incremental update of a centred SVD with new rows (Ross et al. 2008, after Brand 2002).

The centred scatter of old and new rows together is
    V^T S^2 V  +  Yc^T Yc  +  n m / (n + m) (mean_Y - mean)(mean_Y - mean)^T,
so it is the scatter of the small matrix [S V; Yc; sqrt(n m / (n + m)) (mean_Y - mean)]. Projecting
the new rows on V, taking the QR of what V misses and an SVD of the (k+m+1)-square core gives the
exact SVD of that matrix; only truncating to k afterwards loses anything. The old rows are not
needed, only the stored singular values, mean and count.
"""

from __future__ import annotations

import math

import torch

from pipeline.linalg.decompose import Decomposition, components_to_keep, sign_flip


def absorb(dec: Decomposition, rows: torch.Tensor, k: int | None = None, threshold: float | None = None) -> Decomposition:
    """The decomposition of the old rows plus `rows` (m, D), truncated like centred_svd."""
    n, m = dec.count, rows.shape[0]
    basis = dec.components.to(torch.float64)
    mean = dec.mean.to(torch.float64)
    y = rows.to(torch.float64)
    y_mean = y.mean(dim=0)
    weight = n * m / (n + m)
    block = torch.cat([y - y_mean, math.sqrt(weight) * (y_mean - mean)[None]])  # (m+1, D)
    inside = block @ basis.T
    residual = block - inside @ basis
    # Twice, as Gram-Schmidt needs when the stored basis is orthonormal only to float32 rounding.
    again = residual @ basis.T
    inside += again
    residual -= again @ basis
    q, tri = torch.linalg.qr(residual.T)  # (D, j), (j, m+1)
    kept = basis.shape[0]
    core = torch.zeros(kept + m + 1, kept + q.shape[1], dtype=torch.float64)
    core[:kept, :kept] = torch.diag(dec.singular_values.to(torch.float64))
    core[kept:, :kept] = inside
    core[kept:, kept:] = tri.T
    _, spectrum, rotation = torch.linalg.svd(core, full_matrices=False)
    total = dec.total_variance + float((y - y_mean).pow(2).sum()) + weight * float((y_mean - mean).pow(2).sum())
    keep = components_to_keep(spectrum, total, k, threshold)
    components = sign_flip((rotation[:keep] @ torch.cat([basis, q.T])).to(torch.float32))
    new_mean = (n * mean + m * y_mean) / (n + m)
    return Decomposition(components, spectrum[:keep].to(torch.float32), new_mean.to(torch.float32), total, "incremental", n + m)


def truncate(dec: Decomposition, k: int | None = None, threshold: float | None = None) -> Decomposition:
    keep = components_to_keep(dec.singular_values.to(torch.float64), dec.total_variance, k, threshold)
    return Decomposition(dec.components[:keep], dec.singular_values[:keep], dec.mean, dec.total_variance, dec.route, dec.count)


def change_of_basis(old: Decomposition, new: Decomposition) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, t) such that a row stored as loadings l on `old` has loadings l @ R + t on `new`:
    (mean_old + l V_old - mean_new) V_new^T. Exact for the row the old loadings describe."""
    v_new = new.components.to(torch.float64)
    rotation = old.components.to(torch.float64) @ v_new.T
    shift = (old.mean.to(torch.float64) - new.mean.to(torch.float64)) @ v_new.T
    return rotation.to(torch.float32), shift.to(torch.float32)
