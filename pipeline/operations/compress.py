"""Compress: discover -> scan -> compute -> assemble -> publish (see DESIGN.md), one version.

Without --chunk-size every shard task stacks all its adapters for one SVD per module. With it,
each task reads its adapters that many at a time (flow.chunked): the first chunk is fitted, every
further one absorbed by the incremental update, and each chunk's rows are moved once to the final
bases; no process holds more than one chunk of factors. A crashed run resumes from the shards it
finished when the same command is run again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from pipeline.config import DEFAULT_MAX_ERROR, Options, raise_problems, step_problems
from pipeline.errors import PipelineError
from pipeline.flow.change import Change, Summary
from pipeline.flow.publish import write_version
from pipeline.flow.scan import scan
from pipeline.io.adapters import discover
from pipeline.io.format import LOCK, POINTER
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.io.targets import holding_files
from pipeline.runners import Runner, while_starting

log = logging.getLogger(__name__)


def check_out(store: Store, command: str = "compress", what: str = "--out ") -> None:
    """A new store goes into a new or empty folder, a version into an existing store (its LATEST
    pointer, versions/ or writer LOCK there); never into a folder that holds other files."""
    where = store.location
    if where.exists(POINTER) or where.exists("versions") or where.exists(LOCK) or not holding_files(where, [""]):
        return
    raise PipelineError(
        f"{what}{where} holds files and is not a store (no {POINTER}, no versions/): {command} writes a new "
        "store only into a new or empty folder"
    )


_DEFAULT_OPTIONS = Options()


def compress(
    source: Location, store: Store, runner: Runner, options: Options = _DEFAULT_OPTIONS, chunk_size: int | None = None
) -> list[Summary]:
    options.validated()
    raise_problems(step_problems(chunk_size))
    if options.max_error is None:
        options = dataclasses.replace(options, max_error=DEFAULT_MAX_ERROR)
    refs = discover(source)
    check_out(store)
    new_folder = store.location.is_local and not os.path.exists(store.location.root)
    store.check_writable()
    summaries: list[Summary] = []
    try:
        with store.lock("compress") as lock:
            started = time.perf_counter()
            # The scan runs while an embedded Ray starts for the compute stage, and its workers import it.
            adapters = while_starting(
                runner, lambda scanner: scan(refs, scanner, strict=options.strict), warm="pipeline.flow.compute"
            )
            change = Change("compress", "fit", adapters, store.current_version(), chunk=chunk_size)
            change.scan_seconds = time.perf_counter() - started
            summaries.append(write_version(change, source, store, runner, options, lock))
    except PipelineError:
        if new_folder and not summaries:
            _remove_empty_folders(store.location.root)  # a refused first run leaves no trace
        raise
    return summaries


def _remove_empty_folders(root: str) -> None:
    """Remove `root` and the folders under it if they hold no file (never a file, nor a folder
    that holds one)."""
    for folder, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(folder)
        except OSError:
            pass
