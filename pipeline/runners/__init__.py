"""Executors: they fan work out and collect results; they know nothing of adapters.

`SerialRunner` runs in-process (tests, debugging); `RayRunner` (the only module importing Ray)
runs on a local or remote Ray cluster. Both yield `(index, result)` as results finish.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol


class Runner(Protocol):
    has_gpus: bool
    num_cpus: int  # how many tasks run at once: the plan makes at least this many shards

    def map_unordered(
        self, fn: Callable[[Any], Any], items: list, *, num_cpus: float = 1, use_gpu: bool = False, memory: int | None = None
    ) -> Iterator[tuple[int, Any]]: ...


class SerialRunner:
    has_gpus = False
    num_cpus = 1

    def map_unordered(self, fn, items, *, num_cpus=1, use_gpu=False, memory=None):
        for index, item in enumerate(items):
            yield index, fn(item)
