"""Growing a store after uploads: discovery against the current catalog, then `project` (new
adapters on the current basis), `rebase` (the incremental update absorbs them) or `rebase --full`
(one SVD over the stored adapters, rebuilt, or read again from the source with --from-source,
plus the new ones). Stages run in-process when their work is small (pipeline.runners.for_work):
listing a manifest's folders by their count, the rest by the adapters read and the parent
version's bytes.
"""

from __future__ import annotations

import logging
import time

from pipeline.config import OPERATIONS, Operation, Options, raise_problems, step_problems
from pipeline.flow.change import Change, Summary
from pipeline.flow.discover import chunks, diff, stored_catalog, with_digests, with_files
from pipeline.flow.publish import write_version
from pipeline.flow.scan import scan
from pipeline.io.adapters import discover
from pipeline.io.format import read_parameters
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.peft_format import WEIGHTS_FILE
from pipeline.runners import Runner, for_work

log = logging.getLogger(__name__)


def grow(
    source: Location,
    store: Store,
    runner: Runner,
    operation: Operation,
    options: Options,
    *,
    full: bool = False,
    from_source: bool = False,
    dry_run: bool = False,
    chunk_size: int | None = None,
) -> dict:
    """project or rebase: returns {"diff": ..., "versions": [summaries]} (no versions for a dry
    run or when nothing changed). Of `options`, only the run's own knobs count (task memory,
    strict, max_error): the fit's are the store's."""
    options.validated()
    wrong = [] if operation in OPERATIONS else [f"operation must be one of {', '.join(OPERATIONS)}, got {operation!r}"]
    raise_problems(wrong + step_problems(chunk_size, full, from_source))
    store.require_version()  # a missing store fails before the source is listed
    found = discover(source)
    refs = with_files(found, for_work(runner, len(found)))
    if dry_run:
        catalog = stored_catalog(store, store.require_version())
        return {"diff": diff(with_digests(refs, catalog, runner), catalog).to_dict(), "versions": []}
    with store.lock(operation) as lock:
        parent = store.require_version()
        manifest = store.manifest(parent)
        catalog = stored_catalog(store, parent)
        changes = diff(with_digests(refs, catalog, runner), catalog)
        if changes.missing:
            log.info("%d adapter(s) in the store are no longer in the source; they stay", len(changes.missing))
        # The store's fit parameters, with this run's own knobs (task memory, strict, max_error).
        options = read_parameters(manifest["parameters"], options, f"{store} {parent} manifest")
        if from_source:
            to_read = refs  # adapters gone from the source join as rebuilt from the store
        else:
            to_read = changes.added + changes.replaced + (changes.pending if operation == "rebase" else [])
        if not to_read and not full:
            log.info("%s is up to date with %s: nothing to do", store, source)
            _warn_bound_not_kept(store, parent, manifest, options)
            return {"diff": changes.to_dict(), "versions": []}
        runner = for_work(runner, *_work(to_read, catalog if full and not from_source else [], manifest))
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


def _warn_bound_not_kept(store: Store, version: str, manifest: dict, options: Options) -> None:
    """A bound given to a store whose recorded errors exceed it is kept only for the adapters a run
    reads (flow.bounded): with nothing to read, say so rather than leave it unsaid."""
    worst = manifest.get("error", {}).get("max")
    if options.bound is None or worst is None or worst <= options.bound:
        return
    log.warning(
        "%s %s has modules above --max-error %g (up to %.4f) that no run brings within it without their "
        "files, and this one reads none: `rebase --full --from-source --max-error %g` reads them",
        store,
        version,
        options.bound,
        worst,
        options.bound,
    )


def _work(to_read: list, rebuilt: list[dict], manifest: dict) -> tuple[int, int]:
    """The adapters a run reads and their bytes: the weights files of `to_read`, the stored ones
    it rebuilds (catalog rows), and the parent version's objects (basis and loadings streamed)."""
    read = [(ref.files or {}).get(WEIGHTS_FILE) for ref in to_read]
    stored = [row for row in rebuilt if row["status"] == "ok"]
    nbytes = sum(stat.size for stat in read if stat is not None and stat.size > 0)
    nbytes += sum(row["weights_bytes"] or 0 for row in stored)
    nbytes += sum(entry["bytes"] for entry in manifest["files"].values())
    return len(read) + len(stored), nbytes
