"""Reading a shard's factor stacks from the adapters' files, with the reads ahead of their use.

A shard task reads its adapters in parts (a chunked compress's chunks; else one part of all), each
in batches of at most READ_BYTES of tensor bytes: one coalesced range request per adapter, all of
a batch's adapters in one `cat_ranges` call. A thread fetches the batches in order, up to
READ_AHEAD of them before they are used, so storage is read while the task decodes the batch
before and while it does the math of the chunk before (the next chunk's first batches are read
meanwhile). Memory for reading stays at most READ_AHEAD + 2 batches of raw bytes (queued, being
fetched, being decoded), whatever the parts' size.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator

import torch

from pipeline.flow.strategies import ShardResult, ShardTask
from pipeline.io.adapters import read_ranges
from pipeline.io.safetensors_ranges import decode

READ_BYTES = 16 << 20  # raw tensor bytes per cat_ranges call
READ_AHEAD = 2  # batches fetched before they are used
_PART_END = object()

Stacks = dict[str, list[torch.Tensor]]
Entries = list  # ShardTask.new entries: (task id, weights path, infos)


class StackReader:
    """Reads `parts` (consecutive slices of the task's adapters) one after another: `read(part)`
    returns each one's stacks, in order. Use as a context manager: leaving it stops the fetching
    thread (a task that fails does not leave it reading)."""

    def __init__(self, task: ShardTask, result: ShardResult, parts: list[Entries]):
        self._task, self._result = task, result
        self._parts = iter(parts)
        self._fetched: queue.Queue = queue.Queue(READ_AHEAD)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fetch, args=(parts,), name="shard-reads", daemon=True)
        self._thread.start()

    def __enter__(self) -> StackReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        while self._thread.is_alive():  # a fetch blocked on a full queue sees the stop once drained
            self._drain()
            self._thread.join(0.05)
        self._drain()

    def read(self, new: Entries) -> Stacks:
        """[(N, r*d_in), (N, d_out*r)] float32 stacks per module of the next part, which must be
        `new`; rows holding NaN or Inf are reported in the result."""
        if next(self._parts, None) != new:
            raise ValueError("parts must be read in the order they were given")
        task, result = self._task, self._result
        modules = task.shard.modules
        stacks = {m: [torch.empty(len(new), math.prod(shape)) for shape in task.shapes[m]] for m in modules}
        result.stack_bytes = max(result.stack_bytes, sum(4 * x.numel() for pair in stacks.values() for x in pair))
        while (item := self._next()) is not _PART_END:
            begin, requests, blobs, ranges = item
            result.requests += ranges
            for offset, (request, buffers) in enumerate(zip(requests, blobs)):
                for position, (info, buffer) in enumerate(zip(request[1], buffers)):
                    module, side = modules[position // 2], position % 2
                    stacks[module][side][begin + offset] = _padded(
                        decode(buffer, info), side, task.shapes[module][0][0]
                    )
                    result.bytes_read += len(buffer)
        _report_nonfinite(new, stacks, result)
        return stacks

    def _next(self):
        item = self._fetched.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _fetch(self, parts: list[Entries]) -> None:
        modules = self._task.shard.modules
        try:
            for new in parts:
                for begin, batch in read_batches(new, modules):
                    requests = [(path, [info for m in modules for info in infos[m]]) for _, path, infos in batch]
                    blobs, ranges = read_ranges(self._task.source.fs, requests)
                    if not self._put((begin, requests, blobs, ranges)):
                        return
                if not self._put(_PART_END):
                    return
        except BaseException as exc:  # raised where the stacks are read
            self._put(exc)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._fetched.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _drain(self) -> None:
        try:
            while True:
                self._fetched.get_nowait()
        except queue.Empty:
            pass


def read_batches(new: Entries, modules: tuple[str, ...]) -> Iterator[tuple[int, Entries]]:
    """(first row, adapters) batches of at most READ_BYTES of these modules' tensors (at least one
    adapter each)."""
    begin, size = 0, 0
    for row, (_, _, infos) in enumerate(new):
        need = sum(info.end - info.start for m in modules for info in infos[m])
        if row > begin and size + need > READ_BYTES:
            yield begin, new[begin:row]
            begin, size = row, 0
        size += need
    if begin < len(new):
        yield begin, new[begin:]


def _padded(factor: torch.Tensor, side: int, rank: int) -> torch.Tensor:
    """A flattened factor zero-padded to the collection's rank (lora_A rows, lora_B columns): B A
    is unchanged."""
    extra = rank - factor.shape[side]
    if extra:
        factor = torch.nn.functional.pad(factor, (0, 0, 0, extra) if side == 0 else (0, extra))
    return factor.reshape(-1)


def _report_nonfinite(new: Entries, stacks: Stacks, result: ShardResult) -> None:
    for module, pair in stacks.items():
        for side, stack in enumerate(pair):
            # A row's sum is NaN or Inf when any entry is (or, rarely, when finite ones overflow:
            # those rows are checked entry by entry); ten times cheaper than isfinite on all.
            for row in (~torch.isfinite(stack.sum(dim=1))).nonzero().flatten().tolist():
                if not torch.isfinite(stack[row]).all():
                    result.nonfinite.setdefault(new[row][0], f"NaN or Inf in {module} lora_{'AB'[side]}")
