"""export, vlora-export and compress write only where they may: never into a folder holding files
(unless --overwrite), never outside --out, and every check comes before any write or Ray start; a
permanent storage error is one line, at once, and not retried."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
from conftest import make_collection, run_cli

from pipeline.io.location import Location
from pipeline.io.tables import write_tables

IDS = [f"adapter-{i:05d}" for i in range(4)]
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def built(runner, tmp_path_factory):
    """A store of four adapters and one quarantined one ('broken'), beside its source."""
    root = tmp_path_factory.mktemp("export-safety")
    assert make_collection(root / "src", 4) == IDS
    (root / "src" / "broken").mkdir()
    shutil.copy(root / "src" / IDS[0] / "adapter_config.json", root / "src" / "broken")
    (root / "src" / "broken" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    assert run_cli("compress", "--max-error", "none", root / "src", "--out", root / "store", "--components", 2) == 0
    return root


def _error(capsys) -> str:
    """The one error line of a failed command (no traceback, no colour codes)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and "\x1b[" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("lora-subspace: error: "), err
    return lines[-1]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(*args) -> subprocess.CompletedProcess:
    """The CLI in a process of its own, where Ray's output, had it started, would show."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )


def _one_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-subspace: error: "), run.stderr
    assert "\x1b[" not in run.stderr
    return lines[0]


def _keys(s3_endpoint: str, bucket: str) -> dict[str, str]:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    return {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}


# -- folders that hold files -----------------------------------------------------------------------


def test_export_of_one_id_refuses_a_folder_holding_files_unless_overwrite(built, tmp_path, capsys):
    out = tmp_path / IDS[1]
    shutil.copytree(built / "src" / IDS[1], out)  # the original adapter, where its owner keeps it
    before = _files(out)
    capsys.readouterr()
    assert run_cli("export", built / "store", IDS[1], "--out", out) == 1
    line = _error(capsys)
    assert f"--out {out} already holds files" in line and "--overwrite" in line
    assert _files(out) == before
    # A new or empty folder is fine; --overwrite writes over what is there.
    (tmp_path / "empty").mkdir()
    assert run_cli("export", built / "store", IDS[1], "--out", tmp_path / "empty") == 0
    assert run_cli("export", built / "store", IDS[1], "--out", out, "--overwrite") == 0
    assert _files(out) == _files(tmp_path / "empty") != before


@pytest.mark.parametrize("select", [[IDS[0], IDS[1], IDS[2]], ["--all"]])
def test_several_ids_check_every_target_before_writing_any(built, tmp_path, capsys, select):
    out = tmp_path / "out"
    (out / IDS[0]).mkdir(parents=True)
    (out / IDS[0] / "adapter_model.safetensors").write_bytes(b"someone's adapter")
    (out / IDS[2]).write_bytes(b"a file where a folder would go")
    (out / "notes.txt").write_bytes(b"beside the targets: not in the way")
    (out / IDS[1]).mkdir()  # empty: not in the way
    before = _files(out)
    capsys.readouterr()
    assert run_cli("export", built / "store", *select, "--out", out) == 1
    line = _error(capsys)
    assert (
        f"2 target folder(s) under --out {out} already hold files: '{IDS[0]}', '{IDS[2]}'; nothing was written" in line
    )
    assert _files(out) == before
    (out / IDS[2]).unlink()
    assert run_cli("export", built / "store", *select, "--out", out, "--overwrite") == 0
    exported = {p.parent.name for p in out.rglob("adapter_config.json")}
    assert exported == ({IDS[0], IDS[1], IDS[2]} if "--all" not in select else set(IDS))
    assert (out / "notes.txt").read_bytes() == b"beside the targets: not in the way"


def test_vlora_export_refuses_a_folder_holding_files_unless_overwrite(built, tmp_path, capsys):
    out = tmp_path / "vlora"
    out.mkdir()
    (out / "subspace_meta.json").write_text("{}")
    capsys.readouterr()
    assert run_cli("vlora-export", built / "store", out) == 1
    assert f"{out} already holds files" in _error(capsys)
    assert _files(out) == {"subspace_meta.json": b"{}"}
    assert run_cli("vlora-export", built / "store", out, "--overwrite") == 0
    assert json.loads((out / "subspace_meta.json").read_text())["task_ids"] == IDS


def test_compress_refuses_a_folder_that_is_not_a_store(built, tmp_path, capsys):
    out = tmp_path / "work"
    out.mkdir()
    (out / "train.py").write_text("print('mine')\n")
    capsys.readouterr()
    assert run_cli("compress", "--max-error", "none", built / "src", "--out", out, "--components", 2) == 1
    assert f"--out {out} holds files and is not a store" in _error(capsys)
    assert _files(out) == {"train.py": b"print('mine')\n"}
    # An existing store is compress's own output: a new version goes into it.
    shutil.copytree(built / "store", tmp_path / "store")
    assert (
        run_cli("compress", "--max-error", "none", built / "src", "--out", tmp_path / "store", "--components", 2) == 0
    )
    assert json.loads((tmp_path / "store" / "LATEST").read_text())["version"] == "v000002"


def test_s3_targets_holding_objects_are_refused(built, s3_endpoint, bucket, capsys):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for key in ("served/one/adapter_model.safetensors", f"served/many/{IDS[3]}/adapter_config.json", "data/readme.txt"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"kept")
    endpoint = ["--endpoint-url", s3_endpoint]
    before = _keys(s3_endpoint, bucket)
    capsys.readouterr()
    assert run_cli("export", built / "store", IDS[0], "--out", f"s3://{bucket}/served/one", *endpoint) == 1
    assert f"--out s3://{bucket}/served/one already holds files" in _error(capsys)
    assert run_cli("export", built / "store", "--all", "--out", f"s3://{bucket}/served/many", *endpoint) == 1
    assert f"1 target folder(s) under --out s3://{bucket}/served/many already hold files: '{IDS[3]}'" in _error(capsys)
    assert run_cli("vlora-export", built / "store", f"s3://{bucket}/served/one", *endpoint) == 1
    assert f"s3://{bucket}/served/one already holds files" in _error(capsys)
    assert (
        run_cli(
            "compress",
            "--max-error",
            "none",
            built / "src",
            "--out",
            f"s3://{bucket}/data",
            "--components",
            2,
            *endpoint,
        )
        == 1
    )
    assert f"--out s3://{bucket}/data holds files and is not a store" in _error(capsys)
    assert _keys(s3_endpoint, bucket) == before
    # A prefix beside them ("served/one" is not "served/on") and --overwrite are written.
    assert run_cli("export", built / "store", IDS[0], "--out", f"s3://{bucket}/served/on", *endpoint) == 0
    assert (
        run_cli("export", built / "store", IDS[0], "--out", f"s3://{bucket}/served/one", "--overwrite", *endpoint) == 0
    )
    keys = _keys(s3_endpoint, bucket)
    assert keys["served/one/adapter_model.safetensors"] == keys["served/on/adapter_model.safetensors"]


# -- ids -------------------------------------------------------------------------------------------


def test_unknown_and_quarantined_ids_are_named_in_one_line_before_ray_starts(built, tmp_path):
    # An address where no Ray listens: had the command tried to start or join Ray, it would not
    # have failed with the catalog's answer.
    run = _cli(
        "export",
        built / "store",
        IDS[0],
        "nope-1",
        "broken",
        "nope-2",
        "--out",
        tmp_path / "out",
        "--address",
        "127.0.0.1:9",
    )
    line = _one_line(run)
    assert line.endswith(
        f"cannot export from {built / 'store'} version v000001: no adapter 'nope-1', 'nope-2'; "
        "quarantined, not compressed: 'broken'"
    )
    assert not (tmp_path / "out").exists()


def _rename(store: Path, old: str, new: str) -> None:
    """Rewrite the store's catalog and loadings with `old` renamed `new` (kept sorted, as a
    writer would), and the manifest's sizes and checksums to match: only the id is wrong."""
    version = store / "versions" / "v000001"
    manifest = json.loads((version / "manifest.json").read_text())
    for name in ("catalog.parquet", "loadings.parquet"):
        table = pq.read_table(version / name)
        ids = [new if t == old else t for t in table.column("task_id").to_pylist()]
        table = table.set_column(table.schema.get_field_index("task_id"), "task_id", [ids])
        keys = [("task_id", "ascending")] + ([("module", "ascending")] if "module" in table.column_names else [])
        entry = write_tables(Location(str(version)), name, [table.sort_by(keys)], table.schema)
        manifest["files"][f"versions/v000001/{name}"] = entry.to_dict()
    (version / "manifest.json").write_text(json.dumps(manifest, indent=1))


@pytest.fixture(scope="module")
def hostile(built):
    """The store with two ids no scan lets in: one leaves --out as a folder, one as a vlora file name."""
    store = built / "hostile" / "store"
    shutil.copytree(built / "store", store)
    _rename(store, IDS[1], "../escape")
    _rename(store, IDS[2], "x/../../escape")
    return store


def test_ids_read_from_a_store_never_become_paths_outside_out(hostile, tmp_path, capsys):
    manifest = json.loads((hostile / "versions" / "v000001" / "manifest.json").read_text())
    for path, entry in manifest["files"].items():  # every checksum matches: only the ids are wrong
        assert hashlib.sha256((hostile / path).read_bytes()).hexdigest() == entry["sha256"]
    work = tmp_path / "work"
    work.mkdir()
    capsys.readouterr()
    for command in (
        ["export", hostile, "--all", "--out", work / "out"],
        ["export", hostile, IDS[0], "../escape", "--out", work / "out"],
        ["vlora-export", hostile, work / "vlora"],
    ):
        assert run_cli(*command) == 1
        line = _error(capsys)
        assert "safe relative path" in line and "'../escape'" in line, line
    assert (
        list(work.iterdir()) == []
        and not (tmp_path / "escape").exists()
        and not (tmp_path / "escape.safetensors").exists()
    )


# -- storage that cannot be written ----------------------------------------------------------------


def test_export_all_to_an_unwritable_folder_is_one_line_at_once(built, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    started = time.perf_counter()
    run = _cli("export", built / "store", "--all", "--out", tmp_path / "a-file" / "out", "--address", "127.0.0.1:9")
    line = _one_line(run)
    assert f"cannot write to {tmp_path / 'a-file' / 'out'}: NotADirectoryError" in line
    assert time.perf_counter() - started < 60  # no start of Ray, no retries


def test_export_all_to_a_bucket_that_does_not_exist(built, s3_endpoint, capsys):
    capsys.readouterr()
    assert (
        run_cli("export", built / "store", "--all", "--out", "s3://no-such-bucket/out", "--endpoint-url", s3_endpoint)
        == 1
    )
    assert "cannot write to s3://no-such-bucket/out: not found" in _error(capsys)


def test_a_permanent_error_in_a_task_is_one_line_and_not_retried(built, tmp_path):
    """A basis object gone: every task fails with FileNotFoundError, which Ray must neither retry
    nor print as its traceback."""
    store = tmp_path / "store"
    shutil.copytree(built / "store", store)
    for shard in (store / "versions" / "v000001" / "basis").iterdir():
        shard.unlink()
    run = _cli("export", store, "--all", "--out", tmp_path / "out", "--num-cpus", 1)
    line = _one_line(run)
    assert "storage: FileNotFoundError" in line and "basis/shard-" in line


def _fail(item: tuple[str, str]) -> str:
    """A task that counts its attempts in a file and fails as told on the first one."""
    path, kind = item
    with open(path, "a") as handle:
        handle.write("x")
    if kind == "transient" and os.path.getsize(path) == 1:
        raise ConnectionResetError(104, "connection reset by peer")
    if kind == "permanent":
        raise PermissionError(13, "permission denied", path)
    return "done"


def test_the_ray_runner_retries_transient_errors_only(runner, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module
    counts = tmp_path / "transient"
    assert list(runner.map_unordered(_fail, [(str(counts), "transient")])) == [(0, "done")]
    assert counts.read_text() == "xx"
    counts = tmp_path / "permanent"
    with pytest.raises(PermissionError) as caught:
        list(runner.map_unordered(_fail, [(str(counts), "permanent")]))
    assert type(caught.value) is PermissionError and caught.value.filename == str(counts)
    assert counts.read_text() == "x"


def test_a_version_that_does_not_exist_is_named_with_the_store_s_versions(built, tmp_path, capsys):
    """export (one id, several, --all) and info of a --version the store does not hold say so, and
    name the versions `versions` lists; nothing is written."""
    capsys.readouterr()
    assert run_cli("versions", built / "store") == 0
    listed = re.findall(r"^[ *] (v\d{6}) ", capsys.readouterr().out, re.M)
    assert listed == ["v000001"]
    expected = f"lora-subspace: error: version v000099 does not exist in {built / 'store'}; its versions: v000001"
    for ids in ([IDS[0]], IDS[:2], ["--all"]):
        assert run_cli("export", built / "store", *ids, "--version", "v000099", "--out", tmp_path / "out") == 1
        assert _error(capsys) == expected
    assert run_cli("info", built / "store", "--version", "v000099") == 1
    assert _error(capsys) == expected
    assert not (tmp_path / "out").exists()
