"""Compress: discover -> scan -> (per chunk) compute -> assemble -> publish (see DESIGN.md).

Without --chunk-size every adapter goes into one SVD per module. With it, the first chunk is
compressed and every further chunk absorbed by the incremental update, each publishing a
version: no process ever holds more than one chunk of factors, and a crashed run resumes with
`rebase`, which absorbs whatever the store does not hold yet.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from pipeline.config import DEFAULT_MAX_ERROR, Options, raise_problems, step_problems
from pipeline.errors import PipelineError
from pipeline.flow.change import Change, Summary
from pipeline.flow.discover import chunks
from pipeline.flow.publish import write_version
from pipeline.flow.scan import scan
from pipeline.io.adapters import discover
from pipeline.io.format import LOCK, POINTER
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.io.targets import holding_files
from pipeline.runners import Runner

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
            for part in chunks(refs, chunk_size):
                started = time.perf_counter()
                if not summaries:
                    change = Change(
                        "compress", "fit", scan(part, runner, strict=options.strict), store.current_version()
                    )
                else:
                    parent = summaries[-1].version
                    manifest = store.manifest(parent)
                    change = Change(
                        "compress", "absorb", scan(part, runner, manifest, options.strict), parent, manifest
                    )
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
