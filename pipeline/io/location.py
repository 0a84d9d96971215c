"""A storage root (local path, file:// or s3:// URI) and the fsspec filesystem behind it.

A Location is small and picklable, so Ray tasks receive it and open their own filesystem:
credentials come from each process's environment (AWS variables, profile, instance role) and are
never part of a task's arguments or of any message.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import fsspec

_USERINFO_RE = re.compile(r"(?<=://)[^/@]+@")
# A URI's query string (signatures, tokens) runs to the next blank or quote; a "?" elsewhere is text.
_QUERY_RE = re.compile(r"(?<=://)([^\s?'\"`]*)\?[^\s'\"`]*")


def redact(text: str) -> str:
    """Strip user info and query strings (signatures, tokens) from any URI in text."""
    return _QUERY_RE.sub(r"\1", _USERINFO_RE.sub("", text))


def printable(text: str, limit: int = 256) -> str:
    """A name from the outside world (task id, URI, tensor key) as it may appear in one line of a
    message: control characters escaped as repr escapes them (a newline in a folder name cannot
    break a log line), cut to `limit` characters."""
    text = str(text)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


@dataclass(frozen=True)
class Location:
    uri: str
    endpoint_url: str | None = None

    def __post_init__(self):
        if _USERINFO_RE.search(self.uri):
            # They would travel in task arguments and error messages; the environment is the place.
            raise PipelineError(
                f"{redact(self.uri)}: credentials in a URI are not accepted; "
                "use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or an instance role"
            )
        if _QUERY_RE.search(self.uri):
            # A signed URL's signature would end up in task ids, messages and the store's catalog.
            raise PipelineError(
                f"{redact(self.uri)}: a query string in a URI is not accepted (signed URLs are not read); "
                "name the object or folder by its plain URI, with credentials in the environment"
            )
        if self.protocol == "file":
            # Made absolute where the Location is built (the driver): a task gets the pickled
            # absolute path and never resolves it against its own working directory.
            prefix = "file://" if self.uri.startswith("file://") else ""
            object.__setattr__(self, "uri", prefix + os.path.abspath(self.uri[len(prefix) :]))

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return _filesystem(self.protocol, self.endpoint_url)

    @property
    def protocol(self) -> str:
        return self.uri.split("://", 1)[0] if "://" in self.uri else "file"

    @property
    def root(self) -> str:
        """The root as a path of its filesystem (no protocol), without a trailing slash."""
        path = self.uri.split("://", 1)[1] if "://" in self.uri else self.uri
        return path.rstrip("/") or "/"

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri_of(self, path: str) -> str:
        return path if self.is_local else f"{self.protocol}://{path}"

    def relative(self, path: str) -> str:
        """A path of this filesystem relative to the root."""
        return posixpath.relpath(path, self.root)

    def child(self, *parts: str) -> Location:
        return Location(self.uri_of(self.path(*parts)), self.endpoint_url)

    def __str__(self) -> str:
        return redact(self.uri)

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        path = self.path(*parts)
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, data)

    def write_atomic(self, data: bytes, *parts: str) -> None:
        """Replace an object so a reader sees the old bytes or the new, never a mix. A single S3
        PUT is atomic; a local file is written beside and renamed over."""
        if not self.is_local:
            self.write_bytes(data, *parts)
            return
        path = self.path(*parts)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        self.write_bytes(data, tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            os.unlink(tmp)  # nothing of a failed write stays behind
            raise

    def create_exclusive(self, data: bytes, *parts: str) -> None:
        """Write an object only if none exists; FileExistsError otherwise. Atomic on S3 (a PUT with
        If-None-Match: *) and locally (O_EXCL)."""
        path = self.path(*parts)
        if not self.is_local:
            self.fs.pipe_file(path, data, mode="create")
            return
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def remove(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


@functools.cache
def _filesystem(protocol: str, endpoint_url: str | None) -> fsspec.AbstractFileSystem:
    options: dict = {}
    if protocol in ("s3", "s3a"):
        options = {"endpoint_url": endpoint_url} if endpoint_url else {}
        # One retry policy for every request (throttling, 5xx, resets and timeouts back off and
        # retry; 4xx do not); s3fs maps S3 errors to builtin OSErrors.
        options["config_kwargs"] = {
            "retries": {"max_attempts": 8, "mode": "adaptive"},
            "connect_timeout": float(os.environ.get("LORA_SUBSPACE_S3_CONNECT_TIMEOUT", 10)),
            "read_timeout": float(os.environ.get("LORA_SUBSPACE_S3_READ_TIMEOUT", 60)),
        }
    import fsspec  # on first use: the CLI's --help and --version do not pay for it

    try:
        return fsspec.filesystem(protocol, **options)
    except (ImportError, ValueError) as exc:
        raise PipelineError(f"cannot open storage protocol {protocol!r}: {exc}") from None


def storage_error(action: str, where: Location | str, exc: BaseException) -> PipelineError:
    """A one-line error for a failed storage call, with no secrets in it."""
    kind = {
        FileNotFoundError: "not found",
        PermissionError: "permission denied",
    }.get(type(exc), exc.__class__.__name__)
    detail = redact(str(exc)).splitlines()[0] if str(exc) else ""
    return PipelineError(f"cannot {action} {redact(str(where))}: {kind}{': ' + detail if detail else ''}")
