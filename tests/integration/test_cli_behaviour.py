"""The CLI in a new user's hands: fast --help and --version, one line for every failure (no
credentials, a missing bucket, a bug), failures before any Ray start, JSON-only output with
--log-format json, and notes on what a run could not give."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import pytest
from conftest import MINILM, run_cli

# No credentials anywhere botocore looks, and no instance-metadata lookups (no traffic off this host).
NO_CREDENTIALS = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def _cli(
    *args: str, env: dict | None = None, drop: tuple[str, ...] = (), probe: bool = False
) -> subprocess.CompletedProcess:
    """lora-subspace in its own process; with `probe`, it also prints whether Ray was imported."""
    environment = {k: v for k, v in os.environ.items() if k not in drop}
    environment.update(env or {})
    code = "import sys; from pipeline import cli; rc = cli.main(sys.argv[1:])"
    code += "; print('RAY_IMPORTED', 'ray' in sys.modules, file=sys.stderr)" if probe else ""
    return subprocess.run(
        [sys.executable, "-c", code + "; sys.exit(rc)", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def test_help_and_version_import_nothing_heavy():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, pipeline.cli; print(sorted({'torch', 'fsspec', 'ray', 'pyarrow'} & set(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"
    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.strip().startswith("lora-subspace 0.")
    assert _cli("--help").returncode == 0


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if not line.startswith("RAY_IMPORTED")]
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("lora-subspace: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "command",
    [
        ["info", "s3://{bucket}/store"],
        ["compress", "s3://{bucket}/src", "--out", "s3://{bucket}/st"],
        ["rebase", "s3://{bucket}/store", "s3://{bucket}/src"],
        ["versions", "s3://{bucket}/store"],
    ],
)
def test_no_credentials_is_one_line(command, s3_endpoint, bucket):
    args = [a.format(bucket=bucket) for a in command] + ["--endpoint-url", s3_endpoint]
    result = _cli(*args, env=NO_CREDENTIALS, drop=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), probe=True)
    line = _one_error_line(result)
    assert "credentials" in line.lower()
    assert "RAY_IMPORTED False" in result.stderr


def test_job_prints_its_status_line_without_credentials(s3_endpoint, bucket, tmp_path):
    environment = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    environment.update(NO_CREDENTIALS)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.rebase",
            "--set",
            f"store=s3://{bucket}/store",
            "--set",
            f"source=s3://{bucket}/src",
            "--set",
            f"endpoint_url={s3_endpoint}",
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert result.returncode == 1
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["job"] == "rebase" and line["status"] == "error" and "credentials" in line["error"].lower()


@pytest.mark.parametrize(
    "command",
    [
        ["compress", "{tmp}/no-such-source", "--out", "{tmp}/store"],
        ["compress", "{tmp}/empty", "--out", "{tmp}/store"],
        ["rebase", "{tmp}/no-store", str(MINILM)],
        ["rebase", "{tmp}/no-store", str(MINILM), "--dry-run"],
        ["project", "{tmp}/no-store", str(MINILM)],
    ],
)
def test_input_errors_fail_before_ray_starts(command, tmp_path):
    (tmp_path / "empty").mkdir()
    result = _cli(*[a.format(tmp=tmp_path) for a in command], probe=True)
    _one_error_line(result)
    assert "RAY_IMPORTED False" in result.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_an_address_where_nothing_listens_is_one_ray_line(form, tmp_path):
    """Ray itself retries such an address for minutes, and its ConnectionError read as storage's."""
    address = form.format(port=_closed_port())
    result = _cli("compress", str(MINILM), "--out", str(tmp_path / "store"), "--address", address)
    assert _one_error_line(result).endswith(
        f"Ray: nothing answers at {address} (Connection refused): check --address or RAY_ADDRESS"
    )
    assert not (tmp_path / "store").exists()


def test_an_address_where_another_service_listens_is_one_ray_line(tmp_path):
    """Ray retries a port that is not its own for minutes, printing raw lines of its C++ client."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        result = _cli("compress", str(MINILM), "--out", str(tmp_path / "store"), "--address", address)
    finally:
        server.shutdown()
    assert f"Ray: {address} answers, but not as a Ray cluster does" in _one_error_line(result)
    assert not (tmp_path / "store").exists()


def test_empty_s3_prefix_fails_before_ray_starts(s3_endpoint, bucket):
    result = _cli(
        "compress",
        f"s3://{bucket}/nothing-here",
        "--out",
        f"s3://{bucket}/store",
        "--endpoint-url",
        s3_endpoint,
        probe=True,
    )
    _one_error_line(result)
    assert "RAY_IMPORTED False" in result.stderr


def test_an_unexpected_error_is_one_line_and_verbose_shows_it(tmp_path, capsys):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "LATEST").write_text('["not", "a", "pointer"]')
    assert run_cli("info", tmp_path / "store") == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("lora-subspace: error: ")
    assert run_cli("info", tmp_path / "store", "-v") == 1
    assert "Traceback" in capsys.readouterr().err


def test_json_logs_carry_json_only(tmp_path):
    """A command that starts Ray (its start-up warnings included) and one that fails: every line
    on stdout and stderr is a JSON object."""
    store = tmp_path / "store"
    ok = _cli(
        "compress", str(MINILM), "--out", str(store), "--components", "2", "--num-cpus", "1", "--log-format", "json"
    )
    failed = _cli("info", str(tmp_path / "missing"), "--log-format", "json")
    assert ok.returncode == 0, ok.stderr
    assert failed.returncode == 1
    for result in (ok, failed):
        for line in (result.stdout + result.stderr).splitlines():
            assert isinstance(json.loads(line), dict), line
    assert json.loads(ok.stdout)["version"] == "v000001"
    assert "error" in json.loads(failed.stderr.splitlines()[-1])["message"]


def test_capped_components_and_a_store_larger_than_its_input_are_noted(tmp_path, runner, capsys):
    assert (
        run_cli("compress", "--max-error", "none", MINILM, "--out", tmp_path / "store", "--components", "8", "--json")
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    notes = " ".join(result["notes"])
    assert "k capped at 3" in notes and "4 adapter(s) have at most 3 directions" in notes
    assert "not less than the" in notes


@pytest.mark.parametrize(
    "command",
    [
        ["info", "{store}"],
        ["versions", "{store}"],
        ["verify", "{store}", "--all"],
        ["rebase", "{store}", str(MINILM)],
        ["export", "{store}", "x", "--out", "{tmp}/x"],
    ],
)
def test_a_missing_bucket_says_so(command, s3_endpoint, tmp_path, capsys):
    args = [a.format(store="s3://no-such-bucket-here/store", tmp=tmp_path) for a in command]
    assert run_cli(*args, "--endpoint-url", s3_endpoint) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "bucket 'no-such-bucket-here' does not exist" in err


def test_messages_name_the_cli_options_and_joint_stores_read_as_info_does(runner, tmp_path, capsys):
    from conftest import make_collection

    make_collection(tmp_path / "src", 12, preset="micro", structure="gauge", shared_dim=3)
    store = tmp_path / "joint"
    assert (
        run_cli(
            "compress", "--max-error", "none", tmp_path / "src", "--out", store, "--method", "joint", "--components", 8
        )
        == 0
    )
    capsys.readouterr()
    assert run_cli("versions", store, "--json") == 0
    listing = json.loads(capsys.readouterr().out)["versions"][0]
    assert listing["bases"].startswith("c 8 q ") and listing["k"] is None
    assert run_cli("quantize", store, "--bits", "8") == 1
    err = capsys.readouterr().err
    assert "joint module(s)" in err and "--quantize" in err and "Python API" not in err
    assert run_cli("vlora-export", store, tmp_path / "vlora") == 1
    assert "flat bases only" in capsys.readouterr().err and not (tmp_path / "vlora").exists()
    flat = tmp_path / "flat"
    assert run_cli("compress", "--max-error", "none", tmp_path / "src", "--out", flat, "--components", 3) == 0
    assert run_cli("vlora-export", flat, tmp_path / "vlora") == 0
    capsys.readouterr()
    assert run_cli("vlora-import", tmp_path / "vlora", flat) == 1
    err = capsys.readouterr().err
    assert "--replace" in err and "replace=True" not in err


@pytest.mark.parametrize("option", ["--task-memory", "--memory-budget", "--budget-bytes"])
@pytest.mark.parametrize("value", ["0", "0.1", "0MiB"])
def test_sizes_of_zero_bytes_are_usage_errors(option, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli("compress", "--max-error", "none", MINILM, "--out", tmp_path / "store", option, value)
    assert exit_.value.code == 2
    assert "must be at least 1 byte" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_found_by_a_new_user(runner, tmp_path, capsys):
    """What a first walk through the README found: nothing overwritten, nothing created by a refused
    command, names escaped, and messages that name the object."""
    import shutil

    from conftest import make_collection

    src, store = tmp_path / "src", tmp_path / "store"
    ids = make_collection(src, 6, preset="micro")
    odd = src / "new\nline"
    odd.mkdir()
    shutil.copy(src / ids[0] / "adapter_config.json", odd)  # no weights: quarantined
    assert run_cli("compress", "--max-error", "none", src, "--out", store, "--components", 2) == 0
    capsys.readouterr()

    # report writes a new file only.
    (tmp_path / "mine.html").write_text("mine")
    assert run_cli("report", store, "--out", tmp_path / "mine.html") == 1
    assert (tmp_path / "mine.html").read_text() == "mine" and "--overwrite" in capsys.readouterr().err
    assert run_cli("report", store, "--out", tmp_path / "mine.html", "--overwrite") == 0
    (tmp_path / "folder").mkdir()
    assert run_cli("report", store, "--out", tmp_path / "folder") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "mine.html", "src", "store"]

    # info escapes a folder name's newline; one line per quarantined adapter.
    capsys.readouterr()
    assert run_cli("info", store) == 0
    out = capsys.readouterr().out
    assert "quarantined  new\\nline: " in out and "adapters     6 ok, 1 quarantined" in out

    # Commands refused on a missing store create nothing.
    for command in (["rollback", tmp_path / "none", "v000001"], ["prune", tmp_path / "none", "--keep", 1]):
        assert run_cli(*command) == 1
        assert "no store at" in capsys.readouterr().err and not (tmp_path / "none").exists()

    # A compress whose every adapter is quarantined leaves no folder.
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "adapter_config.json").write_text("{}")
    assert run_cli("compress", "--max-error", "none", tmp_path / "bad", "--out", tmp_path / "new-store") == 1
    assert not (tmp_path / "new-store").exists()

    # vlora-import writes a store only where compress would.
    assert run_cli("vlora-export", store, tmp_path / "vlora") == 0
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    capsys.readouterr()
    assert run_cli("vlora-import", tmp_path / "vlora", tmp_path / "notes") == 1
    assert "is not a store" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["todo.txt"]

    # prune lists what it removed, once.
    for _ in range(2):
        assert run_cli("rebase", store, src, "--full") == 0
    capsys.readouterr()
    assert run_cli("prune", store, "--keep", 1, "--json") == 0
    assert json.loads(capsys.readouterr().out)["removed"] == ["v000001"]  # v000002: the parent of the kept one
    assert run_cli("prune", store, "--keep", 1, "--json") == 0
    assert json.loads(capsys.readouterr().out)["removed"] == []

    # A LATEST naming a version that is not there is named as such by every reader.
    (store / "LATEST").write_text('{"version": "v000099", "format_version": 1}')
    for command in (["info", store], ["export", store, ids[0], "--out", tmp_path / "x"], ["verify", store]):
        assert run_cli(*command) == 1
        assert "names v000099, which is not in the store" in capsys.readouterr().err


def test_usage_errors_are_json_under_json_logs(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli("info", "x", "--log-format", "json", "--bogus")
    assert exit_.value.code == 2
    assert "unrecognized arguments: --bogus" in json.loads(capsys.readouterr().err)["message"]
    with pytest.raises(SystemExit):
        run_cli("prune", "x", "--keep", "abc")
    err = capsys.readouterr().err
    assert "--keep: not an integer: 'abc'" in err and "_positive" not in err


def test_a_rebase_of_a_copied_collection_starts_no_ray(runner, tmp_path):
    """`cp -r` keeps the bytes, not the times: a few files are compared by content in the driver."""
    import shutil

    from conftest import make_collection

    make_collection(tmp_path / "src", 6, preset="micro")
    assert (
        run_cli("compress", "--max-error", "none", tmp_path / "src", "--out", tmp_path / "store", "--components", 2)
        == 0
    )
    shutil.copytree(tmp_path / "src", tmp_path / "copy", copy_function=shutil.copyfile)
    result = _cli("rebase", str(tmp_path / "store"), str(tmp_path / "copy"), probe=True)
    assert result.returncode == 0, result.stderr
    assert "is up to date" in result.stdout and "RAY_IMPORTED False" in result.stderr


def test_a_closed_stdout_ends_quietly(tmp_path):
    """`lora-subspace info STORE | head -1`: a reader that stops reading ends the command quietly,
    with a SIGPIPE-killed writer's status (141) and nothing on stderr."""
    from conftest import make_collection

    from pipeline import Subspace

    ids = make_collection(tmp_path / "src", 4, preset="micro")
    Subspace.from_adapters([str(tmp_path / "src" / t) for t in ids], ids, num_components=2).save(
        str(tmp_path / "store")
    )
    for args in (["info"], ["info", "--json"], ["versions"]):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before anything is written: every write meets EPIPE
        try:
            result = subprocess.run(
                [sys.executable, "-m", "pipeline.cli", *args, str(tmp_path / "store")],
                stdout=write,
                stderr=subprocess.PIPE,
                text=True,
                timeout=300,
            )
        finally:
            os.close(write)
        assert (result.returncode, result.stderr) == (141, ""), args
    writer = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "info", str(tmp_path / "store")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # one write per line: head leaves before the last
    )
    head = subprocess.run(["head", "-1"], stdin=writer.stdout, capture_output=True, text=True, timeout=300)
    writer.stdout.close()
    assert writer.wait(timeout=300) in (0, 141) and writer.stderr.read() == b""
    writer.stderr.close()
    assert head.stdout.startswith("store ") and head.stdout.count("\n") == 1
