"""The in-process runner and the choice between it and Ray (no Ray is started here)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from pipeline.commands import Cluster
from pipeline.errors import PipelineError
from pipeline.runners import (
    LOCAL_ADAPTERS,
    LOCAL_BYTES,
    MAX_RETRIES,
    LocalRunner,
    RunnerChoice,
    for_work,
    while_starting,
)
from pipeline.runners.ray_runner import check_reachable


def test_tasks_without_a_memory_bound_run_on_threads():
    together = threading.Barrier(2, timeout=10)  # passes only if two tasks run at the same time

    def task(item):
        together.wait()
        return item * 2

    results = dict(LocalRunner(num_cpus=2).map_unordered(task, [1, 2, 3, 4]))
    assert results == {0: 2, 1: 4, 2: 6, 3: 8}


def test_tasks_with_a_memory_bound_run_one_at_a_time():
    running, most, lock = [0], [0], threading.Lock()

    def task(item):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return item

    results = list(LocalRunner(num_cpus=4).map_unordered(task, list(range(6)), memory=1 << 20))
    assert results == [(i, i) for i in range(6)] and most == [1]


def test_a_failed_task_is_the_error_of_the_map():
    def task(item):
        if item == 3:
            raise PipelineError("task 3 failed")
        return item

    with pytest.raises(PipelineError, match="task 3 failed"):
        list(LocalRunner(num_cpus=2).map_unordered(task, list(range(8))))


def _never():
    raise AssertionError("Ray was asked for")


def test_auto_runs_small_stages_in_process_and_the_rest_on_ray():
    choice = RunnerChoice(_never, "auto", num_cpus=3)
    assert choice.for_work(LOCAL_ADAPTERS, LOCAL_BYTES) is choice.local
    assert choice.local.num_cpus == 3
    assert choice.for_work(LOCAL_ADAPTERS + 1) is choice.ray
    assert choice.for_work(1, LOCAL_BYTES + 1) is choice.ray
    assert choice.default is choice.ray  # a stage that does not size its work
    local, ray = RunnerChoice(_never, "local"), RunnerChoice(_never, "ray")
    assert local.for_work(10**6, 1 << 40) is local.local and local.default is local.local
    assert ray.for_work(1) is ray.ray
    plain = LocalRunner()
    assert for_work(plain, 10**6, 1 << 40) is plain  # any other runner runs every stage


def test_an_address_makes_auto_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert Cluster().mode() == "auto" and Cluster(runner="local").mode() == "local"
    assert Cluster(address="head:6379").mode() == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert Cluster().mode() == "ray" and Cluster(runner="local").mode() == "local"
    with pytest.raises(PipelineError, match="--runner local runs in-process"):
        Cluster(address="head:6379", runner="local")
    with pytest.raises(PipelineError, match="--runner must be one of auto, local, ray"):
        Cluster(runner="threads")


@pytest.mark.parametrize("memory", [None, 1 << 20])
def test_transient_storage_errors_are_retried_as_on_ray_and_permanent_ones_are_not(memory):
    calls: dict[int, int] = {}
    lock = threading.Lock()

    def flaky(item):
        with lock:
            calls[item] = calls.get(item, 0) + 1
            attempt = calls[item]
        if item == 0 and attempt <= MAX_RETRIES:
            raise ConnectionResetError("connection reset by peer")
        if item == 1:
            raise PermissionError("access denied")
        return item

    runner = LocalRunner(num_cpus=2)
    assert list(runner.map_unordered(flaky, [0], memory=memory)) == [(0, 0)]
    assert calls[0] == MAX_RETRIES + 1  # the first try and MAX_RETRIES more, as Ray's max_retries
    with pytest.raises(PermissionError):
        list(runner.map_unordered(flaky, [1, 2], memory=memory))
    assert calls[1] == 1


def test_work_before_an_embedded_ray_runs_in_process_while_it_starts():
    together = threading.Barrier(2, timeout=10)  # passes only if the start and the work overlap
    seen = {}

    class Started(LocalRunner):
        def warm_up(self, module):
            seen["warmed"] = module

    def start():
        seen["start"] = threading.current_thread() is threading.main_thread()
        together.wait()
        return Started(num_cpus=1)

    def work(runner):
        seen["work"] = threading.current_thread() is threading.main_thread()
        together.wait()
        return runner

    choice = RunnerChoice(start, "auto", num_cpus=2)
    assert choice.while_starting(work, warm="pipeline.flow.compute") is choice.local
    assert seen == {"start": True, "work": False, "warmed": "pipeline.flow.compute"} and choice.ray.made
    assert choice.while_starting(lambda runner: runner) is choice  # started: the work runs on it


def test_work_runs_on_the_runner_itself_where_nothing_is_to_start():
    joined = RunnerChoice(_never, "ray", embedded=False)  # a cluster to join: its workers scan
    assert joined.while_starting(lambda runner: runner) is joined and not joined.ray.made
    local = RunnerChoice(_never, "local")
    assert local.while_starting(lambda runner: runner) is local
    plain = LocalRunner()
    assert while_starting(plain, lambda runner: runner) is plain


def test_a_failed_start_is_the_error_once_the_work_has_stopped():
    finished = threading.Event()

    def start():
        raise PipelineError("no Ray")

    def work(runner):
        time.sleep(0.2)
        finished.set()

    with pytest.raises(PipelineError, match="no Ray"):
        RunnerChoice(start, "auto").while_starting(work)
    assert finished.is_set()


def _serve_once(reply: bytes) -> tuple[socket.socket, threading.Thread]:
    """A listener on a free port that answers its first connection with `reply` once it has read
    what the client sent (for gRPC: the HTTP/2 preface and a SETTINGS frame)."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()

    def answer():
        conn, _ = listening.accept()
        with conn:
            conn.recv(64)
            conn.sendall(reply)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return listening, thread


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_a_cluster_address_is_checked_before_ray_is_asked(form):
    settings = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # what a gRPC server (a Ray head's GCS) answers first
    listening, thread = _serve_once(settings)
    address = form.format(port=listening.getsockname()[1])
    with listening:
        check_reachable(address)
        thread.join()
    with pytest.raises(PipelineError, match="Ray: nothing answers at .*Connection refused"):
        check_reachable(address)  # closed now
    listening, thread = _serve_once(b"HTTP/1.0 400 Bad Request\r\n\r\n")  # some other service
    with listening, pytest.raises(PipelineError, match="answers, but not as a Ray cluster does"):
        check_reachable(form.format(port=listening.getsockname()[1]))
    check_reachable("auto")  # Ray finds the cluster that `ray start` left on this machine
    for bad in ("head", "head:99999", "head:port"):
        with pytest.raises(PipelineError, match=f"'{bad}' is not a cluster address"):
            check_reachable(bad)
