"""Exact incremental update of a centred SVD with new rows (after Ross et al. 2008 and Brand 2002).

The centred scatter of old and new rows together is
    V^T S^2 V  +  Yc^T Yc  +  n m / (n + m) (mean_Y - mean)(mean_Y - mean)^T,
so it is the scatter of the small matrix Z = [S V; Yc; sqrt(n m / (n + m)) (mean_Y - mean)] with
k + m + 1 rows. Its SVD, from the eigenvectors of the (k+m+1)-square Z Z^T in float64, is the exact
SVD of old and new rows together; only truncating to k afterwards loses anything. The old rows are
not needed, only the stored singular values, mean and count. (Forming Z Z^T costs (k+m+1)^2 D, a
fraction of a QR of what V misses, and uses the stored V as it is: orthonormal to float32 rounding.)
"""

from __future__ import annotations

import math

import torch

from pipeline.linalg.decompose import Decomposition, components_to_keep, sign_flip


def absorb(
    dec: Decomposition, rows: torch.Tensor, k: int | None = None, threshold: float | None = None
) -> Decomposition:
    """The decomposition of the old rows plus `rows` (m, D), truncated like centred_svd."""
    n, m = dec.count, rows.shape[0]
    kept = len(dec.singular_values)
    mean = dec.mean.to(torch.float64)
    weight = n * m / (n + m)
    # Z filled in place: one float64 (k+m+1, D) buffer, no other copy of the rows.
    z = torch.empty(kept + m + 1, rows.shape[1], dtype=torch.float64, device=rows.device)
    torch.mul(dec.singular_values.to(torch.float64)[:, None], dec.components.to(torch.float64), out=z[:kept])
    z[kept : kept + m] = rows
    y_mean = z[kept : kept + m].mean(dim=0)
    z[kept : kept + m] -= y_mean
    torch.mul(y_mean - mean, math.sqrt(weight), out=z[-1])
    new_variance = float(torch.linalg.vector_norm(z[kept : kept + m]) ** 2)
    evals, evecs = torch.linalg.eigh(z @ z.T)
    spectrum, evecs = evals.flip(0).clamp_min(0).sqrt(), evecs.flip(1)
    total = dec.total_variance + new_variance + weight * float((y_mean - mean).pow(2).sum())
    keep = components_to_keep(spectrum, total, k, threshold)
    components = (evecs[:, :keep].T @ z) / spectrum[:keep, None]
    new_mean = (n * mean + m * y_mean) / (n + m)
    return Decomposition(
        sign_flip(components.to(torch.float32)),
        spectrum[:keep].to(torch.float32),
        new_mean.to(torch.float32),
        total,
        "incremental",
        n + m,
    )


def truncate(dec: Decomposition, k: int | None = None, threshold: float | None = None) -> Decomposition:
    keep = components_to_keep(dec.singular_values.to(torch.float64), dec.total_variance, k, threshold)
    return Decomposition(
        dec.components[:keep], dec.singular_values[:keep], dec.mean, dec.total_variance, dec.route, dec.count
    )


def change_of_basis(old: Decomposition, new: Decomposition) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, t) such that a row stored as loadings l on `old` has loadings l @ R + t on `new`:
    (mean_old + l V_old - mean_new) V_new^T. Exact for the row the old loadings describe."""
    v_new = new.components.to(torch.float64)
    rotation = old.components.to(torch.float64) @ v_new.T
    shift = (old.mean.to(torch.float64) - new.mean.to(torch.float64)) @ v_new.T
    return rotation.to(torch.float32), shift.to(torch.float32)
