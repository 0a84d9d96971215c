"""Per-module strategies of a shard task: each finds one module's bases and the loadings rows of
its new adapters.

  fit-flat      a fresh centred SVD per side (or, with a byte budget, the fit of lowest error)
  fit-aligned   the same, on factors put in one gauge first
  fit-joint     shared U, V and a core per adapter (or, with a byte budget, the fit of lowest error)
  absorb-flat   an incremental update of the parent's flat bases
  absorb-joint  the parent's joint bases refitted with the new adapters and the parent's rebuilt ones
  keep-parent   the parent's bases as they are; only the new adapters' rows are made
  pack-parent   the parent's flat bases packed (quantize); its rows are moved by the shard task

`strategy_for` chooses one from the fit specification, the mode and the parent's entry for the
module. A strategy never writes: the shard task writes what they return.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import ComponentRule
from pipeline.flow.change import Mode
from pipeline.flow.plan import Shard
from pipeline.io.format import FileEntry, loadings_matrix, loadings_rows
from pipeline.io.location import Location
from pipeline.io.safetensors_ranges import DTYPES, TensorInfo
from pipeline.linalg import quantize
from pipeline.linalg.budget import JointFit, candidates, fit_joint_module, fit_within
from pipeline.linalg.decompose import Decomposition, centred_svd, explained_variance, project, reconstruct
from pipeline.linalg.gauge import JointBasis, align_rows, cut_rank, joint_cores, joint_rebuild, pad_rank
from pipeline.linalg.incremental import absorb
from pipeline.linalg.loadings import ERROR_ROWS
from pipeline.linalg.metrics import product_error, relative
from pipeline.linalg.residual import fit_residual, target


@dataclass(frozen=True)
class FitSpec:
    """How bases are fitted: the same for every shard of a version (but `fixed_k`, decided by the
    first shard under vlora's rule)."""

    rule: ComponentRule
    route: str = "auto"
    quantize: str | None = None  # int8 | nf4: the basis is stored packed, and loadings fit what is stored
    method: str = "flat"  # flat | aligned (factors in one gauge first) | joint | auto (flat or joint, by error)
    # module -> stored floats per adapter that the storage budget allows (fit mode; None without one)
    floats_per_adapter: Mapping[str, float] | None = None
    fixed_k: int | None = None  # the collection-wide k, once the first module decided it
    max_error: float | None = None  # the bound of each new adapter module's error: residuals beyond it


@dataclass
class Parent:
    """The version a new one grows from: its basis objects (store-relative, per module), its
    loadings table, and the task ids whose rows the new version replaces."""

    basis: dict[str, str]
    checksums: dict[str, dict]  # basis path -> its manifest entry, checked on read
    loadings: str
    drop: frozenset[str] = frozenset()
    refit: bool = False  # fit mode: the parent's reconstructed rows join the new SVD
    modules: dict[str, dict] = field(default_factory=dict)  # module -> the parent manifest's entry
    residuals: str | None = None  # the parent's residuals table, if it has one


@dataclass
class ShardTask:
    shard: Shard
    mode: Mode
    spec: FitSpec
    store: Location
    version: str
    source: Location | None  # whose filesystem reads the new adapters
    new: list[tuple[str, str, dict[str, tuple[TensorInfo, TensorInfo]]]]  # task id, weights path, infos, sorted by id
    shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]]  # module -> lora_A and lora_B shapes
    parent: Parent | None = None
    key: str = ""  # digest of everything the result depends on: a resumed run reuses a matching shard
    chunk: int | None = None  # fit mode: the adapters read and fitted at a time (flow.chunked)


@dataclass
class ModuleResult:
    module: str
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    k_a: int
    k_b: int
    explained_a: float
    explained_b: float
    route: str
    count: int  # adapters the basis has seen
    method: str = "flat"  # flat (also aligned) | joint
    width: int = 0  # joint: c, the columns of U and V
    core_rank: int = 0  # joint: q, the rank of each adapter's factored core
    budget: float | None = None  # stored floats per adapter a byte budget allows


@dataclass
class ShardResult:
    shard: Shard
    file: FileEntry | None = None  # the basis object written (None: the parent's is kept)
    modules: list[ModuleResult] = field(default_factory=list)
    nonfinite: dict[str, str] = field(default_factory=dict)  # task id -> reason
    decided_k: int | None = None
    bytes_read: int = 0
    requests: int = 0
    stack_bytes: int = 0  # the factor stacks this task held: what grows with the rows it reads
    seconds: dict[str, float] = field(default_factory=dict)
    resumed: bool = False  # taken from a crashed run's finished shard, not computed again
    # quantize: how far the rows' rebuilt delta W moved (relative), summed and largest, over rows
    added_sum: float = 0.0
    added_max: float = 0.0
    added_rows: int = 0
    residual_rows: int = 0  # rows of the staged residuals (none staged: 0)
    unbounded: int = 0  # the parent's rows above the error bound, which could not be brought within it
    chunk_seconds: list[float] = field(default_factory=list)  # compress --chunk-size: each chunk's read and fit
    device: str = ""  # where the task's arithmetic ran: cpu, or cuda where its worker has a GPU

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ShardResult:
        modules = [
            ModuleResult(**{**m, "a_shape": tuple(m["a_shape"]), "b_shape": tuple(m["b_shape"])})
            for m in data["modules"]
        ]
        return cls(
            Shard(data["shard"]["index"], tuple(data["shard"]["modules"])),
            FileEntry(**data["file"]) if data["file"] else None,
            modules,
            {},
            data["decided_k"],
            data["bytes_read"],
            data["requests"],
            data["stack_bytes"],
            data["seconds"],
            True,
            data.get("added_sum", 0.0),
            data.get("added_max", 0.0),
            data.get("added_rows", 0),
            data.get("residual_rows", 0),
            data.get("unbounded", 0),
            data.get("chunk_seconds", []),
            data.get("device", ""),
        )


@dataclass
class Context:
    """What every module of a shard task shares: the task, where tensors go, the parent's bases
    of the shard's modules, the parent's rows of its joint modules (absorb-joint), and the
    collection-wide k once decided (vlora's rule)."""

    task: ShardTask
    device: str
    parents: dict[tuple[str, str], Decomposition] = field(default_factory=dict)  # (module, side) -> flat
    parent_joint: dict[str, JointBasis] = field(default_factory=dict)
    joint_rows: dict[str, pa.Table] = field(default_factory=dict)  # module -> the parent's rows
    k: int | None = None
    decided_k: int | None = None
    align_seconds: float = 0.0
    adapters: int | None = None  # a chunked fit: the shard's adapters, of which the stacks hold a chunk
    # flat modules: the new adapters' rows are made (a chunked fit skips it for the chunks that it
    # projects on the final bases at the end)
    rows: bool = True
    # module -> the adapters' own factors where a fit sees them in another gauge (aligned), kept
    # for their residuals (an error bound only)
    originals: dict[str, list[torch.Tensor]] = field(default_factory=dict)


@dataclass
class Outcome:
    """One module's result: its summary, the bases to write (flat: side -> basis and packed
    components; joint: the bases and the adapters they have seen; none: the parent's are kept), the
    new adapters' rows and, for absorb-joint, the parent's rows moved to the new bases."""

    summary: ModuleResult
    flat: dict[str, Decomposition] = field(default_factory=dict)
    packed: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    joint: tuple[JointBasis, int] | None = None
    rows: pa.Table | None = None
    moved: pa.Table | None = None
    kept: bool = False  # keep-parent: nothing of this module is written to the basis object
    residuals: list[dict] = field(default_factory=list)  # the new adapters' (format.residual_table rows)


Strategy = Callable[[Context, str, list | None], Outcome]


def strategy_for(spec: FitSpec, mode: Mode, joint_parent: bool) -> Strategy:
    """The strategy of one module: by the mode, then the method (fit) or how the parent stored
    the module (absorb: a joint module stays joint)."""
    if mode == "project":
        return keep_parent
    if mode == "quantize":
        return pack_parent
    if mode == "absorb":
        return absorb_joint if joint_parent else absorb_flat
    return {"joint": fit_joint, "aligned": fit_aligned}.get(spec.method, fit_flat)


# -- the strategies --------------------------------------------------------------------------


def fit_flat(ctx: Context, module: str, stack) -> Outcome:
    spec = ctx.task.spec
    if spec.floats_per_adapter:
        return _fit_within(ctx, module, stack)
    bases, k = fit_sides(
        spec.rule,
        ctx.k,
        lambda side, limit, threshold: centred_svd(
            stack["AB".index(side)].to(ctx.device), limit, threshold, spec.route
        ),
    )
    _take_k(ctx, k)
    return _flat_outcome(ctx, module, stack, bases)


def fit_aligned(ctx: Context, module: str, stack) -> Outcome:
    return fit_flat(ctx, module, _aligned(ctx, module, stack, None))


def fit_joint(ctx: Context, module: str, stack) -> Outcome:
    spec = ctx.task.spec
    if spec.floats_per_adapter:
        return _fit_within(ctx, module, stack)
    (r, d_in), (d_out, _) = ctx.task.shapes[module]
    n = len(stack[0])
    fit = fit_joint_module(
        stack[0].to(ctx.device).view(n, r, d_in), stack[1].to(ctx.device).view(n, d_out, r), spec.rule.components, r
    )
    return _joint_outcome(ctx, module, stack, fit, n)


def absorb_flat(ctx: Context, module: str, stack) -> Outcome:
    spec = ctx.task.spec
    if spec.method == "aligned" and stack is not None:
        stack = _aligned(ctx, module, stack, (ctx.parents[module, "A"], ctx.parents[module, "B"]))
    parents = {side: ctx.parents[module, side] for side in "AB"}

    def update(side, limit, threshold):
        x = stack["AB".index(side)].to(ctx.device) if stack is not None else None
        return absorb(_to(parents[side], ctx.device), x, limit, threshold)

    bases, k = fit_sides(spec.rule, ctx.k, update, parents if spec.floats_per_adapter else None)
    _take_k(ctx, k)
    return _flat_outcome(ctx, module, stack, bases)


def absorb_joint(ctx: Context, module: str, stack) -> Outcome:
    task = ctx.task
    fit, moved = _absorb_joint(task, module, stack, ctx.parent_joint[module], ctx.joint_rows[module], ctx.device)
    outcome = _joint_outcome(ctx, module, stack, fit, task.parent.modules[module]["count"] + len(task.new))
    outcome.moved = moved
    return outcome


def keep_parent(ctx: Context, module: str, stack) -> Outcome:
    if module in ctx.parent_joint:
        return _keep_joint(ctx, module, stack)
    if ctx.task.spec.method == "aligned" and stack is not None:
        stack = _aligned(ctx, module, stack, (ctx.parents[module, "A"], ctx.parents[module, "B"]))
    bases = {side: _to(ctx.parents[module, side], "cpu") for side in "AB"}
    outcome = _flat_outcome(ctx, module, stack, bases, packed=False)
    outcome.kept = True
    return outcome


def pack_parent(ctx: Context, module: str, stack) -> Outcome:
    """The parent's flat bases with their components packed as the spec says; the module's entry
    stays the parent's (k, explained variance, route). The parent's rows keep their loadings on
    the packed bases (the shard task moves them, measuring how far each rebuilt delta W moves)."""
    bases = {side: ctx.parents[module, side] for side in "AB"}
    outcome = _flat_outcome(ctx, module, stack, bases)
    outcome.summary = _budgeted(ctx.task, _parent_result(ctx.task, module))
    return outcome


# -- shared steps ----------------------------------------------------------------------------


def _fit_within(ctx: Context, module: str, stack) -> Outcome:
    """A byte budget's fit: the method and parameters of lowest error (flat or joint)."""
    spec = ctx.task.spec
    n = ctx.adapters or len(stack[0])  # the adapters the bases carry: more than a chunk's rows
    fit = fit_within(
        stack[0].to(ctx.device),
        stack[1].to(ctx.device),
        ctx.task.shapes[module],
        spec.floats_per_adapter[module] * n,
        candidates(spec.method),
        spec.route,
        n,
    )
    if isinstance(fit, JointFit):
        return _joint_outcome(ctx, module, stack, fit, len(stack[0]))
    return _flat_outcome(ctx, module, stack, {"A": fit.a, "B": fit.b})


def fit_sides(
    rule: ComponentRule,
    k: int | None,
    fit: Callable[[str, int | None, float | None], Decomposition],
    kept: Mapping[str, Decomposition] | None = None,
) -> tuple[dict[str, Decomposition], int | None]:
    """One flat module's bases, `fit(side, k, threshold)` for lora_A then lora_B, with k as `rule`
    says given the collection-wide k (None: not decided yet); under a byte budget each side keeps
    the k of its basis in `kept`. Returns the bases and the collection-wide k, which vlora's rule
    decides on the first side fitted. The one k rule of the flow's strategies and of the Python API."""
    bases = {}
    for side in "AB":
        limit, threshold = (len(kept[side].singular_values), None) if kept is not None else rule.limits(k)
        bases[side] = fit(side, limit, threshold)
        if kept is None and rule.needs_first_module and k is None:
            k = max(len(bases[side].singular_values), 1)
    return bases, k


def _take_k(ctx: Context, k: int | None) -> None:
    """Record a collection-wide k the module just decided (vlora's rule)."""
    if k != ctx.k:
        ctx.k = ctx.decided_k = k


def _aligned(ctx: Context, module: str, stack, bases) -> list[torch.Tensor]:
    """The module's factors in one gauge: among themselves, or the parent's bases' (`bases`)."""
    clock = time.perf_counter()
    xa, xb = stack
    if ctx.task.spec.max_error is not None:
        ctx.originals[module] = stack
    aligned = list(align_rows(xa, xb, ctx.task.shapes[module], ctx.task.spec.rule.components, bases))
    ctx.align_seconds += time.perf_counter() - clock
    return aligned


def _flat_outcome(ctx: Context, module: str, stack, fitted: dict[str, Decomposition], packed=True) -> Outcome:
    """A flat module's bases on the CPU (packed where the spec quantizes), its summary and the new
    adapters' rows."""
    task = ctx.task
    bases, codes = {}, {}
    for side, dec in fitted.items():
        bases[side] = _to(dec, "cpu")
        if task.spec.quantize and packed:
            codes[side] = quantize.encode(dec.components, task.spec.quantize)
            bases[side] = dataclasses.replace(bases[side], components=quantize.decode(codes[side], dec.mean.shape[0]))
    a, b = bases["A"], bases["B"]
    summary = ModuleResult(
        module,
        *task.shapes[module],
        len(a.singular_values),
        len(b.singular_values),
        explained(a),
        explained(b),
        a.route,
        a.count,
    )
    own = ctx.originals.get(module, stack)
    made = task.new and ctx.rows
    rows, residuals = _project_new(task, module, stack, own, a, b, ctx.device) if made else (None, [])
    return Outcome(_budgeted(task, summary), bases, codes, rows=rows, residuals=residuals)


def _joint_outcome(ctx: Context, module: str, stack, fit: JointFit, count: int) -> Outcome:
    """A joint module fitted (or refitted): its bases, summary and the new adapters' rows."""
    task = ctx.task
    width = fit.basis.u.shape[1]
    summary = ModuleResult(
        module,
        *task.shapes[module],
        fit.q * width,
        fit.q * width,
        fit.explained,
        fit.explained,
        "joint",
        count,
        "joint",
        width,
        fit.q,
    )
    rows, residuals = _joint_rows(ctx, module, stack, fit)
    return Outcome(_budgeted(task, summary), joint=(fit.basis, count), rows=rows, residuals=residuals)


def _keep_joint(ctx: Context, module: str, stack) -> Outcome:
    """A joint module kept as the parent stored it: the new adapters' cores on its bases."""
    task = ctx.task
    summary = _budgeted(task, _parent_result(task, module))
    if not task.new:
        return Outcome(summary, kept=True)
    parent = ctx.parent_joint[module]
    q = task.parent.modules[module]["core_rank"]
    fit = JointFit(parent, q, *_joint_cores(parent, stack, task.shapes[module], q, ctx.device))
    rows, residuals = _joint_rows(ctx, module, stack, fit)
    return Outcome(summary, rows=rows, kept=True, residuals=residuals)


def _budgeted(task: ShardTask, summary: ModuleResult) -> ModuleResult:
    summary.budget = task.spec.floats_per_adapter[summary.module] if task.spec.floats_per_adapter else None
    return summary


def _joint_rows(ctx: Context, module: str, stack, fit: JointFit) -> tuple[pa.Table | None, list[dict]]:
    """The new adapters' rows of a joint module: their cores, and the error of what export writes;
    and their residuals."""
    task, device = ctx.task, ctx.device
    n = len(task.new)
    if not n:
        return None, []
    basis, core_a, core_b = fit.basis, fit.core_a[:n].to(torch.float32), fit.core_b[:n].to(torch.float32)
    u, v = basis.u.to(device, torch.float32), basis.v.to(device, torch.float32)
    xa, xb = stack[0][:n].to(device), stack[1][:n].to(device)

    def written(index: torch.Tensor, rank: int):
        # export.rebuild: the stored core cut to the adapter's rank, then U P and Q V^T
        return joint_rebuild(
            JointBasis(u, v, 0.0, 0.0, 0),
            core_a[index][:, :rank].to(device),
            core_b[index][:, :, :rank].to(device),
            rank,
        )

    error, norm, residuals = _written_errors(task, module, xa, xb, written)
    rows = loadings_rows(
        [t for t, _, _ in task.new],
        module,
        core_a.reshape(n, -1).cpu(),
        core_b.reshape(n, -1).cpu(),
        error.cpu(),
        norm.cpu(),
    )
    return rows, residuals


def _joint_cores(basis: JointBasis, stack, shapes, q: int, device):
    (r, d_in), (d_out, _) = shapes
    n = len(stack[0])
    return joint_cores(basis, stack[0].to(device).view(n, r, d_in), stack[1].to(device).view(n, d_out, r), q)


def _absorb_joint(task, module, stack, parent: JointBasis, old: pa.Table, device) -> tuple[JointFit, pa.Table]:
    """A joint module's re-base: the parent's adapters, rebuilt from their cores, join the new
    ones; the alternating fit starts from the parent's bases. The parent's rows are measured
    against what they rebuilt, and that added error is combined with their stored one in
    quadrature (as linalg.loadings.Move does for flat modules)."""
    (r, d_in), (d_out, _) = shapes = task.shapes[module]
    q = task.parent.modules[module]["core_rank"]
    old_a, old_b = _rebuild_joint(parent, old, shapes, q)
    n = len(task.new)
    a = torch.cat([stack[0].to(device).view(n, r, d_in), old_a.to(device)])
    b = torch.cat([stack[1].to(device).view(n, d_out, r), old_b.to(device)])
    fit = fit_joint_module(a, b, parent.u.shape[1], q, init=parent)
    norm = _column(old, "norm")
    moved = relative(fit.errors[n:].cpu() * fit.norms[n:].cpu(), norm)
    error = _column(old, "error").hypot(moved)
    width = q * parent.u.shape[1]  # stated: there may be no rows left (all replaced)
    table = loadings_rows(
        old.column("task_id").to_pylist(),
        module,
        fit.core_a[n:].reshape(len(old), width).cpu(),
        fit.core_b[n:].reshape(len(old), width).cpu(),
        error,
        norm,
        measured=False,
    )
    return fit, table


def _rebuild_joint(basis: JointBasis, rows: pa.Table, shapes, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (n, r, d_in), (n, d_out, r) that stored joint rows rebuild, zero-padded to r."""
    n, c = rows.num_rows, basis.u.shape[1]
    core_a = loadings_matrix(rows, "a", q * c).view(n, q, c)
    core_b = loadings_matrix(rows, "b", q * c).view(n, c, q)
    return joint_rebuild(basis, core_a, core_b, shapes[0][0])


def _parent_result(task: ShardTask, module: str) -> ModuleResult:
    """A module kept as the parent stored it."""
    e = task.parent.modules[module]
    return ModuleResult(
        module,
        tuple(e["a_shape"]),
        tuple(e["b_shape"]),
        e["k_a"],
        e["k_b"],
        e["explained_variance_a"],
        e["explained_variance_b"],
        e["svd_route"],
        e["count"],
        e.get("method", "flat"),
        e.get("width", 0),
        e.get("core_rank", 0),
    )


# -- loadings rows ---------------------------------------------------------------------------


def _project_new(task, module, stack, own, a: Decomposition, b: Decomposition, device) -> tuple[pa.Table, list[dict]]:
    """Rows for the new adapters: loadings on the new basis, the delta-W error of what export
    writes from them, and ||B A||; and their residuals (fitted to `own`: the adapters' factors,
    the stack's before any alignment)."""
    shapes, n = task.shapes[module], len(task.new)
    xa, xb = stack[0][:n].to(device), stack[1][:n].to(device)
    (ca, ma), (cb, mb) = (a.components.to(device), a.mean.to(device)), (b.components.to(device), b.mean.to(device))
    la, lb = project(xa, ca, ma), project(xb, cb, mb)

    def written(index: torch.Tensor, rank: int):
        # export.rebuild: the factors at the collection's rank, cut to the adapter's own
        m = len(index)
        rebuilt_a, rebuilt_b = (
            reconstruct(la[index], ca, ma).view(m, *shapes[0]),
            reconstruct(lb[index], cb, mb).view(m, *shapes[1]),
        )
        return cut_rank(rebuilt_a, rebuilt_b, rank) if rank < shapes[0][0] else (rebuilt_a, rebuilt_b)

    error, norm, residuals = _written_errors(task, module, xa, xb, written, (own[0][:n], own[1][:n]))
    return loadings_rows([t for t, _, _ in task.new], module, la.cpu(), lb.cpu(), error.cpu(), norm.cpu()), residuals


def _written_errors(
    task: ShardTask, module: str, xa: torch.Tensor, xb: torch.Tensor, written, own=None
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """(relative delta-W error, ||B A||) float64 (n,) of the new adapters' factors as export
    writes them: `written(rows, rank)` rebuilds rows (index tensor) at their own rank as
    export.rebuild does, and the result is cast to the adapter's dtype, as the exported file holds
    it. Measured against the adapter's own factors xa (n, r*d_in), xb (n, d_out*r), flattened at
    the collection's rank r; rows go ERROR_ROWS at a time, grouped by rank and dtype. With a
    bound (spec.max_error), rows above it get residuals (returned) and their error with them,
    fitted to `own` (the adapters' factors where xa, xb hold them in another gauge)."""
    own = (xa, xb) if own is None else own
    (r, d_in), (d_out, _) = task.shapes[module]
    n, device = len(xa), xa.device
    error = torch.zeros(n, dtype=torch.float64, device=device)
    norm = torch.zeros(n, dtype=torch.float64, device=device)
    residuals: list[dict] = []
    groups: dict[tuple[int, str], list[int]] = {}
    for row, (_, _, infos) in enumerate(task.new):
        groups.setdefault((infos[module][0].shape[0], infos[module][0].dtype), []).append(row)
    for (rank, dtype), members in sorted(groups.items()):
        for begin in range(0, len(members), ERROR_ROWS):
            index = torch.tensor(members[begin : begin + ERROR_ROWS], device=device)
            a, b = written(index, rank)
            cast = DTYPES[dtype]
            # float64 for a cut adapter: its factors are in another gauge than its own, so the
            # terms of product_error's expansion are large and cancel (float32 left ~1e-3 of
            # noise); uncut, every term is as small as the error and float32 keeps its precision
            exact = torch.float64 if rank < r else torch.float32
            a, b = pad_rank(a.to(cast).to(exact), b.to(cast).to(exact), r)
            diff, size = product_error(
                xa[index].view(-1, r, d_in).to(exact), xb[index].view(-1, d_out, r).to(exact), a, b
            )
            error[index], norm[index] = relative(diff, size), size
            rows_own = (own[0][index].to(device).view(-1, r, d_in), own[1][index].to(device).view(-1, d_out, r))
            residuals += _residuals(task, module, index, rows_own, (a, b), (rank, cast), error)
    return error, norm, residuals


def _residuals(task: ShardTask, module: str, index: torch.Tensor, own, written, rank_dtype, error) -> list[dict]:
    """Residuals of the rows (`index`) whose `error` misses the bound, their errors updated to
    those of what export writes with them. `own`, `written`: the rows' factors, the adapters'
    and as export writes them (cast, padded to the collection's rank)."""
    bound = task.spec.max_error
    if bound is None:
        return []
    found = []
    for position, row in enumerate(index.tolist()):
        shared = float(error[row])
        if shared <= target(bound):
            continue
        pair = (own[0][position], own[1][position])
        residual = fit_residual(pair, (written[0][position], written[1][position]), *rank_dtype, bound, shared)
        error[row] = residual.error
        found.append(
            {
                "task_id": task.new[row][0],
                "module": module,
                "kind": residual.kind,
                "a": residual.a.cpu(),
                "b": residual.b.cpu(),
                "shared_error": shared,
            }
        )
    return found


def _column(rows: pa.Table, name: str) -> torch.Tensor:
    return torch.from_numpy(rows.column(name).to_numpy().astype(np.float64))


def _to(dec: Decomposition, device) -> Decomposition:
    return Decomposition(
        dec.components.to(device),
        dec.singular_values.to(device),
        dec.mean.to(device),
        dec.total_variance,
        dec.route,
        dec.count,
    )


def explained(dec: Decomposition) -> float:
    ratios = explained_variance(dec.singular_values, dec.total_variance)
    return float(ratios[-1]) if len(ratios) else (1.0 if dec.total_variance == 0 else 0.0)
