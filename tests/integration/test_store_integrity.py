"""A store's own metadata and its publication steps: a writer killed at any step between the
manifest and the end of its cleanup leaves the current version readable and exportable whatever
command runs next (local and S3); a corrupt pointer or manifest gives every command one line and
`rollback` repairs it; ids and paths read from a store are checked; verify fails when there is
nothing sound to verify."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import kill_session, make_collection, run_cli

from pipeline.io.format import check_version_id, is_object_path, is_safe_task_id
from pipeline.io.location import Location
from pipeline.io.store import Store

ROOT = Path(__file__).parents[2]
POINTS = [
    "publish",
    "publish-pointer",
    "publish-staging",
    "publish-run",
]  # after manifest, pointer, staging, run record


@pytest.fixture(scope="module")
def collection(tmp_path_factory, runner):
    """9 adapters; `base` holds 6, `full` 8, `more` 9. `store`: v1 compressed from base; `grown`:
    a copy with v2, a rebase of `full`."""
    root = tmp_path_factory.mktemp("collection")
    ids = make_collection(root / "pool", 9)
    for name, count in (("base", 6), ("full", 8), ("more", 9)):
        for task_id in ids[:count]:
            shutil.copytree(root / "pool" / task_id, root / name / task_id)
    assert run_cli("compress", "--max-error", "none", root / "base", "--out", root / "store", "--components", 4) == 0
    shutil.copytree(root / "store", root / "grown")
    assert run_cli("rebase", root / "grown", root / "full") == 0
    collection = type("Collection", (), {})()
    collection.root, collection.ids, collection.store, collection.grown = root, ids, root / "store", root / "grown"
    return collection


class Places:
    """Stores on one storage: local folders under tmp_path, or prefixes of a fresh S3 bucket."""

    def __init__(self, storage, tmp_path, request):
        self.tmp, self.s3 = tmp_path, None
        self.endpoint = None
        if storage == "s3":
            import boto3

            self.endpoint, self.bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("bucket")
            self.s3 = boto3.client("s3", endpoint_url=self.endpoint)

    @property
    def args(self):
        return ["--endpoint-url", self.endpoint] if self.s3 else []

    def uri(self, name):
        return f"s3://{self.bucket}/{name}" if self.s3 else str(self.tmp / name)

    def store(self, uri):
        return Store(Location(uri, self.endpoint))

    def put(self, folder: Path, uri):
        if not self.s3:
            shutil.copytree(folder, uri)
            return
        for path in folder.rglob("*"):
            if path.is_file():
                self.s3.put_object(
                    Bucket=self.bucket, Key=f"{uri.split('/', 3)[3]}/{path.relative_to(folder)}", Body=path.read_bytes()
                )

    def copy(self, src, dst):
        if not self.s3:
            shutil.copytree(src, dst)
            return
        prefix, target = src.split("/", 3)[3], dst.split("/", 3)[3]
        for item in self.s3.list_objects_v2(Bucket=self.bucket, Prefix=f"{prefix}/")["Contents"]:
            key = f"{target}/{item['Key'][len(prefix) + 1 :]}"
            self.s3.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": item["Key"]})

    def exists(self, uri, relative):
        return self.store(uri).location.exists(relative)


def _kill(args, failpoint):
    """Run a CLI command in its own process, joined to the test's Ray, until the failpoint kills it."""
    import ray

    env = {**os.environ, "LORA_SUBSPACE_FAILPOINT": failpoint}
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        *map(str, args),
        "--address",
        ray.get_runtime_context().gcs_address,
    ]
    driver = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    _, err = driver.communicate(timeout=300)
    kill_session(driver.pid)  # the workers of its embedded Ray too: none may write after this
    assert driver.returncode == -signal.SIGKILL, err[-2000:]


@pytest.mark.parametrize("storage", ["local", "s3"])
@pytest.mark.parametrize("point", POINTS)
def test_a_writer_killed_while_publishing_leaves_the_current_version_readable(
    point, storage, collection, tmp_path, request, capsys
):
    places, ids = Places(storage, tmp_path, request), collection.ids
    full, more = collection.root / "full", collection.root / "more"
    crashed = places.uri("crashed")
    places.put(collection.store, crashed)
    _kill(["rebase", crashed, full, *places.args], point)
    moved = point != "publish"  # LATEST names the killed run's v2
    current = "v000002" if moved else "v000001"
    assert places.store(crashed).current_version() == current
    assert places.exists(crashed, "versions/v000002/manifest.json")
    assert places.exists(crashed, "versions/v000002/run.json") == (point != "publish-run")
    exports = iter(range(100))

    def fresh(name):
        uri = places.uri(name)
        places.copy(crashed, uri)
        return uri

    def readable(uri, version):
        assert places.store(uri).current_version() == version
        assert run_cli("verify", uri, *places.args) == 0
        assert run_cli("export", uri, ids[0], "--out", tmp_path / f"export-{next(exports)}", *places.args) == 0

    # verify --all checks the current version (a v2 LATEST names is published, run record or not).
    uri = fresh("verify")
    capsys.readouterr()
    assert run_cli("verify", uri, "--all", "--json", *places.args) == 0
    assert [r["version"] for r in json.loads(capsys.readouterr().out)["versions"]] == ["v000001", "v000002"][
        : 1 + moved
    ]

    # export
    readable(fresh("export"), current)

    # rebase: grows from the current version; an unpublished v2 is resumed, a published one kept.
    uri = fresh("rebase")
    assert run_cli("rebase", uri, more, *places.args) == 0
    store = places.store(uri)
    readable(uri, "v000003" if moved else "v000002")
    assert store.manifest()["parent"] == ("v000002" if moved else "v000001") and store.unfinished() == []
    assert run_cli("verify", uri, "--version", "v000002", *places.args) == 0

    # prune keeps the current version and its parent; an unpublished v2 goes.
    uri = fresh("prune")
    assert run_cli("prune", uri, "--keep", 1, *places.args) == 0
    readable(uri, current)
    assert [m["version"] for m in places.store(uri).published()] == ["v000001", "v000002"][: 1 + moved]
    assert places.store(uri).versions() == ["v000001", "v000002"][: 1 + moved]

    # rollback: to v2 only if LATEST named it; back to v1; then a rebase must not delete v2.
    uri = fresh("rollback")
    capsys.readouterr()
    assert run_cli("rollback", uri, "v000002", *places.args) == (0 if moved else 1)
    if not moved:
        assert "was never published" in capsys.readouterr().err.splitlines()[-1]
    assert run_cli("rollback", uri, "v000001", *places.args) == 0
    readable(uri, "v000001")
    assert run_cli("rebase", uri, more, *places.args) == 0
    readable(uri, "v000003" if moved else "v000002")
    assert run_cli("verify", uri, "--version", "v000002", *places.args) == 0
    if moved:
        assert places.store(uri).manifest()["parent"] == "v000001"


def _pointer(version):
    return json.dumps({"version": version, "format_version": 1}).encode()


def _damage(store: Path, state: str) -> None:
    latest, v1, v2 = (
        store / "LATEST",
        store / "versions/v000001/manifest.json",
        store / "versions/v000002/manifest.json",
    )
    if state == "latest-empty":
        latest.write_bytes(b"")
    elif state == "latest-garbage":
        latest.write_bytes(b"\x89garbage{")
    elif state == "latest-wrong-type":
        latest.write_bytes(b'{"version": 2, "format_version": 1}')
    elif state == "latest-into-another-store":
        latest.write_bytes(_pointer("../../other/versions/v000001"))
    elif state == "latest-missing-version":
        latest.write_bytes(_pointer("v000009"))
    elif state == "latest-unfinished":  # a run that died before its manifest
        (store / "versions/v000003").mkdir()
        (store / "versions/v000003/run.json").write_text(
            '{"operation": "rebase", "mode": "absorb", "parent": "v000002"}'
        )
        latest.write_bytes(_pointer("v000003"))
    elif state == "current-manifest-garbage":
        v2.write_bytes(b'{"version": "v0')
    elif state == "old-manifest-incomplete":
        manifest = json.loads(v1.read_text())
        del manifest["modules"]
        v1.write_text(json.dumps(manifest))
    elif state == "old-manifest-wrong-types":
        manifest = json.loads(v1.read_text())
        manifest["files"] = ["versions/v000001/loadings.parquet"]
        v1.write_text(json.dumps(manifest))
    else:
        raise AssertionError(state)


# The object each state's one-line error names.
STATES = {
    "latest-empty": "LATEST",
    "latest-garbage": "LATEST",
    "latest-wrong-type": "LATEST",
    "latest-into-another-store": "LATEST",
    "latest-missing-version": "v000009",
    "latest-unfinished": "v000003",
    "current-manifest-garbage": "v000002/manifest.json",
    "old-manifest-incomplete": "v000001/manifest.json",
    "old-manifest-wrong-types": "v000001/manifest.json",
}
COMMANDS = ["verify", "verify-all", "versions", "info", "export", "rebase", "prune", "rollback"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("state", STATES)
def test_corrupt_metadata_gives_one_line_and_rollback_repairs(state, command, collection, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(collection.grown, store)
    _damage(store, state)
    old = state.startswith("old-")  # the current version v2 is sound
    healthy = "v000002" if old else "v000001"
    argv = {
        "verify": ["verify", store],
        "verify-all": ["verify", store, "--all"],
        "versions": ["versions", store],
        "info": ["info", store],
        "export": ["export", store, collection.ids[0], "--out", tmp_path / "out"],
        "rebase": ["rebase", store, collection.root / "full"],
        "prune": ["prune", store, "--keep", 1],
        "rollback": ["rollback", store, healthy],
    }[command]
    expected = 0 if command in ("versions", "rollback") or (old and command not in ("verify-all", "prune")) else 1
    capsys.readouterr()
    assert run_cli(*argv) == expected
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if expected:
        line = err.strip().splitlines()[-1]
        assert line.startswith("lora-subspace: error: ") and STATES[state] in line, line
    if command == "versions":  # every readable version listed, the rest marked
        assert "v000001" in out and "v000002" in out and STATES[state] in out, out
    if command == "rollback":
        assert Store(Location(str(store))).current_version() == healthy
        assert run_cli("verify", store) == 0
        assert run_cli("export", store, collection.ids[0], "--out", tmp_path / "after") == 0
    if old and command == "rollback":
        capsys.readouterr()
        assert run_cli("rollback", store, "v000001") == 1
        assert STATES[state] in capsys.readouterr().err


def test_verify_reports_ids_and_paths_that_leave_the_store(collection, tmp_path, capsys):
    """Task ids and manifest paths are input: verify lists each bad one (and never reads a file
    outside the store); readers refuse them in one line."""
    store = tmp_path / "store"
    shutil.copytree(collection.grown, store)
    folder = store / "versions/v000002"
    manifest = json.loads((folder / "manifest.json").read_text())
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not the store's")
    entry = {"bytes": len(outside.read_bytes()), "sha256": hashlib.sha256(outside.read_bytes()).hexdigest()}
    manifest["files"]["versions/v000002/../../../outside.bin"] = entry
    manifest["files"][str(outside)] = entry
    for name, bad in (("catalog.parquet", "../escaped"), ("loadings.parquet", "/etc/escaped")):
        table = pq.read_table(folder / name)
        ids = table.column("task_id").to_pylist()
        table = table.set_column(0, "task_id", pa.array([bad if t == collection.ids[7] else t for t in ids]))
        pq.write_table(table, folder / name, write_page_checksum=True)
        data = (folder / name).read_bytes()
        manifest["files"][f"versions/v000002/{name}"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert run_cli("verify", store, "--json") == 1
    failures = json.loads(capsys.readouterr().out)["versions"][0]["failures"]
    assert (
        "versions/v000002/manifest.json: file 'versions/v000002/../../../outside.bin' is not a store path "
        "(versions/vNNNNNN/..., no '..')" in failures
    )
    assert (
        f"versions/v000002/manifest.json: file {str(outside)!r} is not a store path (versions/vNNNNNN/..., no '..')"
        in failures
    )
    assert run_cli("info", store) == 1
    assert "manifest.json is not a valid manifest: file" in capsys.readouterr().err

    del manifest["files"]["versions/v000002/../../../outside.bin"], manifest["files"][str(outside)]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("verify", store, "--json") == 1
    failures = json.loads(capsys.readouterr().out)["versions"][0]["failures"]
    assert failures == [
        "loadings.parquet: task id '/etc/escaped' is not a safe relative path",
        "catalog.parquet: task id '../escaped' is not a safe relative path",
    ]
    assert run_cli("info", store) == 1
    assert "which is not a safe relative path" in capsys.readouterr().err


def test_ids_and_paths_are_checked_as_scan_checks_them():
    assert [
        is_safe_task_id(t) for t in ("team/task-1", "a.b=c+d_e", "../x", "a/../b", "/abs", ".hidden", "a//b", "", None)
    ] == [True, True, False, False, False, False, False, False, False]
    assert [
        is_object_path(p)
        for p in (
            "versions/v000001/basis/shard-00000.safetensors",
            "versions/v000001/../../x",
            "versions/v1/x",
            "/versions/v000001/x",
            "versions/v000001",
            "other/v000001/x",
        )
    ] == [True] + [False] * 5
    assert check_version_id("v000123") == "v000123"
    for bad in ("v123", "../v000001", "v000001/..", 7, None):
        with pytest.raises(Exception, match="is not a version id"):
            check_version_id(bad)


def test_verify_fails_when_there_is_nothing_sound_to_verify(collection, s3_endpoint, tmp_path, capsys):
    endpoint = ["--endpoint-url", s3_endpoint]
    for argv in (
        ["verify", tmp_path / "nothing-here", "--all"],
        ["verify", tmp_path / "nothing-here"],
        ["verify", "s3://no-such-bucket/store", "--all", *endpoint],
        ["verify", "s3://no-such-bucket/store", *endpoint],
    ):
        capsys.readouterr()
        assert run_cli(*argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("lora-subspace: error: ") and "Traceback" not in "".join(err)
    store = tmp_path / "store"
    shutil.copytree(collection.grown, store)
    (store / "LATEST").unlink()  # versions but no pointer: which one is served is unknown
    assert run_cli("verify", store, "--all") == 1
    assert "no LATEST pointer" in capsys.readouterr().err


def test_cleanup_keeps_what_published_versions_use(collection, tmp_path):
    """A store written before publication was recognisable from the pointer: its v1 still has the
    run record its writer left, and the current v2 (project) uses v1's basis. The next writer
    removes v1 as a crashed run's leftovers, but not the objects v2 lists."""
    store = tmp_path / "store"
    shutil.copytree(collection.store, store)
    assert run_cli("project", store, collection.root / "full") == 0
    v2 = Store(Location(str(store))).manifest("v000002")
    shared = sorted(p for p in v2["files"] if p.startswith("versions/v000001/"))
    assert shared  # project reuses its parent's basis objects
    (store / "versions/v000001/run.json").write_text('{"operation": "compress", "mode": "fit", "parent": null}')
    assert run_cli("rebase", store, collection.root / "more") == 0
    assert not (store / "versions/v000001/manifest.json").exists()  # v1 itself is gone
    assert all((store / p).exists() for p in shared)
    assert run_cli("verify", store, "--version", "v000002") == 0 and run_cli("verify", store) == 0


def test_a_run_stopped_by_storage_says_where_its_version_is_and_the_next_run_resumes(collection, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(collection.store, store)
    # A resumable v2 whose loadings table cannot be written (a folder stands in its place).
    (store / "versions/v000002/loadings.parquet").mkdir(parents=True)
    (store / "versions/v000002/run.json").write_text('{"operation": "rebase", "mode": "absorb", "parent": "v000001"}')
    capsys.readouterr()
    assert run_cli("rebase", store, collection.root / "full") == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        line.startswith("lora-subspace: error: storage: ")
        and f"the unfinished v000002 stays at {store / 'versions/v000002'}" in line
    ), line
    assert (store / "versions/v000002/run.json").exists() and Store(Location(str(store))).current_version() == "v000001"
    (store / "versions/v000002/loadings.parquet").rmdir()
    assert run_cli("rebase", store, collection.root / "full") == 0
    assert Store(Location(str(store))).current_version() == "v000002" and run_cli("verify", store) == 0


def test_manifests_without_the_fields_early_stores_lack_still_read(collection, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(collection.grown, store)
    path = store / "versions/v000001/manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["operation"], manifest["adapters"]["in_basis"]
    for entry in manifest["modules"].values():
        del entry["count"]
    path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert run_cli("verify", store, "--all") == 0 and run_cli("versions", store) == 0
    assert "v000001" in capsys.readouterr().out
    assert (
        run_cli("rollback", store, "v000001") == 0
        and run_cli("export", store, collection.ids[0], "--out", tmp_path / "out") == 0
    )
