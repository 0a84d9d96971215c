"""Centred truncated SVD of a stacked factor matrix, by the cheapest exact route for its shape.

X is (N, D): one row per adapter, the flattened lora_A (or lora_B) of one module. We need the top
right singular vectors of X - mean. With N << D the (N, N) Gram matrix is cheap; with N >> D the
(D, D) covariance is; both are diagonalised in float64, which keeps the top of the spectrum exact
to well below float32 rounding. Randomized SVD (Halko et al. 2011) serves k << min(N, D) when
both are large.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Route = Literal["auto", "gram", "covariance", "svd", "randomized"]

# Exact routes stay affordable up to this many rows of the small Gram/covariance side.
EXACT_LIMIT = 8192


@dataclass
class Decomposition:
    """components (k, D) orthonormal rows; singular_values (k,); mean (D,);
    total_variance = ||X - mean||_F^2 (all of the spectrum, for explained-variance ratios);
    route: the SVD route taken; count: rows the decomposition has seen (for incremental updates)."""

    components: torch.Tensor
    singular_values: torch.Tensor
    mean: torch.Tensor
    total_variance: float
    route: str
    count: int


def choose_route(n: int, d: int, k: int | None) -> str:
    if min(n, d) <= EXACT_LIMIT or k is None or 4 * k > min(n, d):
        return "gram" if n <= d else "covariance"
    return "randomized"


def sign_flip(components: torch.Tensor) -> torch.Tensor:
    """Make the largest-magnitude entry of every component positive (sklearn's svd_flip), so a
    basis is the same bytes on every run and device."""
    if components.numel() == 0:
        return components
    pivots = components.abs().argmax(dim=1)
    signs = torch.sign(components[torch.arange(components.shape[0]), pivots])
    signs[signs == 0] = 1
    return components * signs[:, None]


def centred_svd(
    x: torch.Tensor, k: int | None = None, threshold: float | None = None, route: Route = "auto", niter: int = 8
) -> Decomposition:
    """Top principal directions of the rows of x (N, D), in float32: at most k (all when None),
    and with a variance threshold, the fewest that explain that fraction.

    Directions with a singular value at rounding level are dropped: they carry no data and have
    no well-defined direction, so the result may hold fewer than k components.
    """
    n, d = x.shape
    centred = x.to(torch.float64)
    mean = centred.mean(dim=0)
    centred -= mean
    total = float(centred.pow(2).sum())
    if route == "auto":
        route = choose_route(n, d, None if threshold is not None else k)
    if route not in _ROUTES:
        raise ValueError(f"unknown SVD route {route!r} (expected auto or one of {sorted(_ROUTES)})")
    spectrum, directions = _ROUTES[route](centred, k, niter)
    keep = components_to_keep(spectrum, total, k, threshold)
    comps = sign_flip(directions(keep).to(torch.float32))
    return Decomposition(comps, spectrum[:keep].to(torch.float32), mean.to(torch.float32), total, route, n)


def components_to_keep(spectrum: torch.Tensor, total: float, k: int | None, threshold: float | None) -> int:
    """At most k, none at rounding level, and with a threshold the fewest explaining it."""
    keep = _significant(spectrum, k)
    if threshold is not None:
        keep = min(keep, components_for_variance(spectrum, total, threshold))
    return keep


# Each route returns the singular values it found (descending) and a function giving the
# leading `keep` right singular vectors as rows, so only the kept ones are formed.


def _gram(centred, k, niter):
    evals, evecs = torch.linalg.eigh(centred @ centred.T)
    s = evals.flip(0).clamp_min(0).sqrt()
    evecs = evecs.flip(1)
    return s, lambda keep: (evecs[:, :keep].T @ centred) / s[:keep, None]


def _covariance(centred, k, niter):
    evals, evecs = torch.linalg.eigh(centred.T @ centred)
    return evals.flip(0).clamp_min(0).sqrt(), lambda keep: evecs.flip(1)[:, :keep].T


def _svd(centred, k, niter):
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    return s, lambda keep: vh[:keep]


def _randomized(centred, k, niter):
    if k is None:
        raise ValueError("the randomized route needs an explicit k")
    _, s, v = torch.svd_lowrank(centred, q=min(k + 10, *centred.shape), niter=niter)
    return s, lambda keep: v[:, :keep].T


_ROUTES = {"gram": _gram, "covariance": _covariance, "svd": _svd, "randomized": _randomized}


def _significant(s: torch.Tensor, k: int | None) -> int:
    """How many leading singular values to keep: at most k, and none at rounding level."""
    limit = len(s) if k is None else min(k, len(s))
    if limit == 0 or float(s[0]) == 0.0:
        return 0
    tol = float(s[0]) * 1e-6
    return int((s[:limit] > tol).sum())


def explained_variance(singular_values: torch.Tensor, total_variance: float) -> torch.Tensor:
    """Cumulative explained-variance ratio (k,) of the leading components."""
    if total_variance <= 0:
        return torch.ones_like(singular_values)
    return torch.cumsum(singular_values.double() ** 2, 0).float() / total_variance


def components_for_variance(singular_values: torch.Tensor, total_variance: float, threshold: float) -> int:
    """Smallest k whose components explain at least `threshold` of the variance (vlora's rule)."""
    ratios = explained_variance(singular_values, total_variance)
    above = (ratios >= threshold - 1e-7).nonzero()
    return int(above[0]) + 1 if len(above) else len(singular_values)


def project(x: torch.Tensor, components: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Loadings (N, k) of rows x (N, D) on an orthonormal basis (k, D) around mean (D,)."""
    return (x.to(torch.float32) - mean) @ components.T


def reconstruct(loadings: torch.Tensor, components: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Rows (N, D) back from loadings (N, k)."""
    return loadings @ components + mean
