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
        raise IntegrityError(f"{redact(name)} does not match its manifest checksum: the object is corrupt or was replaced")


def encode_manifest(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


def encode_basis(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata={"format_version": str(FORMAT_VERSION)})


def basis_tensors(module: str, side: str, dec: Decomposition, packed: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One module side's entries of a basis object; `packed`: its components as quantize.encode
    stored them (`M.S.components.int8` ...), in place of float32 components."""
    fields = {
        "singular_values": dec.singular_values, "mean": dec.mean,
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
        tensors[basis_key(module, side, "components")], tensors[basis_key(module, side, "singular_values")],
        tensors[basis_key(module, side, "mean")], float(tensors[basis_key(module, side, "total_variance")]), "stored",
        int(tensors[basis_key(module, side, "count")]),
    )


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

    def publish(self, version: str, manifest: dict, lock: WriterLock) -> None:
        """Write the manifest, then move the pointer: readers see the old version or the new.
        Refuses if this writer lost its lock, or the pointer moved since the work began (from
        manifest["parent"]). Then the run's scratch (staging, run record) goes."""
        lock.check()
        current = self.current_version()
        if current != manifest["parent"]:
            raise PipelineError(
                f"store {self} moved to {current} while this run worked from {manifest['parent']}; nothing was published"
            )
        where = self.version_location(version)
        where.write_bytes(encode_manifest(manifest), MANIFEST)
        failpoints.reach("publish")
        self.set_pointer(version)
        where.remove("staging")
        where.remove(RUN)

    def start_run(self, version: str, record: dict) -> None:
        self.version_location(version).write_bytes(json.dumps(record).encode(), RUN)

    def unfinished(self) -> list[tuple[str, dict]]:
        """Versions whose run never published them (newest first), with their run records: a
        crashed run's leftovers, to resume or remove. Only meaningful under the lock."""
        found = []
        for version in reversed(self.versions()):
            try:
                found.append((version, json.loads(self.version_location(version).read_bytes(RUN))))
            except FileNotFoundError:
                continue
            except ValueError:
                found.append((version, {}))
        return found

    def finished_shards(self, version: str) -> dict[str, dict]:
        """Shard name -> its done record, for the shards a run of this version finished."""
        where = self.version_location(version)
        try:
            names = where.fs.ls(where.path("staging"), detail=False)
        except FileNotFoundError:
            return {}
        done = {}
        for path in names:
            name = path.rsplit("/", 1)[-1]
            if name.endswith(".json"):
                try:
                    done[name[: -len(".json")]] = json.loads(where.fs.cat_file(path))
                except (FileNotFoundError, ValueError):
                    continue
        return done

    def set_pointer(self, version: str) -> None:
        pointer = {"version": version, "format_version": FORMAT_VERSION}
        self.location.write_atomic(json.dumps(pointer).encode() + b"\n", POINTER)

    @contextlib.contextmanager
    def lock(self, operation: str, ttl: float = LOCK_TTL):
        """Hold the store's writer lock (see WriterLock) for the duration of the block."""
        lock = WriterLock(self, operation, ttl)
        lock.acquire()
        try:
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
            where = self.version_location(version)
            try:
                manifest = json.loads(where.read_bytes(MANIFEST))
            except FileNotFoundError:
                continue  # unpublished: a crashed or running write
            if not where.exists(RUN):  # a manifest whose pointer never moved is not published
                found.append(manifest)
        return found

    # -- reading ---------------------------------------------------------------------------------

    def manifest(self, version: str | None = None) -> dict:
        version = self.require_version(version)
        try:
            return json.loads(self.version_location(version).read_bytes(MANIFEST))
        except FileNotFoundError:
            raise PipelineError(f"version {version} of {self} has no manifest") from None

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

    def read_table(self, version: str, name: str, task_ids: list[str] | None = None, columns: list[str] | None = None) -> pa.Table:
        """A Parquet table of a version; with task_ids, only those adapters' rows (row groups whose
        statistics exclude them are not read)."""
        where = self.version_location(version)
        filters = [("task_id", "in", list(task_ids))] if task_ids is not None else None
        try:
            return pq.read_table(where.path(name), filesystem=where.fs, columns=columns, filters=filters, page_checksum_verification=True)
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
            "operation": operation, "host": socket.gethostname(), "pid": os.getpid(), "user": getpass.getuser(),
            "since": _now(), "heartbeat": time.time(), "ttl": ttl, "token": uuid.uuid4().hex,
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
            raise LockLost(f"lost the lock of store {self.store} to another writer ({_describe(current)}); nothing was published")

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
