"""Residuals: an adapter module's own extra factors, for when the shared reconstruction misses a
delta-W error bound. Pure tensor math, float64.

The difference R = B A - B' A' between an adapter's factors and the shared reconstruction that
export writes has rank <= r_1 + r_2: R = [B, -B'] [A; A'], so QR of both sides and the SVD of the
small core give R's SVD. The residual of rank s is R's leading s singular triplets (balanced
factors); export writes [B', B_s] [A'; A_s]. Its factors are cast to the adapter's dtype as export
casts them, and the error is measured on the cast factors, so s grows until what export writes is
within the bound. When s would reach the adapter's own rank, its own factors are kept instead
("exact": no larger, and the error is that of the factors themselves).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Searches aim this far (relative) below the bound: export rebuilds the shared factors in other
# batch shapes than the search did, which may move a float32 rounding, and a cast with it.
MARGIN = 1e-3
KINDS = ("add", "exact")


@dataclass
class Residual:
    """One module's residual: `kind` add (exported beside the shared factors) or exact (exported
    in their place); a (s, d_in), b (d_out, s) float32 holding values of the adapter's dtype;
    `shared_error` the error without it, `error` that of what export writes with it."""

    kind: str
    a: torch.Tensor
    b: torch.Tensor
    shared_error: float
    error: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def target(bound: float) -> float:
    """The error a search aims at for `bound` (see MARGIN)."""
    return bound * (1 - MARGIN)


def difference_svd(a1, b1, a2, b2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD (U (d_out, m), s (m,), Vh (m, d_in)) of B1 A1 - B2 A2 from the factors a (r, d_in),
    b (d_out, r), float64, without forming either product; m = r1 + r2 (trailing s may be 0)."""
    left = torch.cat([b1, -b2], dim=1).to(torch.float64)
    right = torch.cat([a1, a2], dim=0).to(torch.float64)
    ql, rl = torch.linalg.qr(left)
    qr_, rr = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(rl @ rr.T)
    return ql @ u, s, vh @ qr_.T


def product_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """||left @ right||_F from the small Grams: tr(L^T L R R^T)."""
    return float(((left.T @ left) * (right @ right.T)).sum().clamp_min(0).sqrt())


def error_of(a, b, a_hat, b_hat) -> float:
    """Relative delta-W error ||B A - B^ A^|| / ||B A|| of single factors of any ranks, float64."""
    a, b, a_hat, b_hat = (x.to(torch.float64) for x in (a, b, a_hat, b_hat))
    norm = product_norm(b, a)
    diff = product_norm(torch.cat([b, -b_hat], dim=1), torch.cat([a, a_hat]))
    return diff / norm if norm > 0 else diff


def fit_residual(
    own: tuple[torch.Tensor, torch.Tensor],
    written: tuple[torch.Tensor, torch.Tensor],
    rank: int,
    dtype: torch.dtype,
    bound: float,
    shared_error: float,
) -> Residual:
    """The smallest residual that brings `written` (a', b': the shared factors as export writes
    them, cast) within `target(bound)` of `own` (a (r, d_in), b (d_out, r), the adapter's factors,
    zero-padded past its own `rank`), its factors cast to `dtype`; the adapter's own factors
    (exact) when none of rank below `rank` does."""
    a, b = own[0].double(), own[1].double()
    norm = product_norm(b, a)
    kind, ra, rb, diff = smallest_residual((a, b), written, rank, dtype, target(bound) * norm)
    return Residual(kind, ra, rb, shared_error, diff / norm if norm > 0 else diff)


def smallest_residual(own, written, rank: int, dtype: torch.dtype, goal: float):
    """(kind, a, b, ||B A - B' A' - B_s A_s||): the residual of smallest rank s < `rank` whose
    factors, cast to `dtype`, bring `written` within `goal` (absolute) of `own`; else `own`'s
    first `rank` factors (kind exact), cast. Factors returned float32."""
    a, b = own[0].double(), own[1].double()
    aw, bw = written[0].double(), written[1].double()
    u, s, vh = difference_svd(a, b, aw, bw)
    tail = s.flip(0).square().cumsum(0).flip(0).sqrt().tolist() + [0.0]  # tail[j]: ||R - R_j||
    start = next(j for j, t in enumerate(tail) if t <= goal)
    for j in range(max(start, 1), rank):
        root = s[:j].sqrt()
        ra = (root[:, None] * vh[:j]).to(dtype).double()
        rb = (u[:, :j] * root).to(dtype).double()
        diff = product_norm(torch.cat([b, -bw, -rb], dim=1), torch.cat([a, aw, ra]))
        if diff <= goal:
            return "add", ra.float(), rb.float(), diff
    ea, eb = a[:rank].to(dtype).double(), b[:, :rank].to(dtype).double()
    return "exact", ea.float(), eb.float(), product_norm(torch.cat([b, -eb], dim=1), torch.cat([a, ea]))


def with_residual(
    shared: tuple[torch.Tensor, torch.Tensor], kind: str, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors export writes for one module: the shared ones (a (r, d_in), b (d_out, r)) with
    an add residual appended, or an exact one's in their place."""
    if kind == "exact":
        return a, b
    return torch.cat([shared[0], a.to(shared[0].dtype)]), torch.cat([shared[1], b.to(shared[1].dtype)], dim=1)
