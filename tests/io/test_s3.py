"""The same commands against a real S3 API: a moto server on loopback, real HTTP, real s3fs."""

import json

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_collection, rebase_twice_at_once, run_cli
from safetensors.torch import load, load_file


def _upload(folder, endpoint, bucket, prefix):
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")
    return s3


def test_compress_info_export_on_s3(runner, s3_endpoint, bucket, tmp_path, capsys, caplog):
    ids = make_collection(tmp_path / "src", 8)
    s3 = _upload(tmp_path / "src", s3_endpoint, bucket, "adapters")
    endpoint = ["--endpoint-url", s3_endpoint, "--verbose"]
    assert (
        run_cli(
            "compress", f"s3://{bucket}/adapters/", "--out", f"s3://{bucket}/subspace", "--components", 8, *endpoint
        )
        == 0
    )
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="subspace/")["Contents"]}
    assert {
        "subspace/LATEST",
        "subspace/versions/v000001/manifest.json",
        "subspace/versions/v000001/loadings.parquet",
    } <= keys
    printed = [capsys.readouterr()]
    assert run_cli("info", f"s3://{bucket}/subspace", "--json", *endpoint) == 0
    printed.append(capsys.readouterr())
    info = json.loads(printed[-1].out)
    assert info["adapters"]["ok"] == 8 and info["error"]["max"] < 1e-3

    assert run_cli("export", f"s3://{bucket}/subspace", ids[2], "--out", tmp_path / "one", *endpoint) == 0
    torch.testing.assert_close(
        load_file(str(tmp_path / "one/adapter_model.safetensors")),
        load_file(str(tmp_path / "src" / ids[2] / "adapter_model.safetensors")),
        atol=1e-5,
        rtol=1e-4,
    )
    assert run_cli("export", f"s3://{bucket}/subspace", "--all", "--out", f"s3://{bucket}/exported", *endpoint) == 0
    blob = s3.get_object(Bucket=bucket, Key=f"exported/{ids[5]}/adapter_model.safetensors")["Body"].read()
    torch.testing.assert_close(
        load(blob), load_file(str(tmp_path / "src" / ids[5] / "adapter_model.safetensors")), atol=1e-5, rtol=1e-4
    )
    # No credential reaches anything the run wrote, printed or logged.
    printed.append(capsys.readouterr())
    texts = [caplog.text] + [p.out + p.err for p in printed]
    texts += [s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode("latin-1") for key in keys]
    assert not [t for t in texts if "testing-secret-key" in t or "testing-key-id" in t]


def test_parquet_manifest_source_on_s3(runner, s3_endpoint, bucket, tmp_path):
    ids = make_collection(tmp_path / "src", 4)
    s3 = _upload(tmp_path / "src", s3_endpoint, bucket, "uploads/2026-11-29")
    table = pa.table(
        {"uri": [f"s3://{bucket}/uploads/2026-11-29/{i}" for i in ids], "task_id": [f"customer-{i[-2:]}" for i in ids]}
    )
    pq.write_table(table, tmp_path / "list.parquet")
    s3.upload_file(str(tmp_path / "list.parquet"), bucket, "lists/list.parquet")
    assert (
        run_cli(
            "compress",
            f"s3://{bucket}/lists/list.parquet",
            "--out",
            f"s3://{bucket}/store",
            "--components",
            2,
            "--endpoint-url",
            s3_endpoint,
        )
        == 0
    )
    catalog = pq.read_table(
        pa.BufferReader(s3.get_object(Bucket=bucket, Key="store/versions/v000001/catalog.parquet")["Body"].read())
    )
    assert catalog.column("task_id").to_pylist() == ["customer-00", "customer-01", "customer-02", "customer-03"]


def test_missing_bucket_is_a_clear_error(runner, s3_endpoint, tmp_path, capsys):
    assert (
        run_cli(
            "compress",
            "s3://no-such-bucket/adapters",
            "--out",
            "s3://no-such-bucket/store",
            "--endpoint-url",
            s3_endpoint,
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lora-subspace: error: ") and "no-such-bucket/adapters" in err


def test_daily_rebase_workflow_on_s3(runner, s3_endpoint, bucket, tmp_path, capsys):
    """compress, then uploads arrive: project, rebase, versions, rollback, prune; a manifest
    source's adapters are listed for discovery; two concurrent rebases: one publishes."""
    ids = make_collection(tmp_path / "pool", 20, shared_dim=4, noise=0.2)
    s3 = _upload(tmp_path / "pool", s3_endpoint, bucket, "pool")
    s3_args = ["--endpoint-url", s3_endpoint]
    store, source = f"s3://{bucket}/subspace", f"s3://{bucket}/lists/today.txt"

    def publish_list(count):
        s3.put_object(
            Bucket=bucket, Key="lists/today.txt", Body="\n".join(f"../pool/{i}" for i in ids[:count]).encode()
        )

    def keys():
        return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="subspace/")["Contents"]}

    publish_list(10)
    assert run_cli("compress", source, "--out", store, "--components", 4, *s3_args) == 0  # v1
    publish_list(13)
    capsys.readouterr()
    assert run_cli("project", store, source, "--json", *s3_args) == 0  # v2: v1's basis, 3 new rows
    projected = json.loads(capsys.readouterr().out)
    assert projected["diff"]["added"] == ids[10:13] and projected["versions"][0]["adapters_ok"] == 13
    assert not any(k.startswith("subspace/versions/v000002/basis/") for k in keys())

    publish_list(16)
    assert run_cli("rebase", store, source, "--json", *s3_args) == 0  # v3: absorbs the 3 projected and 3 new
    rebased = json.loads(capsys.readouterr().out)
    assert rebased["diff"]["pending"] == ids[10:13] and rebased["diff"]["added"] == ids[13:16]
    assert rebased["versions"][0]["adapters_ok"] == 16

    assert run_cli("versions", store, "--json", *s3_args) == 0
    listed = json.loads(capsys.readouterr().out)["versions"]
    assert [(v["version"], v["operation"], v["current"]) for v in listed] == [
        ("v000001", "compress", False),
        ("v000002", "project", False),
        ("v000003", "rebase", True),
    ]
    assert run_cli("rollback", store, "v000002", *s3_args) == 0
    assert json.loads(s3.get_object(Bucket=bucket, Key="subspace/LATEST")["Body"].read())["version"] == "v000002"

    # Two rebases at once against S3: the lock is a conditional PUT, so one of them is refused.
    from pipeline.io.location import Location

    published, refused = rebase_twice_at_once(Location(source, s3_endpoint), Location(store, s3_endpoint), runner)
    assert (
        published == ["v000004"] and len(refused) == 1 and ("is locked" in refused[0] or "is up to date" in refused[0])
    ), refused

    assert (
        run_cli("prune", store, "--keep", 1, *s3_args) == 0
    )  # keeps v4 and its parent v2 (and v1's basis, which v2 uses)
    assert run_cli("rebase", store, source, "--full", "--from-source", *s3_args) == 0  # v5: every adapter read again
    assert "versions/v000005/manifest.json" in " ".join(keys())
    left = keys()
    assert "subspace/LOCK" not in left and not any("/staging/" in k for k in left)
    assert not any(k.startswith("subspace/versions/v000003/") for k in left)
    assert (
        "subspace/versions/v000001/manifest.json" not in left
        and "subspace/versions/v000001/basis/shard-00000.safetensors" in left
    )
    assert run_cli("export", store, ids[15], "--out", tmp_path / "one", *s3_args) == 0
    torch.testing.assert_close(
        load_file(str(tmp_path / "one/adapter_model.safetensors")),
        load_file(str(tmp_path / "pool" / ids[15] / "adapter_model.safetensors")),
        atol=0.05,
        rtol=0,
    )


def test_no_secret_reaches_logs_outputs_or_objects(runner, s3_endpoint, bucket, tmp_path, capsys, caplog):
    """Every command, with --verbose, plus failures whose URIs carry credentials or a signature:
    the test credentials appear nowhere."""
    make_collection(tmp_path / "pool", 10)
    s3 = _upload(tmp_path / "pool", s3_endpoint, bucket, "adapters")
    store, source = f"s3://{bucket}/subspace", f"s3://{bucket}/adapters/"
    common = ["--endpoint-url", s3_endpoint, "--verbose"]
    commands = [
        ["compress", source, "--out", store, "--components", 3],
        ["project", store, source],
        ["rebase", store, source, "--full"],
        ["versions", store],
        ["verify", store, "--all"],
        ["info", store],
        ["rollback", store, "v000001"],
        ["prune", store, "--keep", 1],
    ]
    for command in commands:
        assert run_cli(*command, *common) == 0, command
    signed = "X-Amz-Credential=testing-key-id&X-Amz-Signature=testing-secret-key"
    listing = tmp_path / "signed.txt"  # a manifest of signed URLs: its task ids would carry them
    listing.write_text(f"s3://{bucket}/adapters/a1?{signed}\ns3://{bucket}/adapters/a2\n")
    leaky = [
        ["compress", f"s3://testing-key-id:testing-secret-key@{bucket}/nothing/", "--out", f"s3://{bucket}/x"],
        ["info", f"s3://{bucket}/missing?{signed}"],
        ["compress", listing, "--out", tmp_path / "signed-store"],
        ["compress", f"file://{tmp_path / 'pool'}?{signed}", "--out", tmp_path / "signed-store"],
    ]
    for command in leaky:
        assert run_cli(*command, *common) == 1, command
    printed = capsys.readouterr()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"] if not o["Key"].startswith("adapters/")]
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name != "werkzeug")  # not the fake S3's access log
    texts = [ours, printed.out, printed.err] + [
        s3.get_object(Bucket=bucket, Key=k)["Body"].read().decode("latin-1") for k in keys
    ]
    assert keys and not [t for t in texts if "testing-secret-key" in t or "testing-key-id" in t]
    assert not (tmp_path / "signed-store").exists()


def test_a_local_manifest_of_s3_adapters(runner, s3_endpoint, bucket, tmp_path, capsys):
    """The manifest is a local file, the adapters it lists are on S3: they are read from S3. A
    manifest mixing filesystems is refused by name."""
    ids = make_collection(tmp_path / "pool", 6)
    _upload(tmp_path / "pool", s3_endpoint, bucket, "pool")
    listing = tmp_path / "today.txt"
    listing.write_text("\n".join(f"s3://{bucket}/pool/{i}" for i in ids) + "\n")
    assert (
        run_cli(
            "compress", listing, "--out", tmp_path / "store", "--components", 3, "--endpoint-url", s3_endpoint, "--json"
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["adapters_ok"] == 6
    listing.write_text(f"s3://{bucket}/pool/{ids[0]}\n{tmp_path / 'pool' / ids[1]}\n")
    assert run_cli("compress", listing, "--out", tmp_path / "other", "--endpoint-url", s3_endpoint) == 1
    assert "lists adapters on more than one filesystem (file, s3)" in capsys.readouterr().err


def test_compress_auto_budget_and_rebase_on_s3(runner, s3_endpoint, bucket, tmp_path, capsys):
    """`--method auto --ratio` through S3: per-module choice (joint on a gauge collection), verify,
    a re-base of new uploads, export."""
    make_collection(tmp_path / "src", 12, preset="micro", structure="gauge", shared_dim=3)
    s3 = _upload(tmp_path / "src", s3_endpoint, bucket, "adapters")
    endpoint = ["--endpoint-url", s3_endpoint]
    store = f"s3://{bucket}/subspace"
    assert run_cli("compress", f"s3://{bucket}/adapters/", "--out", store, "--ratio", 4, *endpoint) == 0
    make_collection(tmp_path / "more", 3, preset="micro", structure="gauge", shared_dim=3, start=12)
    _upload(tmp_path / "more", s3_endpoint, bucket, "adapters")
    assert run_cli("rebase", store, f"s3://{bucket}/adapters/", *endpoint) == 0
    assert run_cli("verify", store, "--all", *endpoint) == 0
    capsys.readouterr()
    assert run_cli("info", store, "--json", *endpoint) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["adapters"]["ok"] == 15 and info["operation"] == "rebase"
    assert {c["method"] for c in info["methods"].values()} == {"joint"}
    assert run_cli("export", store, "adapter-00013", "--out", f"s3://{bucket}/out", *endpoint) == 0
    exported = load(s3.get_object(Bucket=bucket, Key="out/adapter_model.safetensors")["Body"].read())
    original = load_file(str(tmp_path / "more" / "adapter-00013" / "adapter_model.safetensors"))
    errors = []
    for key_a in (k for k in original if ".lora_A." in k):
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        rebuilt, truth = (
            exported[key_b].double() @ exported[key_a].double(),
            original[key_b].double() @ original[key_a].double(),
        )
        errors.append(float(torch.linalg.norm(rebuilt - truth) / torch.linalg.norm(truth)))
    # A new upload's error is measured, so export rebuilds exactly what info reports.
    assert sum(errors) / len(errors) == pytest.approx(info["per_adapter_error"]["adapter-00013"]["mean"], rel=1e-3)
