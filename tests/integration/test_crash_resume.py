"""A driver killed with SIGKILL mid-compute and mid-publish: the store keeps serving the previous
version, and the same command run again resumes from the finished shards and publishes what an
undisturbed run publishes, on local disk and on S3 (the moto server), at the first rerun. The
killed runs are real processes with their own embedded Ray."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys

import boto3
import pyarrow.parquet as pq
import pytest
import torch
from conftest import kill_session, make_collection, run_cli

from pipeline.io.format import basis_file
from pipeline.io.location import Location
from pipeline.io.store import Store

SHARDED = ["--task-memory", "1"]  # one module per shard: 8 shards to kill a run among


class Place:
    """Where a test's source and stores live: a local folder, or a bucket of the S3 test server."""

    def __init__(self, tmp_path, endpoint=None, bucket=None):
        self.tmp_path, self.endpoint, self.bucket = tmp_path, endpoint, bucket
        self.s3 = boto3.client("s3", endpoint_url=endpoint) if endpoint else None
        self.args = ["--endpoint-url", endpoint] if endpoint else []

    def uri(self, name):
        return f"s3://{self.bucket}/{name}" if self.s3 else str(self.tmp_path / name)

    def add(self, folder, name, source="src"):
        """Upload an adapter folder into a source."""
        if not self.s3:
            shutil.copytree(folder, self.tmp_path / source / name)
            return
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.s3.upload_file(str(path), self.bucket, f"{source}/{name}/{path.relative_to(folder)}")

    def store(self, name="store"):
        return Store(Location(self.uri(name), self.endpoint))

    def stamp(self, store, version, shards):
        """Marks on finished shards' basis objects that a rewrite would erase: the local mtime, or
        on S3 a metadata entry set by copying each object onto itself (same bytes)."""
        marks = {}
        for name in shards:
            key = f"store/versions/{version}/{basis_file(name)}"
            if not self.s3:
                marks[name] = os.stat(self.tmp_path / key).st_mtime_ns
                continue
            self.s3.copy_object(
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": key},
                Metadata={"stamp": name},
                MetadataDirective="REPLACE",
            )
            marks[name] = name
        return marks

    def stamps(self, version, shards):
        if not self.s3:
            return {n: os.stat(self.tmp_path / f"store/versions/{version}/{basis_file(n)}").st_mtime_ns for n in shards}
        return {
            n: self.s3.head_object(Bucket=self.bucket, Key=f"store/versions/{version}/{basis_file(n)}")["Metadata"].get(
                "stamp"
            )
            for n in shards
        }


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    if request.param == "local":
        return Place(tmp_path)
    return Place(tmp_path, request.getfixturevalue("s3_endpoint"), request.getfixturevalue("bucket"))


def _killed(place, *args, failpoint):
    env = {**os.environ, "LORA_SUBSPACE_FAILPOINT": failpoint}
    # Its own session, so that the Ray processes its embedded cluster leaves behind can be reaped.
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *map(str, args), *place.args, "--num-cpus", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _, err = driver.communicate(timeout=300)
    kill_session(driver.pid)  # the workers of its embedded Ray too: none may write after this
    assert driver.returncode == -signal.SIGKILL, err[-2000:]


def _snapshot(store):
    """Every basis tensor and loadings row of the current version."""
    manifest = store.manifest()
    tensors = {}
    for path in {e["basis"] for e in manifest["modules"].values()}:
        tensors.update(store.read_basis(path))
    return tensors, store.read_table(store.current_version(), "loadings.parquet").to_pydict()


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert a[1]["task_id"] == b[1]["task_id"] and a[1]["module"] == b[1]["module"]
    torch.testing.assert_close(torch.tensor(a[1]["a"]), torch.tensor(b[1]["a"]), rtol=1e-5, atol=1e-6)


def test_killed_runs_leave_the_store_intact_and_resume(runner, place, tmp_path):
    pool = tmp_path / "pool"
    ids = make_collection(pool, 24, shared_dim=6, noise=0.3)
    for name in ids[:12]:
        place.add(pool / name, name)
    src, store, reference, args = place.uri("src"), place.uri("store"), place.uri("reference"), place.args
    assert run_cli("compress", src, "--out", store, "--components", 4, *SHARDED, *args) == 0
    assert run_cli("compress", src, "--out", reference, "--components", 4, *SHARDED, *args) == 0  # the same v000001
    assert run_cli("export", store, ids[0], "--out", tmp_path / "before", *args) == 0
    for name in ids[12:18]:
        place.add(pool / name, name)
    assert run_cli("rebase", reference, src, "--full", *SHARDED, *args) == 0

    # Killed mid-compute, after the driver received 3 of 8 shards.
    _killed(place, "rebase", store, src, "--full", *SHARDED, failpoint="shard-done:3")
    s = place.store()
    assert s.current_version() == "v000001" and [m["version"] for m in s.published()] == ["v000001"]
    assert run_cli("export", store, ids[0], "--out", tmp_path / "after", *args) == 0
    assert (tmp_path / "after" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "before" / "adapter_model.safetensors"
    ).read_bytes()
    ((version, run),) = s.unfinished()
    assert run["operation"] == "rebase-full" and run["parent"] == "v000001"
    finished = s.finished_shards(version)
    assert len(finished) >= 3
    marks = place.stamp(s, version, finished)

    # The same command again, once: takes over the dead run's lock, reuses its finished shards.
    assert run_cli("rebase", store, src, "--full", *SHARDED, *args) == 0
    assert s.current_version() == version and s.unfinished() == []
    report = json.loads(s.version_location(version).read_bytes("report.json"))
    # (A worker of the killed run may still finish a shard after we looked: resumed too, then.)
    assert set(finished) <= {r["name"] for r in report["shards"] if r["resumed"]}
    assert place.stamps(version, finished) == marks  # not computed again
    _assert_same(_snapshot(s), _snapshot(place.store("reference")))
    assert not s.version_location(version).exists("staging") and not s.location.exists("LOCK")

    # Killed mid-publish: the manifest is written, the pointer is not.
    for name in ids[18:21]:
        place.add(pool / name, name)
    assert run_cli("rebase", reference, src, *args) == 0
    _killed(place, "rebase", store, src, failpoint="publish")
    assert s.current_version() == "v000002" and [m["version"] for m in s.published()] == ["v000001", "v000002"]
    assert s.version_location("v000003").exists("manifest.json")  # written, but not published
    assert run_cli("rebase", store, src, *args) == 0
    assert s.current_version() == "v000003"
    report = json.loads(s.version_location("v000003").read_bytes("report.json"))
    assert all(r["resumed"] for r in report["shards"])
    _assert_same(_snapshot(s), _snapshot(place.store("reference")))

    # A crashed run of another kind is cleaned away by the next writer, not resumed.
    for name in ids[21:]:
        place.add(pool / name, name)
    _killed(place, "project", store, src, *SHARDED, failpoint="shard-done:1")
    assert [v for v, _ in s.unfinished()] == ["v000004"]
    assert run_cli("rebase", store, src, *args) == 0
    assert s.unfinished() == [] and s.manifest()["operation"] == "rebase" and s.current_version() == "v000004"
    assert pq.read_table(io.BytesIO(s.version_location("v000004").read_bytes("catalog.parquet"))).num_rows == 24


def test_a_killed_compress_resumes_and_a_rerun_with_other_inputs_recomputes(runner, place, tmp_path):
    """compress killed mid-compute resumes at the first rerun. Reruns from another source
    recompute the shards (their inputs differ), and one that dies after overwriting a shard's
    objects leaves no record vouching for them: the next run computes them again."""
    pool = tmp_path / "pool"
    ids = make_collection(pool, 16, shared_dim=6, noise=0.3)
    for name in ids[:12]:
        place.add(pool / name, name)
    src, store, args = place.uri("src"), place.uri("store"), place.args
    _killed(place, "compress", src, "--out", store, "--components", 4, *SHARDED, failpoint="shard-done:3")
    assert run_cli("compress", src, "--out", store, "--components", 4, *SHARDED, *args) == 0
    s = place.store()
    assert s.current_version() == "v000001"
    assert sum(r["resumed"] for r in json.loads(s.version_location("v000001").read_bytes("report.json"))["shards"]) >= 3
    assert run_cli("compress", src, "--out", place.uri("reference"), "--components", 4, *SHARDED, *args) == 0
    _assert_same(_snapshot(s), _snapshot(place.store("reference")))

    # Another source (the same 12 and 4 more) for a re-base of the same kind from the same parent.
    for name in ids:
        place.add(pool / name, name, "src-all")
    other, full = place.uri("src-all"), ["--full", "--from-source", *SHARDED]
    # Killed with the first source; then a run from the other one whose shard tasks all die after
    # writing their objects, before their done records: the first source's records must not
    # vouch for those objects at the next run.
    _killed(place, "rebase", store, src, *full, failpoint="shard-done:3")
    env = {**os.environ, "LORA_SUBSPACE_FAILPOINT": "shard-staged"}
    failed = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "rebase", store, other, *full, *args, "--num-cpus", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode != 0
    assert run_cli("rebase", store, src, *full, *args) == 0
    _assert_same(_snapshot(s), _snapshot(place.store("reference")))

    # Killed again; the rerun from the other source recomputes every shard, replacing staged
    # objects this process listed.
    _killed(place, "rebase", store, src, *full, failpoint="shard-done:3")
    assert run_cli("rebase", store, other, *full, *args) == 0
    assert run_cli("compress", other, "--out", place.uri("reference-all"), "--components", 4, *SHARDED, *args) == 0
    _assert_same(_snapshot(s), _snapshot(place.store("reference-all")))


def test_a_killed_chunked_compress_resumes_its_finished_shards(runner, place, tmp_path):
    """compress --chunk-size is one version: killed mid-compute, the rerun takes the shards that
    finished all their chunks and equals an undisturbed run; another chunk size recomputes them."""
    pool = tmp_path / "pool"
    for name in make_collection(pool, 12, shared_dim=6, noise=0.3):
        place.add(pool / name, name)
    src, store, args = place.uri("src"), place.uri("store"), place.args
    chunked = ["--components", 4, "--chunk-size", 5, *SHARDED]
    _killed(place, "compress", src, "--out", store, *chunked, failpoint="shard-done:3")
    assert run_cli("compress", src, "--out", store, *chunked, *args) == 0
    s = place.store()
    report = json.loads(s.version_location("v000001").read_bytes("report.json"))
    assert s.current_version() == "v000001" and sum(r["resumed"] for r in report["shards"]) >= 3
    assert run_cli("compress", src, "--out", place.uri("reference"), *chunked, *args) == 0
    _assert_same(_snapshot(s), _snapshot(place.store("reference")))

    _killed(place, "compress", src, "--out", place.uri("other"), *chunked, failpoint="shard-done:3")
    other = ["--components", 4, "--chunk-size", 4, *SHARDED]
    assert run_cli("compress", src, "--out", place.uri("other"), *other, *args) == 0
    report = json.loads(place.store("other").version_location("v000001").read_bytes("report.json"))
    assert not any(r["resumed"] for r in report["shards"])
    assert all(len(r["chunk_seconds"]) == 3 for r in report["shards"])
