"""Groups of adapters by the similarity of their delta W (clustered bases): a small sketch of each
adapter's delta W, spherical k-means on the sketches, the nearest group of a new adapter, and the
choice of the number of groups for a byte budget.

An adapter's sketch is, per module, Psi·B·A·Omega (Psi: SIDE x d_out, Omega: d_in x SIDE, fixed
Gaussian matrices drawn from the module's shape, so every run and machine draws the same): an
unbiased, Johnson-Lindenstrauss-style image of delta W = B·A whose inner products approximate
delta W's. Each module's block is scaled to unit norm, so that every module counts alike (errors
are relative per module), and the whole sketch to unit norm: similarity is the cosine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SIDE = 16  # the sketch of one module is SIDE x SIDE (8 misplaced 5% of a synthetic family collection)
ITERATIONS = 30
RESTARTS = 4


def projections(d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Psi, Omega) for a module of this shape: the same on every run (seeded by the shape)."""
    generator = torch.Generator().manual_seed(1_000_003 * d_in + d_out)
    psi = torch.randn(SIDE, d_out, generator=generator, dtype=torch.float64)
    omega = torch.randn(d_in, SIDE, generator=generator, dtype=torch.float64)
    return psi, omega


def sketch(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One adapter's unit sketch from its (lora_A (r, d_in), lora_B (d_out, r)) per module, in a
    fixed module order: (len(factors) * SIDE²,) float32."""
    blocks = []
    for a, b in factors:
        psi, omega = projections(a.shape[1], b.shape[0])
        block = ((psi @ b.double()) @ (a.double() @ omega)).reshape(-1)
        norm = block.norm()
        blocks.append(block / norm if norm > 0 else block)
    whole = torch.cat(blocks)
    norm = whole.norm()
    return (whole / norm if norm > 0 else whole).float()


def partition(sketches: torch.Tensor, groups: int, seed: int = 0) -> torch.Tensor:
    """Spherical k-means of unit rows into `groups` non-empty groups: labels (N,) int64, groups
    numbered by their first member. The best of RESTARTS seeded k-means++ starts."""
    n = sketches.shape[0]
    if not 1 <= groups <= n:
        raise ValueError(f"cannot make {groups} groups of {n} adapters")
    x = sketches.double()
    best, best_score = None, -float("inf")
    for restart in range(RESTARTS):
        labels = _kmeans(x, groups, torch.Generator().manual_seed(seed * RESTARTS + restart))
        score = float((x * centroids(x, labels, groups)[labels]).sum())
        if score > best_score + 1e-9:
            best, best_score = labels, score
    return _renumbered(best)


def centroids(sketches: torch.Tensor, labels: torch.Tensor, groups: int) -> torch.Tensor:
    """Unit mean direction of each group's rows (zero for an empty group): (groups, S)."""
    sums = torch.zeros(groups, sketches.shape[1], dtype=sketches.dtype).index_add_(0, labels, sketches)
    return unit_rows(sums)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, x / norms.clamp_min(1e-300), x)


def nearest(sketches: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """The group (row of `sums`, each group's sum of member sketches) whose mean direction is
    most similar to each sketch: (N,) int64."""
    return (sketches.double() @ unit_rows(sums.double()).T).argmax(dim=1)


def _kmeans(x: torch.Tensor, groups: int, generator: torch.Generator) -> torch.Tensor:
    centres = _plus_plus(x, groups, generator)
    labels = torch.full((x.shape[0],), -1, dtype=torch.int64)
    for _ in range(ITERATIONS):
        new = (x @ centres.T).argmax(dim=1)
        new = _fill_empty(x, new, groups)
        if torch.equal(new, labels):
            break
        labels = new
        centres = centroids(x, labels, groups)
    return labels


def _plus_plus(x: torch.Tensor, groups: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ starts for unit rows (distance² = 2 - 2 cos)."""
    chosen = [int(torch.randint(x.shape[0], (1,), generator=generator))]
    distance = (2 - 2 * (x @ x[chosen[0]])).clamp_min(0)
    while len(chosen) < groups:
        total = float(distance.sum())
        if total <= 0:  # fewer distinct rows than groups: take any not chosen yet
            chosen.append(next(i for i in range(x.shape[0]) if i not in chosen))
        else:
            chosen.append(int(torch.multinomial(distance / total, 1, generator=generator)))
        distance = torch.minimum(distance, (2 - 2 * (x @ x[chosen[-1]])).clamp_min(0))
    return x[chosen].clone()


def _fill_empty(x: torch.Tensor, labels: torch.Tensor, groups: int) -> torch.Tensor:
    """Every group non-empty: an empty group takes the row farthest from its own group's centre
    among groups of more than one row."""
    labels = labels.clone()
    for group in range(groups):
        if (labels == group).any():
            continue
        sizes = torch.bincount(labels, minlength=groups)
        fit = (x * centroids(x, labels, groups)[labels]).sum(dim=1)
        fit[sizes[labels] < 2] = float("inf")
        labels[int(fit.argmin())] = group
    return labels


def _renumbered(labels: torch.Tensor) -> torch.Tensor:
    """Groups numbered in the order of their first member, so equal partitions get equal labels."""
    order: dict[int, int] = {}
    for label in labels.tolist():
        order.setdefault(label, len(order))
    return torch.tensor([order[label] for label in labels.tolist()], dtype=torch.int64)


def estimated_errors(sketches: torch.Tensor, labels: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """Each adapter's relative error in sketch space when its group g keeps ranks[g] shared
    directions (its mean plus the top principal directions of its centred rows): (N,) float64.
    A proxy for the fit's error that ranks numbers of groups, not a measurement."""
    x = sketches.double()
    errors = torch.zeros(x.shape[0], dtype=torch.float64)
    for group, rank in enumerate(ranks):
        members = (labels == group).nonzero().flatten()
        rows = x[members]
        centred = rows - rows.mean(dim=0)
        keep = min(max(rank, 0), *centred.shape)
        if keep:
            _, _, vh = torch.linalg.svd(centred, full_matrices=False)
            centred = centred - centred @ vh[:keep].T @ vh[:keep]
        errors[members] = centred.norm(dim=1) / rows.norm(dim=1).clamp_min(1e-300)
    return errors


def choose_groups(
    sketches: torch.Tensor, candidates: list[int], rank_for: Callable[[int], int], bound: float | None, seed: int = 0
) -> tuple[int, torch.Tensor]:
    """The number of groups, among `candidates`, whose partition has the fewest adapters
    estimated above `bound` (when given) and then the lowest mean estimated error (the maximum
    would follow a single misplaced adapter); `rank_for(n)` is the shared rank a group of n
    adapters can keep at the budget (a partition with a group that can keep none is skipped).
    Ties go to fewer groups. Returns it and its labels."""
    best = None
    for groups in sorted(set(candidates)):
        labels = partition(sketches, groups, seed)
        ranks = [rank_for(int(n)) for n in torch.bincount(labels, minlength=groups)]
        if groups > 1 and min(ranks) < 1:
            continue
        errors = estimated_errors(sketches, labels, ranks)
        above = int((errors > bound).sum()) if bound is not None else 0
        key = (above, round(float(errors.mean()), 6))
        if best is None or key < best[0]:
            best = (key, groups, labels)
    return best[1], best[2]
