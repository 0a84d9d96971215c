"""Writing one new store version: compute every shard, merge what the shards staged into the
version's tables, write the report and manifest, publish. Compress, project and rebase differ
only in the Change they describe.

The driver holds small things only: scan records of the adapters being read, one summary per
shard, and a few floats per adapter for the error summary. Loadings and catalog rows stream from
storage to storage in batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import failpoints
from pipeline.config import ComponentRule
from pipeline.errors import PipelineError
from pipeline.io.format import (
    CATALOG,
    CATALOG_SCHEMA,
    LOADINGS,
    LOADINGS_KEYS,
    LOADINGS_ROW_GROUP,
    LOADINGS_SCHEMA,
    REPORT,
    basis_file,
    build_manifest,
    module_entry,
    rule_parameters,
    staging_file,
    version_path,
)
from pipeline.io.location import Location, printable, redact
from pipeline.io.lock import LockLost, WriterLock
from pipeline.io.store import Store
from pipeline.io.tables import merge_sorted, read_batches, without, write_tables
from pipeline.linalg.budget import FLOAT_BYTES, candidates, fits
from pipeline.progress import Progress
from pipeline.runners import Runner
from pipeline.stages.compute import Mode, Parent, ShardResult, ShardTask, compute_shard
from pipeline.stages.plan import Shard, largest_shard_bytes, plan_shards
from pipeline.stages.scan import ScannedAdapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    rule: ComponentRule = ComponentRule()
    memory_budget: int = 1 << 30  # bytes of stacked factors per shard task
    strict: bool = False
    route: str = "auto"
    max_error: float | None = None  # flag new adapters above this delta-W error
    quantize: str | None = None  # int8 | nf4: bases stored packed (linalg.quantize)
    # flat (vlora's) | aligned (one gauge first) | joint (shared U, V) | auto: flat, or with a budget the better
    method: str = "auto"
    ratio: float | None = (
        None  # byte budget: bases and loadings (float32 values) at most the adapters' tensor bytes / ratio
    )
    budget_bytes: int | None = None  # byte budget given as bytes (turned into a ratio of the collection's)


@dataclass
class Change:
    """What a new version is made of. `adapters`: freshly scanned ones (ok ones are read from
    their files); the parent's rows are kept except for those the adapters replace."""

    operation: str  # compress | project | rebase | rebase-full
    mode: Mode
    adapters: list[ScannedAdapter]
    parent: str | None = None  # the version current when the work began
    parent_manifest: dict | None = None  # set when the new version grows from the parent's data
    parent_status: dict[str, str] = field(default_factory=dict)  # task id -> status in the parent's catalog
    refit: bool = False  # fit mode over the parent's rebuilt rows too (rebase --full from the store)
    counts: dict[str, int] = field(default_factory=dict)  # discovery figures for the summary
    scan_seconds: float = 0.0


@dataclass
class Summary:
    operation: str
    version: str
    parent: str | None
    store: str
    adapters_ok: int
    adapters_quarantined: int
    quarantined: dict[str, str]  # found in this run
    kept_previous: dict[str, str]  # replacements rejected: the earlier upload stays
    modules: int
    shards: int
    error: dict[str, float]
    read_error: dict[str, float]  # summary over the adapters whose files this run read
    read_errors: dict[str, float]  # each of them (mean over modules); not for compress
    flagged: dict[str, float]
    changes: dict[str, int]
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)  # what the user asked for and did not get, and why

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def write_version(
    change: Change, source: Location | None, store: Store, runner: Runner, options: Options, lock: WriterLock
) -> Summary:
    """Compute, assemble and publish one version, holding the store's lock.

    A crashed run of the same operation from the same parent is resumed: its version id is
    reused and every shard it finished with the same inputs is taken as it is. Other crashed
    runs' leftovers are removed (no one else writes: we hold the lock), never the published
    version nor an object a published version uses. A run that fails on its input removes its
    version; one stopped by storage, the cluster or an interrupt keeps its finished shards for
    the next run and says where they are.
    """
    seconds: dict[str, float] = {"scan": change.scan_seconds}
    started = time.perf_counter() - change.scan_seconds
    version = _claim_version(store, change)
    try:
        results, good = _compute_all(change, source, store, version, runner, options, seconds)
        summary = _assemble(change, good, results, source, store, version, options, seconds, lock)
    except LockLost:
        raise  # the version is the new lock holder's now
    except PipelineError:
        store.discard(version)  # final: the same input fails the same way
        raise
    except OSError as exc:  # storage that failed after every retry: the next run may get through
        detail = (redact(str(exc)).splitlines() or [""])[0]
        raise PipelineError(f"storage: {exc.__class__.__name__}: {detail}; {_kept(store, version)}") from exc
    except BaseException:
        log.warning("%s stopped: %s", version, _kept(store, version))
        raise
    summary.seconds["total"] = round(time.perf_counter() - started, 3)
    return summary


def _kept(store: Store, version: str) -> str:
    return (
        f"the unfinished {version} stays at {store.version_location(version)}: the same command run again resumes "
        "from its finished shards; any other writer, or prune, removes it"
    )


def _claim_version(store: Store, change: Change) -> str:
    resumed = None
    for version, run in store.unfinished():
        if resumed is None and (run.get("operation"), run.get("mode"), run.get("parent")) == (
            change.operation,
            change.mode,
            change.parent,
        ):
            resumed = version
            log.info("resuming %s: a crashed %s from %s", version, change.operation, change.parent)
        else:
            log.info("removing %s: leftovers of a crashed run", version)
            store.discard(version)
    version = resumed or store.new_version()
    store.start_run(
        version, {"operation": change.operation, "mode": change.mode, "parent": change.parent, "started": time.time()}
    )
    return version


def good_adapters(adapters: list[ScannedAdapter]) -> list[ScannedAdapter]:
    return sorted((a for a in adapters if a.ok), key=lambda a: a.task_id)


def _compute_all(change, source, store, version, runner, options, seconds):
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


def module_shapes(change: Change, good: list[ScannedAdapter]) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """lora_A and lora_B shapes per module at the collection's largest rank (lower ranks are
    zero-padded to it)."""
    if change.parent_manifest:
        return {m: (tuple(e["a_shape"]), tuple(e["b_shape"])) for m, e in change.parent_manifest["modules"].items()}
    shapes = {}
    for module, (a, b) in good[0].modules.items():
        rank = max(x.modules[module][0].shape[0] for x in good)
        shapes[module] = ((rank, a.shape[1]), (b.shape[0], rank))
    return shapes


def module_budgets(
    change: Change, good: list[ScannedAdapter], shapes, rows: int, options: Options
) -> dict[str, float] | None:
    """Stored floats per adapter per module that a byte budget allows: each module gets the
    budget's share of its own tensor bytes. A re-base keeps the parent's; None without a budget."""
    parent = change.parent_manifest
    if parent and "budget" in next(iter(parent["modules"].values())):
        return {m: e["budget"] for m, e in parent["modules"].items()}
    if parent or not (options.ratio or options.budget_bytes):
        return None
    module_bytes = {m: sum(x.end - x.start for a in good for x in a.modules[m]) for m in shapes}
    ratio = options.ratio or sum(module_bytes.values()) / options.budget_bytes
    budgets = {m: size / ratio / FLOAT_BYTES / len(good) for m, size in module_bytes.items()}
    for module, per_adapter in budgets.items():
        (r, d_in), (d_out, _) = shapes[module]
        if not fits(per_adapter * rows, rows, r, d_in, d_out, candidates(options.method)):
            raise PipelineError(
                f"a budget of 1/{ratio:.3g} of the adapters' bytes is too small for module {module!r}: "
                f"no {' or '.join(candidates(options.method))} fit takes {per_adapter * rows * FLOAT_BYTES:.0f} bytes"
            )
    return budgets


def _plan(change: Change, shapes, rows: int, options: Options, parallelism: int) -> list[Shard]:
    """Fit and absorb: modules grouped to fit the memory budget for the rows read, at least one
    shard per CPU (each task also streams the parent's loadings once, so a re-base of a few uploads
    makes few, wide shards). Project keeps the parent's grouping: its basis objects are reused."""
    if change.mode != "project":
        widths = {m: a[0] * a[1] + b[0] * b[1] for m, (a, b) in shapes.items()}
        return plan_shards(widths, rows, options.memory_budget, parallelism)
    groups: dict[str, list[str]] = {}
    for module, entry in sorted(change.parent_manifest["modules"].items()):
        groups.setdefault(entry["basis"], []).append(module)
    return [Shard(i, tuple(ms)) for i, (_, ms) in enumerate(sorted(groups.items()))]


def _compute_shards(change, good, source, store, version, runner, options) -> list[ShardResult]:
    shapes = module_shapes(change, good)
    widths = {m: a[0] * a[1] + b[0] * b[1] for m, (a, b) in shapes.items()}
    rows = len(good)
    if change.refit:  # the parent's adapters not read again join, rebuilt
        rows += change.parent_manifest["adapters"]["ok"] - sum(
            change.parent_status.get(a.task_id) == "ok" for a in good
        )
    budgets = module_budgets(change, good, shapes, rows, options)
    shards = _plan(change, shapes, rows, options, runner.num_cpus)
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


def error_summary(means: np.ndarray, maxes: np.ndarray) -> dict[str, float]:
    if not len(means):
        return {}
    return {
        "mean": float(means.mean()),
        "p50": float(np.median(means)),
        "p95": float(np.quantile(means, 0.95)),
        "max": float(maxes.max()),
    }


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


def _assemble(change, good, results, source, store, version, options, seconds, lock) -> Summary:
    t0 = time.perf_counter()
    where = store.version_location(version)
    parent_where = store.version_location(change.parent) if change.parent_manifest else None
    new_ids = {a.task_id for a in good}
    files = {version_path(version, basis_file(r.shard.name)): r.file.to_dict() for r in results if r.file}

    errors = _ErrorTally(new_ids)
    staged = [read_batches(where, staging_file(r.shard.name)) for r in results]
    merged = errors.tap(merge_sorted(staged, LOADINGS_KEYS))
    files[version_path(version, LOADINGS)] = write_tables(
        where, LOADINGS, merged, LOADINGS_SCHEMA, LOADINGS_ROW_GROUP
    ).to_dict()

    # Catalog: the parent's rows, except those this run replaces. A replacement that was
    # quarantined does not push out an earlier upload that compressed fine.
    in_basis = change.mode != "project"
    kept_previous = {
        a.task_id: a.reason for a in change.adapters if not a.ok and change.parent_status.get(a.task_id) == "ok"
    }
    scanned = [a for a in change.adapters if a.task_id not in kept_previous]
    catalog = _CatalogTally()
    streams = [[catalog_table(scanned, in_basis)]]
    if parent_where:
        rows = without(_conformed(read_batches(parent_where, CATALOG), CATALOG_SCHEMA), {a.task_id for a in scanned})
        streams.append(_all_in_basis(rows) if change.refit else rows)
    files[version_path(version, CATALOG)] = write_tables(
        where, CATALOG, catalog.tap(merge_sorted(streams, ["task_id"])), CATALOG_SCHEMA
    ).to_dict()

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
    if not all(r.file for r in results):  # shared with the parent: listed so prune keeps them
        for path in {e["basis"] for e in modules.values()} - set(files):
            files[path] = change.parent_manifest["files"][path]

    error = errors.summary()
    watched = np.array(list(errors.watched.values())).reshape(-1, 2)
    read_error = error_summary(watched[:, 0], watched[:, 1])
    read_errors = (
        {} if change.operation == "compress" else {t: round(e[0], 6) for t, e in sorted(errors.watched.items())}
    )
    flagged = _flag(read_errors, change, options)
    quarantined = {a.task_id: a.reason for a in change.adapters if not a.ok}
    report = {
        "version": version,
        "operation": change.operation,
        "adapters": {"ok": catalog.ok, "quarantined": catalog.quarantined, "in_basis": catalog.in_basis},
        "changes": change.counts,
        "quarantined": quarantined,
        "kept_previous": kept_previous,
        "warnings": {a.task_id: a.warnings for a in change.adapters if a.warnings},
        "error": error,
        "read_error": read_error,
        "read_errors": read_errors,
        "flagged": flagged,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "shards": [
            {
                "name": r.shard.name,
                "modules": len(r.shard.modules),
                "bytes_read": r.bytes_read,
                "requests": r.requests,
                "stack_bytes": r.stack_bytes,
                "resumed": r.resumed,
                "seconds": {k: round(v, 3) for k, v in r.seconds.items()},
            }
            for r in results
        ],
    }
    files[version_path(version, REPORT)] = store.write_object(
        version, REPORT, json.dumps(report, indent=1).encode()
    ).to_dict()
    manifest = build_manifest(
        version,
        change.parent,
        change.operation,
        source=redact(source.uri) if source else (change.parent_manifest or {}).get("source"),
        parameters={
            **rule_parameters(options.rule, options.route, options.quantize, options.method),
            "ratio": options.ratio,
            "budget_bytes": options.budget_bytes,
        },
        adapters={"ok": catalog.ok, "quarantined": catalog.quarantined, "in_basis": catalog.in_basis},
        original_bytes=catalog.original_bytes,
        base_model=good[0].base_model if good else change.parent_manifest.get("base_model"),
        dtype=good[0].dtype if good else change.parent_manifest.get("dtype"),
        error=error,
        # Quantized bases record how; the errors above were measured on what is stored.
        quantization=change.parent_manifest.get("quantization")
        if change.mode == "project"
        else ({"scheme": options.quantize, "added_error": None} if options.quantize else None),
        modules=modules,
        files=files,
    )
    t1 = time.perf_counter()
    store.publish(version, manifest, lock)
    seconds["publish"] = time.perf_counter() - t1
    seconds["assemble"] = t1 - t0
    log.info(
        "published %s (%s): %d adapters, %d quarantined", version, change.operation, catalog.ok, catalog.quarantined
    )
    notes = capacity_notes(manifest, options.rule.components if change.mode == "fit" else None)
    for note in notes:
        log.warning("%s: %s", version, note)
    return Summary(
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
        {k: round(v, 3) for k, v in seconds.items()},
        notes,
    )


def capacity_notes(manifest: dict, components: int | None) -> list[str]:
    """What a user would not otherwise notice: fewer components kept than asked for, and a version
    that takes more bytes than the adapters it holds."""
    notes = []
    flat = {m: e for m, e in manifest["modules"].items() if e.get("method", "flat") != "joint"}
    capped = {
        m: max(e["k_a"], e["k_b"]) for m, e in flat.items() if components and max(e["k_a"], e["k_b"]) < components
    }
    if capped:
        rows = manifest["adapters"]["in_basis"]
        low, high = min(capped.values()), max(capped.values())
        notes.append(
            f"--components {components}: k capped at {low if low == high else f'{low}..{high}'} in {len(capped)} of "
            f"{len(flat)} module(s): the centred factors of {rows} adapter(s) have at most {max(rows - 1, 0)} "
            "directions with variance, and directions without any are not stored"
        )
    stored = sum(entry["bytes"] for entry in manifest["files"].values())
    if manifest["original_bytes"] and stored >= manifest["original_bytes"]:
        notes.append(
            f"the version takes {stored:,} bytes, not less than the {manifest['original_bytes']:,} of the adapters it "
            "holds: keep fewer components (--components, --variance-threshold) or give a budget (--ratio)"
        )
    return notes


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


def _flag(read_errors: dict[str, float], change: Change, options: Options) -> dict[str, float]:
    """New adapters the basis represents badly: above --max-error, or (without it) more than twice
    the parent collection's 95th percentile. Only meaningful when the basis did not see them."""
    if change.mode != "project":
        return {}
    limit = options.max_error
    if limit is None:
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
