"""The versioned store: layout, manifests, the LATEST pointer, and reads that fetch only what a
caller needs. Format described in docs/store-format.md.

    STORE/LATEST                                  {"version": ..., "format_version": ...}, written last
    STORE/LOCK                                    held by the one writer at work (created if absent)
    STORE/versions/<v>/manifest.json              parameters, modules, files with sizes and sha256
    STORE/versions/<v>/basis/shard-NNNNN.safetensors
    STORE/versions/<v>/loadings.parquet           one row per (task_id, module), sorted by task_id
    STORE/versions/<v>/catalog.parquet            one row per adapter, quarantined ones too
    STORE/versions/<v>/report.json
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import hashlib
import io
import json
import os
import re
import socket
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.errors import PipelineError
from pipeline.io.location import Location, redact, storage_error

FORMAT_VERSION = 1
POINTER = "LATEST"
LOCK = "LOCK"
MANIFEST = "manifest.json"
LOADINGS = "loadings.parquet"
CATALOG = "catalog.parquet"
REPORT = "report.json"
LOADINGS_ROW_GROUP = 8192
_VERSION_RE = re.compile(r"^v(\d{6})$")


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "sha256": self.sha256}


def basis_file(shard: str) -> str:
    return f"basis/{shard}.safetensors"


def staging_file(shard: str) -> str:
    return f"staging/loadings-{shard}.parquet"


def version_path(version: str, name: str) -> str:
    """A version's object as a path relative to the store root, as manifests list files."""
    return f"versions/{version}/{name}"


def basis_key(module: str, side: str, field: str) -> str:
    return f"{module}.{side}.{field}"


def encode_basis(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata={"format_version": str(FORMAT_VERSION)})


class Store:
    def __init__(self, location: Location):
        self.location = location

    def __str__(self) -> str:
        return str(self.location)

    # -- versions and the pointer -------------------------------------------------------------

    def current_version(self) -> str | None:
        try:
            raw = self.location.read_bytes(POINTER)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise storage_error("read the store pointer of", self.location, exc) from None
        pointer = json.loads(raw)
        if pointer.get("format_version", 0) > FORMAT_VERSION:
            raise PipelineError(
                f"store {self} has format version {pointer['format_version']}; this lora-subspace reads up to {FORMAT_VERSION}"
            )
        return pointer["version"]

    def require_version(self, version: str | None = None) -> str:
        version = version or self.current_version()
        if version is None:
            raise PipelineError(f"no store at {self} (no {POINTER} pointer): run `lora-subspace compress` first")
        return version

    def versions(self) -> list[str]:
        fs = self.location.fs
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(self.location.path("versions"), detail=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _VERSION_RE.match(n))

    def new_version(self) -> str:
        self.location.fs.invalidate_cache()
        existing = self.versions()
        number = int(existing[-1][1:]) + 1 if existing else 1
        return f"v{number:06d}"

    def version_location(self, version: str) -> Location:
        return self.location.child("versions", version)

    def check_writable(self) -> None:
        """Fail before any work if the store cannot be written; the probe object is removed."""
        probe = f".write-probe-{uuid.uuid4().hex}"
        try:
            self.location.write_bytes(b"", probe)
            self.location.remove(probe)
        except OSError as exc:
            raise storage_error("write to store", self.location, exc) from None

    def publish(self, version: str, manifest: dict) -> None:
        """Write the manifest, then move the pointer: readers see the old version or the new.
        Refuses if the pointer moved since the work began (from manifest["parent"])."""
        current = self.current_version()
        if current != manifest["parent"]:
            raise PipelineError(
                f"store {self} moved to {current} while this run worked from {manifest['parent']}; nothing was published"
            )
        where = self.version_location(version)
        where.write_bytes(json.dumps(manifest, indent=1, sort_keys=True).encode(), MANIFEST)
        self.set_pointer(version)

    def set_pointer(self, version: str) -> None:
        pointer = {"version": version, "format_version": FORMAT_VERSION}
        self.location.write_atomic(json.dumps(pointer).encode() + b"\n", POINTER)

    @contextlib.contextmanager
    def lock(self, operation: str):
        """Hold the store's writer lock: an object created only if absent (S3 conditional PUT with
        If-None-Match, O_EXCL locally), so of two writers exactly one gets it. Removed on exit."""
        holder = {
            "operation": operation, "host": socket.gethostname(), "pid": os.getpid(), "user": getpass.getuser(),
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "token": uuid.uuid4().hex,
        }
        try:
            self.location.create_exclusive(json.dumps(holder).encode(), LOCK)
        except FileExistsError:
            raise PipelineError(self._locked_message()) from None
        except OSError as exc:
            raise storage_error("lock store", self.location, exc) from None
        try:
            yield
        finally:
            try:
                if json.loads(self.location.read_bytes(LOCK)).get("token") == holder["token"]:
                    self.location.remove(LOCK)
            except (OSError, ValueError):
                pass

    def _locked_message(self) -> str:
        try:
            holder = json.loads(self.location.read_bytes(LOCK))
            who = f"{holder['operation']} by {holder['user']}@{holder['host']} pid {holder['pid']} since {holder['since']}"
        except (OSError, ValueError, KeyError):
            who = "another writer"
        return (
            f"store {self} is locked ({who}): another writer is at work. If none is (a crashed run), "
            f"remove {redact(self.location.uri_of(self.location.path(LOCK)))} and retry"
        )

    def delete_version(self, version: str, keep: set[str]) -> int:
        """Delete a version's objects except the store-relative paths in `keep` (objects other
        versions use); the manifest first, so a half-deleted version is never listed. Returns
        the bytes freed."""
        folder = self.version_location(version)
        fs = self.location.fs
        try:
            objects = fs.find(folder.root, detail=True)
            doomed = [p for p in objects if self.location.relative(p) not in keep]
            manifest = folder.path(MANIFEST)
            if manifest in doomed:
                fs.rm(manifest)
            rest = [p for p in doomed if p != manifest]
            if rest:
                fs.rm(rest)
            if len(doomed) == len(objects):
                folder.remove()  # local folders outlive their files
        except OSError as exc:
            raise storage_error(f"delete {version} of", self.location, exc) from None
        return sum(objects[p]["size"] for p in doomed)

    def discard(self, version: str) -> None:
        """Remove an unpublished version's objects (best effort: they are invisible anyway)."""
        try:
            self.version_location(version).remove()
        except OSError:
            pass

    # -- writing a version's objects -------------------------------------------------------------

    def write_object(self, version: str, name: str, data: bytes) -> FileEntry:
        self.version_location(version).write_bytes(data, name)
        return FileEntry(len(data), hashlib.sha256(data).hexdigest())

    def published(self) -> list[dict]:
        """Manifests of every published version, oldest first."""
        found = []
        for version in self.versions():
            try:
                found.append(json.loads(self.version_location(version).read_bytes(MANIFEST)))
            except FileNotFoundError:
                continue  # unpublished: a crashed or running write
        return found

    def write_table(self, version: str, name: str, table: pa.Table, row_group_size: int | None = None) -> FileEntry:
        sink = io.BytesIO()
        pq.write_table(table, sink, row_group_size=row_group_size, compression="zstd")
        return self.write_object(version, name, sink.getvalue())

    # -- reading ---------------------------------------------------------------------------------

    def manifest(self, version: str | None = None) -> dict:
        version = self.require_version(version)
        try:
            return json.loads(self.version_location(version).read_bytes(MANIFEST))
        except FileNotFoundError:
            raise PipelineError(f"version {version} of {self} has no manifest") from None

    def read_basis(self, path: str) -> dict[str, torch.Tensor]:
        """A basis object by its store-relative path (a version may use its parent's)."""
        return load_safetensors(self.location.read_bytes(path))

    def read_table(self, version: str, name: str, task_ids: list[str] | None = None, columns: list[str] | None = None) -> pa.Table:
        """A Parquet table of a version; with task_ids, only those adapters' rows (row groups whose
        statistics exclude them are not read)."""
        where = self.version_location(version)
        filters = [("task_id", "in", list(task_ids))] if task_ids is not None else None
        try:
            return pq.read_table(where.path(name), filesystem=where.fs, columns=columns, filters=filters)
        except FileNotFoundError:
            raise PipelineError(f"version {version} of {self} has no {name}") from None
