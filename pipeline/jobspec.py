"""Job configs: YAML files naming what a scheduled job does, validated before any cluster work.

A config is a flat mapping of the job's fields; `--set key=value` overrides any of them (the value
is read as YAML, so `--set components=16` is an int). Unknown keys, wrong types, values out of
range, combinations that do not go together and missing required fields are reported together,
each naming its key. A valid config becomes the typed arguments (pipeline.config.Options and the
rest) of the function the matching `lora-subspace` command runs (pipeline.commands), so a job runs
exactly what the CLI runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline import cli, commands
from pipeline.config import SVD_ROUTES, ComponentRule, Options, parse_max_error, parse_size, step_problems
from pipeline.errors import PipelineError
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.runners import RUNNERS


@dataclass(frozen=True)
class Field:
    kind: type | tuple[type, ...]
    required: bool = False
    choices: tuple | None = None
    least: int | None = None


_SIZE = (str, int)  # 4GiB, or a number of bytes
_COMMON = {
    "endpoint_url": Field(str),
    "address": Field(str),
    "num_cpus": Field(int, least=1),
    "runner": Field(str, choices=RUNNERS),  # auto, local or ray: as --runner
    "log_format": Field(str, choices=("text", "json")),
    "report": Field(bool),  # write STORE/reports/<version>.html after the run (default true)
}
_WRITING = {
    "task_memory": Field(_SIZE),  # bytes of stacked factors per shard task
    "memory_budget": Field(_SIZE),  # task_memory's former name, still read
    "strict": Field(bool),
}

# The benchmark jobs' seeded synthetic collection (pipeline.synthetic), checked by their runners.
_COLLECTION = {"preset": Field(str), "structure": Field(str), "dtype": Field(str), "adapters": Field(int)}

JOBS: dict[str, dict[str, Field]] = {
    "compress": {
        "source": Field(str, required=True),
        "store": Field(str, required=True),
        "components": Field(int),
        "variance_threshold": Field(float),
        "adaptive": Field(bool),
        "svd_route": Field(str),
        "chunk_size": Field(int),
        "method": Field(str),
        "ratio": Field((int, float)),  # the storage budget, as a compression factor
        "budget_bytes": Field(_SIZE),  # or in bytes
        "quantize": Field(str),
        "max_error": Field((int, float, str)),  # the delta-W error bound of every module, or none
        "clusters": Field((int, str)),  # groups of adapters with their own bases: a number, or auto
        **_WRITING,
        **_COMMON,
    },
    "rebase": {
        "source": Field(str, required=True),
        "store": Field(str, required=True),
        "operation": Field(str, choices=("rebase", "project")),
        "full": Field(bool),
        "from_source": Field(bool),
        "chunk_size": Field(int),
        "max_error": Field((int, float, str)),  # a number, or none
        "prune_keep": Field(int, least=1),  # after publishing, prune to this many versions
        **_WRITING,
        **_COMMON,
    },
    "export": {
        "store": Field(str, required=True),
        "out": Field(str, required=True),
        "task_ids": Field(list),
        "all": Field(bool),
        "version": Field(str),
        "overwrite": Field(bool),
        **_COMMON,
    },
    # python -m jobs.benchmark: its own runner (pipeline.benchmark.run), defaults there.
    "benchmark": {
        **_COLLECTION,
        "uploads": Field(int),
        "components": Field(int),
        "repeats": Field(int),
        "task_memory": Field((str, int)),
        "chunk_size": Field(int),
        "svd_route": Field(str, choices=SVD_ROUTES),
        "num_cpus": Field(int),
        "seed": Field(int),
        "floors": Field(bool),
        "rebase": Field(bool),
        "vlora": Field(bool),
        "quantize": Field(bool),
        "export_all": Field(bool),
        "library": Field(bool),
        "methods": Field(int),
        "trained": Field(int),
        "trained_model": Field(str),
        "trained_steps": Field(int),
        "workdir": Field(str),
        "endpoint_url": Field(str),
        "out": Field(str),
    },
    # python -m jobs.gpu_check: its own runner (pipeline.benchmark.gpu), defaults there.
    "gpu-check": {
        **_COLLECTION,
        "components": Field(int, least=1),
        "svd_route": Field(str, choices=SVD_ROUTES),
        "task_memory": Field((str, int)),
        "device": Field(str, choices=("cuda", "cpu")),
        "fp32_peak_tflops": Field(float),
        "exported": Field(int),
        "seed": Field(int),
        "workdir": Field(str),
        "out": Field(str),
    },
}


def load(job: str, path: str | None, overrides: list[str]) -> dict[str, Any]:
    """The validated config of `job` from a YAML file and `key=value` overrides: PipelineError
    naming every problem."""
    config: dict[str, Any] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                config = yaml.safe_load(handle) or {}
        except OSError as exc:
            raise PipelineError(f"cannot read config {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise PipelineError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(config, dict):
            raise PipelineError(f"config {path} must be a mapping of keys to values")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PipelineError(f"--set {item!r}: expected key=value")
        config[key.strip()] = yaml.safe_load(value) if value else None
    validate(job, config, " with ".join(filter(None, [path, "--set" if overrides else None])) or "config")
    return config


def validate(job: str, config: dict[str, Any], where: str) -> None:
    """Every problem of a config in one PipelineError: its keys' (unknown, type, range, missing),
    then, built from the keys that passed, its Options' and the run's steps'."""
    fields = JOBS[job]
    bad = {key: problem for key, value in config.items() if (problem := _key_problem(job, key, value))}
    problems = list(bad.values())
    missing = [k for k, f in fields.items() if f.required and config.get(k) is None]
    if missing:
        problems.append(f"missing required key(s) {', '.join(missing)} for the {job} job")
    usable = {k: v for k, v in config.items() if k not in bad}
    if job == "export" and bool(usable.get("all")) == bool(usable.get("task_ids")):
        problems.append("the export job needs task_ids or all: true (not both)")
    if usable.get("runner") == "local" and usable.get("address"):
        problems.append("'runner': local runs in-process: it joins no cluster ('address')")
    if job in ("compress", "rebase"):
        problems += _run_problems(job, usable)
    if problems:
        raise PipelineError(f"{where}: {'; '.join(problems)}")


def _key_problem(job: str, key: str, value: Any) -> str | None:
    field = JOBS[job].get(key)
    if field is None:
        return f"unknown key {key!r} for the {job} job (known: {', '.join(sorted(JOBS[job]))})"
    if value is None:  # null: not given
        return None
    kinds = field.kind if isinstance(field.kind, tuple) else (field.kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        if not (float in kinds and isinstance(value, int) and not isinstance(value, bool)):
            return f"{key!r} must be {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__} {value!r}"
    if field.choices and value not in field.choices:
        return f"{key!r} must be {' or '.join(field.choices)}, got {value!r}"
    if field.least is not None and value < field.least:
        return f"{key!r} must be at least {field.least}, got {value!r}"
    return _item_problem(key, value, field)


def _item_problem(key: str, value: Any, field: Field) -> str | None:
    """What a value of the right type may still get wrong: its task ids, its size."""
    if key == "task_ids" and not all(isinstance(item, str) and item for item in value):
        return f"{key!r} must be a list of task ids (non-empty strings), got {value!r}"
    if field.kind == _SIZE:
        try:
            parse_size(value)
        except ValueError as exc:
            return f"{key!r}: {exc}"
    return None


def _run_problems(job: str, config: dict[str, Any]) -> list[str]:
    """Problems of the Options and steps a compress or rebase config builds (keys as written)."""
    problems = []
    if "task_memory" in config and "memory_budget" in config:
        problems.append("'memory_budget' is the former name of 'task_memory': give one")
    given = [k for k in ("components", "ratio", "budget_bytes") if config.get(k) is not None]
    if config.get("variance_threshold") is not None and given:
        problems.append(f"'variance_threshold' and {given[0]!r} exclude each other")

    def spell(key: str) -> str:  # as the config writes it
        return repr("memory_budget" if key == "task_memory" and "memory_budget" in config else key)

    steps = step_problems(config.get("chunk_size"), bool(config.get("full")), bool(config.get("from_source")), spell)
    return problems + options(job, config).problems(spell) + steps


def options(job: str, config: dict[str, Any]) -> Options:
    """The Options of a compress or rebase config whose keys passed their checks (a rebase takes
    its fit parameters from the store: of its config, only the run's own knobs count)."""

    def get(key: str, default=None):  # a key set to null is a key not given
        return default if config.get(key) is None else config[key]

    defaults = Options()
    memory = get("task_memory", get("memory_budget"))
    run_knobs = Options(
        task_memory=defaults.task_memory if memory is None else parse_size(memory),
        strict=get("strict", False),
        max_error=_max_error(get("max_error")),
    )
    if job == "rebase":
        return run_knobs
    budget = get("budget_bytes")
    return dataclasses.replace(
        run_knobs,
        rule=ComponentRule(get("components"), get("variance_threshold", 0.6), get("adaptive", False)),
        route=get("svd_route", defaults.route),
        quantize=get("quantize"),
        method=get("method", defaults.method),
        ratio=get("ratio"),
        budget_bytes=None if budget is None else parse_size(budget),
        clusters=get("clusters"),
    )


def _max_error(value):
    """A max_error value read (a number or none); anything else as it is, for the check to name."""
    try:
        return parse_max_error(value)
    except ValueError:
        return value


def run(job: str, config: dict[str, Any]) -> dict:
    """What the job's command answers, from a validated config: the same function the CLI runs."""
    cluster = commands.Cluster(
        config.get("address"),
        config.get("num_cpus"),
        config.get("log_format") == "json",
        config.get("runner") or "auto",
    )
    endpoint_url = config.get("endpoint_url")
    if job == "compress":
        summaries = commands.compress_collection(
            config["source"], config["store"], options(job, config), config.get("chunk_size"), cluster, endpoint_url
        )
        return commands.compress_result(summaries)
    if job == "rebase":
        return commands.grow_store(
            config.get("operation") or "rebase",
            config["store"],
            config["source"],
            options(job, config),
            full=bool(config.get("full")),
            from_source=bool(config.get("from_source")),
            chunk_size=config.get("chunk_size"),
            cluster=cluster,
            endpoint_url=endpoint_url,
        )
    task_ids = None if config.get("all") else config["task_ids"]
    return commands.export_adapters(
        config["store"],
        config["out"],
        task_ids,
        config.get("version"),
        bool(config.get("overwrite")),
        cluster,
        endpoint_url,
    )


def main(job: str, argv: list[str] | None = None) -> int:
    """A scheduled job: `python -m jobs.<job> --config FILE [--set key=value ...]`. Logs go to
    stderr; the last line on stdout is one JSON object for the scheduler (status, version,
    adapters, error, seconds). Exit status 0 on success, 1 on any error."""
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{job}", description=main.__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (see jobs/configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    line: dict[str, Any] = {"job": job}
    try:
        config = load(job, args.config, args.set)
        cli.configure_logging(False, config.get("log_format") or "text")
        if "memory_budget" in config:
            cli.log.warning("config key memory_budget is now task_memory (the former name still works)")
        line.update(status="ok", **_summary(job, run(job, config)))
        if job != "export" and line.get("version") and config.get("report", True):
            line["report"] = _write_report(config, line["version"])
        if job == "rebase" and config.get("prune_keep"):
            from pipeline.operations.history import prune

            line["pruned"] = prune(_store(config), config["prune_keep"])["removed"]
    except Exception as exc:  # noqa: BLE001 - whatever failed, the scheduler gets its status line
        line.update(status="error", error=cli.error_line(exc))
    line["seconds"] = round(time.perf_counter() - started, 3)
    print(json.dumps(line, default=str))
    sys.stdout.flush()
    return 0 if line["status"] == "ok" else 1


def _store(config: dict) -> Store:
    return Store(Location(config["store"], config.get("endpoint_url")))


def _write_report(config: dict, version: str) -> str:
    from pipeline.operations.report import write_report

    store = _store(config)
    out = store.location.child("reports", f"{version}.html")
    write_report(store, version, out)
    return str(out)


def _summary(job: str, result: dict) -> dict:
    """The figures a scheduler alerts on, from the command's result."""
    if job == "export":
        return {"version": result["version"], "exported": result["exported"]}
    versions = result["versions"] if job == "rebase" else [result]
    if not versions:
        return {"version": None, "absorbed": 0, "quarantined": 0, "up_to_date": True}
    last = versions[-1]
    return {
        "version": last["version"],
        "adapters": last["adapters_ok"],
        "absorbed": sum(len(v.get("read_errors") or {}) for v in versions) if job == "rebase" else last["adapters_ok"],
        "quarantined": sum(len(v["quarantined"]) for v in versions),
        "error_mean": last["error"].get("mean"),
        "error_max": last["error"].get("max"),
    }
