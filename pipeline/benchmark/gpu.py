"""The GPU check: one seeded collection compressed twice by the same command, in-process
(`--runner local`: the shard tasks run in the driver, so no Ray is needed on the GPU machine), once
with CUDA hidden and once on the CUDA device; the two stores compared (every row's recorded error,
and exported adapters' delta W against the parity bound of the vlora tests); and the bare math of
every module side timed on both, with its matrix products' flops and the device's share of its
fp32 peak.

    python -m jobs.gpu_check [--config jobs/configs/gpu-check.yaml] [--set key=value ...]

`device=cpu` runs both passes on the CPU: the same steps and comparisons, for machines without a GPU.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from pipeline import peft_format
from pipeline.benchmark.floors import math_floor
from pipeline.benchmark.peaks import run_with_peaks
from pipeline.benchmark.run import (
    DEFAULTS as BENCHMARK_DEFAULTS,
)
from pipeline.benchmark.run import (
    cli_argv,
    collection,
    collection_problems,
    job_main,
    last_json,
    machine,
    raise_problems,
    require,
)
from pipeline.errors import PipelineError
from pipeline.io.format import LOADINGS, REPORT
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.io.tables import read_batches
from pipeline.peft_format import WEIGHTS_FILE

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    **{
        key: BENCHMARK_DEFAULTS[key]
        for key in ("preset", "structure", "dtype", "adapters", "components", "task_memory", "seed")
    },
    "svd_route": "gram",
    "device": "cuda",
    "fp32_peak_tflops": 67.0,
    "exported": 16,
    "workdir": "gpu-check-data",
    "out": "gpu-check.json",
}
PARITY = 1e-4  # relative delta-W difference, as tests/integration/test_vlora_parity.py bounds it


def main(argv: list[str] | None = None) -> int:
    return job_main("gpu-check", __doc__, argv, DEFAULTS, _check, gpu_check, format_figures, _verdict)


def _verdict(figures: dict) -> dict:
    return {"parity": figures["parity"]["met"]}


def _check(config: dict) -> None:
    problems = collection_problems(config)
    if config["adapters"] == 1:
        problems.append("adapters must be at least 2")
    if config["exported"] < 1:
        problems.append("exported must be at least 1")
    if config["fp32_peak_tflops"] <= 0:
        problems.append(f"fp32_peak_tflops must be positive, got {config['fp32_peak_tflops']!r}")
    if not Location(config["workdir"]).is_local:
        problems.append("workdir must be a local folder")
    if config["device"] == "cuda" and not torch.cuda.is_available():
        problems.append("torch sees no CUDA device here (set device=cpu to run the check's steps on the CPU)")
    raise_problems("gpu-check", problems)


def gpu_check(config: dict) -> dict:
    root = Location(config["workdir"])
    source, _ = collection(root, {**config, "uploads": 0})
    paths = [source.path(f"adapter-{i:05d}", WEIGHTS_FILE) for i in range(config["adapters"])]
    figures: dict[str, Any] = {"config": config, "machine": machine()}
    passes = {"cpu": "cpu", "device": config["device"]}
    for name, device in passes.items():
        log.info("compress on %s, in-process", device)
        figures[name] = _compress(source, root.child("stores", name), device, config)
    figures["parity"] = _parity(root, figures, config)
    for name, device in passes.items():
        log.info("bare math on %s", device)
        floor = math_floor(source.fs, paths, config["components"], config["svd_route"], device, flops=name == "device")
        figures[name]["math"] = floor
    math = figures["device"]["math"]
    math["tflops_per_second"] = math["flops"] / math["seconds"] / 1e12
    math["share_of_fp32_peak"] = math["tflops_per_second"] / config["fp32_peak_tflops"]
    return figures


def _compress(source: Location, store: Location, device: str, config: dict) -> dict:
    """One in-process compress on `device` (cpu: CUDA hidden from the process)."""
    store.remove()
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})}
    argv = cli_argv(
        "compress", source.uri, "--out", store.uri, "--runner", "local", "--max-error", "none",
        "--components", config["components"], "--svd-route", config["svd_route"],
        "--task-memory", config["task_memory"],
    )  # fmt: skip
    run = require(run_with_peaks(argv, env=env), "compress")
    result = last_json(run.stdout)
    report = json.loads(Store(store).version_location(result["versions"][-1]).read_bytes(REPORT))
    ran_on = sorted({shard.get("device", "cpu") for shard in report["shards"]})
    if ran_on != [device]:
        raise PipelineError(f"gpu-check: the {device} pass's shard tasks ran on {', '.join(ran_on)}")
    shard_seconds = [shard["seconds"] for shard in report["shards"]]
    return {
        "device": device,
        "seconds": run.seconds,
        "stages": dict(result["seconds_per_version"][-1]),
        "task_seconds": {k: sum(s.get(k, 0.0) for s in shard_seconds) for k in ("read", "compute", "write")},
        "peak_rss_mib": run.peaks,
        "error": Store(store).manifest()["error"],
        "store": store.uri,
    }


def _parity(root: Location, figures: dict, config: dict) -> dict:
    """How far the device's store is from the CPU's: each row's recorded error, and the delta W
    of the first `exported` adapters as export writes them (relative, per module)."""
    errors = [_row_errors(Location(figures[name]["store"])) for name in ("cpu", "device")]
    if errors[0].keys() != errors[1].keys():
        raise PipelineError("gpu-check: the two stores hold different rows")
    error_gap = max(abs(errors[0][key] - errors[1][key]) for key in errors[0])
    task_ids = [f"adapter-{i:05d}" for i in range(min(config["exported"], config["adapters"]))]
    with tempfile.TemporaryDirectory(dir=root.path()) as scratch:
        cpu, device = (_export(figures[name]["store"], task_ids, Path(scratch, name)) for name in ("cpu", "device"))
        worst = max(_delta_gap(load_file(cpu[t]), load_file(device[t])) for t in task_ids)
    return {"row_error_gap": error_gap, "delta_w_gap": worst, "bound": PARITY, "met": worst < PARITY}


def _row_errors(store: Location) -> dict[tuple[str, str], float]:
    s = Store(store)
    version = s.version_location(s.current_version())
    rows = {}
    for batch in read_batches(version, LOADINGS, ["task_id", "module", "error"]):
        for row in batch.to_pylist():
            rows[row["task_id"], row["module"]] = row["error"]
    return rows


def _export(store: str, task_ids: list[str], out: Path) -> dict[str, Path]:
    """Each adapter's weights file, exported in one in-process command (one adapter is written to
    `out` itself, several to out/<task_id>/)."""
    require(run_with_peaks(cli_argv("export", store, *task_ids, "--out", out, "--runner", "local")), "export")
    return {t: (out / t if len(task_ids) > 1 else out) / WEIGHTS_FILE for t in task_ids}


def _delta_gap(cpu: dict[str, torch.Tensor], device: dict[str, torch.Tensor]) -> float:
    """The largest relative difference of a module's delta W (B A) between two exports."""
    worst = 0.0
    for key in cpu:
        parsed = peft_format.parse_key(key)
        if not parsed or parsed[1] != "A":
            continue
        b_key = peft_format.weight_key(parsed[0], "B")
        ours = cpu[b_key].double() @ cpu[key].double()
        theirs = device[b_key].double() @ device[key].double()
        worst = max(worst, float(torch.linalg.norm(ours - theirs) / torch.linalg.norm(ours).clamp_min(1e-300)))
    return worst


def format_figures(f: dict) -> str:
    cpu, dev = f["cpu"], f["device"]
    math = dev["math"]
    lines = [
        f"{f['config']['adapters']} {f['config']['preset']} adapters, k = {f['config']['components']}, "
        f"route {f['config']['svd_route']}; device: {f['machine']['gpu'] or 'cpu'}",
        f"{'':34}{'cpu pass':>12}{dev['device'] + ' pass':>12}",
        f"{'compress, end to end (s)':34}{cpu['seconds']:12.2f}{dev['seconds']:12.2f}",
        f"{'compute stage (s)':34}{cpu['stages'].get('compute', 0):12.2f}{dev['stages'].get('compute', 0):12.2f}",
        f"{'task seconds: compute':34}{cpu['task_seconds']['compute']:12.2f}{dev['task_seconds']['compute']:12.2f}",
        f"{'bare math, every module side (s)':34}{cpu['math']['seconds']:12.2f}{math['seconds']:12.2f}",
        f"{'delta-W error mean':34}{cpu['error']['mean']:12.6f}{dev['error']['mean']:12.6f}",
        f"bare math on {dev['device']}: {math['flops'] / 1e9:.4g} GFLOP of matrix products, "
        f"{math['tflops_per_second']:.4g} TFLOP/s, {100 * math['share_of_fp32_peak']:.3g}% of "
        f"{f['config']['fp32_peak_tflops']} TFLOP/s fp32",
        f"parity: largest delta-W gap {f['parity']['delta_w_gap']:.2e} (bound {PARITY:g}), "
        f"largest row error gap {f['parity']['row_error_gap']:.2e}",
    ]
    return "\n".join(lines)
