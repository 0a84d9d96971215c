"""Writing one new store version: claim a version id (or resume a crashed run's), compute every
shard, assemble, publish (manifest, then LATEST). Compress, project, rebase and quantize differ only
in the Change they describe; vlora-import also in how its shards are computed.
"""

from __future__ import annotations

import logging
import time

from pipeline.config import Options
from pipeline.errors import PipelineError
from pipeline.flow.assemble import assemble
from pipeline.flow.change import Change, Summary
from pipeline.flow.compute import compute_all
from pipeline.io.location import Location, redact
from pipeline.io.lock import LockLost, WriterLock
from pipeline.io.store import Store
from pipeline.runners import Runner

log = logging.getLogger(__name__)


def write_version(
    change: Change,
    source: Location | None,
    store: Store,
    runner: Runner,
    options: Options,
    lock: WriterLock,
    compute=compute_all,
) -> Summary:
    """Compute, assemble and publish one version, holding the store's lock. `compute` makes the
    shards (compute_all's signature and results); another layout's import brings its own.

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
        results, good = compute(change, source, store, version, runner, options, seconds)
        t0 = time.perf_counter()
        manifest, summary = assemble(change, good, results, source, store, version, options, seconds)
        publish(change, store, version, manifest, summary, options, seconds, lock, time.perf_counter() - t0)
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
            since = f" from {change.parent}" if change.parent else ""
            log.info("resuming %s: an unfinished %s%s", version, change.operation, since)
        else:
            log.info("removing %s: leftovers of an unfinished run", version)
            store.discard(version)
    version = resumed or store.new_version()
    store.start_run(
        version, {"operation": change.operation, "mode": change.mode, "parent": change.parent, "started": time.time()}
    )
    return version


def publish(
    change: Change,
    store: Store,
    version: str,
    manifest: dict,
    summary: Summary,
    options: Options,
    seconds: dict[str, float],
    lock: WriterLock,
    assemble_seconds: float,
) -> None:
    """Write the manifest, then move LATEST (Store.publish); the summary gets the run's seconds and
    what the user would not otherwise notice (capacity_notes)."""
    t1 = time.perf_counter()
    store.publish(version, manifest, lock)
    seconds["publish"] = time.perf_counter() - t1
    seconds["assemble"] = assemble_seconds
    log.info(
        "published %s (%s): %d adapters, %d quarantined",
        version,
        change.operation,
        summary.adapters_ok,
        summary.adapters_quarantined,
    )
    notes = capacity_notes(manifest, options.rule.components if change.mode == "fit" else None)
    for note in notes:
        log.warning("%s: %s", version, note)
    for note in summary.notes:  # assemble's, before these
        log.warning("%s: %s", version, note)
    summary.seconds = {k: round(v, 3) for k, v in seconds.items()}
    summary.notes = [*summary.notes, *notes]


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
