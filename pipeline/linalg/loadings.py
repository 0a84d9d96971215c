"""Loadings of adapters on one module's bases, the delta-W error they leave, and their move to a
new basis. Pure tensor math, shared by the Ray stages and the in-process Subspace."""

from __future__ import annotations

import torch

from pipeline.linalg.decompose import Decomposition, project, reconstruct
from pipeline.linalg.incremental import change_of_basis
from pipeline.linalg.metrics import Drift, FactorBasis, product_error, relative

ERROR_ROWS = 64  # adapters whose factors are rebuilt at once to measure errors: stays in cache

Shapes = tuple[tuple[int, int], tuple[int, int]]  # lora_A (r, d_in), lora_B (d_out, r)


def project_factors(xa: torch.Tensor, xb: torch.Tensor, a: Decomposition, b: Decomposition, shapes: Shapes):
    """Loadings (n, k_a), (n, k_b) of flattened factors xa (n, r*d_in), xb (n, d_out*r) on the
    bases a and b, with the relative delta-W error each leaves and ||B A||_F (float64, (n,))."""
    n, device = len(xa), xa.device
    (ca, ma), (cb, mb) = (a.components.to(device), a.mean.to(device)), (b.components.to(device), b.mean.to(device))
    la, lb = project(xa, ca, ma), project(xb, cb, mb)
    diffs, norms = [], []
    for i in range(0, n, ERROR_ROWS):
        rows = slice(i, i + ERROR_ROWS)
        m = len(la[rows])
        diff, norm = product_error(
            xa[rows].to(torch.float32).view(m, *shapes[0]),
            xb[rows].to(torch.float32).view(m, *shapes[1]),
            reconstruct(la[rows], ca, ma).view(m, *shapes[0]),
            reconstruct(lb[rows], cb, mb).view(m, *shapes[1]),
        )
        diffs.append(diff)
        norms.append(norm)
    diff = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.float64, device=device)
    norm = torch.cat(norms) if norms else torch.zeros(0, dtype=torch.float64, device=device)
    return la, lb, relative(diff, norm), norm


def factor_basis(a: Decomposition, b: Decomposition, shapes: Shapes) -> FactorBasis:
    return FactorBasis(a.mean, a.components, b.mean, b.components, *shapes)


class Move:
    """Rows stored as loadings on one module's old bases, moved to new ones: the new loadings are
    the projection of what the old ones rebuild (exact: change_of_basis). Without the adapters'
    files the new error is estimated: the old residual (orthogonal to the old basis) and the move
    of the reconstruction add in quadrature, sqrt(error^2 + (drift / ||B A||)^2). The triangle
    inequality would bound it, but overstates it by ~25% on typical collections where this
    estimate is within ~1%."""

    def __init__(
        self,
        old: tuple[Decomposition, Decomposition],
        new: tuple[Decomposition, Decomposition],
        shapes: Shapes,
        keep_loadings: bool = False,
    ):
        # keep_loadings: the rows keep their loadings (a basis rounded in place, e.g. quantized).
        self.keep = keep_loadings
        self.a, self.b = change_of_basis(old[0], new[0]), change_of_basis(old[1], new[1])
        self.drift = Drift(factor_basis(*old, shapes), factor_basis(*new, shapes))

    def __call__(self, la, lb, error, norm):
        """(new la, new lb, estimated error float64, drift / norm) for rows la, lb with errors and norms (n,)."""
        if self.keep:
            new_a, new_b = la, lb
        else:
            new_a, new_b = la @ self.a[0] + self.a[1], lb @ self.b[0] + self.b[1]
        moved = relative(self.drift(la, lb, new_a, new_b), norm.to(torch.float64))
        return new_a, new_b, error.to(torch.float64).hypot(moved), moved


def orthonormal_rows(components: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Components (k, D) with orthonormal rows spanning the same space, and R (k, k) with
    l V = (l R) Q, or None when they already are orthonormal. vlora's incremental updates and
    in-memory rounding (quantize) leave bases that are not, which the store's readers assume."""
    v = components.to(torch.float64)
    if not len(v) or float((v @ v.T - torch.eye(len(v), dtype=torch.float64)).abs().max()) <= 1e-5:
        return components.to(torch.float32), None
    q, r = torch.linalg.qr(v.T)  # V^T = Q R, so V = R^T Q^T
    return q.T.to(torch.float32).contiguous(), r.T


def onto_rows(loadings: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
    """Loadings (n, k) on components V moved onto the orthonormal rows Q of V = R Q."""
    return loadings.to(torch.float32) if r is None else (loadings.to(torch.float64) @ r).to(torch.float32)
