"""The CLI's one-line error for a failure of any kind."""


def test_a_bug_in_a_task_is_one_line_naming_its_cause():
    from ray.exceptions import RayTaskError

    from pipeline.cli import error_line

    wrapped = RayTaskError(
        "compute_shard", "Traceback (most recent call last):\n  \x1b[36mray::x\x1b[39m", ValueError("bad shape")
    )
    line = error_line(wrapped.as_instanceof_cause())
    assert line.startswith("unexpected ValueError in a task: bad shape") and "\x1b" not in line
