"""Storage that fails: transient faults are retried and the run matches a clean one; permanent
ones fail fast, in one line, leaving nothing visible. A fault-injecting proxy sits in front of the
moto server; Ray workers and the driver both talk to it."""

import time

import boto3
import pytest
import torch
from conftest import make_collection, run_cli
from faulty_proxy import FaultyProxy

from pipeline.io.location import Location
from pipeline.io.store import Store


def _upload(folder, endpoint, bucket):
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"adapters/{path.relative_to(folder)}")
    return s3


def _bases(uri, endpoint):
    store = Store(Location(uri, endpoint))
    tensors = {}
    for path in {e["basis"] for e in store.manifest()["modules"].values()}:
        tensors.update(store.read_basis(path))
    return tensors


@pytest.fixture
def proxy_factory(s3_endpoint):
    proxies = []

    def make(**kwargs):
        proxies.append(FaultyProxy(s3_endpoint, **kwargs))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


def test_transient_faults_are_retried_and_the_result_is_unchanged(
    runner, s3_endpoint, bucket, tmp_path, proxy_factory, capsys
):
    ids = make_collection(tmp_path / "src", 8)
    _upload(tmp_path / "src", s3_endpoint, bucket)
    source = f"s3://{bucket}/adapters/"
    assert (
        run_cli("compress", source, "--out", f"s3://{bucket}/clean", "--components", 4, "--endpoint-url", s3_endpoint)
        == 0
    )

    proxy = proxy_factory(period=4, slow_seconds=3)
    flaky = ["--endpoint-url", proxy.url]
    assert run_cli("compress", source, "--out", f"s3://{bucket}/flaky", "--components", 4, *flaky) == 0
    assert run_cli("export", f"s3://{bucket}/flaky", ids[3], "--out", tmp_path / "one", *flaky) == 0
    assert {"503", "500", "reset", "slow"} <= set(proxy.injected), proxy.injected
    torch.testing.assert_close(_bases(f"s3://{bucket}/flaky", s3_endpoint), _bases(f"s3://{bucket}/clean", s3_endpoint))
    assert run_cli("verify", f"s3://{bucket}/flaky", "--endpoint-url", s3_endpoint) == 0


def test_a_permanent_error_fails_fast_and_leaves_nothing(runner, s3_endpoint, bucket, tmp_path, proxy_factory, capsys):
    make_collection(tmp_path / "src", 4)
    s3 = _upload(tmp_path / "src", s3_endpoint, bucket)
    proxy = proxy_factory(period=0, forbid_writes=True)
    capsys.readouterr()
    started = time.perf_counter()
    assert (
        run_cli("compress", f"s3://{bucket}/adapters/", "--out", f"s3://{bucket}/store", "--endpoint-url", proxy.url)
        == 1
    )
    assert time.perf_counter() - started < 30  # no retry storm on a 403
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lora-subspace: error: cannot write to store s3://") and "permission denied" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert s3.list_objects_v2(Bucket=bucket, Prefix="store/").get("KeyCount", 0) == 0
