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
import json
import logging
import os
import re
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline import failpoints
from pipeline.errors import IntegrityError, PipelineError
from pipeline.io.location import Location, redact, storage_error
from pipeline.linalg import quantize
from pipeline.linalg.decompose import Decomposition
from pipeline.linalg.gauge import JointBasis

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LOCK_TTL = 600.0  # seconds without a heartbeat after which a lock is stale
POINTER = "LATEST"
LOCK = "LOCK"
RUN = "run.json"  # present while the run that writes a version has not published it
MANIFEST = "manifest.json"
LOADINGS = "loadings.parquet"
CATALOG = "catalog.parquet"
REPORT = "report.json"
LOADINGS_ROW_GROUP = 8192
_VERSION_RE = re.compile(r"^v(\d{6})$")
# A task id, and each part of an object path below a version folder: what scan accepts on the way
# in (no part starts with '.', so '..' never passes). RE2 syntax too, for pyarrow.compute.
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9._=+-]*"
SAFE_TASK_ID = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})*$")
_OBJECT_PATH_RE = re.compile(rf"^versions/v\d{{6}}(/{_SEGMENT})+$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "sha256": self.sha256}


# What a version folder is (Store.survey).
PUBLISHED = "published"  # a sound manifest, and no run record or LATEST names it
UNREADABLE = "unreadable"  # no run record (or LATEST names it), but its manifest is not sound
UNFINISHED = "unfinished"  # a run record, and LATEST does not name it: a run at work or crashed
LEFTOVER = "leftover"  # neither: what prune or a discard left of a version (objects newer ones use)
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


def basis_file(shard: str) -> str:
    return f"basis/{shard}.safetensors"


def staging_file(shard: str) -> str:
    return f"staging/loadings-{shard}.parquet"


def done_file(shard: str) -> str:
    """Written by a shard task after its basis object and staged loadings: the shard is finished."""
    return f"staging/{shard}.json"


def version_path(version: str, name: str) -> str:
    """A version's object as a path relative to the store root, as manifests list files."""
    return f"versions/{version}/{name}"


def basis_key(module: str, side: str, field: str) -> str:
    return f"{module}.{side}.{field}"


def check_bytes(data: bytes, expected: dict, name: str) -> None:
    if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise IntegrityError(
            f"{redact(name)} does not match its manifest checksum: the object is corrupt or was replaced"
        )


# -- a store's own metadata is input: ids and paths are checked wherever they are read -------------


def is_safe_task_id(task_id: object) -> bool:
    """A task id as scan accepts it: relative, parts of letters, digits and ._=+-, none starting with '.'."""
    return isinstance(task_id, str) and SAFE_TASK_ID.match(task_id) is not None


def safe_task_id(task_id: object, where: str) -> str:
    """`task_id` read from `where` (a store object), or IntegrityError: used as a path by export."""
    if not is_safe_task_id(task_id):
        raise IntegrityError(
            f"{where} holds task id {task_id!r}, which is not a safe relative path (letters, digits, ._=+- and /)"
        )
    return task_id


def unsafe_task_ids(column) -> list:
    """The values of a task_id column (pyarrow) that are not safe task ids (nulls too), in order."""
    bad = pc.invert(pc.fill_null(pc.match_substring_regex(column, SAFE_TASK_ID.pattern), False))
    return pc.filter(column, bad).to_pylist()


def check_version_id(version: object, where: str | None = None) -> str:
    """A version id (v + 6 digits); anything else (`../x`, a path into another store) is refused:
    IntegrityError naming `where` when read from a store, PipelineError when the user typed it."""
    if isinstance(version, str) and _VERSION_RE.match(version):
        return version
    if where is None:
        raise PipelineError(f"{version!r} is not a version id (v and 6 digits, e.g. v000001)")
    raise IntegrityError(f"{where}: {version!r} is not a version id (v and 6 digits)")


def is_object_path(path: object) -> bool:
    """A manifest's file path: `versions/vNNNNNN/...`, relative, no empty, '.' or '..' parts."""
    return isinstance(path, str) and _OBJECT_PATH_RE.match(path) is not None


def manifest_problems(manifest: object, version: str) -> list[str]:
    """What makes a parsed manifest unusable: every field a reader relies on, with its type (fields
    that early format-1 manifests lack, `operation`, `adapters.in_basis` and a module's `count`,
    only when present); every file path a store path; every module's basis one of the files.
    Empty when it is sound."""
    if not isinstance(manifest, dict):
        return [f"not a JSON object ({type(manifest).__name__})"]
    problems = []

    def need(container: dict, key: str, kinds, label: str, optional: bool = False) -> bool:
        if optional and key not in container:
            return False
        value = container.get(key)
        if isinstance(value, bool) or not isinstance(value, kinds):
            problems.append(f"{label} is {'missing' if key not in container else type(value).__name__}")
            return False
        return True

    if need(manifest, "format_version", int, "format_version") and manifest["format_version"] > FORMAT_VERSION:
        problems.append(f"format_version {manifest['format_version']}: this lora-subspace reads up to {FORMAT_VERSION}")
    if manifest.get("version") != version:
        problems.append(f"version is {manifest.get('version')!r}, not {version!r}")
    parent = manifest.get("parent")
    if "parent" not in manifest:
        problems.append("parent is missing")
    elif parent is not None and not (isinstance(parent, str) and _VERSION_RE.match(parent)):
        problems.append(f"parent {parent!r} is not a version id")
    need(manifest, "created", str, "created")
    need(manifest, "operation", str, "operation", optional=True)
    need(manifest, "original_bytes", int, "original_bytes")
    need(manifest, "parameters", dict, "parameters")
    if need(manifest, "adapters", dict, "adapters"):
        for key in ("ok", "quarantined", "in_basis"):
            need(manifest["adapters"], key, int, f"adapters.{key}", optional=key == "in_basis")
    files = manifest.get("files")
    if need(manifest, "files", dict, "files"):
        for path, entry in files.items():
            if not is_object_path(path):
                problems.append(f"file {path!r} is not a store path (versions/vNNNNNN/..., no '..')")
            elif not (
                isinstance(entry, dict)
                and isinstance(entry.get("bytes"), int)
                and entry["bytes"] >= 0
                and isinstance(entry.get("sha256"), str)
                and _SHA256_RE.match(entry["sha256"])
            ):
                problems.append(f"file {path!r}: entry is not {{bytes, sha256}}")
    if need(manifest, "modules", dict, "modules"):
        for module, entry in manifest["modules"].items():
            label = f"module {module!r}"
            if not isinstance(entry, dict):
                problems.append(f"{label} is {type(entry).__name__}")
                continue
            if isinstance(files, dict) and entry.get("basis") not in files:
                problems.append(f"{label}: basis {entry.get('basis')!r} is not one of the files")
            for key in ("a_shape", "b_shape"):
                shape = entry.get(key)
                if not (
                    isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)
                ):
                    problems.append(f"{label}: {key} is {shape!r}")
            for key in ("k_a", "k_b", "count") + (("width", "core_rank") if entry.get("method") == "joint" else ()):
                need(entry, key, int, f"{label}.{key}", optional=key == "count")
            for key in ("explained_variance_a", "explained_variance_b"):
                need(entry, key, (int, float), f"{label}.{key}")
            need(entry, "svd_route", str, f"{label}.svd_route")
    return problems


def encode_manifest(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


def encode_basis(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors(
        {k: v.contiguous() for k, v in tensors.items()}, metadata={"format_version": str(FORMAT_VERSION)}
    )


def basis_tensors(
    module: str, side: str, dec: Decomposition, packed: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """One module side's entries of a basis object; `packed`: its components as quantize.encode
    stored them (`M.S.components.int8` ...), in place of float32 components."""
    fields = {
        "singular_values": dec.singular_values,
        "mean": dec.mean,
        "total_variance": torch.tensor([dec.total_variance], dtype=torch.float64),
        "count": torch.tensor([dec.count], dtype=torch.int64),
    }
    if packed is None:
        fields["components"] = dec.components
    else:
        fields.update({f"components.{name}": value for name, value in packed.items()})
    return {basis_key(module, side, name): value.detach().to("cpu") for name, value in fields.items()}


def decode_basis(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A basis object's tensors with packed components decoded to float32 `M.S.components`."""
    decoded, packed = {}, {}
    for key, value in tensors.items():
        head, _, tail = key.rpartition(".components.")
        if head and tail in quantize.FIELDS:
            packed.setdefault(head, {})[tail] = value
        else:
            decoded[key] = value
    for head, fields in packed.items():
        decoded[f"{head}.components"] = quantize.decode(fields, tensors[f"{head}.mean"].shape[0])
    return decoded


def joint_tensors(module: str, basis: JointBasis, count: int) -> dict[str, torch.Tensor]:
    """A joint module's entries of a basis object: U (d_out, c), V (d_in, c), adapters seen."""
    return {
        basis_key(module, "joint", "u"): basis.u.detach().to("cpu", torch.float32),
        basis_key(module, "joint", "v"): basis.v.detach().to("cpu", torch.float32),
        basis_key(module, "joint", "count"): torch.tensor([count], dtype=torch.int64),
    }


def read_joint(tensors: dict[str, torch.Tensor], module: str) -> JointBasis | None:
    """A module's joint bases from a decoded basis object; None for a flat module."""
    u = tensors.get(basis_key(module, "joint", "u"))
    if u is None:
        return None
    return JointBasis(u, tensors[basis_key(module, "joint", "v")], 0.0, 0.0, 0)


def read_decomposition(tensors: dict[str, torch.Tensor], module: str, side: str) -> Decomposition:
    """A module side's Decomposition from a decoded basis object."""
    return Decomposition(
        tensors[basis_key(module, side, "components")],
        tensors[basis_key(module, side, "singular_values")],
        tensors[basis_key(module, side, "mean")],
        float(tensors[basis_key(module, side, "total_variance")]),
        "stored",
        int(tensors[basis_key(module, side, "count")]),
    )


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
        return version

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
        return sorted(n for n in names if _VERSION_RE.match(n))

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
        self.set_pointer(version)
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

    def set_pointer(self, version: str) -> None:
        pointer = {"version": version, "format_version": FORMAT_VERSION}
        self.location.write_atomic(json.dumps(pointer).encode() + b"\n", POINTER)

    @contextlib.contextmanager
    def lock(self, operation: str, ttl: float = LOCK_TTL):
        """Hold the store's writer lock (see WriterLock) for the duration of the block."""
        lock = WriterLock(self, operation, ttl)
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
            raise PipelineError(
                f"version {version} of {self} has no manifest ({self._uri('versions', version, MANIFEST)} is missing)"
            ) from None

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
        if expected is not None:
            check_bytes(data, expected, self.location.uri_of(self.location.path(path)))
        tensors = load_safetensors(data)
        return decode_basis(tensors) if decode else tensors

    def tensor_bytes(self, path: str) -> dict[str, int]:
        """Bytes of each tensor of a safetensors object (store-relative path), from its header alone."""
        fs, full = self.location.fs, self.location.path(path)
        (length,) = struct.unpack("<Q", fs.cat_file(full, start=0, end=8))
        header = json.loads(fs.cat_file(full, start=8, end=8 + length))
        return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}

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
            raise PipelineError(f"version {version} of {self} has no {name}") from None
        except (OSError, pa.ArrowInvalid) as exc:
            if isinstance(exc, pa.ArrowInvalid) or "checksum" in str(exc).lower():
                raise IntegrityError(f"{where.uri_of(where.path(name))} is corrupt: {exc}") from None
            raise


class WriterLock:
    """STORE/LOCK, created only if absent (S3 conditional PUT with If-None-Match: *, O_EXCL
    locally), so of two writers exactly one gets it.

    The holder rewrites its heartbeat every ttl/3 seconds. A lock is stale when its holder is a
    dead process on this host, or its heartbeat is older than its ttl (a killed driver, a lost
    node); a new writer then takes it over. A holder that finds its lock taken over stops before
    publishing (`check`)."""

    def __init__(self, store: Store, operation: str, ttl: float):
        self.store, self.ttl = store, ttl
        self.holder = {
            "operation": operation,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": getpass.getuser(),
            "since": _now(),
            "heartbeat": time.time(),
            "ttl": ttl,
            "token": uuid.uuid4().hex,
        }
        self.lost = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def location(self) -> Location:
        return self.store.location

    def acquire(self) -> None:
        try:
            self._create()
        except FileExistsError:
            current = self._read()
            if current is None or not _stale(current):
                raise PipelineError(self._locked_message(current)) from None
            log.warning("taking over a stale lock (%s)", _describe(current))
            self.location.remove(LOCK)
            try:
                self._create()
            except FileExistsError:
                raise PipelineError(self._locked_message(self._read())) from None
        self._beat = threading.Thread(target=self._heartbeat, name="store-lock-heartbeat", daemon=True)
        self._beat.start()

    def check(self) -> None:
        """Raise unless this writer still holds the lock (called before publishing)."""
        current = self._read()
        if self.lost or current is None or current.get("token") != self.holder["token"]:
            self.lost = True
            raise LockLost(
                f"lost the lock of store {self.store} to another writer ({_describe(current)}); nothing was published"
            )

    def release(self) -> None:
        self._stop.set()
        if self._beat:
            self._beat.join()
        try:
            current = self._read()
            if current is not None and current.get("token") == self.holder["token"]:
                self.location.remove(LOCK)
        except OSError:
            pass

    def _create(self) -> None:
        try:
            self.location.create_exclusive(json.dumps(self.holder).encode(), LOCK)
        except FileExistsError:
            raise
        except OSError as exc:
            raise storage_error("lock store", self.location, exc) from None

    def _read(self) -> dict | None:
        try:
            return json.loads(self.location.read_bytes(LOCK))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # half-written by a crashed holder: stale by any measure

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                current = self._read()
                if current is None or current.get("token") != self.holder["token"]:
                    self.lost = True
                    return
                self.holder["heartbeat"] = time.time()
                self.location.write_atomic(json.dumps(self.holder).encode(), LOCK)
            except OSError as exc:
                log.warning("could not refresh the store lock: %s", redact(str(exc)))

    def _locked_message(self, current: dict | None) -> str:
        return (
            f"store {self.store} is locked ({_describe(current)}): another writer is at work. If none is, "
            f"the lock goes stale {self.ttl:.0f}s after its last heartbeat, or remove "
            f"{redact(self.location.uri_of(self.location.path(LOCK)))} and retry"
        )


def _describe(holder: dict | None) -> str:
    try:
        return f"{holder['operation']} by {holder['user']}@{holder['host']} pid {holder['pid']} since {holder['since']}"
    except (TypeError, KeyError):
        return "unknown holder"


def _stale(holder: dict) -> bool:
    try:
        if holder["host"] == socket.gethostname() and not _alive(int(holder["pid"])):
            return True
        return time.time() - float(holder["heartbeat"]) > float(holder["ttl"])
    except (KeyError, TypeError, ValueError):
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class LockLost(PipelineError):
    """Another writer took this run's lock over: its staged work is now that writer's."""
