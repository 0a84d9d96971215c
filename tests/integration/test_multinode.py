"""Three nodes on one machine (ray.cluster_utils.Cluster, in its own process since this session
already has its Ray): shards spread over the worker nodes, and a worker node lost while shards
run on it; both results equal the single-node run's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_collection, run_cli

from pipeline.io.location import Location
from pipeline.io.store import Store

DRILL = Path(__file__).with_name("cluster_drill.py")


def _snapshot(path):
    store = Store(Location(str(path)))
    tensors = {}
    for basis in {e["basis"] for e in store.manifest()["modules"].values()}:
        tensors.update(store.read_basis(basis))
    return tensors, store.read_table(store.current_version(), "loadings.parquet").to_pydict()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    make_collection(root / "src", 16)
    return root


@pytest.fixture(scope="module")
def single_node(runner, collection):
    assert (
        run_cli("compress", collection / "src", "--out", collection / "single", "--components", 4, "--task-memory", 1)
        == 0
    )
    return _snapshot(collection / "single")


def _drill(mode, collection, **env):
    store = collection / mode
    done = subprocess.run(
        [sys.executable, str(DRILL), mode, str(collection / "src"), str(store)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), **env},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout, _snapshot(store)


def _assert_same(got, expected):
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    assert got[1]["task_id"] == expected[1]["task_id"]
    torch.testing.assert_close(torch.tensor(got[1]["a"]), torch.tensor(expected[1]["a"]), rtol=1e-5, atol=1e-6)


def test_shards_spread_over_nodes_and_give_the_single_node_result(collection, single_node):
    out, result = _drill("spread", collection, LORA_SUBSPACE_DELAYPOINT="shard-start:0.3")
    placements = json.loads(out.strip().splitlines()[-1])["tasks_per_node"]
    shard_tasks = sum(placements.values())
    assert len(placements) == 2 and shard_tasks >= 8, placements  # scan tasks too; 8 shards, both workers busy
    _assert_same(result, single_node)


def test_a_lost_worker_node_does_not_change_the_result(collection, single_node):
    # Every shard task sleeps a second, so the node is removed while work is in flight.
    out, result = _drill("lose-node", collection, LORA_SUBSPACE_DELAYPOINT="shard-start:1")
    assert "removed node" in out
    _assert_same(result, single_node)
