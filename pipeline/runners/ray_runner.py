"""Ray fan-out: tasks with declared resources, retries for transient failures, results as they finish."""

from __future__ import annotations

import functools
import importlib
import logging
import os
import socket
from collections import Counter

import ray
from ray.exceptions import RayTaskError

from pipeline.errors import PipelineError
from pipeline.runners import MAX_RETRIES, PERMANENT

log = logging.getLogger(__name__)

# Seconds to wait for a joined cluster's port to answer: Ray itself retries an address that does
# not answer for minutes before it gives up.
JOIN_TIMEOUT = 10

# Local folders that every node of the cluster mounts at the same path (os.pathsep-separated).
SHARED_PATHS_ENV = "LORA_SUBSPACE_SHARED_PATHS"


class NotRetried(Exception):
    """Carries a permanent OSError out of a task: not an OSError itself, so Ray does not retry it."""

    def __init__(self, error: OSError):
        super().__init__(error)
        self.error = error


class RayRunner:
    """Joins the cluster at `address` (or RAY_ADDRESS); without one, starts an embedded local Ray.
    `quiet`: nothing of Ray's is printed but through the logging handlers (--log-format json)."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None, quiet: bool = False):
        if not ray.is_initialized():
            # "local" starts a new embedded cluster, never one that `ray start` left on this machine.
            address = address or os.environ.get("RAY_ADDRESS") or "local"
            local = {"num_cpus": num_cpus, "include_dashboard": False} if address == "local" else {}
            if quiet:
                # Ray's own records (its start-up warnings) go through our handlers, JSON included;
                # workers' output stays in Ray's session logs instead of being printed here raw.
                logging.getLogger("ray").handlers.clear()
                logging.getLogger("ray").propagate = True
            if address != "local":
                check_reachable(address)
            try:
                context = ray.init(address=address, logging_level=logging.WARNING, log_to_driver=not quiet, **local)
            except ConnectionError as exc:  # an OSError, which users would otherwise read as a storage fault
                raise PipelineError(f"Ray: cannot join the cluster at {address}: {exc}") from None
            self.dashboard_url = context.dashboard_url or None
        else:
            self.dashboard_url = None
        self.tasks_per_node: Counter[str] = Counter()  # node id -> tasks finished there, for logs and tests
        resources = ray.cluster_resources()
        self.has_gpus = resources.get("GPU", 0) > 0
        self.num_cpus = int(resources.get("CPU", 1))

    def check_local_paths(self, paths: list[str]) -> None:
        """Refuse absolute local paths that tasks on other hosts would not find: a node on another
        host than the driver's sees its own disk, unless the path lies under a folder declared
        shared in LORA_SUBSPACE_SHARED_PATHS. Nodes on the driver's host (an embedded Ray, or
        `ray start` on this machine) see its files."""
        hosts = _other_hosts() if paths else []
        if not hosts:
            return
        shared = [os.path.abspath(p) for p in os.environ.get(SHARED_PATHS_ENV, "").split(os.pathsep) if p]
        for path in paths:
            if not any(os.path.commonpath([path, folder]) == folder for folder in shared):
                others = ", ".join(hosts[:3]) + (f" and {len(hosts) - 3} more" if len(hosts) > 3 else "")
                raise PipelineError(
                    f"{path} is a local path, but the Ray cluster has nodes on other hosts ({others}) "
                    "that would not see it: "
                    f"use s3://..., or a file system every node mounts at the same path, declared in {SHARED_PATHS_ENV}"
                )

    def warm_up(self, module: str) -> None:
        """Import `module` in one worker per CPU now, so that the first tasks of the stage that
        needs it do not each wait for its imports (torch: seconds)."""
        ray.get([_import.remote(module) for _ in range(self.num_cpus)])

    def map_unordered(self, fn, items, *, num_cpus=1, use_gpu=False, memory=None):
        options = {"num_cpus": num_cpus, "max_retries": MAX_RETRIES, "retry_exceptions": [OSError]}
        if use_gpu and self.has_gpus:
            options["num_gpus"] = 1
        if memory:
            options["memory"] = memory
        remote = _remote(fn).options(**options)
        # A window of tasks in flight keeps the object store and the driver bounded.
        window = max(2 * self.num_cpus, 4)
        pending: dict = {}
        queue = list(enumerate(items))
        queue.reverse()
        while queue or pending:
            while queue and len(pending) < window:
                index, item = queue.pop()
                pending[remote.remote(item)] = index
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            index = pending.pop(ref)
            try:
                node, result = ray.get(ref)
            except RayTaskError as exc:
                for other in pending:
                    ray.cancel(other)
                raise application_error(exc) from None
            self.tasks_per_node[node] += 1
            yield index, result


def application_error(exc: RayTaskError) -> BaseException:
    """The task's own error for what users see as one line (PipelineError, OSError), without
    Ray's wrapping, whose text is the remote traceback; anything else (a bug) keeps it."""
    cause = exc.cause.error if isinstance(exc.cause, NotRetried) else exc.cause
    if isinstance(cause, (PipelineError, OSError)):
        return cause
    return exc.as_instanceof_cause()


# What an HTTP/2 (gRPC) client sends first: the preface and an empty SETTINGS frame. A Ray head's
# GCS and Ray client ports answer with a SETTINGS frame (type 4, the fourth byte of its header).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_FRAME_HEADER = 9


def check_reachable(address: str) -> None:
    """Fail in seconds when nothing, or something other than gRPC, answers at a cluster's
    `host:port` (or `ray://host:port`); "auto" (the cluster that `ray start` left on this machine)
    is Ray's to find. With RAY_USE_TLS the port speaks TLS first, and only the connection is checked."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        if address == "auto":
            return
        raise PipelineError(f"Ray: {address!r} is not a cluster address: use host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=JOIN_TIMEOUT) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", ""):
                sock.sendall(_HTTP2_PREFACE)
                head = _received(sock, _FRAME_HEADER)
                if len(head) < _FRAME_HEADER or head[3] != 4:
                    raise PipelineError(
                        f"Ray: {address} answers, but not as a Ray cluster does (no gRPC there): check --address "
                        "or RAY_ADDRESS (a head's GCS port, 6379 by default, or ray://HEAD:10001)"
                    )
    except OSError as exc:
        reason = f"no answer in {JOIN_TIMEOUT} s" if isinstance(exc, TimeoutError) else exc.strerror or repr(exc)
        raise PipelineError(f"Ray: nothing answers at {address} ({reason}): check --address or RAY_ADDRESS") from None


def _received(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := sock.recv(size - len(data))):
        data += chunk
    return data


def _other_hosts() -> list[str]:
    """Addresses of the live nodes that can run tasks and are not on the driver's host."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    me = ray.get_runtime_context().get_node_id()
    mine = {n["NodeManagerAddress"] for n in nodes if n["NodeID"] == me}
    workers = {
        n["NodeManagerAddress"] for n in nodes if any(n.get("Resources", {}).get(r, 0) > 0 for r in ("CPU", "GPU"))
    }
    return sorted(workers - mine)


@ray.remote(num_cpus=1)
def _import(module: str) -> None:
    importlib.import_module(module)


@functools.cache
def _remote(fn):
    def on_node(item):
        try:
            return ray.get_runtime_context().get_node_id(), fn(item)
        except PERMANENT as exc:
            raise NotRetried(exc) from None

    on_node.__name__ = on_node.__qualname__ = fn.__name__  # tasks keep their names in the dashboard
    return ray.remote(on_node)
