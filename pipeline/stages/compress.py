"""Compress: discover -> scan -> (per chunk) compute -> assemble -> publish (see DESIGN.md).

Without --chunk-size every adapter goes into one SVD per module. With it, the first chunk is
compressed and every further chunk absorbed by the incremental update, each publishing a
version: no process ever holds more than one chunk of factors, and a crashed run resumes with
`rebase`, which absorbs whatever the store does not hold yet.
"""

from __future__ import annotations

import logging
import time

from pipeline.errors import PipelineError
from pipeline.io.adapters import AdapterRef, discover
from pipeline.io.format import LOCK, POINTER
from pipeline.io.location import Location, printable
from pipeline.io.store import Store
from pipeline.io.targets import holding_files
from pipeline.progress import Progress
from pipeline.runners import Runner
from pipeline.stages.scan import ScannedAdapter, check_collection, scan_batch
from pipeline.stages.version import Change, Options, Summary, write_version

log = logging.getLogger(__name__)

SCAN_BATCH = 64


def scan(
    refs: list[AdapterRef], runner: Runner, reference: dict | None = None, strict: bool = False
) -> list[ScannedAdapter]:
    """Validate adapters in parallel tasks, then against each other, or against a store's
    manifest (`reference`) when they join one."""
    batches = [refs[i : i + SCAN_BATCH] for i in range(0, len(refs), SCAN_BATCH)]
    progress = Progress("scan", len(refs), "adapters")
    scanned: list[list[ScannedAdapter]] = [[] for _ in batches]
    for index, records in runner.map_unordered(scan_batch, batches):
        scanned[index] = records
        progress.advance(len(records))
    progress.close()
    adapters = [a for batch in scanned for a in batch]
    check_collection(adapters, reference)
    for a in adapters:
        for warning in a.warnings:
            log.warning("%s: %s", printable(a.task_id), warning)
        if not a.ok:
            log.warning("quarantined %s: %s", printable(a.task_id), a.reason)
    bad = [a for a in adapters if not a.ok]
    if strict and bad:
        raise PipelineError(f"--strict: {len(bad)} adapter(s) quarantined, first {bad[0].task_id!r}: {bad[0].reason}")
    return adapters


def chunks(refs: list[AdapterRef], size: int | None) -> list[list[AdapterRef]]:
    """Consecutive refs, `size` at a time; refs sharing a task id stay together (so duplicates
    are caught within one chunk)."""
    if not size:
        return [refs]
    out: list[list[AdapterRef]] = []
    for ref in refs:
        if not out or (len(out[-1]) >= size and out[-1][-1].task_id != ref.task_id):
            out.append([])
        out[-1].append(ref)
    return out


def check_out(store: Store) -> None:
    """compress writes a store into a new or empty folder, or a version into an existing store
    (its LATEST pointer, versions/ or writer LOCK there); never into a folder that holds other files."""
    where = store.location
    if where.exists(POINTER) or where.exists("versions") or where.exists(LOCK) or not holding_files(where, [""]):
        return
    raise PipelineError(
        f"--out {where} holds files and is not a store (no {POINTER}, no versions/): compress writes a new "
        "store only into a new or empty folder"
    )


_DEFAULT_OPTIONS = Options()


def compress(
    source: Location, store: Store, runner: Runner, options: Options = _DEFAULT_OPTIONS, chunk_size: int | None = None
) -> list[Summary]:
    refs = discover(source)
    check_out(store)
    store.check_writable()
    with store.lock("compress") as lock:
        summaries: list[Summary] = []
        for part in chunks(refs, chunk_size):
            started = time.perf_counter()
            if not summaries:
                change = Change("compress", "fit", scan(part, runner, strict=options.strict), store.current_version())
            else:
                parent = summaries[-1].version
                manifest = store.manifest(parent)
                change = Change("compress", "absorb", scan(part, runner, manifest, options.strict), parent, manifest)
            change.scan_seconds = time.perf_counter() - started
            summaries.append(write_version(change, source, store, runner, options, lock))
    return summaries
