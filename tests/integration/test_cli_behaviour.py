"""The CLI in a new user's hands: fast --help and --version, one line for every failure (no
credentials, a missing bucket, a bug), failures before any Ray start, JSON-only output with
--log-format json, and notes on what a run could not give."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    assert run_cli("compress", MINILM, "--out", tmp_path / "store", "--components", "8", "--json") == 0
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
    assert run_cli("compress", tmp_path / "src", "--out", store, "--method", "joint", "--components", 8) == 0
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
    assert run_cli("compress", tmp_path / "src", "--out", flat, "--components", 3) == 0
    assert run_cli("vlora-export", flat, tmp_path / "vlora") == 0
    capsys.readouterr()
    assert run_cli("vlora-import", tmp_path / "vlora", flat) == 1
    err = capsys.readouterr().err
    assert "--replace" in err and "replace=True" not in err


@pytest.mark.parametrize("option", ["--memory-budget", "--budget-bytes"])
@pytest.mark.parametrize("value", ["0", "0.1", "0MiB"])
def test_sizes_of_zero_bytes_are_usage_errors(option, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli("compress", MINILM, "--out", tmp_path / "store", option, value)
    assert exit_.value.code == 2
    assert "must be at least 1 byte" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
