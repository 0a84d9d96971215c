"""Growing a store after uploads: discovery against the current catalog, then `project` (new
adapters on the current basis), `rebase` (the incremental update absorbs them) or `rebase --full`
(one SVD over the stored adapters, rebuilt, or read again from the source with --from-source,
plus the new ones).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.adapters import AdapterRef, FileStat, discover, list_adapter_files, weights_sha256
from pipeline.io.format import CATALOG, parameters_rule
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.peft_format import WEIGHTS_FILE
from pipeline.runners import Runner
from pipeline.stages.compress import chunks, scan
from pipeline.stages.version import Change, Options, Summary, write_version

log = logging.getLogger(__name__)

STAT_BATCH = 64


@dataclass
class Diff:
    """The source against the current version's catalog."""

    added: list[AdapterRef]
    replaced: list[AdapterRef]  # same task id, different weights: size, ETag, or (local) mtime and content
    pending: list[AdapterRef]  # projected earlier, not yet absorbed into the basis
    unchanged: int
    missing: list[str]  # in the store, gone from the source: kept

    def counts(self) -> dict[str, int]:
        return {
            "added": len(self.added),
            "replaced": len(self.replaced),
            "pending": len(self.pending),
            "unchanged": self.unchanged,
            "missing": len(self.missing),
        }

    def to_dict(self) -> dict:
        return {
            "added": [r.task_id for r in self.added],
            "replaced": [r.task_id for r in self.replaced],
            "pending": [r.task_id for r in self.pending],
            "unchanged": self.unchanged,
            "missing": self.missing,
        }


def diff(refs: list[AdapterRef], catalog: list[dict]) -> Diff:
    known = {row["task_id"]: row for row in catalog}
    seen = set()
    added, replaced, pending, unchanged = [], [], [], 0
    for ref in refs:
        row = known.get(ref.task_id)
        if row is None or ref.task_id in seen:
            added.append(ref)  # a second ref with one id: scan quarantines it as a duplicate
            continue
        seen.add(ref.task_id)
        if _changed((ref.files or {}).get(WEIGHTS_FILE, FileStat(-1, "")), row):
            replaced.append(ref)
        elif row["status"] == "ok" and not row["in_basis"]:
            pending.append(ref)
        else:
            unchanged += 1
    missing = sorted(set(known) - seen)
    return Diff(added, replaced, pending, unchanged, missing)


def _changed(weights: FileStat, row: dict) -> bool:
    """A different size is a change; so is a different tag, unless both sides know the content's
    SHA-256 and it is the same (a local copy that did not keep file times)."""
    if weights.size != row["weights_bytes"]:
        return True
    if weights.tag == row["weights_tag"]:
        return False
    return weights.sha256 is None or weights.sha256 != row.get("weights_sha256")


def _with_digests(refs: list[AdapterRef], catalog: list[dict], runner: Runner) -> list[AdapterRef]:
    """Hash the weights files whose time changed but whose size did not, where the catalog has
    the content's SHA-256 to compare with (local sources; S3 tags are ETags, which a copy keeps)."""
    known = {row["task_id"]: row for row in catalog}
    todo = []
    for ref in refs:
        row, weights = known.get(ref.task_id), (ref.files or {}).get(WEIGHTS_FILE)
        if (
            row
            and weights
            and ref.location.is_local
            and row.get("weights_sha256")
            and weights.sha256 is None
            and weights.size == row["weights_bytes"]
            and weights.tag != row["weights_tag"]
        ):
            todo.append(ref)
    if not todo:
        return refs
    log.info("%d weights file(s) have new times but their old sizes: comparing their contents", len(todo))
    batches = [todo[i : i + STAT_BATCH] for i in range(0, len(todo), STAT_BATCH)]
    for index, digests in runner.map_unordered(weights_sha256, batches, num_cpus=1):
        for ref, digest in zip(batches[index], digests):
            weights = ref.files[WEIGHTS_FILE]
            ref.files[WEIGHTS_FILE] = FileStat(weights.size, weights.tag, digest)
    return refs


def _with_files(refs: list[AdapterRef], runner: Runner) -> list[AdapterRef]:
    """Refs from a manifest file carry no listing yet: list their folders in parallel."""
    bare = [r for r in refs if r.files is None]
    if not bare:
        return refs
    batches = [bare[i : i + STAT_BATCH] for i in range(0, len(bare), STAT_BATCH)]
    for index, listed in runner.map_unordered(list_adapter_files, batches, num_cpus=0.5):
        for ref, files in zip(batches[index], listed):
            ref.files = files
    return refs


def grow(
    source: Location,
    store: Store,
    runner: Runner,
    operation: str,
    options: Options,
    *,
    full: bool = False,
    from_source: bool = False,
    dry_run: bool = False,
    chunk_size: int | None = None,
) -> dict:
    """project or rebase: returns {"diff": ..., "versions": [summaries]} (no versions for a dry
    run or when nothing changed)."""
    store.require_version()  # a missing store fails before the source is listed
    refs = _with_files(discover(source), runner)
    if dry_run:
        catalog = _catalog(store, store.require_version())
        return {"diff": diff(_with_digests(refs, catalog, runner), catalog).to_dict(), "versions": []}
    with store.lock(operation) as lock:
        parent = store.require_version()
        manifest = store.manifest(parent)
        catalog = _catalog(store, parent)
        changes = diff(_with_digests(refs, catalog, runner), catalog)
        if changes.missing:
            log.info("%d adapter(s) in the store are no longer in the source; they stay", len(changes.missing))
        options = dataclasses.replace(
            options,
            rule=parameters_rule(manifest["parameters"]),
            route=manifest["parameters"]["svd_route"],
            quantize=manifest["parameters"].get("quantize"),
            method=manifest["parameters"].get("method", "flat"),
            ratio=manifest["parameters"].get("ratio"),
            budget_bytes=manifest["parameters"].get("budget_bytes"),
        )
        if from_source:
            to_read = refs  # adapters gone from the source join as rebuilt from the store
        else:
            to_read = changes.added + changes.replaced + (changes.pending if operation == "rebase" else [])
        if not to_read and not full:
            log.info("%s is up to date with %s: nothing to do", store, source)
            return {"diff": changes.to_dict(), "versions": []}
        status = {row["task_id"]: row["status"] for row in catalog}
        summaries: list[Summary] = []
        parts = chunks(sorted(to_read, key=lambda r: r.task_id), None if full else chunk_size)
        for part in parts:
            started = time.perf_counter()
            adapters = scan(part, runner, manifest, options.strict)
            if operation == "project":
                change = Change("project", "project", adapters, parent, manifest, status)
            elif full:
                change = Change("rebase-full", "fit", adapters, parent, manifest, status, refit=True)
            else:
                change = Change("rebase", "absorb", adapters, parent, manifest, status)
            change.counts, change.scan_seconds = changes.counts(), time.perf_counter() - started
            summaries.append(write_version(change, source, store, runner, options, lock))
            parent = summaries[-1].version
            manifest = store.manifest(parent)
            status = {**status, **{a.task_id: a.status for a in adapters}}
    return {"diff": changes.to_dict(), "versions": [s.to_dict() for s in summaries]}


def _catalog(store: Store, version: str) -> list[dict]:
    """What discovery compares against, one small row per stored adapter (weights_sha256 is
    absent from catalogs written before it existed)."""
    where = store.version_location(version)
    try:
        present = set(pq.read_schema(where.path(CATALOG), filesystem=where.fs).names)
    except (FileNotFoundError, pa.ArrowInvalid):
        present = set()  # read_table says what is wrong with it
    columns = ["task_id", "status", "weights_bytes", "weights_tag", "in_basis"] + (
        ["weights_sha256"] if "weights_sha256" in present else []
    )
    return store.read_table(version, CATALOG, columns=columns).to_pylist()
