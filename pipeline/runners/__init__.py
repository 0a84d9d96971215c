"""Executors: they fan work out and collect results; they know nothing of adapters.

`SerialRunner` runs in-process (tests, debugging); `RayRunner` (the only module importing Ray)
runs on a local or remote Ray cluster. Both yield `(index, result)` as results finish.
A shared module: imports only pipeline.errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol


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
    def has_gpus(self) -> bool:
        return self.runner.has_gpus

    @property
    def num_cpus(self) -> int:
        return self.runner.num_cpus

    def map_unordered(self, fn, items, **options):
        if not items:
            return iter(())
        return self.runner.map_unordered(fn, items, **options)
