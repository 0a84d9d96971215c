"""compress, project/rebase and export as functions of typed arguments: what the CLI and the
scheduled jobs run once each has built and validated its configuration (pipeline.config.Options).
They return results and print nothing; printing is the CLI's. Heavy modules are imported on use,
so that `lora-subspace --help` stays fast."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pipeline.config import Operation, Options
from pipeline.errors import PipelineError
from pipeline.io.location import Location
from pipeline.runners import RUNNERS

log = logging.getLogger("lora-subspace")


@dataclass(frozen=True)
class Cluster:
    """Where compute tasks run: a Ray cluster to join (default RAY_ADDRESS, else an embedded
    local Ray with `num_cpus`), quiet under JSON logs (no progress bar of Ray's). `runner`:
    "auto" runs small stages in-process and the rest on Ray, unless an address is given (Ray
    for all); "local" runs everything in-process; "ray" everything on Ray."""

    address: str | None = None
    num_cpus: int | None = None
    quiet: bool = False
    runner: str = "auto"

    def __post_init__(self):
        if self.runner not in RUNNERS:
            raise PipelineError(f"--runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        if self.runner == "local" and self.address:
            raise PipelineError("--runner local runs in-process: it joins no cluster (--address)")

    @property
    def joins(self) -> bool:
        """Whether Ray is joined at an address (--address or RAY_ADDRESS), not started here."""
        return bool(self.address or os.environ.get("RAY_ADDRESS"))

    def mode(self) -> str:
        """The runner mode: an address makes "auto" Ray's."""
        return "ray" if self.runner == "auto" and self.joins else self.runner


def store_at(uri: str, endpoint_url: str | None):
    from pipeline.io.store import Store

    return Store(Location(uri, endpoint_url))


def runner(cluster: Cluster, *locations: Location):
    """In-process or Ray per stage (pipeline.runners.RunnerChoice), Ray joined or started on its
    first task, so that input checks before it fail in a moment, not after Ray's start; on
    start, it checks that its tasks will find the local paths among `locations`."""
    from pipeline.runners import RunnerChoice

    def start():
        from pipeline.runners.ray_runner import RayRunner

        ray = RayRunner(cluster.address, cluster.num_cpus, quiet=cluster.quiet)
        ray.check_local_paths([location.root for location in locations if location.is_local])
        if ray.dashboard_url:
            log.info("Ray dashboard: %s", ray.dashboard_url)
        return ray

    return RunnerChoice(start, cluster.mode(), cluster.num_cpus, embedded=not cluster.joins)


def compress_collection(
    source: str,
    out: str,
    options: Options,
    chunk_size: int | None = None,
    cluster: Cluster = Cluster(),
    endpoint_url: str | None = None,
) -> list[dict]:
    """The summary of every version written (one, or one per chunk)."""
    from pipeline.operations.compress import compress

    where, store = Location(source, endpoint_url), store_at(out, endpoint_url)
    return [s.to_dict() for s in compress(where, store, runner(cluster, where, store.location), options, chunk_size)]


def compress_result(summaries: list[dict]) -> dict:
    """What compress answers: the last version's summary, with every version and its seconds."""
    return {
        **summaries[-1],
        "versions": [s["version"] for s in summaries],
        "seconds_per_version": [s["seconds"] for s in summaries],
    }


def grow_store(
    operation: Operation,
    store: str,
    source: str,
    options: Options,
    *,
    full: bool = False,
    from_source: bool = False,
    chunk_size: int | None = None,
    dry_run: bool = False,
    cluster: Cluster = Cluster(),
    endpoint_url: str | None = None,
) -> dict:
    """project or rebase: {"diff": ..., "versions": [summaries]}."""
    from pipeline.operations.grow import grow

    where, target = Location(source, endpoint_url), store_at(store, endpoint_url)
    return grow(
        where,
        target,
        runner(cluster, where, target.location),
        operation,
        options,
        full=full,
        from_source=from_source,
        dry_run=dry_run,
        chunk_size=chunk_size,
    )


def export_adapters(
    store: str,
    out: str,
    task_ids: list[str] | None,
    version: str | None = None,
    overwrite: bool = False,
    cluster: Cluster = Cluster(),
    endpoint_url: str | None = None,
) -> dict:
    """Rebuild adapters as PEFT folders: `task_ids`, or every adapter when None."""
    from pipeline.operations.export import export_all, plan_export

    source = store_at(store, endpoint_url)
    version = source.require_version(version)
    where = Location(out, endpoint_url)
    # Every check (ids, targets, out writable) before Ray starts or anything is written.
    plan = plan_export(source, version, task_ids, where, overwrite)
    written = export_all(source, plan, runner(cluster, source.location, where))
    return {"version": version, "exported": len(written), "out": str(where)}
