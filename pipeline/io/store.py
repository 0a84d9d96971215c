"""The versioned store: the Store class over one store's objects (docs/store-format.md, whose
names, codecs and checks are in pipeline.io.format): the LATEST pointer, versions and what each
is (survey), publishing, cleanup, and reads that fetch only what a caller needs. The writer lock
is pipeline.io.lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import struct
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors

from pipeline import failpoints
from pipeline.errors import IntegrityError, PipelineError
from pipeline.io.format import (
    CATALOG,
    FORMAT_VERSION,
    MANIFEST,
    PLAIN_FORMAT_VERSION,
    POINTER,
    RUN,
    VERSION_RE,
    FileEntry,
    check_bytes,
    check_version_id,
    decode_basis,
    done_file,
    encode_manifest,
    manifest_problems,
    pointer_record,
    safe_task_id,
    unsafe_task_ids,
)
from pipeline.io.location import Location, redact, storage_error
from pipeline.io.lock import LOCK_TTL, WriterLock
from pipeline.io.safetensors_ranges import MAX_HEADER_BYTES

log = logging.getLogger(__name__)

# What a version folder is (Store.survey).
PUBLISHED = "published"  # a sound manifest, and no run record or LATEST names it
UNREADABLE = "unreadable"  # no run record (or LATEST names it), but its manifest is not sound
UNFINISHED = "unfinished"  # a run record, and LATEST does not name it: a run at work or crashed
LEFTOVER = "leftover"  # neither: what prune or a discard left of a version (objects newer ones use)
LISTED_VERSIONS = 20  # the latest versions named when a version asked for does not exist
_REPAIR = (
    "`lora-subspace versions STORE` lists the sound versions, "
    "`lora-subspace rollback STORE VERSION` points LATEST at one"
)


@dataclass(frozen=True)
class VersionState:
    version: str
    state: str
    manifest: dict | None = None  # PUBLISHED: the checked manifest
    problem: str | None = None  # UNREADABLE: why, naming the object
    run: dict | None = None  # UNFINISHED: the run record ({} when unreadable)


@dataclass(frozen=True)
class Survey:
    current: str | None  # what LATEST names; None when absent or unreadable
    problem: str | None  # LATEST absent, unreadable, or naming a version without a manifest
    versions: list[VersionState]  # oldest first

    def state(self, version: str) -> VersionState | None:
        return next((s for s in self.versions if s.version == version), None)


class Store:
    def __init__(self, location: Location):
        self.location = location

    def __str__(self) -> str:
        return str(self.location)

    # -- versions and the pointer -------------------------------------------------------------

    def current_version(self) -> str | None:
        """The version LATEST names (None without a LATEST); IntegrityError when LATEST is not a
        JSON object naming a version id (empty, garbage, a path into another store)."""
        try:
            raw = self.location.read_bytes(POINTER)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise storage_error("read the store pointer of", self.location, exc) from None
        where = self._uri(POINTER)
        try:
            pointer = json.loads(raw)
        except ValueError:
            pointer = raw
        if not isinstance(pointer, dict):
            what = "empty" if not raw.strip() else "not a JSON object"
            raise IntegrityError(f"{where} is {what}: {_REPAIR}")
        if isinstance(pointer.get("format_version"), int) and pointer["format_version"] > FORMAT_VERSION:
            raise PipelineError(
                f"store {self} has format version {pointer['format_version']}; "
                f"this lora-subspace reads up to {FORMAT_VERSION}"
            )
        try:
            return check_version_id(pointer.get("version"), where)
        except IntegrityError as exc:
            raise IntegrityError(f"{exc}: {_REPAIR}") from None

    def require_version(self, version: str | None = None) -> str:
        """`version` if given (checked to be a version id), else the current one."""
        if version:
            return check_version_id(version)
        version = self.current_version()
        if version is None:
            bucket = self.missing_bucket()
            if bucket:
                raise PipelineError(
                    f"bucket {bucket!r} does not exist (store {self}); check the name, region and --endpoint-url"
                )
            raise PipelineError(f"no store at {self} (no {POINTER} pointer): run `lora-subspace compress` first")
        if not self.version_location(version).exists(MANIFEST):  # a published version always has one
            raise IntegrityError(f"{self._uri(POINTER)} names {version}, which is not in the store: {_REPAIR}")
        return version

    def require_store(self) -> None:
        """Raise unless a store is there (a LATEST pointer or versions), readable or not."""
        if self.location.exists(POINTER) or self.location.exists("versions"):
            return
        bucket = self.missing_bucket()
        if bucket:
            raise PipelineError(
                f"bucket {bucket!r} does not exist (store {self}); check the name, region and --endpoint-url"
            )
        raise PipelineError(f"no store at {self} (no {POINTER} pointer, no versions)")

    def missing_bucket(self) -> str | None:
        """The store's bucket when it is on object storage and the bucket does not exist."""
        if self.location.is_local:
            return None
        bucket = self.location.root.split("/", 1)[0]
        try:
            return None if self.location.fs.exists(bucket) else bucket
        except OSError:
            return None  # unknown: the caller's own message stands

    def versions(self) -> list[str]:
        fs = self.location.fs
        try:
            names = [
                p.rstrip("/").rsplit("/", 1)[-1]
                for p in fs.ls(self.location.path("versions"), detail=False, refresh=True)
            ]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if VERSION_RE.match(n))

    def survey(self) -> Survey:
        """Every version folder and what it is, with the pointer: readers' and cleanup's one view.

        A version LATEST names is published, run record or not (a writer died after moving the
        pointer); any other version with a run record is unfinished; one with neither a manifest
        nor a run record is what a prune or a discard left (objects newer versions use)."""
        try:
            current, problem = self.current_version(), None
            if current is None:
                problem = f"no {POINTER} pointer in {self}"
        except IntegrityError as exc:
            current, problem = None, str(exc)
        states = []
        for version in self.versions():
            where = self.version_location(version)
            try:
                run = json.loads(where.read_bytes(RUN))
            except FileNotFoundError:
                run = None
            except ValueError:
                run = {}
            if run is not None and version != current:
                states.append(VersionState(version, UNFINISHED, run=run if isinstance(run, dict) else {}))
                continue
            try:
                states.append(VersionState(version, PUBLISHED, self._read_manifest(version)))
            except FileNotFoundError:
                states.append(VersionState(version, LEFTOVER))
                if version == current:
                    problem = f"{self._uri(POINTER)} names {version}, which has no manifest: {_REPAIR}"
            except IntegrityError as exc:
                states.append(VersionState(version, UNREADABLE, problem=str(exc)))
        if current is not None and current not in {s.version for s in states}:
            problem = f"{self._uri(POINTER)} names {current}, which is not in the store: {_REPAIR}"
        return Survey(current, problem, states)

    def _uri(self, *parts: str) -> str:
        return redact(self.location.uri_of(self.location.path(*parts)))

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

    def publish(self, version: str, manifest: dict, lock: WriterLock) -> None:
        """Write the manifest, then move the pointer: readers see the old version or the new.
        Refuses if this writer lost its lock, or the pointer moved since the work began (from
        manifest["parent"]). Then the run's scratch (staging, run record) goes.

        Once the pointer has moved the version is published, whatever happens next: a failure
        to remove the scratch is logged, and the next writer (any lock holder) removes it."""
        lock.check()
        current = self.current_version()
        if current != manifest["parent"]:
            raise PipelineError(
                f"store {self} moved to {current} "
                f"while this run worked from {manifest['parent']}; nothing was published"
            )
        where = self.version_location(version)
        where.write_bytes(encode_manifest(manifest), MANIFEST)
        failpoints.reach("publish")  # crash points: after the manifest, the pointer, the staging, the run record
        self.set_pointer(version, manifest.get("format_version", PLAIN_FORMAT_VERSION))
        failpoints.reach("publish-pointer")
        try:
            self._finish(version)
        except OSError as exc:
            log.warning(
                "%s is published; its run's scratch stays until the next writer removes it (%s)",
                version,
                redact(str(exc)),
            )

    def _finish(self, version: str) -> None:
        """Remove a published version's scratch: staging, then the run record."""
        where = self.version_location(version)
        where.remove("staging")
        failpoints.reach("publish-staging")
        where.remove(RUN)
        failpoints.reach("publish-run")

    def finish_publication(self) -> None:
        """Under the lock: if the writer that moved LATEST died before removing its version's
        scratch, remove it now, so the version never again looks unfinished (whatever LATEST
        points at next). Nothing to do with an unreadable LATEST."""
        try:
            current = self.current_version()
        except IntegrityError:
            return
        if current is not None and self.version_location(current).exists(RUN):
            log.info("%s is published (LATEST names it): removing the run record its writer left", current)
            self._finish(current)

    def start_run(self, version: str, record: dict) -> None:
        self.version_location(version).write_bytes(json.dumps(record).encode(), RUN)

    def unfinished(self) -> list[tuple[str, dict]]:
        """Versions whose run never published them (newest first), with their run records: a
        crashed run's leftovers, to resume or remove. Never the version LATEST names. Only
        meaningful under the lock; IntegrityError when LATEST is unreadable (which version is
        published is then unknown)."""
        self.current_version()
        return [(s.version, s.run) for s in reversed(self.survey().versions) if s.state == UNFINISHED]

    def needed_objects(self) -> set[str]:
        """Store-relative paths of every object a published version uses (its parents' shared
        basis objects included): what cleanup must never delete. IntegrityError when LATEST or
        a published-looking version's manifest is unreadable: what it needs is then unknown."""
        self.current_version()
        survey = self.survey()
        bad = [s for s in survey.versions if s.state == UNREADABLE]
        if bad:
            raise IntegrityError(bad[0].problem)
        return {path for s in survey.versions if s.state == PUBLISHED for path in s.manifest["files"]}

    def finished_shards(self, version: str) -> dict[str, dict]:
        """Shard name -> its done record, for the shards a run of this version finished."""
        where = self.version_location(version)
        staging = where.path("staging")
        try:
            names = where.fs.ls(staging, detail=False, refresh=True)
        except FileNotFoundError:
            return {}
        finally:
            # Shard tasks in other processes write here next; a listing left in this process's
            # cache (s3fs) would hide their objects from the assembly (FileNotFoundError) or
            # hand it the ETags of the objects they replaced (FileExpired).
            where.fs.invalidate_cache(staging)
        done = {}
        for path in names:
            name = path.rsplit("/", 1)[-1]
            if name.endswith(".json"):
                try:
                    done[name[: -len(".json")]] = json.loads(where.fs.cat_file(path))
                except (FileNotFoundError, ValueError):
                    continue
        return done

    def unfinish_shard(self, version: str, shard: str) -> None:
        """Remove a shard's done record before its objects are written again: a record left
        behind would vouch for objects that a task with other inputs then overwrote."""
        where = self.version_location(version)
        try:
            where.fs.rm_file(where.path(done_file(shard)))
        except FileNotFoundError:
            pass

    def set_pointer(self, version: str, format_version: int = PLAIN_FORMAT_VERSION) -> None:
        """Point LATEST at `version`, recording its manifest's format version (readers of an older
        format refuse a version that needs a newer one)."""
        self.location.write_atomic(pointer_record(version, format_version), POINTER)

    @contextlib.contextmanager
    def lock(self, operation: str, ttl: float = LOCK_TTL):
        """Hold the store's writer lock (see WriterLock) for the duration of the block."""
        lock = WriterLock(self.location, operation, ttl)
        lock.acquire()
        try:
            try:
                self.finish_publication()
            except OSError as exc:
                raise storage_error("finish the last publication of", self.location, exc) from None
            yield lock
        finally:
            lock.release()

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

    def discard(self, version: str) -> bool:
        """Remove an unpublished version's objects, under the lock. Never the version LATEST
        names, nor an object a published version uses; nothing at all when either is unknown
        (an unreadable LATEST or manifest). Best effort (the objects are invisible anyway):
        returns whether the version is gone."""
        try:
            if self.current_version() == version:
                return False
            self.delete_version(version, keep=self.needed_objects())
            return True
        except PipelineError as exc:
            log.warning("%s is left in place: %s", self.version_location(version), redact(str(exc)))
            return False

    # -- writing a version's objects -------------------------------------------------------------

    def write_object(self, version: str, name: str, data: bytes) -> FileEntry:
        self.version_location(version).write_bytes(data, name)
        return FileEntry(len(data), hashlib.sha256(data).hexdigest())

    def published(self) -> list[dict]:
        """Manifests of every published version whose manifest is sound, oldest first (see
        `survey` for the others)."""
        return [s.manifest for s in self.survey().versions if s.state == PUBLISHED]

    # -- reading ---------------------------------------------------------------------------------

    def manifest(self, version: str | None = None) -> dict:
        """A version's manifest, checked (`manifest_problems`): PipelineError naming the object
        when it is missing, not JSON or not a sound manifest."""
        version = self.require_version(version)
        try:
            return self._read_manifest(version)
        except FileNotFoundError:
            raise self._missing(
                version, f"no manifest ({self._uri('versions', version, MANIFEST)} is missing)"
            ) from None

    def _missing(self, version: str, what: str) -> PipelineError:
        """The error for an object a version lacks: the version itself when the store has no such
        version (a mistyped --version), naming the versions `versions` lists."""
        if version in self.versions():
            return PipelineError(f"version {version} of {self} has {what}")
        published = [s.version for s in self.survey().versions if s.state == PUBLISHED]
        shown = ", ".join(published[-LISTED_VERSIONS:]) or "none"
        earlier = len(published) - LISTED_VERSIONS
        return PipelineError(
            f"version {version} does not exist in {self}; its versions: {shown}"
            + (f" (and {earlier} earlier: `lora-subspace versions` lists them)" if earlier > 0 else "")
        )

    def raw_manifest(self, version: str) -> object:
        """A version's manifest as parsed JSON, unchecked (verify lists its problems):
        FileNotFoundError when absent, IntegrityError when not JSON."""
        try:
            raw = self.version_location(version).read_bytes(MANIFEST)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise storage_error(f"read the manifest of {version} of", self.location, exc) from None
        try:
            return json.loads(raw)
        except ValueError:
            what = "empty" if not raw.strip() else "not JSON"
            raise IntegrityError(f"{self._uri('versions', version, MANIFEST)} is {what}") from None

    def _read_manifest(self, version: str) -> dict:
        manifest = self.raw_manifest(version)
        problems = manifest_problems(manifest, version)
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise IntegrityError(
                f"{self._uri('versions', version, MANIFEST)} is not a valid manifest: {problems[0]}{more}"
            )
        return manifest

    def read_basis(self, path: str, expected: dict | None = None, decode: bool = True) -> dict[str, torch.Tensor]:
        """A basis object by its store-relative path (a version may use its parent's), checked
        against its manifest entry `{"bytes", "sha256"}` when given; packed components decoded
        unless `decode` is False."""
        data = self.location.read_bytes(path)
        name = self.location.uri_of(self.location.path(path))
        if expected is not None:
            check_bytes(data, expected, name)
        try:
            tensors = load_safetensors(data)
        except Exception as exc:  # safetensors' own error type, or what a hostile header makes of it
            raise IntegrityError(f"{redact(name)} is not a readable safetensors object: {exc}") from None
        return decode_basis(tensors) if decode else tensors

    def tensor_bytes(self, path: str) -> dict[str, int]:
        """Bytes of each tensor of a safetensors object (store-relative path), from its header alone."""
        fs, full = self.location.fs, self.location.path(path)
        try:
            (length,) = struct.unpack("<Q", fs.cat_file(full, start=0, end=8))
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(fs.cat_file(full, start=8, end=8 + length))
            return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
        except (struct.error, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise IntegrityError(
                f"{redact(self.location.uri_of(full))} is not a readable safetensors object: {exc}"
            ) from None

    def read_table(
        self, version: str, name: str, task_ids: list[str] | None = None, columns: list[str] | None = None
    ) -> pa.Table:
        """A Parquet table of a version; with task_ids, only those adapters' rows (row groups whose
        statistics exclude them are not read)."""
        where = self.version_location(version)
        filters = [("task_id", "in", list(task_ids))] if task_ids is not None else None
        # The catalog keeps quarantined adapters under the id they came with, safe or not (it is
        # never a path: they have no loadings and are never exported); every other id must be safe.
        with_status = name == CATALOG and columns is not None and "task_id" in columns and "status" not in columns
        read = columns + ["status"] if with_status else columns
        try:
            table = pq.read_table(
                where.path(name), filesystem=where.fs, columns=read, filters=filters, page_checksum_verification=True
            )
            if "task_id" in table.column_names:
                ids = table.column("task_id")
                if "status" in table.column_names:
                    ids = pc.filter(ids, pc.fill_null(pc.equal(table.column("status"), "ok"), True))
                bad = unsafe_task_ids(ids)
                if bad:
                    safe_task_id(bad[0], where.uri_of(where.path(name)))
            return table.drop_columns(["status"]) if with_status else table
        except FileNotFoundError:
            raise self._missing(version, f"no {name}") from None
        except (OSError, pa.ArrowInvalid) as exc:
            if isinstance(exc, pa.ArrowInvalid) or "checksum" in str(exc).lower():
                raise IntegrityError(f"{where.uri_of(where.path(name))} is corrupt: {exc}") from None
            raise
