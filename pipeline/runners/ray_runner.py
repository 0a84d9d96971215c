"""Ray fan-out: tasks with declared resources, retries for transient failures, results as they finish."""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter

import ray
from ray.exceptions import RayTaskError

log = logging.getLogger(__name__)

# Transient storage faults and lost workers are retried; a bug or bad input is not.
MAX_RETRIES = 3


class RayRunner:
    """Joins the cluster at `address` (or RAY_ADDRESS); without one, starts an embedded local Ray."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        if not ray.is_initialized():
            # "local" starts a new embedded cluster, never one that `ray start` left on this machine.
            address = address or os.environ.get("RAY_ADDRESS") or "local"
            local = {"num_cpus": num_cpus, "include_dashboard": False} if address == "local" else {}
            context = ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, **local)
            self.dashboard_url = context.dashboard_url or None
        else:
            self.dashboard_url = None
        self.tasks_per_node: Counter[str] = Counter()  # node id -> tasks finished there, for logs and tests
        resources = ray.cluster_resources()
        self.has_gpus = resources.get("GPU", 0) > 0
        self.num_cpus = int(resources.get("CPU", 1))

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
                raise exc.as_instanceof_cause() from None
            self.tasks_per_node[node] += 1
            yield index, result


@functools.lru_cache(maxsize=None)
def _remote(fn):
    def on_node(item):
        return ray.get_runtime_context().get_node_id(), fn(item)

    on_node.__name__ = on_node.__qualname__ = fn.__name__  # tasks keep their names in the dashboard
    return ray.remote(on_node)
