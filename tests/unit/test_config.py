"""The one configuration of compress, project and rebase: its checks (every problem at once, named
as the CLI, a job config or the Python API spells it), its manifest form, and the CLI's build."""

import pytest

from pipeline.config import ComponentRule, Options, cli_flag, parse_size, step_problems
from pipeline.errors import PipelineError
from pipeline.io.format import read_parameters, write_parameters


def test_every_problem_is_reported_together():
    options = Options(
        ComponentRule(0, 1.5, "yes"), task_memory=0, strict=1, route="qr", max_error=float("nan"), method="deep"
    )
    problems = options.problems()
    assert problems == [
        "components must be at least 1, got 0",
        "variance_threshold must be in (0, 1], got 1.5",
        "adaptive must be true or false, got str 'yes'",
        "task_memory must be at least 1, got 0",
        "strict must be true or false, got int 1",
        "svd_route must be one of auto, gram, covariance, svd, randomized, got 'qr'",
        "max_error must be a number, got float nan",
        "method must be one of auto, flat, aligned, joint, got 'deep'",
    ]
    with pytest.raises(PipelineError) as caught:
        options.validated()
    assert str(caught.value) == "; ".join(problems)


@pytest.mark.parametrize(
    "options, message",
    [
        (Options(method="aligned"), "--method aligned needs --components (the rank of the structure"),
        (Options(method="joint"), "--method joint needs --components (the width of U and V) or a budget (--ratio"),
        (Options(ComponentRule(4), ratio=4), "--components and --ratio exclude each other"),
        (Options(ComponentRule(4), budget_bytes=10), "--components and --budget-bytes exclude each other"),
        (Options(ratio=4, budget_bytes=10), "--ratio and --budget-bytes are two ways of giving one budget"),
        (Options(ratio=1), "--ratio must be above 1 (the compression factor), got 1"),
        (Options(budget_bytes=2.5), "--budget-bytes must be a number of bytes, got float 2.5"),
        (Options(quantize="int4"), "--quantize must be one of int8, nf4, got 'int4'"),
        (
            Options(ComponentRule(4, adaptive=True)),
            "--adaptive and --components exclude each other (--adaptive picks each module's k from "
            "--variance-threshold; --components decides it)",
        ),
        (Options(ComponentRule(adaptive=True), ratio=4), "--adaptive and --ratio exclude each other"),
        (Options(ComponentRule(adaptive=True), budget_bytes=10), "--adaptive and --budget-bytes exclude each other"),
        (Options(route="randomized"), "--svd-route randomized needs --components or a budget: a variance threshold"),
    ],
)
def test_each_rule_names_the_flags(options, message):
    problems = options.problems(cli_flag)
    assert len(problems) == 1 and problems[0].startswith(message)


def test_sound_options_pass():
    for options in (
        Options(),
        Options(ComponentRule(4), method="aligned", quantize="nf4"),
        Options(method="joint", ratio=3),
        Options(method="joint", budget_bytes=2**20),
        Options(ComponentRule(None, 0.9, True), route="svd", max_error=0.0),
        Options(ComponentRule(8), route="randomized"),
        Options(route="randomized", ratio=4),
    ):
        assert options.validated() is options


def test_steps_of_a_run():
    assert step_problems(10) == [] and step_problems(None, True, True) == []
    assert step_problems(0) == ["chunk_size must be at least 1, got 0"]
    assert step_problems(5, full=True, from_source=True, spell=cli_flag) == [
        "--chunk-size is for the incremental re-base, not --full"
    ]
    assert step_problems(from_source=True, spell=cli_flag) == ["--from-source needs --full"]


def test_sizes():
    assert parse_size("512MiB") == 512 * 2**20 and parse_size(4096) == 4096
    for bad, message in (("0", "at least 1 byte"), ("lots", "not a size"), ("0.1", "at least 1 byte")):
        with pytest.raises(ValueError, match=message):
            parse_size(bad)


# -- the manifest pair ---------------------------------------------------------------------------

# `parameters` as format-1 manifests hold them: compress or rebase today, a saved Subspace
# (vlora-import, quantize: no budget keys), and a store of an early release (no method, quantize).
WRITTEN_TODAY = {
    "components": None,
    "variance_threshold": 0.6,
    "adaptive": False,
    "svd_route": "auto",
    "quantize": None,
    "method": "auto",
    "ratio": 4,
    "budget_bytes": None,
}
SAVED_SUBSPACE = {
    "components": 8,
    "variance_threshold": None,
    "adaptive": False,
    "svd_route": "gram",
    "quantize": "int8",
    "method": "aligned",
}
EARLY = {"components": 3, "variance_threshold": None, "adaptive": True, "svd_route": "auto"}


@pytest.mark.parametrize(
    "options",
    [
        Options(ratio=4),
        Options(ComponentRule(8), route="gram", quantize="nf4", method="aligned"),
        Options(ComponentRule(None, 0.9, True), method="flat"),
        Options(method="joint", budget_bytes=123456),
    ],
)
def test_the_stored_part_round_trips(options):
    written = write_parameters(options)
    assert read_parameters(written) == options
    assert write_parameters(read_parameters(written)) == written


def test_format_1_parameters_read_as_written():
    assert write_parameters(read_parameters(WRITTEN_TODAY)) == WRITTEN_TODAY
    assert read_parameters(WRITTEN_TODAY) == Options(ratio=4)
    assert read_parameters(SAVED_SUBSPACE) == Options(ComponentRule(8), route="gram", quantize="int8", method="aligned")
    assert read_parameters(EARLY) == Options(ComponentRule(3, 0.6, True), method="flat")


def test_reading_keeps_the_runs_own_knobs():
    run = Options(ComponentRule(99), task_memory=5, strict=True, max_error=0.3, method="joint", ratio=9)
    assert read_parameters(SAVED_SUBSPACE, run) == Options(
        ComponentRule(8), task_memory=5, strict=True, route="gram", max_error=0.3, quantize="int8", method="aligned"
    )


def test_bad_stored_parameters_are_named():
    with pytest.raises(PipelineError, match="^s v000002 manifest: parameters lack adaptive, svd_route$"):
        read_parameters({"components": 3, "variance_threshold": None}, where="s v000002 manifest")
    bad = {**WRITTEN_TODAY, "components": "3", "method": "deep", "ratio": None}
    with pytest.raises(PipelineError) as caught:
        read_parameters(bad, where="m")
    assert str(caught.value) == (
        "m: parameters.components must be an integer, got str '3'; "
        "parameters.method must be one of auto, flat, aligned, joint, got 'deep'"
    )


# -- the CLI's build -----------------------------------------------------------------------------


def _parse(*argv):
    from pipeline.cli import build_parser

    return build_parser().parse_args([str(a) for a in argv])


def test_the_cli_builds_options_from_its_arguments():
    from pipeline.cli import options_from_args

    args = _parse("compress", "src", "--out", "st", "--ratio", 5, "--quantize", "nf4", "--task-memory", "2MiB")
    assert options_from_args(args) == Options(task_memory=2 * 2**20, quantize="nf4", ratio=5.0)
    args = _parse("project", "st", "src", "--max-error", 0.5, "--strict")
    assert options_from_args(args) == Options(strict=True, max_error=0.5)
    args = _parse("rebase", "st", "src", "--from-source", "--strict")
    with pytest.raises(PipelineError, match="^--from-source needs --full$"):
        options_from_args(args)
    args = _parse("compress", "src", "--out", "st", "--method", "aligned", "--budget-bytes", "1MiB")
    with pytest.raises(PipelineError) as caught:
        options_from_args(args)
    assert str(caught.value).startswith("--method aligned needs --components")


def test_memory_budget_is_a_hidden_name_of_task_memory():
    from pipeline.cli import build_parser

    args = _parse("rebase", "st", "src", "--memory-budget", "3MiB")
    assert args.task_memory == 3 * 2**20 and args.deprecated == ["--memory-budget is now --task-memory"]
    assert _parse("compress", "src", "--out", "st").task_memory == 2**30
    compress = build_parser()._subparsers._group_actions[0].choices["compress"]
    assert "--task-memory" in compress.format_help() and "--memory-budget" not in compress.format_help()


def test_an_infinite_ratio_is_named_as_not_finite():
    assert Options(ratio=float("inf")).problems() == ["ratio must be a finite number, got inf"]


def test_adaptive_beside_a_k_or_a_budget_is_refused_on_the_cli_but_read_from_early_stores():
    from pipeline.cli import options_from_args
    from pipeline.operations.evaluate import like

    for extra in (["--components", 4], ["--ratio", 4], ["--budget-bytes", "1MiB"]):
        args = _parse("compress", "src", "--out", "st", "--adaptive", *extra)
        with pytest.raises(PipelineError) as caught:
            options_from_args(args)
        assert str(caught.value).startswith(f"--adaptive and {extra[0]} exclude each other")
    assert options_from_args(_parse("compress", "src", "--out", "st", "--adaptive")).rule.adaptive
    # A store written before the rule records both (EARLY): it reads as written, and evaluate
    # compresses as it was built, where adaptive changed nothing.
    assert like({"parameters": EARLY}) == Options(ComponentRule(3, 0.6, False), method="flat").validated()


@pytest.mark.parametrize(
    "names",
    [["--task-memory", "--memory-budget"], ["--memory-budget", "--task-memory"]],
    ids=["new-first", "old-first"],
)
def test_task_memory_and_its_former_name_together_are_refused(names):
    """Whichever comes last would win: both given are one problem, in one line with any other."""
    from pipeline.cli import options_from_args

    args = _parse("rebase", "st", "src", names[0], "2MiB", names[1], "3MiB", "--from-source")
    with pytest.raises(PipelineError) as caught:
        options_from_args(args)
    assert str(caught.value) == (
        "--from-source needs --full; --memory-budget is the former name of --task-memory: give one"
    )
    for alone in names:
        assert options_from_args(_parse("compress", "src", "--out", "st", alone, "2MiB")).task_memory == 2 * 2**20
