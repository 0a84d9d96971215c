"""Job configs: YAML files naming what a scheduled job does, validated before any cluster work.

A config is a flat mapping of the job's fields; `--set key=value` overrides any of them (the value
is read as YAML, so `--set components=16` is an int). Unknown keys, wrong types and missing
required fields are errors that name the key. A valid config becomes the argument list of the
matching `lora-subspace` command, so a job runs exactly what the CLI runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline import cli
from pipeline.errors import PipelineError
from pipeline.io.location import Location
from pipeline.io.store import Store


@dataclass(frozen=True)
class Field:
    kind: type | tuple[type, ...]
    required: bool = False
    flag: str | None = None  # the CLI option; None for positional fields, handled per job


_COMMON = {
    "endpoint_url": Field(str, flag="--endpoint-url"),
    "address": Field(str, flag="--address"),
    "num_cpus": Field(int, flag="--num-cpus"),
    "log_format": Field(str, flag="--log-format"),
    "report": Field(bool),  # write STORE/reports/<version>.html after the run (default true)
}
_WRITING = {
    "memory_budget": Field((str, int), flag="--memory-budget"),
    "strict": Field(bool, flag="--strict"),
}

JOBS: dict[str, dict[str, Field]] = {
    "compress": {
        "source": Field(str, required=True),
        "store": Field(str, required=True, flag="--out"),
        "components": Field(int, flag="--components"),
        "variance_threshold": Field(float, flag="--variance-threshold"),
        "adaptive": Field(bool, flag="--adaptive"),
        "svd_route": Field(str, flag="--svd-route"),
        "chunk_size": Field(int, flag="--chunk-size"),
        "method": Field(str, flag="--method"),
        "ratio": Field((int, float), flag="--ratio"),
        "budget_bytes": Field((str, int), flag="--budget-bytes"),
        "quantize": Field(str, flag="--quantize"),
        **_WRITING,
        **_COMMON,
    },
    "rebase": {
        "source": Field(str, required=True),
        "store": Field(str, required=True),
        "operation": Field(str),  # rebase (default) or project
        "full": Field(bool, flag="--full"),
        "from_source": Field(bool, flag="--from-source"),
        "chunk_size": Field(int, flag="--chunk-size"),
        "max_error": Field(float, flag="--max-error"),
        "prune_keep": Field(int),  # after publishing, prune to this many versions
        **_WRITING,
        **_COMMON,
    },
    "export": {
        "store": Field(str, required=True),
        "out": Field(str, required=True, flag="--out"),
        "task_ids": Field(list),
        "all": Field(bool, flag="--all"),
        "version": Field(str, flag="--version"),
        "overwrite": Field(bool, flag="--overwrite"),
        **_COMMON,
    },
    # python -m jobs.benchmark: its own runner (pipeline.benchmark.run), defaults there.
    "benchmark": {
        "preset": Field(str),
        "structure": Field(str),
        "dtype": Field(str),
        "adapters": Field(int),
        "uploads": Field(int),
        "components": Field(int),
        "repeats": Field(int),
        "memory_budget": Field((str, int)),
        "chunk_size": Field(int),
        "num_cpus": Field(int),
        "seed": Field(int),
        "floors": Field(bool),
        "rebase": Field(bool),
        "vlora": Field(bool),
        "quantize": Field(bool),
        "library": Field(bool),
        "methods": Field(int),
        "trained": Field(int),
        "trained_model": Field(str),
        "trained_steps": Field(int),
        "trained_ratio": Field((int, float)),
        "workdir": Field(str),
        "endpoint_url": Field(str),
        "out": Field(str),
    },
}


def load(job: str, path: str | None, overrides: list[str]) -> dict[str, Any]:
    """The validated config of `job` from a YAML file and `key=value` overrides."""
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
    fields = JOBS[job]
    for key, value in config.items():
        if key not in fields:
            raise PipelineError(f"{where}: unknown key {key!r} for the {job} job (known: {', '.join(sorted(fields))})")
        kind = fields[key].kind
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if value is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
            if not (float in kinds and isinstance(value, int) and not isinstance(value, bool)):
                names = " or ".join(k.__name__ for k in kinds)
                raise PipelineError(f"{where}: {key!r} must be {names}, got {type(value).__name__} {value!r}")
    missing = [k for k, f in fields.items() if f.required and config.get(k) is None]
    if missing:
        raise PipelineError(f"{where}: missing required key(s) {', '.join(missing)} for the {job} job")
    if job == "rebase" and config.get("operation", "rebase") not in ("rebase", "project"):
        raise PipelineError(f"{where}: 'operation' must be rebase or project, got {config['operation']!r}")
    if job == "export" and bool(config.get("all")) == bool(config.get("task_ids")):
        raise PipelineError(f"{where}: the export job needs task_ids or all: true (not both)")


def to_argv(job: str, config: dict[str, Any]) -> list[str]:
    """The lora-subspace command line that runs this config (always with --json)."""
    fields = JOBS[job]
    if job == "compress":
        argv = ["compress", config["source"]]
    elif job == "rebase":
        argv = [config.get("operation") or "rebase", config["store"], config["source"]]
    else:
        argv = ["export", config["store"], *(config.get("task_ids") or [])]
    for key, value in config.items():
        flag = fields[key].flag
        if flag is None or value is None or value is False:
            continue
        argv += [flag] if value is True else [flag, str(value)]
    return argv + ["--json"]


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
        cli_args = _parse(to_argv(job, config))
        cli.configure_logging(False, cli_args.log_format)
        result = cli.COMMANDS[cli_args.command](cli_args)
        line.update(status="ok", **_summary(job, result))
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


def _parse(argv: list[str]) -> argparse.Namespace:
    """The CLI's parse of a job's arguments; a value the CLI refuses (e.g. memory_budget: 0) is a
    PipelineError, so the job still prints its status line."""
    message = io.StringIO()
    try:
        with contextlib.redirect_stderr(message):
            return cli.build_parser().parse_args(argv)
    except SystemExit:
        reason = message.getvalue().strip().splitlines()[-1:] or ["invalid arguments"]
        raise PipelineError(f"config: {reason[0].partition('error: ')[2] or reason[0]}") from None


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
