import json

import pytest

from pipeline.config import ComponentRule, Options
from pipeline.errors import PipelineError
from pipeline.jobspec import load, options


def _write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def test_a_config_with_overrides_becomes_the_commands_options(tmp_path):
    path = _write(tmp_path, "source: s3://b/in/\nstore: s3://b/store\ncomponents: 8\nstrict: true\n")
    config = load("compress", path, ["components=16", "chunk_size=500", "adaptive=false"])
    assert config["components"] == 16 and config["chunk_size"] == 500
    assert options("compress", config) == Options(ComponentRule(16), strict=True)
    budgeted = load(
        "compress",
        None,
        ["source=s3://b/in/", "store=s3://b/store", "ratio=10", "method=auto", "quantize=int8", "budget_bytes=null"],
    )
    assert options("compress", budgeted) == Options(ratio=10, method="auto", quantize="int8")
    rebase = load("rebase", None, ["source=s3://b/in/", "store=s3://b/store", "operation=project", "max_error=0.2"])
    assert options("rebase", rebase) == Options(max_error=0.2)
    sized = load("compress", None, ["source=a", "store=b", "task_memory=2MiB", "budget_bytes=3000"])
    assert options("compress", sized) == Options(task_memory=2 * 2**20, budget_bytes=3000)


def test_the_former_name_of_task_memory_still_works():
    config = load("rebase", None, ["source=a", "store=b", "memory_budget=4GiB"])
    assert options("rebase", config).task_memory == 4 * 2**30
    with pytest.raises(PipelineError, match="'memory_budget' is the former name of 'task_memory': give one"):
        load("rebase", None, ["source=a", "store=b", "memory_budget=4GiB", "task_memory=1GiB"])


def test_every_problem_of_a_config_is_reported_at_once(tmp_path):
    text = "source: a\nstore: b\ncomponnets: 8\nchunk_size: 0\nmethod: aligned\nsvd_route: qr\nmemory_budget: 0\n"
    with pytest.raises(PipelineError) as caught:
        load("compress", _write(tmp_path, text), ["ratio=0.5", "num_cpus=0"])
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'job.yaml'} with --set: ")
    for part in (
        "unknown key 'componnets' for the compress job",
        "'memory_budget': must be at least 1 byte, got 0",
        "'num_cpus' must be at least 1, got 0",
        "'svd_route' must be one of auto, gram, covariance, svd, randomized, got 'qr'",
        "'ratio' must be above 1 (the compression factor), got 0.5",
        "'method' aligned needs 'components'",
        "'chunk_size' must be at least 1, got 0",
    ):
        assert part in message
    assert len(message.split("; ")) == 7


@pytest.mark.parametrize(
    "job, sets, message",
    [
        ("compress", ["components=4", "ratio=10"], "'components' and 'ratio' exclude each other"),
        ("compress", ["variance_threshold=0.9", "budget_bytes=1MiB"], "'variance_threshold' and 'budget_bytes'"),
        ("compress", ["ratio=10", "budget_bytes=1MiB"], "'ratio' and 'budget_bytes' are two ways of giving one"),
        ("compress", ["method=joint"], "'method' joint needs 'components' (the width of U and V) or a budget"),
        ("compress", ["quantize=int4"], "'quantize' must be one of int8, nf4, got 'int4'"),
        ("rebase", ["from_source=true"], "'from_source' needs 'full'"),
        ("rebase", ["full=true", "chunk_size=10"], "'chunk_size' is for the incremental re-base, not 'full'"),
        ("rebase", ["max_error=-1"], "'max_error' must be at least 0, got -1"),
        ("compress", ["adaptive=true", "components=4"], "'adaptive' and 'components' exclude each other"),
        ("compress", ["adaptive=true", "ratio=10"], "'adaptive' and 'ratio' exclude each other"),
        ("compress", ["clusters=auto"], "'clusters' auto chooses the number of groups for a budget"),
        ("compress", ["clusters=many"], "'clusters' must be an integer or \"auto\", got str 'many'"),
        ("compress", ["clusters=0"], "'clusters' must be at least 1, got 0"),
    ],
)
def test_combinations_that_do_not_go_together(job, sets, message):
    with pytest.raises(PipelineError) as caught:
        load(job, None, ["source=a", "store=b", *sets])
    assert message in str(caught.value)


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
        "gpu-check.yaml": "gpu-check",
    }
    assert sorted(p.name for p in configs.glob("*.yaml")) == sorted(jobs)
    for name, job in jobs.items():
        config = load(job, str(configs / name), [])
        if job in ("compress", "rebase"):  # the benchmark has its own runner
            assert options(job, config).problems() == []


def test_the_benchmark_schemas_and_defaults_name_the_same_keys():
    from pathlib import Path

    from pipeline.benchmark import gpu, run
    from pipeline.jobspec import JOBS

    assert set(JOBS["benchmark"]) == set(run.DEFAULTS)
    assert set(JOBS["gpu-check"]) == set(gpu.DEFAULTS)
    example = Path(__file__).parents[2] / "jobs" / "configs" / "gpu-check.yaml"
    assert load("gpu-check", str(example), []) == gpu.DEFAULTS  # the example writes out the defaults


def test_values_the_config_refuses_still_give_the_status_line(tmp_path, capsys):
    from pipeline.jobspec import main

    overrides = ["--set", f"source={tmp_path}/src", "--set", f"store={tmp_path}/store", "--set", "memory_budget=0"]
    assert main("rebase", [*overrides, "--set", "from_source=true"]) == 1
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["status"] == "error" and "'memory_budget': must be at least 1 byte" in line["error"]
    assert "'from_source' needs 'full'" in line["error"]


def test_prune_keep_and_task_ids_are_checked_before_the_job_runs():
    with pytest.raises(PipelineError, match="'prune_keep' must be at least 1, got -3"):
        load("rebase", None, ["source=a", "store=b", "prune_keep=-3"])
    with pytest.raises(PipelineError, match="'task_ids' must be a list of task ids"):
        load("export", None, ["store=a", "out=b", "task_ids=[1, {a: b}, null]"])
