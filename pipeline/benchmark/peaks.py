"""Run a command in its own process and sample the resident memory of every process it starts
(its driver, Ray's system processes, Ray's workers), so a benchmark can report, and a test bound,
each one."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil

SAMPLE_SECONDS = 0.1


@dataclass
class Run:
    status: int
    peaks: dict[str, int]  # peak RSS in MiB per kind of process: driver, worker, ray-system
    stdout: str
    stderr: str
    seconds: float  # wall time, process start to exit


def run_with_peaks(argv: list[str], timeout: float = 3600, env: dict[str, str] | None = None) -> Run:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # files: a pipe could fill and block
        started = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=env)
        peaks = _sample(psutil.Process(child.pid), child, time.time() + timeout)
        if child.poll() is None:
            child.kill()
        status = child.wait()
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        return Run(status, peaks, out.read(), err.read(), seconds)


def _sample(root: psutil.Process, child: subprocess.Popen, deadline: float) -> dict[str, int]:
    peaks: dict[str, int] = {}
    while child.poll() is None and time.time() < deadline:
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for process in processes:
            try:
                kind = (
                    "driver"
                    if process.pid == child.pid
                    else "worker"
                    if process.name().startswith("ray::")
                    else "ray-system"
                )
                peaks[kind] = max(peaks.get(kind, 0), process.memory_info().rss >> 20)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(SAMPLE_SECONDS)
    return peaks


def cli(*args) -> list[str]:
    """The argv that runs `lora-subspace ARGS` with this interpreter."""
    return [sys.executable, "-m", "pipeline.cli", *map(str, args)]
