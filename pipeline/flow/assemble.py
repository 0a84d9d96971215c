"""Assemble: merge what the shards staged into the version's loadings and catalog tables (sorted
streams, storage to storage), write the report, and build the manifest that publishing writes.

The driver holds small things only: one summary per shard, and a few floats per adapter for the
error summary.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Options
from pipeline.flow.change import Change, Summary
from pipeline.flow.scan import ScannedAdapter
from pipeline.io.format import (
    CATALOG,
    CATALOG_SCHEMA,
    FORMAT_VERSION,
    GROUPS,
    LOADINGS,
    LOADINGS_KEYS,
    LOADINGS_ROW_GROUP,
    LOADINGS_SCHEMA,
    REPORT,
    RESIDUALS,
    RESIDUALS_SCHEMA,
    basis_file,
    build_manifest,
    encode_basis,
    groups_tensors,
    module_entry,
    residual_staging_file,
    staging_file,
    version_path,
    write_parameters,
)
from pipeline.io.location import redact
from pipeline.io.tables import merge_sorted, read_batches, without, write_tables
from pipeline.linalg.metrics import error_summary

log = logging.getLogger(__name__)


class _ErrorTally:
    """Per-adapter mean and max of the module errors, from the merged loadings stream (all rows of
    an adapter arrive in one table)."""

    def __init__(self, watch: set[str]):
        self.means: list[np.ndarray] = []
        self.maxes: list[np.ndarray] = []
        self.watch, self.watched = watch, {}

    def tap(self, tables):
        for table in tables:
            grouped = table.group_by("task_id").aggregate([("error", "mean"), ("error", "max")])
            ids = grouped.column("task_id").to_pylist()
            means, maxes = grouped.column("error_mean").to_numpy(), grouped.column("error_max").to_numpy()
            self.means.append(means)
            self.maxes.append(maxes)
            for task_id, mean, worst in zip(ids, means.tolist(), maxes.tolist()):
                if task_id in self.watch:
                    self.watched[task_id] = (mean, worst)
            yield table

    def summary(self) -> dict[str, float]:
        means, maxes = np.concatenate(self.means or [np.zeros(0)]), np.concatenate(self.maxes or [np.zeros(0)])
        return error_summary(means, maxes)


class _CatalogTally:
    def __init__(self):
        self.ok = self.quarantined = self.in_basis = self.original_bytes = 0

    def tap(self, tables):
        for table in tables:
            ok = table.filter(pc.equal(table.column("status"), "ok"))
            self.ok += ok.num_rows
            self.quarantined += table.num_rows - ok.num_rows
            self.in_basis += int(pc.sum(ok.column("in_basis")).as_py() or 0)
            configs = pc.sum(pc.binary_length(pc.fill_null(ok.column("config_json"), ""))).as_py() or 0
            self.original_bytes += int(pc.sum(ok.column("weights_bytes")).as_py() or 0) + configs
            yield table


def assemble(change, good, results, source, store, version, options, seconds) -> tuple[dict, Summary]:
    """Merge what the shards staged into the version's loadings and catalog, write its report;
    returns its manifest, to publish, and the summary (seconds and notes filled in on publishing)."""
    files = {version_path(version, basis_file(r.shard.name)): r.file.to_dict() for r in results if r.file}
    errors = _ErrorTally({a.task_id for a in good})
    files[version_path(version, LOADINGS)] = _write_loadings(store, version, results, errors)
    residuals = _ResidualTally({a.task_id for a in good})
    entry = _write_residuals(store, version, results, residuals, files)
    # A replacement that was quarantined does not push out an earlier upload that compressed fine.
    kept_previous = {
        a.task_id: a.reason for a in change.adapters if not a.ok and change.parent_status.get(a.task_id) == "ok"
    }
    catalog = _CatalogTally()
    files[version_path(version, CATALOG)] = _write_catalog(store, version, change, kept_previous, catalog)
    modules = _module_entries(change, results, version)
    if not all(r.file for r in results):  # shared with the parent: listed so prune keeps them
        for path in {e["basis"] for e in modules.values()} - set(files):
            files[path] = change.parent_manifest["files"][path]

    error = errors.summary()
    watched = np.array(list(errors.watched.values())).reshape(-1, 2)
    read_error = error_summary(watched[:, 0], watched[:, 1])
    read_errors = (
        {} if change.operation == "compress" else {t: round(e[0], 6) for t, e in sorted(errors.watched.items())}
    )
    flagged = _flag(read_errors, change, options, residuals.read)
    quarantined = {a.task_id: a.reason for a in change.adapters if not a.ok}
    summary = Summary(
        change.operation,
        version,
        change.parent,
        str(store),
        catalog.ok,
        catalog.quarantined,
        quarantined,
        kept_previous,
        len(modules),
        len(results),
        error,
        read_error,
        read_errors,
        flagged,
        change.counts,
        {},
        residuals=dict(sorted(residuals.read.items())),
        residuals_stored=residuals.stored(entry),
    )
    summary.notes += _bound_notes(results, options)
    report = _report(summary, change, catalog, seconds, results)
    files[version_path(version, REPORT)] = store.write_object(
        version, REPORT, json.dumps(report, indent=1).encode()
    ).to_dict()
    quantization = _quantization(change, options, results)
    manifest = _manifest(change, good, source, version, options, catalog, error, modules, files, quantization)
    if change.groups is not None:
        manifest["groups"] = _write_groups(store, version, change.groups, manifest["files"])
    if summary.residuals_stored:
        manifest = {**manifest, "format_version": FORMAT_VERSION, "residuals": summary.residuals_stored}
    return manifest, summary


def _report(summary: Summary, change: Change, catalog: _CatalogTally, seconds: dict, results) -> dict:
    return {
        "version": summary.version,
        "operation": summary.operation,
        "adapters": {"ok": catalog.ok, "quarantined": catalog.quarantined, "in_basis": catalog.in_basis},
        "changes": change.counts,
        "quarantined": summary.quarantined,
        "kept_previous": summary.kept_previous,
        "warnings": {a.task_id: a.warnings for a in change.adapters if a.warnings},
        "error": summary.error,
        "read_error": summary.read_error,
        "read_errors": summary.read_errors,
        "flagged": summary.flagged,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "shards": [_shard_report(r) for r in results],
    }


def _write_loadings(store, version: str, results, errors: _ErrorTally) -> dict:
    """The shards' staged rows merged into the version's loadings table (errors tallied on the way)."""
    where = store.version_location(version)
    staged = [read_batches(where, staging_file(r.shard.name)) for r in results]
    merged = errors.tap(merge_sorted(staged, LOADINGS_KEYS))
    return write_tables(where, LOADINGS, merged, LOADINGS_SCHEMA, LOADINGS_ROW_GROUP).to_dict()


class _ResidualTally:
    """Adapters and modules with residuals, from the merged residuals stream; `read`: the adapters
    whose files this run read, with their largest module error without a residual."""

    def __init__(self, watch: set[str]):
        self.watch, self.read = watch, {}
        self.adapters: set[str] = set()
        self.modules = 0

    def tap(self, tables):
        for table in tables:
            self.modules += table.num_rows
            for task_id, shared in zip(table.column("task_id").to_pylist(), table.column("shared_error").to_pylist()):
                self.adapters.add(task_id)
                if task_id in self.watch:
                    self.read[task_id] = round(max(self.read.get(task_id, 0.0), shared), 6)
            yield table

    def stored(self, entry: dict | None) -> dict[str, int]:
        if entry is None:
            return {}
        return {"adapters": len(self.adapters), "modules": self.modules, "bytes": entry["bytes"]}


def _write_residuals(store, version: str, results, tally: _ResidualTally, files: dict) -> dict | None:
    """The shards' staged residuals merged into the version's residuals table, added to `files`;
    None (no object) when no adapter has one."""
    staged = [r for r in results if r.residual_rows]
    if not staged:
        return None
    where = store.version_location(version)
    merged = tally.tap(
        merge_sorted([read_batches(where, residual_staging_file(r.shard.name)) for r in staged], LOADINGS_KEYS)
    )
    entry = files[version_path(version, RESIDUALS)] = write_tables(where, RESIDUALS, merged, RESIDUALS_SCHEMA).to_dict()
    return entry


def _bound_notes(results, options: Options) -> list[str]:
    """Stored adapters a re-base could not bring within the bound (given to a store made without it)."""
    unbounded = sum(r.unbounded for r in results)
    if not unbounded:
        return []
    return [
        f"{unbounded} stored adapter module(s) were above --max-error {options.bound:g} already and cannot be "
        "brought within it without their files: `rebase --full --from-source` reads them"
    ]


def _write_catalog(store, version: str, change: Change, kept_previous: dict, catalog: _CatalogTally) -> dict:
    """Catalog: the scanned adapters' rows and the parent's, except those this run replaces."""
    where = store.version_location(version)
    scanned = [a for a in change.adapters if a.task_id not in kept_previous]
    streams = [[catalog_table(scanned, change.mode != "project")]]
    if change.catalog:
        streams.append(
            [pa.Table.from_pylist(sorted(change.catalog, key=lambda r: r["task_id"]), schema=CATALOG_SCHEMA)]
        )
    if change.parent_manifest:
        parent_where = store.version_location(change.parent)
        rows = without(_conformed(read_batches(parent_where, CATALOG), CATALOG_SCHEMA), {a.task_id for a in scanned})
        streams.append(_all_in_basis(rows) if change.refit else rows)
    return write_tables(where, CATALOG, catalog.tap(merge_sorted(streams, ["task_id"])), CATALOG_SCHEMA).to_dict()


def _write_groups(store, version: str, groups, files: dict) -> dict:
    """The groups object (each group's sketch sum and members) and the manifest's `groups`."""
    path = version_path(version, GROUPS)
    files[path] = store.write_object(
        version, GROUPS, encode_basis(groups_tensors(groups.sums, groups.counts))
    ).to_dict()
    return {"count": groups.count, "sketches": path}


def _module_entries(change: Change, results, version: str) -> dict[str, dict]:
    """Each module's manifest entry; a shard that wrote no basis object keeps the parent's."""
    modules = {}
    for r in results:
        for m in r.modules:
            basis = (
                version_path(version, basis_file(r.shard.name))
                if r.file
                else change.parent_manifest["modules"][m.module]["basis"]
            )
            modules[m.module] = module_entry(
                basis,
                m.a_shape,
                m.b_shape,
                m.k_a,
                m.k_b,
                m.explained_a,
                m.explained_b,
                m.route,
                m.count,
                method=m.method,
                **({"width": m.width, "core_rank": m.core_rank} if m.method == "joint" else {}),
                **({"budget": m.budget} if m.budget is not None else {}),
            )
    return modules


def _shard_report(r) -> dict:
    return {
        "name": r.shard.name,
        "modules": len(r.shard.modules),
        "bytes_read": r.bytes_read,
        "requests": r.requests,
        "stack_bytes": r.stack_bytes,
        "resumed": r.resumed,
        **({"device": r.device} if r.device else {}),
        "seconds": {k: round(v, 3) for k, v in r.seconds.items()},
        **({"chunk_seconds": r.chunk_seconds} if r.chunk_seconds else {}),
    }


def _quantization(change: Change, options: Options, results) -> dict | None:
    """How the bases are packed: as the parent recorded it (project); with the measured move of
    every row's rebuilt delta W (quantize: mean over adapters of their mean over modules, max over
    both; every adapter has a row per module); or, with bases fitted to what is stored, the scheme
    alone (the errors recorded are those of the packed bases)."""
    if change.mode == "project":
        return change.parent_manifest.get("quantization")
    if change.mode == "quantize":
        rows = sum(r.added_rows for r in results)
        if not rows:
            return {"scheme": options.quantize, "added_error": {}}
        added = {"mean": sum(r.added_sum for r in results) / rows, "max": max(r.added_max for r in results)}
        return {"scheme": options.quantize, "added_error": added}
    return {"scheme": options.quantize, "added_error": None} if options.quantize else None


def _manifest(change, good, source, version, options, catalog, error, modules, files, quantization) -> dict:
    base_model, dtype = _collection(change, good)
    return build_manifest(
        version,
        change.parent,
        change.operation,
        source=redact(source.uri) if source else (change.parent_manifest or {}).get("source"),
        parameters=write_parameters(options),
        adapters={"ok": catalog.ok, "quarantined": catalog.quarantined, "in_basis": catalog.in_basis},
        original_bytes=catalog.original_bytes,
        base_model=base_model,
        dtype=dtype,
        error=error,
        quantization=quantization,
        modules=modules,
        files=files,
    )


def _collection(change: Change, good) -> tuple[str | None, str | None]:
    """The collection's base model and dtype: its first adapter read's; without one, the
    parent's, or the catalog rows given (vlora-import)."""
    if good:
        return good[0].base_model, good[0].dtype
    first = change.catalog[0] if change.catalog else change.parent_manifest
    return first.get("base_model"), first.get("dtype")


def _conformed(batches, schema: pa.Schema):
    """An older catalog's batches with the columns added since (nullable) as nulls."""
    for batch in batches:
        for name in schema.names:
            if batch.schema.get_field_index(name) < 0:
                batch = batch.append_column(schema.field(name), pa.nulls(batch.num_rows, schema.field(name).type))
        yield batch


def _all_in_basis(batches):
    """A full re-base fits the parent's adapters too: every ok row is now in the basis."""
    for batch in batches:
        index = batch.schema.get_field_index("in_basis")
        yield batch.set_column(index, "in_basis", pc.equal(batch.column("status"), "ok"))


def _flag(read_errors: dict[str, float], change: Change, options: Options, shared: dict) -> dict[str, float]:
    """New adapters the basis represents badly. With an error bound, those with a module above it
    before any residual (their largest such error: `shared`, the adapters given residuals); without
    one, those more than twice the parent collection's 95th percentile. Only meaningful when the
    basis did not see them."""
    if change.mode != "project":
        return {}
    if options.bound is not None:
        return {t: e for t, e in sorted(shared.items()) if e > options.bound}
    p95 = (change.parent_manifest.get("error") or {}).get("p95")
    if p95 is None:
        return {}
    limit = 2 * p95
    return {t: round(e, 6) for t, e in sorted(read_errors.items()) if e > limit}


def catalog_table(adapters: list[ScannedAdapter], in_basis: bool) -> pa.Table:
    rows = sorted(adapters, key=lambda a: a.task_id)
    config = [a.config or {} for a in rows]
    return pa.table(
        {
            "task_id": [a.task_id for a in rows],
            "uri": [redact(a.location.uri) for a in rows],
            "status": [a.status for a in rows],
            "reason": [a.reason for a in rows],
            "warnings": [a.warnings for a in rows],
            "weights_bytes": [a.weights_bytes for a in rows],
            "weights_tag": [a.weights_tag for a in rows],
            "rank": [a.rank for a in rows],
            "lora_alpha": [c.get("lora_alpha") for c in config],
            "use_rslora": [bool(c.get("use_rslora")) for c in config],
            "base_model": [a.base_model for a in rows],
            "dtype": [a.dtype for a in rows],
            "config_json": [a.config_text for a in rows],
            "in_basis": [in_basis and a.ok for a in rows],
            "weights_sha256": [a.weights_sha256 for a in rows],
        },
        schema=CATALOG_SCHEMA,
    )
