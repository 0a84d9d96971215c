"""`ray job submit --working-dir . -- python -m jobs.<job> --config ...` against a real Ray head
(`ray start --head` on loopback ports), with the store and the adapters on the moto S3 server; and
the README's `make dev` sequence as written, then `make dev-stop`."""

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
    agents = [
        arg
        for flag in (
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
            "--ray-client-server-port",
        )
        for arg in (flag, str(_free_port()))
    ]
    temp = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | NO_AUTH
    head = subprocess.Popen(
        [
            *RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard),
            "--disable-usage-stats",
            "--temp-dir",
            temp,
            *agents,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
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
    command = [
        *RAY,
        "job",
        "submit",
        "--address",
        url,
        "--working-dir",
        str(REPO),
        "--",
        sys.executable,
        "-m",
        f"jobs.{job}",
        "--config",
        str(config),
        *[a for s in sets for a in ("--set", s)],
    ]
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
    config.write_text(
        f"source: s3://{bucket}/uploads/\nstore: s3://{bucket}/subspace/\nendpoint_url: {s3_endpoint}\n"
        "log_format: json\n"
    )
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


def _readme_block(first_line):
    """The lines of the README's fenced code block that starts with `first_line`."""
    block = None
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if block and block[0] == first_line:
                return block
            block = [] if block is None else None
        elif block is not None:
            block.append(line)
    raise AssertionError(f"no code block starting with {first_line!r} in README.md")


def _processes_of(state):
    """The live processes of the dev cluster whose state folder is `state`: the head's process
    tree, the S3 API, and anything naming the head's temp dir."""
    temp = (state / "ray.tempdir").read_text().strip()
    found = {}
    for pid_file in ("ray.pid", "moto.pid"):
        root = psutil.Process(int((state / pid_file).read_text()))
        found |= {p.pid: p for p in [root, *root.children(recursive=True)]}
    for process in psutil.process_iter(["cmdline"]):
        if any(temp in part for part in process.info["cmdline"] or []):
            found[process.pid] = process
    return temp, list(found.values())


def test_readme_dev_cluster_runs_the_documented_submission_and_stops_alone(runner, tmp_path):
    """The README's `make dev` block, run as written in a shell without Ray settings (ports and
    the state folder moved, so it runs beside anyone's `make dev`): the job runs on the dev head
    with the venv's Python and reads the seeded adapters from the dev S3; `make dev-stop` then
    stops that cluster and leaves this session's own Ray running."""
    import ray

    lines = _readme_block("make dev")
    assert (
        lines[1] == ". .dev/env" and lines[2].startswith(".venv/bin/ray job submit ") and lines[-1] == "make dev-stop"
    )
    state, s3_port, gcs_port, dashboard_port = tmp_path / "dev", _free_port(), _free_port(), _free_port()

    def documented(line):
        line = line.replace(":9000", f":{s3_port}").replace(":8265", f":{dashboard_port}")
        line = line.replace(".dev/env", str(state / "env"))
        # `make dev` without re-checking the venv (the session runs in it already).
        return "make -s -o .venv/.installed dev" if line == "make dev" else line

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LORA_SUBSPACE_"))} | {
        "DEV_STATE": str(state),
        "DEV_S3_PORT": str(s3_port),
        "DEV_RAY_PORT": str(gcs_port),
        "DEV_DASHBOARD_PORT": str(dashboard_port),
    }

    def shell(lines):
        script = "set -e\n" + "\n".join(documented(line) for line in lines)
        return subprocess.run(
            ["bash", "-c", script],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )

    # This session's own Ray (the runner fixture's), taken before the dev cluster exists.
    session = [p for p in psutil.Process().children(recursive=True) if p.name() in ("gcs_server", "raylet")]
    assert {p.name() for p in session} == {"gcs_server", "raylet"}
    try:
        done = shell(lines[:-1])
        output = done.stdout[-4000:] + done.stderr[-3000:]
        assert done.returncode == 0, output
        job = json.loads([line for line in done.stdout.splitlines() if line.startswith('{"job"')][-1])
        assert (job["status"], job["version"], job["adapters"]) == ("ok", "v000001", 32), output
        assert "Job 'raysubmit_" in done.stdout + done.stderr and "succeeded" in done.stdout + done.stderr, output
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}")
        latest = json.loads(s3.get_object(Bucket="dev", Key="subspace/LATEST")["Body"].read())
        assert latest["version"] == "v000001"
        temp, cluster = _processes_of(state)
        assert len(cluster) > 3

        done = shell(lines[-1:])
        assert done.returncode == 0 and "stopped" in done.stdout, done.stdout + done.stderr
        assert not [p for p in cluster if p.is_running()], "dev-stop left processes of its cluster"
        assert not os.path.exists(temp) and not state.exists()
        # Every other Ray of this machine keeps running: this session's, at least.
        assert all(p.is_running() for p in session)
        assert ray.get(ray.remote(lambda: 42).remote(), timeout=120) == 42
    finally:
        subprocess.run(["infra/local/dev.sh", "stop"], cwd=REPO, env=env, capture_output=True, timeout=120)
