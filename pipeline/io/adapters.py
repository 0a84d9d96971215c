"""Finding PEFT adapter folders under a source and reading their bytes.

Only reads: the config file, the safetensors header (one range read, two for huge headers) and,
for compute, just the tensor byte ranges a shard needs, coalesced per file and fetched
concurrently where the filesystem supports it (s3fs `cat_ranges`).
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipeline import peft_format
from pipeline.errors import AdapterError, PipelineError
from pipeline.io.location import Location, printable, storage_error
from pipeline.io.safetensors_ranges import (
    HEADER_PROBE_BYTES,
    TensorInfo,
    coalesce,
    parse_full_header,
    parse_header,
)

MANIFEST_SUFFIXES = (".txt", ".parquet")


@dataclass(frozen=True)
class FileStat:
    size: int
    tag: str  # ETag on S3, modification time locally: tells a changed upload from the same one
    sha256: str | None = None  # of the content, where it was read (local weights files): a new time alone is no change


@dataclass
class AdapterRef:
    """An adapter folder found by discovery. `files` maps file name -> stat, or is None when the
    folder came from a manifest and has not been listed yet. `root`: the source folder it was
    found in (None: a manifest's folder, which is then its own bound); a local symbolic link
    that leads out of it is refused."""

    task_id: str
    location: Location
    files: dict[str, FileStat] | None = None
    root: str | None = None


@dataclass
class AdapterBytes:
    """What a scan reads of one adapter: raw config bytes (None if absent), the tensor table."""

    files: dict[str, FileStat]
    config: bytes | None = None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)


def _stat(info: dict) -> FileStat:
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return FileStat(int(info.get("size") or 0), str(tag).strip('"'))


def discover(source: Location) -> list[AdapterRef]:
    """Every adapter folder under source (or listed by a manifest file), sorted by task id."""
    fs = source.fs
    try:
        is_manifest = source.root.endswith(MANIFEST_SUFFIXES) and fs.isfile(source.root)
        if is_manifest:
            return _from_manifest(source)
        listing = fs.find(source.root, detail=True)
    except (OSError, ValueError) as exc:
        raise storage_error("list source", source, exc) from None
    folders: dict[str, dict[str, FileStat]] = {}
    for path, info in listing.items():
        folder, name = posixpath.split(path)
        if name in peft_format.ADAPTER_FILES:
            folders.setdefault(folder, {})[name] = _stat(info)
    if not folders:
        if not listing and not fs.exists(source.root):
            raise PipelineError(f"source {source} does not exist")
        raise PipelineError(f"no adapters found under {source} (no folder holds {peft_format.CONFIG_FILE} or weights)")
    refs = [
        AdapterRef(
            _task_id(source.root, folder), source.child(posixpath.relpath(folder, source.root)), files, source.root
        )
        for folder, files in folders.items()
    ]
    return sorted(refs, key=lambda r: r.task_id)


def _task_id(root: str, folder: str) -> str:
    rel = posixpath.relpath(folder, root)
    return posixpath.basename(folder) if rel == "." else rel


def _from_manifest(manifest: Location) -> list[AdapterRef]:
    """A text file (one adapter folder URI per line, # comments) or Parquet (column `uri`, optional
    `task_id`). Task ids default to the folder's path relative to the manifest's folder."""
    data = manifest.read_bytes()
    if manifest.root.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        if "uri" not in table.column_names:
            raise PipelineError(f"manifest {manifest} has no 'uri' column (columns: {table.column_names})")
        uris = table.column("uri").to_pylist()
        ids = table.column("task_id").to_pylist() if "task_id" in table.column_names else [None] * len(uris)
    else:
        lines = (line.strip() for line in data.decode("utf-8", errors="replace").splitlines())
        uris = [line for line in lines if line and not line.startswith("#")]
        ids = [None] * len(uris)
    if not uris:
        raise PipelineError(f"manifest {manifest} lists no adapters")
    base = posixpath.dirname(manifest.root)
    refs = []
    for uri, task_id in zip(uris, ids):
        uri = uri.rstrip("/")
        if "://" not in uri and not uri.startswith("/"):
            uri = manifest.uri_of(posixpath.normpath(posixpath.join(base, uri)))
        location = Location(uri, manifest.endpoint_url)
        if task_id is None:
            rel = posixpath.relpath(location.root, posixpath.dirname(manifest.root))
            task_id = rel if not rel.startswith("..") else posixpath.basename(location.root)
        refs.append(AdapterRef(str(task_id), location))
    protocols = sorted({ref.location.protocol for ref in refs})
    if len(protocols) > 1:
        raise PipelineError(
            f"manifest {manifest} lists adapters on more than one filesystem ({', '.join(protocols)}); "
            "use one manifest per filesystem"
        )
    return sorted(refs, key=lambda r: (r.task_id, r.location.uri))


def read_adapter(ref: AdapterRef) -> AdapterBytes:
    """Config bytes and the safetensors header of one adapter. Raises AdapterError (quarantine)
    for malformed headers; storage errors propagate as OSError."""
    fs = ref.location.fs
    files = ref.files if ref.files is not None else _list_files(ref)
    if ref.location.is_local:
        _check_links(ref, files)
    result = AdapterBytes(files)
    if peft_format.CONFIG_FILE in files:
        # No more than a config may hold (a listed size can be stale): one byte over tells it is too big.
        result.config = fs.cat_file(
            ref.location.path(peft_format.CONFIG_FILE), start=0, end=peft_format.MAX_CONFIG_BYTES + 1
        )
    if peft_format.WEIGHTS_FILE in files:
        result.tensors = read_tensor_table(
            ref.location.path(peft_format.WEIGHTS_FILE), files[peft_format.WEIGHTS_FILE].size, fs
        )
    return result


def _check_links(ref: AdapterRef, files: dict[str, FileStat]) -> None:
    """Refuse adapter files that symbolic links take out of the source (or, from a manifest, out
    of the adapter's folder): their contents would be read and stored as the adapter's.
    Discovery does not descend into linked folders."""
    bound = os.path.realpath(ref.root or ref.location.root)
    for name in sorted(files):
        target = os.path.realpath(ref.location.path(name))
        if os.path.commonpath([target, bound]) != bound:
            raise AdapterError(f"{name} is a symbolic link that leads outside the source; it is not followed")


def _list_files(ref: AdapterRef) -> dict[str, FileStat]:
    listing = ref.location.fs.ls(ref.location.root, detail=True)
    files = {posixpath.basename(i["name"]): _stat(i) for i in listing if i.get("type") != "directory"}
    return {name: stat for name, stat in files.items() if name in peft_format.ADAPTER_FILES}


def list_adapter_files(refs: list[AdapterRef]) -> list[dict[str, FileStat]]:
    """The adapter files of each folder with their size and tag ({} where the folder is gone)."""
    out = []
    for ref in refs:
        try:
            out.append(_list_files(ref))
        except FileNotFoundError:
            out.append({})
    return out


def weights_sha256(refs: list[AdapterRef]) -> list[str | None]:
    """The SHA-256 of each adapter's weights file (None where it is gone): what tells a copy
    that did not keep file times from a changed upload."""
    out = []
    for ref in refs:
        try:
            with ref.location.fs.open(ref.location.path(peft_format.WEIGHTS_FILE), "rb") as handle:
                out.append(hashlib.file_digest(handle, "sha256").hexdigest())
        except FileNotFoundError:
            out.append(None)
    return out


def read_tensor_table(path: str, size: int, fs) -> dict[str, TensorInfo]:
    head = fs.cat_file(path, start=0, end=min(size, HEADER_PROBE_BYTES))
    length, infos = parse_header(head, size)
    if infos is None:
        infos = parse_full_header(fs.cat_file(path, start=8, end=8 + length), size)
    return infos


def read_ranges(fs, requests: list[tuple[str, list[TensorInfo]]]) -> tuple[list[list[bytes]], int]:
    """Bytes of the given tensors, per file in request order, and how many range requests it took.
    Ranges of one file are coalesced and all files are fetched in one `cat_ranges` call
    (concurrent on object stores)."""
    paths, starts, ends, spans = [], [], [], []
    for path, infos in requests:
        merged = coalesce([(i.start, i.end) for i in infos])
        spans.append(merged)
        for start, end in merged:
            paths.append(path)
            starts.append(start)
            ends.append(end)
    blobs = fs.cat_ranges(paths, starts, ends, on_error="raise")
    out: list[list[bytes]] = []
    cursor = 0
    for (path, infos), merged in zip(requests, spans):
        chunks = list(zip(merged, blobs[cursor : cursor + len(merged)]))
        cursor += len(merged)
        out.append([_slice(chunks, info, path) for info in infos])
    return out, len(paths)


def _slice(chunks: list[tuple[tuple[int, int], bytes]], info: TensorInfo, path: str) -> memoryview:
    for (start, end), blob in chunks:
        if start <= info.start and info.end <= end:
            if len(blob) != end - start:
                # Not an OSError: reading the same file again would fail again, so it is not retried.
                read = f"{len(blob)} of {end - start} bytes read"
                raise PipelineError(f"{printable(path)} changed after it was scanned: {read}; run again")
            return memoryview(blob)[info.start - start : info.end - start]
    raise AssertionError("range not covered by its coalesced chunks")
