"""The error bound for stored adapters that a re-base moves to new bases without reading their
files (incremental, or full from the store).

Their original delta W is not at hand, but what export wrote of them before is: W_old (the old
shared factors as exported, with the old residual) and its error e_old, a bound on
||dW - W_old|| / ||dW||. What export writes now, W_new (+ a residual R), is within
e_old + ||W_old - W_new - R|| / ||dW|| (triangle inequality). Where the shared part alone keeps
that within the bound, the row has no residual (an old one is dropped); otherwise R is the
smallest residual that brings W_new back towards W_old, or W_old itself (kind exact: an exact
residual keeps the original factors). The error recorded is that bound (measured = false).
Rows whose stored error is already above the bound (a bound given to a store compressed without
one) cannot be brought within it without their files: they are counted, and keep their rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import peft_format
from pipeline.io.format import CATALOG, residual_factors
from pipeline.io.safetensors_ranges import DTYPES
from pipeline.io.store import Store
from pipeline.io.tables import read_batches, without
from pipeline.linalg.decompose import Decomposition, reconstruct
from pipeline.linalg.gauge import JointBasis, cut_rank, joint_rebuild
from pipeline.linalg.residual import product_norm, smallest_residual, target, with_residual

# (loadings a, loadings b) of one row -> the factors export writes at (rank, dtype), float64
Exporter = Callable[[torch.Tensor, torch.Tensor, int, torch.dtype], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StoredAdapters:
    """What the shard needs of the parent's adapters to keep the bound: their residuals (of the
    shard's modules), and each one's dtype and own catalog row (for its ranks)."""

    residuals: dict[tuple[str, str], dict] = field(default_factory=dict)
    catalog: dict[str, dict] = field(default_factory=dict)
    unbounded: int = 0  # rows above the bound that could not be brought within it
    ranks: dict[tuple[str, str], int] = field(default_factory=dict)  # (task id, module) -> rank, where known

    def rank(self, task_id: str, module: str, collection_rank: int) -> int:
        if (task_id, module) in self.ranks:
            return min(self.ranks[task_id, module], collection_rank)
        row = self.catalog[task_id]
        config = json.loads(row["config_json"]) if row["config_json"] else {}
        if "r" in config:
            return min(peft_format.module_rank(config, module), collection_rank)
        return min(row["rank"] or collection_rank, collection_rank)


def stored_adapters(store: Store, parent, modules: list[str]) -> StoredAdapters:
    """The parent's residuals of `modules` and its catalog rows, without the adapters replaced."""
    found = StoredAdapters()
    if parent.residuals:
        wanted = pa.array(modules, pa.string())
        for batch in without(read_batches(store.location, parent.residuals), set(parent.drop)):
            for row in batch.filter(pc.is_in(batch.column("module"), value_set=wanted)).to_pylist():
                found.residuals[row["task_id"], row["module"]] = row
    catalog = f"{parent.loadings.rsplit('/', 1)[0]}/{CATALOG}"  # the parent version's catalog
    columns = ["task_id", "status", "rank", "dtype", "config_json"]
    for batch in read_batches(store.location, catalog, columns):
        for row in batch.to_pylist():
            if row["status"] == "ok":
                found.catalog[row["task_id"]] = row
    return found


def flat_exporter(a: Decomposition, b: Decomposition, shapes) -> Exporter:
    """What export writes of a flat module's row: rebuilt, cut to the adapter's rank, cast."""

    def exported(la, lb, rank, dtype):
        fa = reconstruct(la[None], a.components, a.mean).view(1, *shapes[0])
        fb = reconstruct(lb[None], b.components, b.mean).view(1, *shapes[1])
        if rank < shapes[0][0]:
            fa, fb = cut_rank(fa, fb, rank)
        return fa[0].to(dtype).double(), fb[0].to(dtype).double()

    return exported


def joint_exporter(basis: JointBasis, q: int, c: int) -> Exporter:
    """What export writes of a joint module's row: its core cut to the adapter's rank, cast."""

    def exported(la, lb, rank, dtype):
        fa, fb = joint_rebuild(basis, la.view(1, q, c)[:, :rank], lb.view(1, c, q)[:, :, :rank], rank)
        return fa[0].to(dtype).double(), fb[0].to(dtype).double()

    return exported


def keep_bound(
    found: StoredAdapters,
    module: str,
    rows: pa.Table,
    moved: tuple[torch.Tensor, torch.Tensor],
    exporters: tuple[Exporter, Exporter],
    bound: float,
    shapes,
    estimate: torch.Tensor,
) -> tuple[torch.Tensor, list[dict]]:
    """(errors, residuals) of the parent's rows of one module moved to new loadings `moved`:
    each error the triangle bound, and a residual where the shared part alone misses `bound`.
    A row above the bound already keeps what export wrote of it (its residual, as exact), or
    without a residual gets the move's `estimate`."""
    goal = target(bound)
    old = _matrix(rows, "a"), _matrix(rows, "b")
    errors = torch.tensor(rows.column("error").to_numpy().astype("float64"))
    norms = rows.column("norm").to_numpy().astype("float64")
    kept = []
    for i, task_id in enumerate(rows.column("task_id").to_pylist()):
        rank, dtype = found.rank(task_id, module, shapes[0][0]), DTYPES[found.catalog[task_id]["dtype"]]
        before = exporters[0](old[0][i], old[1][i], rank, dtype)
        residual = found.residuals.get((task_id, module))
        if residual is not None:
            factors = residual_factors(residual, *shapes)
            before = with_residual(before, residual["kind"], *(f.double() for f in factors))
        if errors[i] > goal:
            found.unbounded += 1
            if residual is None:
                errors[i] = float(estimate[i])
            else:
                kept.append(_row(task_id, module, "exact", before, residual["shared_error"]))
            continue
        after = exporters[1](moved[0][i], moved[1][i], rank, dtype)
        norm = max(float(norms[i]), 1e-300)
        shift = product_norm(torch.cat([before[1], -after[1]], dim=1), torch.cat([before[0], after[0]])) / norm
        if errors[i] + shift <= goal:
            errors[i] += shift
            continue
        budget = (goal - float(errors[i])) * norm
        kind, ra, rb, diff = smallest_residual(before, after, before[0].shape[0], dtype, budget)
        kept.append(_row(task_id, module, kind, (ra, rb), float(errors[i]) + shift))
        errors[i] += diff / norm
    return errors, kept


def bounded_flat(found, module, rows, moved, old, new, task, estimate) -> tuple[torch.Tensor, list[dict]]:
    """keep_bound for a flat module's rows moved from the bases `old` to `new` ((A, B) each)."""
    shapes = task.shapes[module]
    exporters = flat_exporter(*old, shapes), flat_exporter(*new, shapes)
    return keep_bound(found, module, rows, moved, exporters, task.spec.max_error, shapes, estimate)


def bounded_joint(found, module, rows, moved: pa.Table, old: JointBasis, new: JointBasis, q: int, task):
    """(moved rows with errors that keep the bound, residuals) for a joint module's rows refitted
    from the bases `old` to `new` (`rows`: as they were; `moved`: as refitted, errors estimated)."""
    c = old.u.shape[1]
    cores = (_matrix(moved, "a"), _matrix(moved, "b"))
    estimate = torch.tensor(moved.column("error").to_numpy().astype("float64"))
    exporters = joint_exporter(old, q, c), joint_exporter(new, q, c)
    error, residuals = keep_bound(
        found, module, rows, cores, exporters, task.spec.max_error, task.shapes[module], estimate
    )
    index = moved.schema.get_field_index("error")
    return moved.set_column(index, "error", pa.array(error.numpy().astype("float32"))), residuals


def _row(task_id: str, module: str, kind: str, factors, shared_error: float) -> dict:
    """A residuals row (format.residual_table) of factors (a, b)."""
    a, b = factors
    return {
        "task_id": task_id,
        "module": module,
        "kind": kind,
        "a": a.float(),
        "b": b.float(),
        "shared_error": shared_error,
    }


def _matrix(rows: pa.Table, column: str) -> torch.Tensor:
    values = rows.column(column).combine_chunks()
    width = len(values[0]) if len(values) else 0
    return torch.from_numpy(values.flatten().to_numpy().astype("float32").reshape(len(values), width))
