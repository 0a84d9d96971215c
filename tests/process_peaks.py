"""Run the CLI in its own process and sample the resident memory of every process it starts (the
driver, Ray's system processes, Ray's workers), so a test can bound each one."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


def run_with_peaks(*args, timeout: float = 600) -> tuple[int, dict[str, int], str]:
    """(exit status, peak RSS in MiB per kind of process: driver, worker, ray-system, stderr)."""
    child = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peaks, deadline = psutil.Process(child.pid), {}, time.time() + timeout
    while child.poll() is None and time.time() < deadline:
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for process in processes:
            try:
                kind = "driver" if process.pid == child.pid else "worker" if process.name().startswith("ray::") else "ray-system"
                peaks[kind] = max(peaks.get(kind, 0), process.memory_info().rss >> 20)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.1)
    _, err = child.communicate(timeout=max(deadline - time.time(), 1))
    return child.returncode, peaks, err
