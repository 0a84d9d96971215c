"""Executors: they fan work out and collect results; they know nothing of adapters.

`SerialRunner` runs in-process (tests, debugging); `LocalRunner` in-process on threads;
`RayRunner` (the only module importing Ray) on a local or remote Ray cluster. All yield
`(index, result)` as results finish. `RunnerChoice` picks in-process or Ray per stage, by the
size of the stage's work. A shared module: imports only pipeline.errors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

RUNNERS = ("auto", "local", "ray")
# A stage of at most LOCAL_ADAPTERS adapters and LOCAL_BYTES of their bytes (read or written) runs
# in-process under "auto": Ray's start-up (seconds, tens on a busy machine) and per-task overhead
# would cost more than its worker processes gain on such a stage.
LOCAL_ADAPTERS = 256
LOCAL_BYTES = 512 << 20
# Lost workers and transient storage faults (resets, timeouts, throttling: the OSErrors left after
# s3fs's own retries) are retried, in-process as on Ray; a bug, bad input or a permanent storage
# error is not.
MAX_RETRIES = 3
PERMANENT = (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)

T = TypeVar("T")


class Runner(Protocol):
    has_gpus: bool
    num_cpus: int  # how many tasks run at once: the plan makes at least this many shards

    def map_unordered(
        self,
        fn: Callable[[Any], Any],
        items: list,
        *,
        num_cpus: float = 1,
        use_gpu: bool = False,
        memory: int | None = None,
    ) -> Iterator[tuple[int, Any]]: ...


class SerialRunner:
    has_gpus = False
    num_cpus = 1

    def map_unordered(self, fn, items, *, num_cpus=1, use_gpu=False, memory=None):
        for index, item in enumerate(items):
            yield index, fn(item)


class LocalRunner:
    """In-process, without Ray. Tasks that declare a memory bound (compute shards, each planned
    within --task-memory) run one at a time, so the process holds one task's memory as a Ray
    worker would; the others (listings, reads, exports: mostly waiting on storage) on `threads`
    threads. `num_cpus` is what an embedded Ray would have, so the plan (its shards) is the same."""

    has_gpus = False

    def __init__(self, num_cpus: int | None = None, threads: int | None = None):
        self.num_cpus = num_cpus or local_cpus()
        self.threads = threads or self.num_cpus

    def map_unordered(self, fn, items, *, num_cpus=1, use_gpu=False, memory=None):
        if memory or self.threads == 1 or len(items) < 2:
            for index, item in enumerate(items):
                yield index, with_retries(fn, item)
            return
        pool = ThreadPoolExecutor(min(self.threads, len(items)))
        try:
            futures = {pool.submit(with_retries, fn, item): index for index, item in enumerate(items)}
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            pool.shutdown(cancel_futures=True)  # a failed task: the others not started never start


def with_retries(fn: Callable[[Any], Any], item: Any) -> Any:
    """fn(item), again after a transient OSError, up to MAX_RETRIES times (as a Ray task is)."""
    for attempt in range(MAX_RETRIES):
        try:
            return fn(item)
        except PERMANENT:
            raise
        except OSError as exc:
            log.warning("%s: %s; retrying (%d of %d)", fn.__name__, exc, attempt + 1, MAX_RETRIES)
    return fn(item)


def local_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LazyRunner:
    """A runner made on first use: commands check their inputs before a cluster starts, and a
    command that finds nothing to do starts none."""

    def __init__(self, make: Callable[[], Runner]):
        self._make = make
        self._runner: Runner | None = None

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            self._runner = self._make()
        return self._runner

    @property
    def made(self) -> bool:
        return self._runner is not None

    @property
    def has_gpus(self) -> bool:
        return self.runner.has_gpus

    @property
    def num_cpus(self) -> int:
        return self.runner.num_cpus

    def map_unordered(self, fn, items, **options):
        if not items:
            return iter(())
        return self.runner.map_unordered(fn, items, **options)


class RunnerChoice:
    """In-process or Ray, per stage of a command. `mode` "local" or "ray" forces one; "auto" runs
    in-process the stages that say their work is small (`for_work`) and on Ray the others. Ray is
    made (started or joined) once, on the first task that needs it."""

    def __init__(
        self, make_ray: Callable[[], Runner], mode: str = "auto", num_cpus: int | None = None, embedded: bool = True
    ):
        if mode not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {mode!r}")
        self.mode = mode
        self.ray = LazyRunner(make_ray)
        self.local = LocalRunner(num_cpus)
        self.embedded = embedded  # make_ray starts a Ray of its own (seconds), rather than join one

    def while_starting(self, work: Callable[[Runner], T], warm: str | None = None) -> T:
        """work(runner), a stage before the default runner's: when that runner is an embedded Ray
        still to start, Ray starts on this thread (ray.init wants the main one) while `work` runs
        in-process on another, so neither waits for the other; then its workers import the
        module `warm` (the next stage's tasks). A joined cluster (its many workers, no start to
        wait for) or a started one runs `work` itself."""
        if self.default is not self.ray or self.ray.made or not self.embedded:
            return work(self)
        with ThreadPoolExecutor(1, thread_name_prefix="while-starting") as pool:
            done = pool.submit(work, self.local)
            try:
                ray = self.ray.runner
                if warm and hasattr(ray, "warm_up"):
                    ray.warm_up(warm)
            except BaseException:
                wait([done])  # the start's error, once the work has stopped
                raise
            return done.result()

    def for_work(self, adapters: int, nbytes: int = 0) -> Runner:
        small = adapters <= LOCAL_ADAPTERS and nbytes <= LOCAL_BYTES
        if self.mode == "local" or (self.mode == "auto" and small):
            log.debug("in-process: %d adapter(s), %d bytes", adapters, nbytes)
            return self.local
        return self.ray

    @property
    def default(self) -> Runner:
        """The runner of stages that do not size their work: Ray, unless forced in-process."""
        return self.local if self.mode == "local" else self.ray

    @property
    def has_gpus(self) -> bool:
        return self.default.has_gpus

    @property
    def num_cpus(self) -> int:
        return self.default.num_cpus

    def map_unordered(self, fn, items, **options):
        return self.default.map_unordered(fn, items, **options)


def while_starting(runner: Runner, work: Callable[[Runner], T], warm: str | None = None) -> T:
    """work(runner), overlapping the start of the runner's Ray where it has one to start
    (RunnerChoice.while_starting)."""
    return runner.while_starting(work, warm) if isinstance(runner, RunnerChoice) else work(runner)


def for_work(runner: Runner, adapters: int, nbytes: int = 0) -> Runner:
    """The runner of a stage of `adapters` adapters and `nbytes` of their bytes: a RunnerChoice
    picks one; any other runner runs every stage itself."""
    return runner.for_work(adapters, nbytes) if isinstance(runner, RunnerChoice) else runner
