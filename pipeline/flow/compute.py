"""Compute: one task per shard of modules. It finds each module's basis (a fresh SVD, an
incremental update of the parent's, or the parent's as it is), writes the shard's basis object,
and stages the shard's loadings for every adapter of the new version: the new adapters, projected
from their files, and the parent's, moved to the new basis from their stored loadings.

Only small summaries go back to the driver; what grows with the number of adapters is written to
storage, in row batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import failpoints
from pipeline.config import ComponentRule
from pipeline.errors import PipelineError
from pipeline.flow.change import Mode, good_adapters
from pipeline.flow.plan import Shard, largest_shard_bytes, module_budgets, module_shapes, version_shards
from pipeline.io.adapters import read_ranges
from pipeline.io.format import (
    LOADINGS,
    LOADINGS_KEYS,
    LOADINGS_SCHEMA,
    FileEntry,
    basis_file,
    basis_tensors,
    done_file,
    encode_basis,
    joint_tensors,
    loadings_matrix,
    loadings_rows,
    read_decomposition,
    read_joint,
    staging_file,
    version_path,
)
from pipeline.io.location import Location, printable
from pipeline.io.safetensors_ranges import DTYPES, TensorInfo, decode
from pipeline.io.store import Store
from pipeline.io.tables import merge_sorted, read_batches, without, write_tables
from pipeline.linalg import quantize
from pipeline.linalg.budget import FlatFit, JointFit, candidates, fit_joint_module, fit_within
from pipeline.linalg.decompose import Decomposition, centred_svd, explained_variance, project, reconstruct
from pipeline.linalg.gauge import JointBasis, align_rows, cut_rank, joint_cores, joint_rebuild, pad_rank
from pipeline.linalg.incremental import absorb
from pipeline.linalg.loadings import ERROR_ROWS, Move
from pipeline.linalg.metrics import product_error, relative
from pipeline.progress import Progress

log = logging.getLogger(__name__)

READ_BYTES = 64 << 20  # raw tensor bytes per cat_ranges call: bounds what reading holds at once


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


@dataclass
class ShardTask:
    shard: Shard
    mode: Mode
    rule: ComponentRule
    store: Location
    version: str
    source: Location | None  # whose filesystem reads the new adapters
    new: list[tuple[str, str, dict[str, tuple[TensorInfo, TensorInfo]]]]  # task id, weights path, infos, sorted by id
    shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]]  # module -> lora_A and lora_B shapes
    parent: Parent | None = None
    fixed_k: int | None = None  # the collection-wide k, once the first module decided it
    route: str = "auto"
    quantize: str | None = None  # int8 | nf4: the basis is stored packed, and loadings fit what is stored
    method: str = "flat"  # flat | aligned (factors in one gauge first) | joint | auto (flat or joint, by error)
    budgets: dict[str, float] | None = None  # module -> stored floats per adapter (a byte budget; fit mode)
    key: str = ""  # digest of everything the result depends on: a resumed run reuses a matching shard


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
    nonfinite: dict[int, str] = field(default_factory=dict)  # index into task.new -> reason
    decided_k: int | None = None
    bytes_read: int = 0
    requests: int = 0
    stack_bytes: int = 0  # the factor stacks this task held: what grows with the rows it reads
    seconds: dict[str, float] = field(default_factory=dict)
    resumed: bool = False  # taken from a crashed run's finished shard, not computed again

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
        )


def compute_shard(task: ShardTask) -> ShardResult:
    failpoints.reach("shard-start")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = ShardResult(task.shard)
    store = Store(task.store)
    # First: a crashed run's record for this shard (other inputs, or it would not be recomputed)
    # must not outlive the objects this task is about to overwrite.
    store.unfinish_shard(task.version, task.shard.name)
    clock = time.perf_counter()
    stacks = _read_stacks(task, result) if task.new else {}
    if result.nonfinite:
        return result
    parents, parent_joint = _parent_bases(store, task) if task.parent else ({}, {})
    if task.parent and task.parent.refit:
        _add_parent_rows(store, task, parents, parent_joint, stacks, result)
    result.seconds["read"] = time.perf_counter() - clock
    if task.method == "aligned":
        clock = time.perf_counter()
        _align(task, stacks, parents)
        result.seconds["align"] = time.perf_counter() - clock

    clock = time.perf_counter()
    k = task.fixed_k
    bases: dict[tuple[str, str], Decomposition] = {}
    joint: dict[str, tuple[JointBasis, int]] = {}  # module -> bases to write, adapters they have seen
    packed: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    new_rows: list[pa.Table] = []
    parent_rows: list[pa.Table] = []  # joint absorb: the parent's rows, refitted with the new ones
    # A joint re-base refits the parent's rows of its joint modules: read them in one pass.
    joint_rows = _rows_by_module(store, task, sorted(parent_joint)) if task.mode == "absorb" and parent_joint else {}
    for module in task.shard.modules:
        shapes = task.shapes[module]
        stack = stacks.pop(module, None)
        fit = _choose(task, module, stack, device) if task.mode == "fit" else None
        if isinstance(fit, JointFit) or (task.mode != "fit" and module in parent_joint):
            summary, basis, rows, moved = _joint_module(
                task, module, stack, fit, parent_joint.get(module), joint_rows.get(module), device
            )
            result.modules.append(summary)
            if basis is not None:
                joint[module] = basis, summary.count
            new_rows += [rows] if rows is not None else []
            parent_rows += [moved] if moved is not None else []
            continue
        for side in "AB":
            x = stack["AB".index(side)].to(device) if stack is not None else None
            limit, threshold = task.rule.limits(k)
            if task.budgets and task.mode == "absorb":  # a budgeted store keeps each module's k
                limit, threshold = len(parents[module, side].singular_values), None
            if fit is not None:
                dec = getattr(fit, side.lower())
            elif task.mode == "project":
                dec = parents[module, side]
            elif task.mode == "absorb":
                dec = absorb(_to(parents[module, side], device), x, limit, threshold)
            else:
                dec = centred_svd(x, limit, threshold, task.route)
            if task.rule.needs_first_module and k is None and task.mode != "project" and not task.budgets:
                k = result.decided_k = max(len(dec.singular_values), 1)
            bases[module, side] = _to(dec, "cpu")
            if task.quantize and task.mode != "project":
                codes = packed[module, side] = quantize.encode(dec.components, task.quantize)
                bases[module, side] = dataclasses.replace(
                    bases[module, side], components=quantize.decode(codes, dec.mean.shape[0])
                )
        a, b = bases[module, "A"], bases[module, "B"]
        result.modules.append(
            ModuleResult(
                module,
                *shapes,
                len(a.singular_values),
                len(b.singular_values),
                explained(a),
                explained(b),
                a.route,
                a.count,
            )
        )
        if task.new:
            new_rows.append(_project_new(task, module, shapes, stack, a, b, device))
    result.seconds["compute"] = time.perf_counter() - clock
    for m in result.modules:
        m.budget = task.budgets[m.module] if task.budgets else None

    clock = time.perf_counter()
    if task.mode != "project":
        tensors = {}
        for (module, side), dec in bases.items():
            tensors.update(basis_tensors(module, side, dec, packed.get((module, side))))
        for module, (basis, count) in joint.items():
            tensors.update(joint_tensors(module, basis, count))
        result.file = store.write_object(task.version, basis_file(task.shard.name), encode_basis(tensors))
    streams: list = [_sorted_rows(new_rows), _sorted_rows(parent_rows)]
    if task.parent:
        streams.append(
            _moved_parent_rows(store, task, parents, bases, set(parent_joint) if task.mode == "absorb" else set())
        )
    where = store.version_location(task.version)
    write_tables(where, staging_file(task.shard.name), merge_sorted(streams, LOADINGS_KEYS), LOADINGS_SCHEMA)
    result.seconds["write"] = time.perf_counter() - clock
    failpoints.reach("shard-staged")
    # Last: this record says the shard's objects are complete, for a resumed run to reuse.
    store.write_object(
        task.version, done_file(task.shard.name), json.dumps({"key": task.key, "result": result.to_json()}).encode()
    )
    return result


def _choose(task: ShardTask, module: str, stack, device) -> FlatFit | JointFit | None:
    """Fit mode: the fit the method and the budget choose; None where the flat method's
    component rule decides (no budget)."""
    shapes = task.shapes[module]
    if task.budgets:
        n = len(stack[0])
        return fit_within(
            stack[0].to(device),
            stack[1].to(device),
            shapes,
            task.budgets[module] * n,
            candidates(task.method),
            task.route,
        )
    if task.method == "joint":
        (r, d_in), (d_out, _) = shapes
        n = len(stack[0])
        return fit_joint_module(
            stack[0].to(device).view(n, r, d_in), stack[1].to(device).view(n, d_out, r), task.rule.components, r
        )
    return None


def _joint_module(
    task: ShardTask, module: str, stack, fit: JointFit | None, parent: JointBasis | None, old: pa.Table | None, device
):
    """A joint module: (its result, the bases to write (None: the parent's are kept), rows of the
    new adapters, the parent's rows `old` moved to the new bases (a re-base)); None where there
    are none."""
    shapes = task.shapes[module]
    moved = None
    if task.mode == "project":
        summary = _parent_result(task, module)
        if not task.new:
            return summary, None, None, None
        q = task.parent.modules[module]["core_rank"]
        fit = JointFit(parent, q, *_joint_cores(parent, stack, shapes, q, device))
    else:
        if task.mode == "absorb":
            fit, moved = _absorb_joint(task, module, stack, parent, old, device)
            count = task.parent.modules[module]["count"] + len(task.new)
        else:
            count = len(stack[0])  # with a full re-base's rebuilt rows
        width = fit.basis.u.shape[1]
        summary = ModuleResult(
            module,
            *shapes,
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
    n = len(task.new)
    rows = None
    if n:
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

        error, norm = _written_errors(task, module, xa, xb, written)
        rows = loadings_rows(
            [t for t, _, _ in task.new],
            module,
            core_a.reshape(n, -1).cpu(),
            core_b.reshape(n, -1).cpu(),
            error.cpu(),
            norm.cpu(),
        )
    return summary, None if task.mode == "project" else fit.basis, rows, moved


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


# -- reading ---------------------------------------------------------------------------------


def _read_stacks(task: ShardTask, result: ShardResult) -> dict[str, list[torch.Tensor]]:
    """[(N, r*d_in), (N, d_out*r)] float32 stacks per module; non-finite rows are reported."""
    n = len(task.new)
    stacks = {m: [torch.empty(n, math.prod(shape)) for shape in task.shapes[m]] for m in task.shard.modules}
    result.stack_bytes = sum(4 * x.numel() for pair in stacks.values() for x in pair)
    for begin, batch in _read_batches(task):
        requests = [(path, [info for m in task.shard.modules for info in infos[m]]) for _, path, infos in batch]
        blobs, ranges = read_ranges(task.source.fs, requests)
        result.requests += ranges
        for offset, (request, buffers) in enumerate(zip(requests, blobs)):
            for position, (info, buffer) in enumerate(zip(request[1], buffers)):
                module, side = task.shard.modules[position // 2], position % 2
                stacks[module][side][begin + offset] = _padded(decode(buffer, info), side, task.shapes[module][0][0])
                result.bytes_read += len(buffer)
    for module, pair in stacks.items():
        for side, stack in enumerate(pair):
            # A row's sum is NaN or Inf when any entry is (or, rarely, when finite ones overflow:
            # those rows are checked entry by entry); ten times cheaper than isfinite on all.
            for row in (~torch.isfinite(stack.sum(dim=1))).nonzero().flatten().tolist():
                if not torch.isfinite(stack[row]).all():
                    result.nonfinite.setdefault(row, f"NaN or Inf in {module} lora_{'AB'[side]}")
    return stacks


def _padded(factor: torch.Tensor, side: int, rank: int) -> torch.Tensor:
    """A flattened factor zero-padded to the collection's rank (lora_A rows, lora_B columns): B A
    is unchanged."""
    extra = rank - factor.shape[side]
    if extra:
        factor = torch.nn.functional.pad(factor, (0, 0, 0, extra) if side == 0 else (0, extra))
    return factor.reshape(-1)


def _read_batches(task: ShardTask) -> Iterator[tuple[int, list]]:
    """(first row, adapters) batches of at most READ_BYTES of this shard's tensors (at least one)."""
    begin, size = 0, 0
    for row, (_, _, infos) in enumerate(task.new):
        need = sum(info.end - info.start for m in task.shard.modules for info in infos[m])
        if row > begin and size + need > READ_BYTES:
            yield begin, task.new[begin:row]
            begin, size = row, 0
        size += need
    if begin < len(task.new):
        yield begin, task.new[begin:]


def _parent_bases(store: Store, task: ShardTask) -> tuple[dict[tuple[str, str], Decomposition], dict[str, JointBasis]]:
    """The parent's bases of this shard's modules: (module, side) -> flat, module -> joint."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted({task.parent.basis[m] for m in task.shard.modules}):
        tensors.update(store.read_basis(path, task.parent.checksums[path]))
    joint = {m: j for m in task.shard.modules if (j := read_joint(tensors, m)) is not None}
    flat = {
        (m, side): read_decomposition(tensors, m, side) for m in task.shard.modules if m not in joint for side in "AB"
    }
    return flat, joint


def _parent_batches(store: Store, task: ShardTask, modules: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The parent's rows of these modules (default: the shard's), without the ones the new
    version replaces."""
    modules = pa.array(task.shard.modules if modules is None else modules, pa.string())
    for batch in without(
        read_batches(store.location, task.parent.loadings, LOADINGS_SCHEMA.names), set(task.parent.drop)
    ):
        yield batch.filter(pc.is_in(batch.column("module"), value_set=modules))


def _rows_by_module(store: Store, task: ShardTask, modules: list[str]) -> dict[str, pa.Table]:
    """The parent's rows of these modules (without the replaced ones), in one pass."""
    tables: dict[str, list[pa.Table]] = {m: [] for m in modules}
    for batch in _parent_batches(store, task, modules):
        for module, rows in _by_module(batch):
            tables[module].append(rows)
    return {m: pa.concat_tables(t) if t else LOADINGS_SCHEMA.empty_table() for m, t in tables.items()}


def _add_parent_rows(store, task, parents, parent_joint, stacks, result) -> None:
    """Full re-base from the store: the parent's adapters, rebuilt, join the new rows."""
    rebuilt: dict[str, list[list[torch.Tensor]]] = {m: [[], []] for m in task.shard.modules}
    for batch in _parent_batches(store, task):
        for module, rows in _by_module(batch):
            if module in parent_joint:
                a, b = _rebuild_joint(
                    parent_joint[module], rows, task.shapes[module], task.parent.modules[module]["core_rank"]
                )
                rebuilt[module][0].append(a.reshape(len(a), -1))
                rebuilt[module][1].append(b.reshape(len(b), -1))
                continue
            for side, column in enumerate("ab"):
                dec = parents[module, "AB"[side]]
                rebuilt[module][side].append(reconstruct(loadings_matrix(rows, column), dec.components, dec.mean))
    for module, sides in rebuilt.items():
        old = [torch.cat(parts) if parts else None for parts in sides]
        if module in stacks:
            stacks[module] = [torch.cat([x, o]) if o is not None else x for x, o in zip(stacks[module], old)]
        elif old[0] is not None:
            stacks[module] = old
    result.stack_bytes = sum(4 * x.numel() for pair in stacks.values() for x in pair)


def _align(task: ShardTask, stacks, parents) -> None:
    """Replace each module's factors by aligned ones (the same delta W, in the collection's gauge):
    a fit aligns its whole stack, project and absorb align the new rows to the parent's bases."""
    for module, (xa, xb) in stacks.items():
        bases = None if task.mode == "fit" else (parents[module, "A"], parents[module, "B"])
        stacks[module] = list(align_rows(xa, xb, task.shapes[module], task.rule.components, bases))


# -- loadings rows ---------------------------------------------------------------------------


def _project_new(task, module, shapes, stack, a: Decomposition, b: Decomposition, device) -> pa.Table:
    """Rows for the new adapters: loadings on the new basis, the delta-W error of what export
    writes from them, and ||B A||."""
    n = len(task.new)
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

    error, norm = _written_errors(task, module, xa, xb, written)
    return loadings_rows([t for t, _, _ in task.new], module, la.cpu(), lb.cpu(), error.cpu(), norm.cpu())


def _written_errors(
    task: ShardTask, module: str, xa: torch.Tensor, xb: torch.Tensor, written
) -> tuple[torch.Tensor, torch.Tensor]:
    """(relative delta-W error, ||B A||) float64 (n,) of the new adapters' factors as export
    writes them: `written(rows, rank)` rebuilds rows (index tensor) at their own rank as
    export.rebuild does, and the result is cast to the adapter's dtype, as the exported file holds
    it. Measured against the adapter's own factors xa (n, r*d_in), xb (n, d_out*r), flattened at
    the collection's rank r; rows go ERROR_ROWS at a time, grouped by rank and dtype."""
    (r, d_in), (d_out, _) = task.shapes[module]
    n, device = len(xa), xa.device
    error = torch.zeros(n, dtype=torch.float64, device=device)
    norm = torch.zeros(n, dtype=torch.float64, device=device)
    groups: dict[tuple[int, str], list[int]] = {}
    for row, (_, _, infos) in enumerate(task.new):
        groups.setdefault((infos[module][0].shape[0], infos[module][0].dtype), []).append(row)
    for (rank, dtype), members in sorted(groups.items()):
        for begin in range(0, len(members), ERROR_ROWS):
            index = torch.tensor(members[begin : begin + ERROR_ROWS], device=device)
            a, b = written(index, rank)
            cast = DTYPES[dtype]
            a, b = pad_rank(a.to(cast).to(torch.float64), b.to(cast).to(torch.float64), r)
            # float64: a cut adapter's factors are in another gauge than its own, so the terms
            # of product_error's expansion are large and cancel (float32 left ~1e-3 of noise)
            diff, size = product_error(
                xa[index].view(-1, r, d_in).double(), xb[index].view(-1, d_out, r).double(), a, b
            )
            error[index], norm[index] = relative(diff, size), size
    return error, norm


def _moved_parent_rows(store, task, parents, bases, skip: set[str]) -> Iterator[pa.Table]:
    """The parent's rows on the new basis, their errors estimated (linalg.loadings.Move); the
    modules in `skip` were moved already (joint ones in a re-base)."""
    modules = [m for m in task.shard.modules if m not in skip]
    if not modules:
        return
    if task.mode == "project":
        yield from (pa.Table.from_batches([b]) for b in _parent_batches(store, task, modules))
        return
    moves = {
        m: Move((parents[m, "A"], parents[m, "B"]), (bases[m, "A"], bases[m, "B"]), task.shapes[m]) for m in modules
    }
    for batch in _parent_batches(store, task, modules):
        tables = []
        for module, rows in _by_module(batch):
            norm, error = _column(rows, "norm"), _column(rows, "error")
            new_a, new_b, error, _ = moves[module](loadings_matrix(rows, "a"), loadings_matrix(rows, "b"), error, norm)
            tables.append(
                loadings_rows(rows.column("task_id").to_pylist(), module, new_a, new_b, error, norm, measured=False)
            )
        yield from _sorted_rows(tables)


def _by_module(batch) -> Iterator[tuple[str, pa.Table]]:
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    for module in pc.unique(table.column("module")).to_pylist():
        yield module, table.filter(pc.equal(table.column("module"), module))


def _sorted_rows(tables: list[pa.Table]) -> Iterator[pa.Table]:
    if tables:
        yield pa.concat_tables(tables).sort_by([(k, "ascending") for k in LOADINGS_KEYS])


# -- small helpers ---------------------------------------------------------------------------


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


# -- the driver: every shard of a version, resumed where a crashed run finished them ------------


def compute_all(change, source, store, version, runner, options, seconds):
    """Every shard's results, in shard order. Adapters found holding NaN/Inf are quarantined and
    the shards recomputed without them, so no basis ever saw them."""
    started = time.perf_counter()
    while True:
        good = good_adapters(change.adapters)
        if not good and change.mode == "absorb":
            change.mode = "project"  # only quarantined ones: record them, keep the basis
        if not good and change.mode == "fit" and not change.refit:
            first = change.adapters[0]
            raise PipelineError(
                f"no usable adapters: all {len(change.adapters)} quarantined (e.g. {first.task_id!r}: {first.reason})"
            )
        results = _compute_shards(change, good, source, store, version, runner, options)
        nonfinite = {i: reason for r in results for i, reason in r.nonfinite.items()}
        if not nonfinite:
            break
        if options.strict:
            index, reason = next(iter(nonfinite.items()))
            raise PipelineError(f"--strict: adapter {good[index].task_id!r} quarantined: {reason}")
        for index, reason in nonfinite.items():
            good[index].quarantine(reason)
            log.warning("quarantined %s: %s", printable(good[index].task_id), reason)
    seconds["compute"] = time.perf_counter() - started
    return results, good


def _compute_shards(change, good, source, store, version, runner, options) -> list[ShardResult]:
    shapes = module_shapes(change, good)
    widths = {m: a[0] * a[1] + b[0] * b[1] for m, (a, b) in shapes.items()}
    rows = len(good)
    if change.refit:  # the parent's adapters not read again join, rebuilt
        rows += change.parent_manifest["adapters"]["ok"] - sum(
            change.parent_status.get(a.task_id) == "ok" for a in good
        )
    budgets = module_budgets(change, good, shapes, rows, options)
    shards = version_shards(change, shapes, rows, options, runner.num_cpus)
    peak = largest_shard_bytes(shards, widths, max(rows, 1))
    log.info(
        "plan: %d adapters to read, %d modules in %d shards (largest needs ~%.0f MiB)",
        len(good),
        len(shapes),
        len(shards),
        peak / 2**20,
    )
    if peak > options.memory_budget:
        log.warning(
            "one shard needs ~%.0f MiB, over the %.0f MiB budget: use --chunk-size",
            peak / 2**20,
            options.memory_budget / 2**20,
        )
    # Declared to Ray so it does not pack more shards on a node than fit; never above the budget,
    # so a single oversized module is still scheduled rather than left infeasible.
    memory = min(peak, options.memory_budget)
    parent = None
    if change.parent_manifest:
        drop = frozenset(a.task_id for a in good)
        basis = {m: e["basis"] for m, e in change.parent_manifest["modules"].items()}
        checksums = {path: change.parent_manifest["files"][path] for path in set(basis.values())}
        parent = Parent(
            basis,
            checksums,
            version_path(change.parent, LOADINGS),
            drop,
            change.refit,
            change.parent_manifest["modules"],
        )

    inputs = _digest(
        [
            change.operation,
            change.mode,
            change.parent,
            change.refit,
            dataclasses.asdict(options.rule),
            options.route,
            options.quantize,
            options.method,
            budgets,
            [(a.task_id, a.location.uri, a.weights_bytes, a.weights_tag) for a in good],
        ]
    )
    finished = store.finished_shards(version)
    # The adapters' own filesystem reads them: a manifest source lists folders on one filesystem
    # that is not the manifest's (discovery refuses a mix).
    reader = good[0].location if good else source

    def task(shard, fixed_k=None):
        new = [(a.task_id, a.weights_path, {m: a.modules[m] for m in shard.modules}) for a in good]
        key = _digest([inputs, shard.modules, fixed_k])
        return ShardTask(
            shard,
            change.mode,
            options.rule,
            store.location,
            version,
            reader,
            new,
            shapes,
            parent,
            fixed_k,
            options.route,
            options.quantize,
            options.method,
            budgets,
            key,
        )

    progress = Progress("compute", len(shards), "shards")
    results: list[ShardResult | None] = [None] * len(shards)

    def run(tasks: list[ShardTask]) -> None:
        todo = []
        for t in tasks:
            done = finished.get(t.shard.name)
            if done and done["key"] == t.key:
                results[t.shard.index] = ShardResult.from_json(done["result"])
                progress.advance()
            else:
                todo.append(t)
        for index, result in runner.map_unordered(compute_shard, todo, use_gpu=True, memory=memory):
            results[todo[index].shard.index] = result
            progress.advance()
            failpoints.reach("shard-done")

    pending = list(shards)
    fixed_k = None
    if options.rule.needs_first_module and change.mode != "project" and not budgets:
        # vlora's rule: k comes from the first module's lora_A, so that shard runs first.
        run([task(shards[0])])
        if results[0].nonfinite:
            return [results[0]]
        fixed_k, pending = results[0].decided_k, shards[1:]
    run([task(s, fixed_k) for s in pending])
    progress.close()
    resumed = sum(r.resumed for r in results)
    if resumed:
        log.info("%d of %d shards taken from the crashed run", resumed, len(results))
    return results


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
