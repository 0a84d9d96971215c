"""Reading a shard's stacks (pipeline.flow.reading): the bytes of the part after the one in use
are fetched ahead, a fetch that fails raises where the stacks are read, and a reader left early
stops fetching. On real files of a generated collection."""

import os

import pytest
import torch

from pipeline.config import ComponentRule
from pipeline.flow.plan import Shard
from pipeline.flow.reading import READ_AHEAD, StackReader
from pipeline.flow.scan import read_factors, scan_adapter
from pipeline.flow.strategies import FitSpec, ShardResult, ShardTask
from pipeline.io.adapters import discover
from pipeline.io.location import Location
from pipeline.synthetic import generate


def _task(root, n: int) -> tuple[ShardTask, list]:
    source = Location(str(root))
    generate(source, n, preset="micro", dtype=torch.bfloat16)
    refs = discover(source)
    adapters = [scan_adapter(ref) for ref in refs]
    modules = tuple(sorted(adapters[0].modules))
    shapes = {m: (tuple(a.shape), tuple(b.shape)) for m, (a, b) in adapters[0].modules.items()}
    new = [(a.task_id, a.weights_path, {m: a.modules[m] for m in modules}) for a in adapters]
    task = ShardTask(Shard(0, modules), "fit", FitSpec(ComponentRule(4)), source, "v000001", source, new, shapes)
    return task, refs


def _expected(refs, module: str) -> list[torch.Tensor]:
    factors = [read_factors(ref) for ref in refs]
    return [torch.stack([f[side][module].float().reshape(-1) for f in factors]) for side in (0, 1)]


def test_parts_are_read_in_order_as_the_files_hold_them(tmp_path):
    task, refs = _task(tmp_path, 6)
    parts = [task.new[:4], task.new[4:]]
    result = ShardResult(task.shard)
    with StackReader(task, result, parts) as reader:
        stacks = [reader.read(part) for part in parts]
    for module in task.shard.modules:
        for got, want in zip(stacks[0][module], _expected(refs[:4], module)):
            assert torch.equal(got, want)
        for got, want in zip(stacks[1][module], _expected(refs[4:], module)):
            assert torch.equal(got, want)
    assert result.requests == 6  # one coalesced range per adapter and shard
    assert result.nonfinite == {}


def test_the_next_part_is_fetched_while_the_one_before_is_in_use(tmp_path):
    task, refs = _task(tmp_path, 6)
    parts = [task.new[:3], task.new[3:]]
    module = task.shard.modules[0]
    want = _expected(refs[3:], module)
    with StackReader(task, ShardResult(task.shard), parts) as reader:
        reader.read(parts[0])
        # The second part is one batch: with its end mark it fills READ_AHEAD, so the fetching
        # thread has read all of it and finished, before any of it is asked for.
        assert READ_AHEAD >= 2
        reader._thread.join(30)
        assert not reader._thread.is_alive()
        for _, path, _ in parts[1]:
            os.remove(path)
        second = reader.read(parts[1])
    assert all(torch.equal(got, expected) for got, expected in zip(second[module], want))


def test_a_failed_fetch_raises_where_the_stacks_are_read(tmp_path):
    task, _ = _task(tmp_path, 4)
    os.remove(task.new[2][1])
    with StackReader(task, ShardResult(task.shard), [task.new]) as reader, pytest.raises(FileNotFoundError):
        reader.read(task.new)


def test_a_reader_left_early_stops_fetching(tmp_path):
    task, _ = _task(tmp_path, 8)
    parts = [task.new[i : i + 1] for i in range(8)]  # more parts than READ_AHEAD holds
    with StackReader(task, ShardResult(task.shard), parts) as reader:
        reader.read(parts[0])
        thread = reader._thread
    assert not thread.is_alive()


def test_parts_must_be_read_in_their_order(tmp_path):
    task, _ = _task(tmp_path, 4)
    parts = [task.new[:2], task.new[2:]]
    with StackReader(task, ShardResult(task.shard), parts) as reader, pytest.raises(ValueError, match="order"):
        reader.read(parts[1])
