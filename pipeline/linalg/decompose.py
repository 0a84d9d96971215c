"""Centred truncated SVD of a stacked factor matrix, by the cheapest exact route for its shape.

X is (N, D): one row per adapter, the flattened lora_A (or lora_B) of one module. We need the top
right singular vectors of X - mean. With N <= D the (N, N) Gram matrix is cheap; with N > D the
(D, D) covariance is. Either is formed from float32 products of centred column (or row) blocks,
summed in float64, so no float64 or centred copy of X is ever held, and diagonalised in float64.
Centring keeps its rounding error relative to the spread of the rows, not their mean (a stack of
adapters from one init has a mean ~1000x its spread): the float32 mean is corrected by the mean of
the float32 residuals (per column block on the Gram route, by a first pass on the covariance
route), and what is left of the blocks' column means is removed in float64 (double centring of
the Gram matrix, centring of the projected columns). Float32 products blur the small end of the
spectrum, by eta ~ n u |||X - mean|||_2^2 (u = 2^-24, n the inner length of one block product),
so the kept directions are then refined by one float64 Rayleigh-Ritz step on X itself (the SVD of
X - mean, in float64, projected on the leading eigenvectors and a few more). What that guarantees
against a float64 SVD, derived from rounding error analysis for any BLAS kernel and checked in
tests/unit/test_linalg.py: a singular value is never above the true one by more than the
centring's rounding (~2u |||X - mean|||_2); its square is below the true one by at most
min(2 eta, eta^2 / gap), gap its distance to the (k + OVERSAMPLE + 1)-th. Directions whose
variance is below eta (a noise floor under a dominant structure) are therefore not resolved: the
kept ones then miss at most their own variance more than the optimum.

With an explicit k and many rows (choose_route), `auto` takes the randomized route (Halko et al.
2011: a sketch, power iterations, Rayleigh-Ritz), linear in N instead of quadratic, and keeps its
result when randomized_loss estimates that it misses at most RANDOMIZED_LOSS of the variance the
optimum captures; a flat spectrum, where the power iterations would not have converged, is
decomposed again by the exact route. tests/unit/test_linalg.py checks the stated accuracy (under
1e-4 of the total variance against a float64 SVD) on the benchmark's structures, at 1 and 2
threads. `--svd-route gram|covariance` forces an exact route; `--svd-route svd` is the float64
reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import scipy.linalg
import torch

Route = Literal["auto", "gram", "covariance", "svd", "randomized"]

# Extra eigenvectors the Rayleigh-Ritz step looks at beyond the kept ones.
OVERSAMPLE = 10
# Power iterations of the randomized route (each one pass over X; see _randomized).
POWER_ITERATIONS = 2
# The most captured variance (a fraction of the total) `auto` lets the randomized route miss, as
# randomized_loss estimates it; above it, auto takes the exact route (flat spectra).
RANDOMIZED_LOSS = 1e-5
# Bytes of one float32 working block of X (its columns for the Gram route, its rows for covariance).
BLOCK_BYTES = 32 << 20
# The fewest columns of X per block of the randomized route's products.
SKETCH_COLUMNS = 128
# Bytes of one float64 block of X - mean in the Rayleigh-Ritz step (cache-sized: the float64 pass
# then costs about what a float32 one did).
RITZ_BLOCK_BYTES = 1 << 20


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


def choose_route(n: int, d: int, k: int | None, niter: int = POWER_ITERATIONS) -> str:
    """The exact route for the shape, or with an explicit k the randomized one where the Gram (or
    covariance) matrix costs several times its passes: min(n, d) n d multiply-adds against
    (2 niter + 2) n d (k + OVERSAMPLE), plus the centring of every pass. The factor 3 (2 niter + 3)
    is measured (one thread, D = 14,336, k = 16): at the threshold (N = 546) the randomized route
    takes 0.6 of the Gram route's time, at N = 1,000 a third, at 2,000 a fifth; below it, a flat
    spectrum's fall back to the exact route (centred_svd) would cost more than it saves."""
    if k is not None and min(n, d) >= 3 * (2 * niter + 3) * (k + OVERSAMPLE):
        return "randomized"
    return _exact_route(n, d)


def _exact_route(n: int, d: int) -> str:
    return "gram" if n <= d else "covariance"


def randomized_loss(spectrum: torch.Tensor, total: float, k: int | None, niter: int = POWER_ITERATIONS) -> float:
    """Estimated captured variance the randomized route misses, as a fraction of the total: the
    i-th direction converges as (s_l / s_i)^(2 niter + 1) (Halko et al. 2011, Sec. 10.4), so its
    variance is missed up to (s_l / s_i)^(4 niter + 2), with s_l the smallest Ritz value, which
    stands for the first direction the sketch cannot hold."""
    kept = spectrum[: len(spectrum) if k is None else min(k, len(spectrum))].to(torch.float64)
    if total <= 0 or not len(kept) or float(kept[0]) == 0.0:
        return 0.0
    ratio = (float(spectrum[-1]) / kept.clamp_min(torch.finfo(torch.float64).tiny)).clamp(max=1.0)
    return float((kept.pow(2) * ratio.pow(4 * niter + 2)).sum()) / total


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
    x: torch.Tensor,
    k: int | None = None,
    threshold: float | None = None,
    route: Route = "auto",
    niter: int = POWER_ITERATIONS,
) -> Decomposition:
    """Top principal directions of the rows of x (N, D), in float32: at most k (all when None),
    and with a variance threshold, the fewest that explain that fraction.

    Directions with a singular value at rounding level are dropped: they carry no data and have
    no well-defined direction, so the result may hold fewer than k components.
    """
    n, d = x.shape
    x = x.to(torch.float32)
    # A float32 mean (10x faster than float64 sums); each route corrects it by the mean of the
    # residuals, so its error (~u |mean|) does not reach the centred blocks.
    base = x.mean(dim=0)
    wanted = None if threshold is not None else k  # with a threshold the whole spectrum decides k
    chosen = route
    if route == "auto":
        route = choose_route(n, d, wanted, niter)
    if route not in _ROUTES:
        raise ValueError(f"unknown SVD route {route!r} (expected auto or one of {sorted(_ROUTES)})")
    estimate, total, leading, mean = _ROUTES[route](x, base, wanted, niter)
    if chosen == "auto" and route == "randomized" and randomized_loss(estimate, total, k, niter) > RANDOMIZED_LOSS:
        route = _exact_route(n, d)  # a flat spectrum: power iterations would not have converged
        estimate, total, leading, mean = _ROUTES[route](x, base, wanted, niter)
    keep = components_to_keep(estimate, total, k, threshold)
    spectrum, directions = leading(keep)
    keep = _significant(spectrum, keep)
    comps = sign_flip(directions[:keep].to(torch.float32))
    return Decomposition(comps, spectrum[:keep].to(torch.float32), mean.to(torch.float32), total, route, n)


def components_to_keep(spectrum: torch.Tensor, total: float, k: int | None, threshold: float | None) -> int:
    """At most k, none at rounding level, and with a threshold the fewest explaining it."""
    keep = _significant(spectrum, k)
    if threshold is not None:
        keep = min(keep, components_for_variance(spectrum, total, threshold))
    return keep


# Each route takes `wanted`, the most components that can be kept (None: the whole spectrum is
# needed), and returns an estimate of the singular values (descending; at least the top wanted +
# OVERSAMPLE), the total variance, a function giving the leading `keep` singular values and
# right singular vectors (rows), float64, so only the kept ones are formed, and the mean (float64)
# it centred by, from `base`, the float32 column mean.


def _gram(x, base, wanted, niter):
    n = x.shape[0]
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    shifts = []
    for block in _centred_blocks(x, base, None, dim=1):
        # A column block holds every row: the residuals' own mean corrects the float32 mean here.
        shift = block.mean(dim=0)
        block -= shift
        shifts.append(shift)
        gram += (block @ block.T).to(torch.float64)
    shift = torch.cat(shifts) if shifts else torch.zeros_like(base)
    # Double centring (J G J, J = I - 11^T/n) removes what is left of the blocks' column means
    # (the float32 shift's rounding) from the Gram matrix exactly, in O(n^2).
    row = gram.mean(dim=1, keepdim=True)
    gram = gram - row - row.T + row.mean()
    estimate, top = _spectrum(gram, wanted)
    mean = base.to(torch.float64) + shift.to(torch.float64)

    def leading(keep):
        return _ritz(x, mean, top(keep + OVERSAMPLE))

    return estimate, float(gram.trace()), leading, mean


def _ritz(x, mean, u):
    """Rayleigh-Ritz on the rows' side: the SVD of U^T J (X - mean), in float64, for orthonormal
    columns U (n, l) that span (nearly) the leading left singular vectors; J = I - 11^T/n again,
    through the blocks' float64 column means (one more row of U). Singular values (l,) descending
    and the right singular vectors (rows)."""
    n = x.shape[0]
    weights = torch.cat([u, torch.full((n, 1), 1.0 / max(n, 1), dtype=torch.float64, device=x.device)], dim=1)
    weights = weights.T.contiguous()
    projected = torch.cat([weights @ block for block in _float64_blocks(x, mean, dim=1)], dim=1)
    return _row_svd(projected[:-1] - u.sum(dim=0)[:, None] * projected[-1:])


def _row_svd(projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and right singular vectors (rows) of a short, wide float64
    matrix, from the eigenpairs of its small square."""
    spectrum, rotation = _eig_desc(projected @ projected.T)
    return spectrum, (rotation.T @ projected) / spectrum.clamp_min(torch.finfo(torch.float64).tiny)[:, None]


def _covariance(x, base, wanted, niter):
    n, d = x.shape
    # Row blocks: one pass for the residuals' mean (the float32 mean's correction), one for the products.
    sums = torch.zeros(d, dtype=torch.float64, device=x.device)
    for block in _centred_blocks(x, base, None, dim=0):
        sums += block.sum(dim=0).to(torch.float64)
    shift = (sums / max(n, 1)).to(torch.float32)
    cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for block in _centred_blocks(x, base, shift, dim=0):
        cov += (block.T @ block).to(torch.float64)
    estimate, top = _spectrum(cov, wanted)

    def leading(keep):
        # Rayleigh-Ritz: the SVD of J (X - mean) V for the leading eigenvectors V of the covariance,
        # in float64 (J: the projected columns' own means removed).
        v = top(keep + OVERSAMPLE)
        projected = torch.cat([block @ v for block in _float64_blocks(x, mean, dim=0)])
        projected -= projected.mean(dim=0)
        spectrum, rotation = _eig_desc(projected.T @ projected)
        return spectrum, rotation.T @ v.T

    mean = base.to(torch.float64) + shift.to(torch.float64)
    return estimate, float(cov.trace()), leading, mean


def _svd(x, base, wanted, niter):
    x64 = x.to(torch.float64)
    mean = x64.mean(dim=0)
    centred = x64 - mean
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    return s, float(centred.pow(2).sum()), lambda keep: (s[:keep], vh[:keep]), mean


def _randomized(x, base, wanted, niter):
    """Halko, Martinsson & Tropp (2011), Alg. 4.4, on the centred column blocks of the Gram route:
    the range Q of (X - mean) Omega for a Gaussian Omega (D, k + OVERSAMPLE), refined by `niter`
    power iterations (X - mean)(X - mean)^T Q, then Rayleigh-Ritz: the SVD of Q^T (X - mean). Each
    step is one pass over X in cache-sized blocks, float32 products summed in float64: about
    2 (2 niter + 2) N D (k + OVERSAMPLE) flops against the Gram route's 2 N^2 D, and nothing of
    size N^2 held. Omega is drawn on the CPU from a seed fixed by the shape, so a basis is the
    same bytes on every run and device."""
    if wanted is None:
        raise ValueError("the randomized route needs an explicit k and no variance threshold")
    n, d = x.shape
    width = min(wanted + OVERSAMPLE, n, d)
    # Cache-sized blocks, yet wide enough for the products to run at their full rate.
    size = max(RITZ_BLOCK_BYTES, 4 * n * SKETCH_COLUMNS)
    omega = torch.randn(d, width, generator=torch.Generator().manual_seed(n * 1_000_003 + d)).to(x.device)
    sketch = torch.zeros(n, width, dtype=torch.float64, device=x.device)
    shifts, total, start = [], 0.0, 0
    for block in _centred_blocks(x, base, None, dim=1, size=size):
        shift = block.mean(dim=0)
        block -= shift
        shifts.append(shift)
        total += float(block.pow(2).sum())  # a cascade sum: relative error ~u log(size)
        sketch += (block @ omega[start : start + block.shape[1]]).to(torch.float64)
        start += block.shape[1]
    shift = torch.cat(shifts) if shifts else torch.zeros_like(base)
    for _ in range(niter):
        q = _orthonormal(sketch).to(torch.float32)
        sketch.zero_()
        for block in _centred_blocks(x, base, shift, dim=1, size=size):
            sketch += (block @ (block.T @ q)).to(torch.float64)
    q = _orthonormal(sketch).to(torch.float32)
    projected = torch.cat(
        [(q.T @ block).to(torch.float64) for block in _centred_blocks(x, base, shift, dim=1, size=size)],
        dim=1,
    )
    spectrum, rows = _row_svd(projected)
    mean = base.to(torch.float64) + shift.to(torch.float64)
    return spectrum, total, lambda keep: (spectrum[:keep], rows[:keep]), mean


def _orthonormal(columns: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns (float64) spanning `columns`, without the ones vector's direction: the
    rows are centred, so it holds only rounding."""
    centred = columns - columns.mean(dim=0)
    return torch.linalg.qr(centred)[0]


_ROUTES: dict[str, Callable] = {"gram": _gram, "covariance": _covariance, "svd": _svd, "randomized": _randomized}


def _centred_blocks(
    x: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor | None, dim: int, size: int = BLOCK_BYTES
) -> Iterator[torch.Tensor]:
    """float32 blocks of (x - hi) - lo: column blocks (dim=1) or row blocks (dim=0) of ~`size` bytes.
    hi is the float32 mean, lo (or None) the small correction to it; x - hi cancels exactly where
    x is within a factor 2 of hi (Sterbenz), so a block's rounding error is ~2u of its entries,
    whatever the mean's size."""
    other = x.shape[1 - dim]
    step = max(size // (4 * max(other, 1)), 1)
    for start in range(0, x.shape[dim], step):
        if dim == 1:
            block = x[:, start : start + step] - hi[start : start + step]
            yield block if lo is None else block.sub_(lo[start : start + step])
        else:
            block = x[start : start + step] - hi
            yield block if lo is None else block.sub_(lo)


def _float64_blocks(x: torch.Tensor, mean: torch.Tensor, dim: int) -> Iterator[torch.Tensor]:
    """float64 blocks of x - mean, column (dim=1) or row (dim=0) blocks of ~RITZ_BLOCK_BYTES: small
    enough to stay in cache between the conversion and the product."""
    other = x.shape[1 - dim]
    step = max(RITZ_BLOCK_BYTES // (8 * max(other, 1)), 1)
    for start in range(0, x.shape[dim], step):
        if dim == 1:
            yield x[:, start : start + step].to(torch.float64).sub_(mean[start : start + step])
        else:
            yield x[start : start + step].to(torch.float64).sub_(mean)


def _spectrum(square: torch.Tensor, wanted: int | None) -> tuple[torch.Tensor, Callable[[int], torch.Tensor]]:
    """Square roots of the eigenvalues (descending) of a symmetric PSD float64 matrix, all of them
    or the top wanted + OVERSAMPLE, and a function giving its top `count` eigenvectors (columns).
    On the CPU only the needed eigenpairs are computed (LAPACK's MRRR through scipy): at N = 1000
    a quarter of the time of a full eigh."""
    n = square.shape[0]
    cache: dict[str, torch.Tensor] = {}

    def top(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        count = min(count, n)
        if "vectors" not in cache or cache["vectors"].shape[1] < count:
            if square.device.type == "cpu":
                values, vectors = scipy.linalg.eigh(square.numpy(), subset_by_index=[n - count, n - 1], driver="evr")
                cache["values"], cache["vectors"] = (
                    torch.from_numpy(values).flip(0).clamp_min(0).sqrt(),
                    torch.from_numpy(vectors).flip(1),
                )
            else:
                cache["values"], cache["vectors"] = _eig_desc(square)
        return cache["values"], cache["vectors"]

    if wanted is None:
        values = (
            torch.linalg.eigvalsh(square)
            if square.device.type != "cpu"
            else torch.from_numpy(scipy.linalg.eigvalsh(square.numpy()))
        )
        estimate = values.flip(0).clamp_min(0).sqrt()
    else:
        estimate = top(wanted + OVERSAMPLE)[0]
    return estimate, lambda count: top(count)[1][:, : min(count, n)]


def _eig_desc(square: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Square roots of the eigenvalues of a symmetric PSD matrix, descending, and its eigenvectors
    (columns) in the same order."""
    evals, evecs = torch.linalg.eigh(square)
    return evals.flip(0).clamp_min(0).sqrt(), evecs.flip(1)


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
    """Rows (N, D) back from loadings (N, k) (a row (D,) from (k,)), float32. The product runs in float64: float32
    products round differently with the number of rows at once, and an adapter must rebuild to
    the same bytes whether it is exported alone, in a batch, or measured in compute."""
    rows = loadings.to(torch.float64) @ components.to(torch.float64)
    return rows.add_(mean.to(torch.float64)).to(torch.float32)
