"""Compute: one task per shard of modules. It finds each module's basis (a fresh SVD, an
incremental update of the parent's, or the parent's as it is), writes the shard's basis object,
and stages the shard's loadings for every adapter of the new version: the new adapters, projected
from their files, and the parent's, moved to the new basis from their stored loadings. A chunked
compress reads the new adapters a chunk at a time (flow.chunked).

Only small summaries go back to the driver; what grows with the number of adapters is written to
storage, in row batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import failpoints
from pipeline.errors import PipelineError
from pipeline.flow import chunked
from pipeline.flow.bounded import StoredAdapters, bounded_flat, bounded_joint, stored_adapters
from pipeline.flow.change import good_adapters
from pipeline.flow.grouping import group_adapters
from pipeline.flow.plan import (
    floats_per_adapter,
    largest_shard_bytes,
    module_members,
    module_shapes,
    version_shards,
)
from pipeline.flow.reading import StackReader
from pipeline.flow.strategies import (
    Context,
    FitSpec,
    ModuleResult,
    Outcome,
    Parent,
    ShardResult,
    ShardTask,
    _column,
    _rebuild_joint,
    absorb_joint,
    explained,
    strategy_for,
)
from pipeline.io.format import (
    LOADINGS,
    LOADINGS_KEYS,
    LOADINGS_SCHEMA,
    RESIDUALS,
    RESIDUALS_SCHEMA,
    basis_file,
    basis_tensors,
    done_file,
    encode_basis,
    joint_tensors,
    loadings_matrix,
    loadings_rows,
    read_decomposition,
    read_joint,
    residual_staging_file,
    residual_table,
    staging_file,
    version_path,
)
from pipeline.io.location import printable
from pipeline.io.store import Store
from pipeline.io.tables import merge_sorted, read_batches, without, write_tables
from pipeline.linalg.decompose import Decomposition, reconstruct
from pipeline.linalg.gauge import JointBasis
from pipeline.linalg.loadings import Move
from pipeline.progress import Progress

__all__ = ["ModuleResult", "Parent", "ShardResult", "ShardTask", "compute_all", "compute_shard", "explained"]

log = logging.getLogger(__name__)


def compute_shard(task: ShardTask) -> ShardResult:
    """Read the shard's stacks, apply each module's strategy, write the basis object, the staged
    loadings and, last, the done record."""
    failpoints.reach("shard-start")
    result = ShardResult(task.shard)
    store = Store(task.store)
    # First: a crashed run's record for this shard (other inputs, or it would not be recomputed)
    # must not outlive the objects this task is about to overwrite.
    store.unfinish_shard(task.version, task.shard.name)
    ctx = Context(task, "cuda" if torch.cuda.is_available() else "cpu", k=task.spec.fixed_k)
    result.device = ctx.device
    if task.chunk and len(task.new) > task.chunk:
        with StackReader(task, result, chunked.reads(task)) as reader:
            outcomes = chunked.compute(ctx, result, lambda part: reader.read(part.new), _apply_strategies)
    else:
        outcomes = _compute_at_once(store, ctx, result)
    if outcomes is None:
        return result  # rows with NaN or Inf: the driver quarantines them and runs the shard again
    result.modules = [o.summary for o in outcomes]
    result.decided_k = ctx.decided_k
    if task.spec.method == "aligned":
        result.seconds["align"] = ctx.align_seconds

    clock = time.perf_counter()
    _write_shard(store, ctx, outcomes, result)
    result.seconds["write"] = time.perf_counter() - clock
    failpoints.reach("shard-staged")
    # Last: this record says the shard's objects are complete, for a resumed run to reuse.
    store.write_object(
        task.version, done_file(task.shard.name), json.dumps({"key": task.key, "result": result.to_json()}).encode()
    )
    return result


def _compute_at_once(store: Store, ctx: Context, result: ShardResult) -> list[Outcome] | None:
    """Every adapter of the shard in one stack per module side (None: some hold NaN or Inf)."""
    task = ctx.task
    clock = time.perf_counter()
    stacks = {}
    if task.new:
        with StackReader(task, result, [task.new]) as reader:
            stacks = reader.read(task.new)
    if result.nonfinite:
        return None
    if task.parent:
        ctx.parents, ctx.parent_joint = _parent_bases(store, task)
        if task.parent.refit:
            _add_parent_rows(store, task, ctx.parents, ctx.parent_joint, stacks, result)
    result.seconds["read"] = time.perf_counter() - clock
    clock = time.perf_counter()
    outcomes = _apply_strategies(ctx, stacks, store)
    result.seconds["compute"] = time.perf_counter() - clock - ctx.align_seconds
    return outcomes


def _apply_strategies(ctx: Context, stacks: dict[str, list[torch.Tensor]], store: Store | None = None) -> list[Outcome]:
    """Each module's outcome, in shard order. The parent's rows of the modules a joint re-base
    refits are read from the store first, in one pass, unless the context holds them."""
    task = ctx.task
    chosen = {m: strategy_for(task.spec, task.mode, m in ctx.parent_joint) for m in task.shard.modules}
    refitted = sorted(m for m, strategy in chosen.items() if strategy is absorb_joint and m not in ctx.joint_rows)
    if refitted:
        ctx.joint_rows = _rows_by_module(store, task, refitted)
    return [strategy(ctx, module, stacks.pop(module, None)) for module, strategy in chosen.items()]


def _write_shard(store: Store, ctx: Context, outcomes: list[Outcome], result: ShardResult) -> None:
    """The basis object (unless every module keeps the parent's) and the staged loadings: the new
    adapters' rows and the parent's, moved to the new bases."""
    task = ctx.task
    if not all(o.kept for o in outcomes):
        tensors = {}
        for o in outcomes:
            for side, dec in o.flat.items():
                tensors.update(basis_tensors(o.summary.module, side, dec, o.packed.get(side)))
        for o in outcomes:
            if o.joint is not None:
                tensors.update(joint_tensors(o.summary.module, *o.joint))
        result.file = store.write_object(task.version, basis_file(task.shard.name), encode_basis(tensors))
    found = _stored_adapters(store, ctx)
    moved_residuals: list[dict] = []
    streams: list = [
        _sorted_rows([o.rows for o in outcomes if o.rows is not None]),
        _sorted_rows([_bounded_joint(ctx, found, o, moved_residuals) for o in outcomes if o.moved is not None]),
    ]
    if task.parent:
        streams.append(_moved_parent_rows(store, ctx, outcomes, result, found, moved_residuals))
    where = store.version_location(task.version)
    write_tables(where, staging_file(task.shard.name), merge_sorted(streams, LOADINGS_KEYS), LOADINGS_SCHEMA)
    _write_residuals(store, ctx, outcomes, result, moved_residuals)
    result.unbounded = found.unbounded if found else 0


def _stored_adapters(store: Store, ctx: Context) -> StoredAdapters | None:
    """With an error bound, what keeping it needs of the parent's adapters that this shard moves
    to new bases (flow.bounded); None when there is no bound or nothing moves."""
    task = ctx.task
    if task.spec.max_error is None or not task.parent or task.mode not in ("absorb", "fit"):
        return None
    return stored_adapters(store, task.parent, list(task.shard.modules))


def _bounded_joint(ctx: Context, found: StoredAdapters | None, outcome: Outcome, residuals: list[dict]) -> pa.Table:
    """A joint re-base's moved rows, with errors and residuals that keep the bound (if any)."""
    if found is None:
        return outcome.moved
    module = outcome.summary.module
    q = ctx.task.parent.modules[module]["core_rank"]
    table, extra = bounded_joint(
        found, module, ctx.joint_rows[module], outcome.moved, ctx.parent_joint[module], outcome.joint[0], q, ctx.task
    )
    residuals += extra
    return table


def _write_residuals(
    store: Store, ctx: Context, outcomes: list[Outcome], result: ShardResult, moved: list[dict]
) -> None:
    """The shard's residuals, staged when there are any: the new adapters', those of the parent's
    adapters moved to new bases (`moved`), and the parent's of adapters this version keeps as they
    are (project: their rows do not move)."""
    task = ctx.task
    tables = [residual_table([r for o in outcomes for r in o.residuals] + moved)]
    if task.parent and task.parent.residuals and task.mode == "project":
        tables.append(_parent_residuals(store, task))
    table = pa.concat_tables(tables).sort_by([(k, "ascending") for k in LOADINGS_KEYS])
    result.residual_rows = table.num_rows
    if table.num_rows:
        where = store.version_location(task.version)
        write_tables(where, residual_staging_file(task.shard.name), [table], RESIDUALS_SCHEMA)


def _parent_residuals(store: Store, task: ShardTask) -> pa.Table:
    """The parent's residuals of the shard's modules, without the adapters the new version replaces."""
    modules = pa.array(task.shard.modules, pa.string())
    batches = without(read_batches(store.location, task.parent.residuals), set(task.parent.drop))
    tables = [pa.Table.from_batches([b.filter(pc.is_in(b.column("module"), value_set=modules))]) for b in batches]
    return pa.concat_tables(tables) if tables else RESIDUALS_SCHEMA.empty_table()


# -- reading ---------------------------------------------------------------------------------


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


def _moved_parent_rows(
    store: Store,
    ctx: Context,
    outcomes: list[Outcome],
    result: ShardResult,
    found: StoredAdapters | None = None,
    residuals: list[dict] | None = None,
) -> Iterator[pa.Table]:
    """The parent's rows on the new bases, their errors estimated (linalg.loadings.Move); as they
    are where every module keeps the parent's bases; none of the modules moved already (joint ones
    in a re-base). Quantize keeps their loadings on the packed bases: a row stays measured only
    where its rebuilt delta W did not move, and the moves are tallied in `result`. With an error
    bound (`found`), errors and `residuals` keep it (flow.bounded)."""
    task = ctx.task
    modules = [o.summary.module for o in outcomes if o.moved is None]
    if not modules:
        return
    if all(o.kept for o in outcomes):
        yield from (pa.Table.from_batches([b]) for b in _parent_batches(store, task, modules))
        return
    bases = {o.summary.module: o.flat for o in outcomes}
    moves: dict[str, Move] = {}
    for batch in _parent_batches(store, task, modules):
        if not moves and batch.num_rows:
            moves = _moves(ctx, bases, modules)
        tables = []
        for module, rows in _by_module(batch):
            norm, error = _column(rows, "norm"), _column(rows, "error")
            new_a, new_b, error, moved = moves[module](
                loadings_matrix(rows, "a"), loadings_matrix(rows, "b"), error, norm
            )
            if found is not None:
                old, new = (
                    (ctx.parents[module, "A"], ctx.parents[module, "B"]),
                    (bases[module]["A"], bases[module]["B"]),
                )
                error, extra = bounded_flat(found, module, rows, (new_a, new_b), old, new, ctx.task, error)
                residuals += extra
            measured = False
            if moves[module].keep:
                measured = rows.column("measured").to_numpy(zero_copy_only=False) & (moved == 0).numpy()
                result.added_sum += float(moved.sum())
                result.added_max = max(result.added_max, float(moved.max()))
                result.added_rows += len(moved)
            ids = rows.column("task_id").to_pylist()
            tables.append(loadings_rows(ids, module, new_a, new_b, error, norm, measured=measured))
        yield from _sorted_rows(tables)


def _moves(ctx: Context, bases: dict, modules: list[str]) -> dict[str, Move]:
    joint = [m for m in modules if (m, "A") not in ctx.parents or "A" not in bases[m]]
    if joint:
        # Moving stored rows needs flat bases on both sides; a joint module's rows are rebuilt and
        # refitted only by an incremental re-base.
        raise PipelineError(
            f"rebase --full from the store cannot move the stored rows of joint module {joint[0]!r} "
            f"({len(joint)} in this shard) to the new bases: run `rebase --full --from-source`, or compress again"
        )
    keep = ctx.task.mode == "quantize"  # bases rounded in place: the rows keep their loadings
    return {
        m: Move((ctx.parents[m, "A"], ctx.parents[m, "B"]), (bases[m]["A"], bases[m]["B"]), ctx.task.shapes[m], keep)
        for m in modules
    }


def _by_module(batch) -> Iterator[tuple[str, pa.Table]]:
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    for module in pc.unique(table.column("module")).to_pylist():
        yield module, table.filter(pc.equal(table.column("module"), module))


def _sorted_rows(tables: list[pa.Table]) -> Iterator[pa.Table]:
    if tables:
        yield pa.concat_tables(tables).sort_by([(k, "ascending") for k in LOADINGS_KEYS])


# -- the driver: every shard of a version, resumed where a crashed run finished them ------------


def compute_all(change, source, store, version, runner, options, seconds):
    """Every shard's results, in shard order. Adapters found holding NaN/Inf are quarantined and
    the shards recomputed without them, so no basis ever saw them."""
    started = time.perf_counter()
    change.groups = group_adapters(change, good_adapters(change.adapters), store, runner, options)
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
        nonfinite = {task_id: reason for r in results for task_id, reason in r.nonfinite.items()}
        if not nonfinite:
            break
        if options.strict:
            task_id, reason = next(iter(nonfinite.items()))
            raise PipelineError(f"--strict: adapter {task_id!r} quarantined: {reason}")
        for adapter in good:
            if adapter.task_id in nonfinite:
                adapter.quarantine(nonfinite[adapter.task_id])
                log.warning("quarantined %s: %s", printable(adapter.task_id), adapter.reason)
    seconds["compute"] = time.perf_counter() - started
    return results, good


def _compute_shards(change, good, source, store, version, runner, options) -> list[ShardResult]:
    shapes = module_shapes(change, good)
    rows = _row_counts(change, good, shapes)
    floats = floats_per_adapter(change, good, shapes, rows, options)
    held = {m: min(n, change.chunk or n) for m, n in rows.items()}  # the rows a task holds at once
    shards = version_shards(change, shapes, held, options, runner.num_cpus)
    memory = _shard_memory(shards, shapes, max(held.values(), default=0), len(good), options)
    spec = FitSpec(options.rule, options.route, options.quantize, options.method, floats, max_error=options.bound)
    parent = _parent(change, good)
    inputs = _digest(
        [
            change.operation,
            change.mode,
            change.parent,
            change.refit,
            change.chunk,
            dataclasses.asdict(options.rule),
            options.route,
            options.quantize,
            options.method,
            floats,
            options.bound,
            [(a.task_id, a.location.uri, a.weights_bytes, a.weights_tag) for a in good],
        ]
    )
    finished = store.finished_shards(version)
    # The adapters' own filesystem reads them: a manifest source lists folders on one filesystem
    # that is not the manifest's (discovery refuses a mix).
    reader = good[0].location if good else source

    def task(shard, fixed_k=None):
        # A shard holds one group's modules (plan): it reads that group's adapters.
        members = [a for a in good if shard.modules[0] in a.modules]
        new = [(a.task_id, a.weights_path, {m: a.modules[m] for m in shard.modules}) for a in members]
        key = _digest([inputs, shard.modules, fixed_k])
        fixed = dataclasses.replace(spec, fixed_k=fixed_k)
        # A group that gets no new adapter keeps its bases: an absorb of nothing is a projection.
        mode = "project" if change.mode == "absorb" and not new else change.mode
        return ShardTask(shard, mode, fixed, store.location, version, reader, new, shapes, parent, key, change.chunk)

    progress = Progress("compute", len(shards), "shards")
    results: list[ShardResult | None] = [None] * len(shards)

    def run(tasks: list[ShardTask]) -> None:
        _run_tasks(tasks, finished, results, runner, memory, progress)

    pending = list(shards)
    fixed_k = None
    if options.rule.needs_first_module and change.mode not in ("project", "quantize") and not floats:
        # vlora's rule: k comes from the first module's lora_A, so that shard runs first.
        run([task(shards[0])])
        if results[0].nonfinite:
            return [results[0]]
        fixed_k, pending = results[0].decided_k, shards[1:]
    run([task(s, fixed_k) for s in pending])
    progress.close()
    resumed = sum(r.resumed for r in results)
    if resumed:
        log.info("%d of %d shards taken from the unfinished run", resumed, len(results))
    return results


def _row_counts(change, good, shapes) -> dict[str, int]:
    """Rows each module's fit sees: its adapters read, and in a full re-base from the store the
    parent's adapters not read again (they join, rebuilt; counted whole for a grouped store's
    modules, a bound on memory)."""
    members = module_members(good)
    rebuilt = 0
    if change.refit:
        rebuilt = change.parent_manifest["adapters"]["ok"] - sum(
            change.parent_status.get(a.task_id) == "ok" for a in good
        )
    return {m: len(members.get(m, ())) + rebuilt for m in shapes}


def _shard_memory(shards, shapes, rows: int, adapters: int, options) -> int:
    """The memory declared to Ray per shard task (logged with the plan): the largest shard's
    stacks, never above the memory bound per task, so a single oversized module is still scheduled rather than
    left infeasible. Ray then packs no more shards on a node than fit."""
    widths = {m: a[0] * a[1] + b[0] * b[1] for m, (a, b) in shapes.items()}
    peak = largest_shard_bytes(shards, widths, max(rows, 1))
    log.info(
        "plan: %d adapters to read, %d modules in %d shards (largest needs ~%.0f MiB)",
        adapters,
        len(shapes),
        len(shards),
        peak / 2**20,
    )
    if peak > options.task_memory:
        log.warning(
            "one shard needs ~%.0f MiB, over the %.0f MiB task memory (--task-memory): use --chunk-size",
            peak / 2**20,
            options.task_memory / 2**20,
        )
    return min(peak, options.task_memory)


def _parent(change, good) -> Parent | None:
    """The parent version as the shard tasks read it; None where the new version does not grow
    from one."""
    if not change.parent_manifest:
        return None
    basis = {m: e["basis"] for m, e in change.parent_manifest["modules"].items()}
    residuals = version_path(change.parent, RESIDUALS)
    checksums = {path: change.parent_manifest["files"][path] for path in set(basis.values())}
    return Parent(
        basis,
        checksums,
        version_path(change.parent, LOADINGS),
        frozenset(a.task_id for a in good),
        change.refit,
        change.parent_manifest["modules"],
        residuals if residuals in change.parent_manifest["files"] else None,
    )


def _run_tasks(tasks: list[ShardTask], finished: dict, results: list, runner, memory: int, progress) -> None:
    """Run the tasks into `results` (by shard index); a crashed run's finished shard with the
    same key is taken as it is."""
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


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
