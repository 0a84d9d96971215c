"""Folders a command writes into: what they already hold, and whether they can be written.

export, vlora-export and compress never write into a folder that holds files they did not just
write, unless told to (`--overwrite`): a rebuilt adapter written over its original replaces it
with a lossy copy. Both checks run before any work, so a refused command writes nothing.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterable

from pipeline.io.location import Location, storage_error


def holding_files(out: Location, folders: Iterable[str]) -> list[str]:
    """Those of `folders` (paths relative to `out`; "" is `out` itself) that are a file or have
    files under them, in the order given. One listing of `out`, whatever the number of folders."""
    fs = out.fs
    fs.invalidate_cache(out.root)
    try:
        found = fs.find(out.root)
    except (FileNotFoundError, NotADirectoryError):
        found = []
    held: set[str] = set()
    for path in found:
        held.add("")
        parts = out.relative(path).split("/")
        held.update("/".join(parts[: i + 1]) for i in range(len(parts)) if parts != ["."])
    return [folder for folder in folders if folder in held]


def check_writable(out: Location) -> None:
    """Fail in one line if files cannot be written under `out`: a probe object is written and
    removed. A local folder not there yet is probed at its nearest existing parent, so a
    refused command leaves no empty folder behind."""
    where = out
    if out.is_local:
        path = out.root
        while not os.path.lexists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            exc = NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            raise storage_error("write to", out, exc)
        where = Location(path)
    probe = f".write-probe-{uuid.uuid4().hex}"
    try:
        where.write_bytes(b"", probe)
        where.remove(probe)
    except OSError as exc:
        raise storage_error("write to", out, exc) from None
