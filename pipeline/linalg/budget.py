"""Byte budgets: per module, the method and its parameters (flat k, or joint width c and core rank
q) that leave the lowest mean delta-W error in a given number of stored float32 values.

Stored floats, per module of n adapters of rank r:
  flat:  (k + 1) r (d_in + d_out) for the components and means of both sides, 2 k n loadings;
  joint: c (d_in + d_out) for U and V, 2 c q n for the factored cores.
Errors are exact (from the factors, never from d_out x d_in products). The flat candidate is fitted
and measured; the joint core ranks are ranked on a short fit at the widest c, and the winner is
fitted in full, warm-started from it, and measured. Pure tensor math: the compute stage and the benchmark call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.linalg.decompose import Decomposition, centred_svd
from pipeline.linalg.gauge import JointBasis, core_rank_errors, fit_joint, joint_cores
from pipeline.linalg.loadings import project_factors

FLOAT_BYTES = 4
SCREEN_ITERATIONS = 2  # of the joint fit that ranks the core ranks q before the winner's full fit


def flat_floats(n: int, k: int, r: int, d_in: int, d_out: int) -> int:
    return (k + 1) * r * (d_in + d_out) + 2 * k * n


def joint_floats(n: int, c: int, q: int, d_in: int, d_out: int) -> int:
    return c * (d_in + d_out) + 2 * c * q * n


def flat_components(budget: float, n: int, r: int, d_in: int, d_out: int) -> int:
    """The largest k (at most n) whose flat storage fits `budget` floats; 0 when none does."""
    k = int((budget - r * (d_in + d_out)) // (r * (d_in + d_out) + 2 * n))
    return max(0, min(k, n))


def joint_width(budget: float, n: int, q: int, d_in: int, d_out: int) -> int:
    """The largest c whose U, V and rank-q factored cores fit `budget` floats; 0 when none does."""
    return max(0, min(d_in, d_out, int(budget // joint_floats(n, 1, q, d_in, d_out))))


def core_ranks(r: int) -> list[int]:
    """The core ranks q tried: r, r/2, r/4 (a smaller q buys a wider c)."""
    return sorted({max(1, r // 2**i) for i in range(3)}, reverse=True)


def candidates(method: str) -> tuple[str, ...]:
    """The fits a compress method chooses among under a budget (aligned factors are fitted flat)."""
    return {"auto": ("flat", "joint"), "aligned": ("flat",)}.get(method, (method,))


def joint_widths(budget: float, n: int, r: int, d_in: int, d_out: int) -> dict[int, int]:
    """Core rank q -> the widest c within `budget` floats, for the q tried (core_ranks) that have a
    c of at least q (a core's rank is at most c)."""
    widths = {q: joint_width(budget, n, q, d_in, d_out) for q in core_ranks(r)}
    return {q: c for q, c in widths.items() if c >= q}


def fits(budget: float, n: int, r: int, d_in: int, d_out: int, methods: tuple[str, ...] = ("flat", "joint")) -> bool:
    """Whether one of `methods` fits `budget` floats: what fit_within tries (flat k >= 1, or joint
    at one of the core ranks tried)."""
    return ("flat" in methods and flat_components(budget, n, r, d_in, d_out) > 0) or (
        "joint" in methods and bool(joint_widths(budget, n, r, d_in, d_out))
    )


@dataclass
class FlatFit:
    a: Decomposition
    b: Decomposition
    error: float  # mean relative delta-W error


@dataclass
class JointFit:
    basis: JointBasis
    q: int
    core_a: torch.Tensor  # (n, q, c)
    core_b: torch.Tensor  # (n, c, q)
    errors: torch.Tensor  # (n,) relative delta-W errors
    norms: torch.Tensor  # (n,) ||B A||

    @property
    def error(self) -> float:
        return float(self.errors.mean())

    @property
    def explained(self) -> float:
        """The fraction of the collection's delta-W energy the bases and cores keep."""
        total = float(self.norms.pow(2).sum())
        return 1.0 - float((self.errors * self.norms).pow(2).sum()) / total if total else 1.0


def fit_flat(xa: torch.Tensor, xb: torch.Tensor, shapes, k: int, route: str = "auto") -> FlatFit:
    a, b = centred_svd(xa, k, None, route), centred_svd(xb, k, None, route)
    return FlatFit(a, b, float(project_factors(xa, xb, a, b, shapes)[2].mean()))


def fit_joint_module(a: torch.Tensor, b: torch.Tensor, c: int, q: int, init: JointBasis | None = None) -> JointFit:
    """Joint bases of width c for factors a (n, r, d_in), b (n, d_out, r), rank-q cores."""
    basis = fit_joint(a, b, c, init=init)
    return JointFit(basis, q, *joint_cores(basis, a, b, q))


def fit_within(
    xa: torch.Tensor,
    xb: torch.Tensor,
    shapes,
    budget: float,
    methods: tuple[str, ...] = ("flat", "joint"),
    route: str = "auto",
    count: int | None = None,
) -> FlatFit | JointFit:
    """The fit of the lowest mean delta-W error among `methods` within `budget` floats, for one
    module's flattened factors xa (n, r*d_in), xb (n, d_out*r); the budget pays for the loadings
    of `count` adapters (default n: a chunked fit sees the first of them)."""
    (r, d_in), (d_out, _) = shapes
    n = len(xa)
    found: list[FlatFit | JointFit] = []
    k = flat_components(budget, count or n, r, d_in, d_out)
    if "flat" in methods and k:
        found.append(fit_flat(xa, xb, shapes, k, route))
    widths = joint_widths(budget, count or n, r, d_in, d_out)
    if "joint" in methods and widths:
        a, b = xa.view(n, r, d_in), xb.view(n, d_out, r)
        # Screen the core ranks on a short fit at the widest c, then fit the winner in full,
        # warm-started from the screen's leading columns.
        widest = fit_joint(a, b, max(widths.values()), iterations=SCREEN_ITERATIONS)
        screened = core_rank_errors(widest, a, b, widths)
        q = min(screened, key=screened.get)
        c = widths[q]
        found.append(
            fit_joint_module(a, b, c, q, init=JointBasis(widest.u[:, :c], widest.v[:, :c], 0.0, widest.total, 0))
        )
    if not found:
        raise ValueError(
            f"no method among {methods} fits {budget:.0f} floats for {count or n} adapters of shapes {shapes}"
        )
    return min(found, key=lambda f: f.error)
