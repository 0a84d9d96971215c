"""The store's writer lock: STORE/LOCK, created only if absent, kept fresh by a heartbeat thread,
taken over when stale (docs/store-format.md, "Writers")."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid

from pipeline.errors import PipelineError
from pipeline.io.format import LOCK
from pipeline.io.location import Location, redact, storage_error

log = logging.getLogger(__name__)

LOCK_TTL = 600.0  # seconds without a heartbeat after which a lock is stale


class WriterLock:
    """STORE/LOCK, created only if absent (S3 conditional PUT with If-None-Match: *, O_EXCL
    locally), so of two writers exactly one gets it.

    The holder rewrites its heartbeat every ttl/3 seconds. A lock is stale when its holder is a
    dead process on this host, or its heartbeat is older than its ttl (a killed driver, a lost
    node); a new writer then takes it over. A holder that finds its lock taken over stops before
    publishing (`check`)."""

    def __init__(self, location: Location, operation: str, ttl: float = LOCK_TTL):
        self.location, self.ttl = location, ttl
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
                f"lost the lock of store {self.location} to another writer ({_describe(current)}); "
                "nothing was published"
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
            f"store {self.location} is locked ({_describe(current)}): another writer is at work. If none is, "
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
