import json

import pytest

from pipeline.errors import PipelineError
from pipeline.jobspec import load, to_argv


def _write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def test_a_config_with_overrides_becomes_the_cli_command(tmp_path):
    path = _write(tmp_path, "source: s3://b/in/\nstore: s3://b/store\ncomponents: 8\nstrict: true\n")
    config = load("compress", path, ["components=16", "chunk_size=500", "adaptive=false"])
    assert config["components"] == 16 and config["chunk_size"] == 500
    assert to_argv("compress", config) == [
        "compress",
        "s3://b/in/",
        "--out",
        "s3://b/store",
        "--components",
        "16",
        "--strict",
        "--chunk-size",
        "500",
        "--json",
    ]
    budgeted = load(
        "compress", None, ["source=s3://b/in/", "store=s3://b/store", "ratio=10", "method=auto", "quantize=int8"]
    )
    assert to_argv("compress", budgeted) == [
        "compress",
        "s3://b/in/",
        "--out",
        "s3://b/store",
        "--ratio",
        "10",
        "--method",
        "auto",
        "--quantize",
        "int8",
        "--json",
    ]
    rebase = load("rebase", None, ["source=s3://b/in/", "store=s3://b/store", "operation=project", "max_error=0.2"])
    assert to_argv("rebase", rebase) == ["project", "s3://b/store", "s3://b/in/", "--max-error", "0.2", "--json"]


@pytest.mark.parametrize(
    "job, text, overrides, message",
    [
        ("compress", "source: a\nstore: b\ncomponnets: 8\n", [], "unknown key 'componnets' for the compress job"),
        ("compress", "source: a\nstore: b\ncomponents: eight\n", [], "'components' must be int, got str 'eight'"),
        ("compress", "source: a\nstore: b\n", ["strict=1"], "'strict' must be bool, got int 1"),
        ("compress", "source: a\n", [], "missing required key(s) store for the compress job"),
        ("rebase", "source: a\nstore: b\noperation: absorb\n", [], "'operation' must be rebase or project"),
        ("export", "store: a\nout: b\n", [], "needs task_ids or all: true"),
        ("compress", "- a list\n", [], "must be a mapping"),
        ("compress", "source: [unclosed\n", [], "is not valid YAML"),
        ("compress", "source: a\nstore: b\n", ["components"], "--set 'components': expected key=value"),
    ],
)
def test_bad_configs_are_clear_errors(tmp_path, job, text, overrides, message):
    with pytest.raises(PipelineError, match=None) as caught:
        load(job, _write(tmp_path, text), overrides)
    assert message in str(caught.value)


def test_every_example_config_is_valid():
    from pathlib import Path

    configs = Path(__file__).parents[2] / "jobs" / "configs"
    jobs = {
        "nightly-rebase.yaml": "rebase",
        "monthly-full-compress.yaml": "compress",
        "bulk-export.yaml": "export",
        "benchmark.yaml": "benchmark",
    }
    assert sorted(p.name for p in configs.glob("*.yaml")) == sorted(jobs)
    for name, job in jobs.items():
        config = load(job, str(configs / name), [])
        if job != "benchmark":  # the benchmark has its own runner, not a CLI command line
            to_argv(job, config)


def test_the_benchmark_schema_and_defaults_name_the_same_keys():
    from pipeline.benchmark.run import DEFAULTS
    from pipeline.jobspec import JOBS

    assert set(JOBS["benchmark"]) == set(DEFAULTS)


def test_a_value_the_cli_refuses_still_gives_the_status_line(tmp_path, capsys):
    from pipeline.jobspec import main

    overrides = ["--set", f"source={tmp_path}/src", "--set", f"store={tmp_path}/store", "--set", "memory_budget=0"]
    assert main("rebase", overrides) == 1
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["status"] == "error" and "--memory-budget: must be at least 1 byte" in line["error"]
