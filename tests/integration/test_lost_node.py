"""A worker node lost while shards run on it: Ray retries its tasks elsewhere, the run finishes
and its result equals an undisturbed run's. The cluster (ray.cluster_utils.Cluster) lives in its
own process, since this test session already has its Ray."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import make_collection, run_cli
from pipeline.io.location import Location
from pipeline.io.store import Store

DRILL = Path(__file__).with_name("lost_node_drill.py")


def _snapshot(path):
    store = Store(Location(str(path)))
    tensors = {}
    for basis in {e["basis"] for e in store.manifest()["modules"].values()}:
        tensors.update(store.read_basis(basis))
    return tensors, store.read_table(store.current_version(), "loadings.parquet").to_pydict()


def test_a_lost_worker_node_does_not_change_the_result(runner, tmp_path):
    make_collection(tmp_path / "src", 16)
    assert run_cli("compress", tmp_path / "src", "--out", tmp_path / "undisturbed", "--components", 4, "--memory-budget", 1) == 0
    # Every shard task sleeps a second, so the node is removed while work is in flight.
    env = {**os.environ, "LORA_SUBSPACE_DELAYPOINT": "shard-start:1", "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run([sys.executable, str(DRILL), str(tmp_path / "src"), str(tmp_path / "store")],
                          env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "removed node" in done.stdout and "published" in done.stdout
    (expected, expected_rows), (got, got_rows) = _snapshot(tmp_path / "undisturbed"), _snapshot(tmp_path / "store")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got_rows["task_id"] == expected_rows["task_id"]
    torch.testing.assert_close(torch.tensor(got_rows["a"]), torch.tensor(expected_rows["a"]), rtol=1e-5, atol=1e-6)
