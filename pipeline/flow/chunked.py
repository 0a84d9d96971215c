"""compress --chunk-size: one shard task reads its adapters a chunk at a time (by task id), so it
holds one chunk of factors whatever the collection's size. The first chunk is fitted; each further
one is absorbed into the bases so far (flat: the exact incremental update; joint: a refit with the
earlier chunks' cores, which it moves). Then the earlier chunks are read once more and projected
on the final flat bases, as `project` would add them: their loadings are the best the final bases
allow and their errors (and residuals, under an error bound) are measured, not estimated. So each
chunk costs the same however many came before it, and every adapter is read twice at most.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import pyarrow as pa
import torch

from pipeline.flow.bounded import StoredAdapters, bounded_joint
from pipeline.flow.memory import release_freed_memory
from pipeline.flow.strategies import Context, Outcome, Parent, ShardResult, ShardTask, keep_parent
from pipeline.io.format import residual_factors, residual_table

Stacks = dict[str, list[torch.Tensor]]


def compute(
    ctx: Context,
    result: ShardResult,
    read: Callable[[ShardTask], Stacks],
    apply: Callable[[Context, Stacks], list[Outcome]],
) -> list[Outcome] | None:
    """The shard's outcomes, each holding the rows and residuals of every adapter on its final
    bases. `read(task)` reads a task's stacks, the parts of `reads(task)` in order (reporting rows
    with NaN or Inf in `result`: then every chunk is still read, so that all of them are reported
    at once, and None is returned); `apply(ctx, stacks)` runs the modules' strategies."""
    task = ctx.task
    ctx.adapters = len(task.new)  # a byte budget pays for every adapter's loadings, not a chunk's
    found = _adapters(task)  # what keeping a bound needs: residuals so far, ranks and dtypes
    parent = Parent({}, {}, "")  # the bases so far, as the absorb strategies read a parent's
    outcomes: list[Outcome] = []
    chunks = parts(task)
    for number, new in enumerate(chunks):
        part = dataclasses.replace(
            task,
            new=new,
            mode="absorb" if number else "fit",
            parent=parent if number else None,
            chunk=None,
        )
        clock = time.perf_counter()
        stacks = read(part)
        if result.nonfinite:
            continue
        read_seconds = time.perf_counter() - clock
        if outcomes:
            _carry(ctx, parent, outcomes)
        ctx.task, ctx.originals = part, {}
        ctx.rows = number == len(chunks) - 1  # the earlier chunks' rows are made on the final bases
        outcomes = apply(ctx, stacks)
        del stacks
        _carry_joint(ctx, found, outcomes)
        release_freed_memory()
        result.chunk_seconds.append(round(time.perf_counter() - clock, 3))
        result.seconds["read"] = result.seconds.get("read", 0.0) + read_seconds
    ctx.task = task
    if result.nonfinite:
        return None
    result.seconds["compute"] = sum(result.chunk_seconds) - result.seconds["read"] - ctx.align_seconds
    clock = time.perf_counter()
    final = _on_final_bases(ctx, result, found, outcomes, read)
    result.seconds["remeasure"] = time.perf_counter() - clock
    return final


def parts(task: ShardTask) -> list[list]:
    """The task's adapters, a chunk at a time."""
    return [task.new[begin : begin + task.chunk] for begin in range(0, len(task.new), task.chunk)]


def reads(task: ShardTask) -> list[list]:
    """The parts in the order `compute` reads them: every chunk, then all but the last once more."""
    chunks = parts(task)
    return chunks + chunks[:-1]


def _adapters(task: ShardTask) -> StoredAdapters:
    """The shard's adapters as flow.bounded reads a parent's: each one's dtype and its ranks."""
    found = StoredAdapters()
    for task_id, _, infos in task.new:
        for module, (a, _) in infos.items():
            found.ranks[task_id, module] = a.shape[0]
            found.catalog[task_id] = {"dtype": a.dtype}
    return found


def _carry(ctx: Context, parent: Parent, outcomes: list[Outcome]) -> None:
    """The bases the last chunk left, as the next chunk's parent."""
    ctx.parents = {(o.summary.module, side): dec for o in outcomes for side, dec in o.flat.items()}
    ctx.parent_joint = {o.summary.module: o.joint[0] for o in outcomes if o.joint is not None}
    parent.modules = {o.summary.module: {"core_rank": o.summary.core_rank, "count": o.summary.count} for o in outcomes}


def _carry_joint(ctx: Context, found: StoredAdapters, outcomes: list[Outcome]) -> None:
    """A joint module's rows so far, refitted by this chunk, carried on with their bound kept."""
    for o in outcomes:
        if o.joint is None:
            continue
        module = o.summary.module
        rows, residuals = o.rows, o.residuals
        if o.moved is not None:
            moved, kept = o.moved, []
            if ctx.task.spec.max_error is not None:
                q = ctx.task.parent.modules[module]["core_rank"]
                old = ctx.parent_joint[module]
                moved, kept = bounded_joint(
                    found, module, ctx.joint_rows[module], o.moved, old, o.joint[0], q, ctx.task
                )
            rows, residuals = pa.concat_tables([moved, rows]), kept + residuals
        ctx.joint_rows[module] = rows
        found.residuals = {key: r for key, r in found.residuals.items() if key[1] != module}
        found.residuals.update(_by_key(residuals))


def _on_final_bases(
    ctx: Context, result: ShardResult, found: StoredAdapters, outcomes: list[Outcome], read
) -> list[Outcome] | None:
    """The last chunk's outcomes with every chunk's rows and residuals on the final bases: the
    earlier chunks' flat rows projected there from their factors, read again; joint rows as the
    last refit left them."""
    task = ctx.task
    flat = [o for o in outcomes if o.joint is None]
    tables = {o.summary.module: [] for o in flat}
    residuals = {o.summary.module: [] for o in flat}
    ctx.parents = {(o.summary.module, side): dec for o in flat for side, dec in o.flat.items()}
    for new in parts(task)[:-1] if flat else []:  # a shard of joint modules only reads nothing again
        stacks = read(dataclasses.replace(task, new=new))
        if result.nonfinite:  # changed since its first read: the driver quarantines the rows
            return None
        ctx.task, ctx.originals = dataclasses.replace(task, new=new, mode="project", chunk=None), {}
        for module in tables:
            projected = keep_parent(ctx, module, stacks.pop(module))
            tables[module].append(projected.rows)
            residuals[module] += projected.residuals
        del stacks
        release_freed_memory()
    ctx.task = task
    final = []
    for o in outcomes:
        module = o.summary.module
        if o.joint is None:
            rows = pa.concat_tables([*tables[module], o.rows])
            kept = residuals[module] + o.residuals
        else:
            rows, shapes = ctx.joint_rows[module], task.shapes[module]
            kept = [
                {**r, **dict(zip("ab", residual_factors(r, *shapes)))}
                for (_, m), r in found.residuals.items()
                if m == module
            ]
        final.append(dataclasses.replace(o, rows=rows, moved=None, residuals=kept))
    return final


def _by_key(residuals: list[dict]) -> dict[tuple[str, str], dict]:
    """Residual rows as flow.bounded reads a parent's (format.residual_table's row form)."""
    return {(r["task_id"], r["module"]): r for r in residual_table(residuals).to_pylist()}
