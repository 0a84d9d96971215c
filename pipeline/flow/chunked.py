"""compress --chunk-size: one shard task reads its adapters a chunk at a time (by task id), so it
holds one chunk of factors whatever the collection's size. The first chunk is fitted; each further
one is absorbed into the bases so far (flat: the exact incremental update; joint: a refit with the
earlier chunks' cores, which it moves). A chunk's rows are made on the bases of its own step and
moved once, at the end, straight to the final ones (linalg.loadings.Move; under an error bound,
flow.bounded keeps it from what they rebuilt at their step). So every row is moved and written
once, and a chunk costs the same however many came before it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import torch

from pipeline.flow.bounded import StoredAdapters, bounded_flat, bounded_joint
from pipeline.flow.memory import release_freed_memory
from pipeline.flow.strategies import Context, Outcome, Parent, ShardResult, ShardTask, _column
from pipeline.io.format import loadings_matrix, loadings_rows, residual_factors, residual_table
from pipeline.linalg.decompose import Decomposition
from pipeline.linalg.loadings import Move

Stacks = dict[str, list[torch.Tensor]]


@dataclass
class Step:
    """One chunk's rows of the flat modules and the bases they were made on."""

    bases: dict[str, tuple[Decomposition, Decomposition]]
    rows: dict[str, pa.Table]


def compute(
    ctx: Context,
    result: ShardResult,
    read: Callable[[ShardTask], Stacks],
    apply: Callable[[Context, Stacks], list[Outcome]],
) -> list[Outcome] | None:
    """The shard's outcomes, each holding the rows and residuals of every adapter on its final
    bases. `read(task)` reads a task's stacks (reporting rows with NaN or Inf in `result`: then
    every chunk is still read, so that all of them are reported at once, and None is returned);
    `apply(ctx, stacks)` runs the modules' strategies."""
    task = ctx.task
    ctx.adapters = len(task.new)  # a byte budget pays for every adapter's loadings, not a chunk's
    found = _adapters(task)  # what keeping a bound needs: residuals so far, ranks and dtypes
    parent = Parent({}, {}, "")  # the bases so far, as the absorb strategies read a parent's
    steps: list[Step] = []
    outcomes: list[Outcome] = []
    for number, new in enumerate(parts(task)):
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
        outcomes = apply(ctx, stacks)
        del stacks
        steps.append(_step(ctx, found, outcomes))
        release_freed_memory()
        result.chunk_seconds.append(round(time.perf_counter() - clock, 3))
        result.seconds["read"] = result.seconds.get("read", 0.0) + read_seconds
    ctx.task = task
    if result.nonfinite:
        return None
    clock = time.perf_counter()
    final = _moved(ctx, found, steps, outcomes)
    result.seconds["move"] = time.perf_counter() - clock
    result.seconds["compute"] = sum(result.chunk_seconds) - result.seconds["read"] - ctx.align_seconds
    return final


def parts(task: ShardTask) -> list[list]:
    """The task's adapters, a chunk at a time, in the order they are read."""
    return [task.new[begin : begin + task.chunk] for begin in range(0, len(task.new), task.chunk)]


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


def _step(ctx: Context, found: StoredAdapters, outcomes: list[Outcome]) -> Step:
    """Book one chunk's outcomes: its flat rows stay on this step's bases (moved at the end); a
    joint module's rows so far, refitted by this step, are carried on with their bound kept."""
    step = Step({}, {})
    for o in outcomes:
        module = o.summary.module
        if o.joint is None:
            step.bases[module] = (o.flat["A"], o.flat["B"])
            step.rows[module] = o.rows
            found.residuals.update(_by_key(o.residuals))
            continue
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
    return step


def _moved(ctx: Context, found: StoredAdapters, steps: list[Step], outcomes: list[Outcome]) -> list[Outcome]:
    """The last step's outcomes with every chunk's rows and residuals on the final bases."""
    final = []
    for o in outcomes:
        module = o.summary.module
        if o.joint is not None:
            rows = ctx.joint_rows[module]
            shapes = ctx.task.shapes[module]
            residuals = [
                {**r, **dict(zip("ab", residual_factors(r, *shapes)))}
                for (_, m), r in found.residuals.items()
                if m == module
            ]
        else:
            tables, residuals = [steps[-1].rows[module]], list(o.residuals)
            new = steps[-1].bases[module]
            for step in steps[:-1]:
                table, extra = _move_flat(ctx, found, module, step.rows[module], step.bases[module], new)
                tables.append(table)
                residuals += extra
            rows = pa.concat_tables(tables)  # sorted as the shard's rows are written
        final.append(dataclasses.replace(o, rows=rows, moved=None, residuals=residuals))
    return final


def _move_flat(ctx: Context, found: StoredAdapters, module: str, rows: pa.Table, old, new) -> tuple:
    """One step's rows of a flat module moved from its bases `old` to the final `new`, with their
    errors estimated, or bounded (and residuals) under an error bound."""
    task = ctx.task
    norm, error = _column(rows, "norm"), _column(rows, "error")
    new_a, new_b, error, _ = Move(old, new, task.shapes[module])(
        loadings_matrix(rows, "a"), loadings_matrix(rows, "b"), error, norm
    )
    residuals = []
    if task.spec.max_error is not None:
        error, residuals = bounded_flat(found, module, rows, (new_a, new_b), old, new, task, error)
    ids = rows.column("task_id").to_pylist()
    return loadings_rows(ids, module, new_a, new_b, error, norm, measured=False), residuals


def _by_key(residuals: list[dict]) -> dict[tuple[str, str], dict]:
    """Residual rows as flow.bounded reads a parent's (format.residual_table's row form)."""
    return {(r["task_id"], r["module"]): r for r in residual_table(residuals).to_pylist()}
