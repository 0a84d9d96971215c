"""A driver killed with SIGKILL mid-compute and mid-publish: the store keeps serving the previous
version, and the same command run again resumes from the finished shards and publishes what an
undisturbed run publishes. The killed runs are real processes with their own embedded Ray."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import torch

from conftest import make_collection, run_cli
from pipeline.io.location import Location
from pipeline.io.store import Store

SHARDED = ["--memory-budget", "1"]  # one module per shard: 8 shards to kill a run among


def _killed(*args, failpoint):
    env = {**os.environ, "LORA_SUBSPACE_FAILPOINT": failpoint}
    # Its own session, so that the Ray processes its embedded cluster leaves behind can be reaped.
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args), "--num-cpus", "2"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _, err = driver.communicate(timeout=300)
    try:
        os.killpg(driver.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    assert driver.returncode == -signal.SIGKILL, err[-2000:]


def _snapshot(store_path):
    """Every basis tensor and loadings row of the current version."""
    store = Store(Location(str(store_path)))
    manifest = store.manifest()
    tensors = {}
    for path in {e["basis"] for e in manifest["modules"].values()}:
        tensors.update(store.read_basis(path))
    return tensors, store.read_table(store.current_version(), "loadings.parquet").to_pydict()


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert a[1]["task_id"] == b[1]["task_id"] and a[1]["module"] == b[1]["module"]
    torch.testing.assert_close(torch.tensor(a[1]["a"]), torch.tensor(b[1]["a"]), rtol=1e-5, atol=1e-6)


def test_killed_runs_leave_the_store_intact_and_resume(runner, tmp_path):
    pool, src, store, reference = tmp_path / "pool", tmp_path / "src", tmp_path / "store", tmp_path / "reference"
    ids = make_collection(pool, 24, shared_dim=6, noise=0.3)
    shutil.copytree(pool, src, ignore=shutil.ignore_patterns(*ids[12:]))
    assert run_cli("compress", src, "--out", store, "--components", 4, *SHARDED) == 0
    assert run_cli("export", store, ids[0], "--out", tmp_path / "before") == 0
    for name in ids[12:18]:
        shutil.copytree(pool / name, src / name)
    shutil.copytree(store, reference)
    assert run_cli("rebase", reference, src, "--full", *SHARDED) == 0

    # Killed mid-compute, after the driver received 3 of 8 shards.
    _killed("rebase", store, src, "--full", *SHARDED, failpoint="shard-done:3")
    s = Store(Location(str(store)))
    assert s.current_version() == "v000001" and [m["version"] for m in s.published()] == ["v000001"]
    assert run_cli("export", store, ids[0], "--out", tmp_path / "after") == 0
    assert (tmp_path / "after" / "adapter_model.safetensors").read_bytes() == (tmp_path / "before" / "adapter_model.safetensors").read_bytes()
    (version, run), = s.unfinished()
    assert run["operation"] == "rebase-full" and run["parent"] == "v000001"
    finished = s.finished_shards(version)
    assert len(finished) >= 3
    stamps = {name: os.stat(store / "versions" / version / "basis" / f"{name}.safetensors").st_mtime_ns for name in finished}

    # The same command again: takes over the dead run's lock, reuses its finished shards.
    assert run_cli("rebase", store, src, "--full", *SHARDED) == 0
    assert s.current_version() == version and s.unfinished() == []
    report = json.loads(s.version_location(version).read_bytes("report.json"))
    # (A worker of the killed run may still finish a shard after we looked: resumed too, then.)
    assert set(finished) <= {r["name"] for r in report["shards"] if r["resumed"]}
    for name, stamp in stamps.items():  # not computed again
        assert os.stat(store / "versions" / version / "basis" / f"{name}.safetensors").st_mtime_ns == stamp
    _assert_same(_snapshot(store), _snapshot(reference))
    assert not (store / "versions" / version / "staging").exists() and not (store / "LOCK").exists()

    # Killed mid-publish: the manifest is written, the pointer is not.
    for name in ids[18:21]:
        shutil.copytree(pool / name, src / name)
    assert run_cli("rebase", reference, src) == 0
    _killed("rebase", store, src, failpoint="publish")
    assert s.current_version() == "v000002" and [m["version"] for m in s.published()] == ["v000001", "v000002"]
    assert (store / "versions" / "v000003" / "manifest.json").exists()  # written, but not published
    assert run_cli("rebase", store, src) == 0
    assert s.current_version() == "v000003"
    report = json.loads(s.version_location("v000003").read_bytes("report.json"))
    assert all(r["resumed"] for r in report["shards"])
    _assert_same(_snapshot(store), _snapshot(reference))

    # A crashed run of another kind is cleaned away by the next writer, not resumed.
    for name in ids[21:]:
        shutil.copytree(pool / name, src / name)
    _killed("project", store, src, *SHARDED, failpoint="shard-done:1")
    assert [v for v, _ in s.unfinished()] == ["v000004"]
    assert run_cli("rebase", store, src) == 0
    assert s.unfinished() == [] and s.manifest()["operation"] == "rebase" and s.current_version() == "v000004"
    assert pq.read_table(store / "versions" / "v000004" / "catalog.parquet").num_rows == 24
