"""`ray job submit --working-dir . -- python -m jobs.<job> --config ...` against a real Ray head
(`ray start --head` on loopback ports), with the store and the adapters on the moto S3 server."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import psutil
import pytest

from conftest import _free_port, make_collection

REPO = Path(__file__).parents[2]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
NO_AUTH = {"RAY_AUTH_MODE": "disabled"}  # a throwaway head on loopback; real clusters keep token auth


@pytest.fixture
def ray_head():
    """A Ray head in its own process group, with its dashboard (the job server) on loopback."""
    port, dashboard = _free_port(), _free_port()
    # Every port of its own: another Ray on this machine (this session's) holds the defaults.
    agents = [arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                               "--metrics-export-port", "--ray-client-server-port") for arg in (flag, str(_free_port()))]
    temp = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | NO_AUTH
    head = subprocess.Popen(
        [*RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--disable-usage-stats", "--temp-dir", temp, *agents],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # up (it wants Ray's auth token, which `ray job submit` sends)
        except OSError:
            if head.poll() is not None or time.time() > deadline:
                _stop(head, temp)
                pytest.fail(f"ray head did not start: {head.stderr.read().decode()[-2000:]}")
            time.sleep(1)
    yield url
    _stop(head, temp)


def _stop(head, temp):
    """Kill the head's process group and anything else of its session (not `ray stop`: that would
    stop the test session's own Ray too)."""
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=30)
    for process in psutil.process_iter(["cmdline"]):
        if any(temp in part for part in process.info["cmdline"] or []):
            process.kill()
    shutil.rmtree(temp, ignore_errors=True)


def _submit(url, job, config, *sets):
    command = [*RAY, "job", "submit", "--address", url, "--working-dir", str(REPO), "--",
               sys.executable, "-m", f"jobs.{job}", "--config", str(config), *[a for s in sets for a in ("--set", s)]]
    deadline = time.time() + 120
    while True:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ | NO_AUTH)
        if "No available agent to submit job" not in done.stderr or time.time() > deadline:
            break
        time.sleep(2)  # the head's job agent starts a little after its dashboard
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"job"')]
    return done.returncode, json.loads(lines[-1]) if lines else None, done.stdout[-3000:] + done.stderr[-2000:]


def test_submitted_jobs_compress_and_rebase_on_s3(ray_head, s3_endpoint, bucket, tmp_path):
    ids = make_collection(tmp_path / "pool", 12)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)

    def upload(names):
        for name in names:
            for path in (tmp_path / "pool" / name).iterdir():
                s3.upload_file(str(path), bucket, f"uploads/{name}/{path.name}")

    upload(ids[:8])
    config = tmp_path / "nightly.yaml"
    config.write_text(f"source: s3://{bucket}/uploads/\nstore: s3://{bucket}/subspace/\nendpoint_url: {s3_endpoint}\nlog_format: json\n")
    status, line, output = _submit(ray_head, "compress", config, "components=4")
    assert status == 0 and line and line["status"] == "ok", output
    assert line["version"] == "v000001" and line["adapters"] == 8

    upload(ids[8:])
    status, line, output = _submit(ray_head, "rebase", config, "prune_keep=5")
    assert status == 0 and line["status"] == "ok", output
    assert (line["version"], line["absorbed"], line["quarantined"]) == ("v000002", 4, 0) and line["error_mean"] < 0.5
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="subspace/")["Contents"]}
    assert {"subspace/reports/v000001.html", "subspace/reports/v000002.html"} <= keys
    assert json.loads(s3.get_object(Bucket=bucket, Key="subspace/LATEST")["Body"].read())["version"] == "v000002"

    # A failing job fails the submission: a scheduler sees the exit status and the JSON line.
    status, line, output = _submit(ray_head, "rebase", config, f"store=s3://{bucket}/no-store-here/")
    assert status != 0 and line["status"] == "error" and "no store at" in line["error"], output
