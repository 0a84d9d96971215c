"""Parquet tables too big to hold: sorted streams in, merged, written out in row groups.

Every table of a version is sorted by task id, so a new version's tables are merges of sorted
streams (the parent's rows, each shard's staged rows, new rows). Memory is a few batches per
stream, whatever the number of adapters. Pages carry CRC checksums, verified on every read, so a
reader that fetches a few row groups still notices corruption in what it read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import IntegrityError
from pipeline.io.format import FileEntry
from pipeline.io.location import Location

BATCH_ROWS = 8192


def read_batches(location: Location, name: str, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Batches of a table; every page read is checked against its CRC."""
    with location.fs.open(location.path(name), "rb") as handle:
        yield from checked(
            pq.ParquetFile(handle, page_checksum_verification=True).iter_batches(
                batch_size=BATCH_ROWS, columns=columns
            ),
            location,
            name,
        )


def checked(batches, location: Location, name: str):
    """Re-raise a failed page checksum as corruption (an OSError would be retried as transient)."""
    try:
        yield from batches
    except (OSError, pa.ArrowInvalid) as exc:
        if not isinstance(exc, pa.ArrowInvalid) and "checksum" not in str(exc).lower():
            raise
        raise IntegrityError(f"{location.uri_of(location.path(name))} is corrupt: {exc}") from None


def without(batches: Iterable[pa.RecordBatch], task_ids: set[str]) -> Iterator[pa.RecordBatch]:
    """The rows whose task id is not in task_ids."""
    drop = pa.array(sorted(task_ids), pa.string())
    for batch in batches:
        yield batch.filter(pc.invert(pc.is_in(batch.column("task_id"), value_set=drop))) if len(drop) else batch


def merge_sorted(streams: list[Iterable[pa.RecordBatch | pa.Table]], keys: list[str]) -> Iterator[pa.Table]:
    """Merge streams (of batches or tables) that are each sorted by keys (keys[0] is the task id) into one
    sorted stream.

    Rows are released only once every unfinished stream has moved past their task id, so all rows
    of one task id leave together and are put in key order.
    """
    iterators = [iter(s) for s in streams]
    buffers: list[pa.Table | None] = [None] * len(iterators)
    live = list(range(len(iterators)))

    def refill(i: int) -> None:
        for batch in iterators[i]:
            if batch.num_rows:
                table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
                buffers[i] = table if buffers[i] is None else pa.concat_tables([buffers[i], table])
                return
        live.remove(i)

    for i in list(live):
        refill(i)
    while live:
        last = {i: buffers[i].column(keys[0])[-1].as_py() for i in live}
        watermark = min(last.values())
        ready = []
        for i, buffer in enumerate(buffers):
            if buffer is None or not buffer.num_rows:
                continue
            below = pc.less(buffer.column(keys[0]), watermark)
            ready.append(buffer.filter(below))
            buffers[i] = buffer.filter(pc.invert(below))
        yield from _sorted(ready, keys)
        for i in [i for i in live if last[i] == watermark]:
            refill(i)
    yield from _sorted([b for b in buffers if b is not None and b.num_rows], keys)


def _sorted(tables: list[pa.Table], keys: list[str]) -> Iterator[pa.Table]:
    tables = [t for t in tables if t.num_rows]
    if tables:
        yield pa.concat_tables(tables).sort_by([(k, "ascending") for k in keys])


class _HashingWriter:
    """A write-only file that hashes and counts what passes through."""

    def __init__(self, handle):
        self.handle, self.sha256, self.size = handle, hashlib.sha256(), 0
        self.closed = False

    def write(self, data) -> int:
        data = bytes(data)
        self.sha256.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.closed = True


def write_tables(
    location: Location, name: str, tables: Iterable[pa.Table], schema: pa.Schema, row_group_size: int = BATCH_ROWS
) -> FileEntry:
    """Stream tables into one zstd Parquet object; returns its size and sha256."""
    path = location.path(name)
    if location.is_local:
        location.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with location.fs.open(path, "wb") as handle:
        sink = _HashingWriter(handle)
        with pq.ParquetWriter(sink, schema, compression="zstd", write_page_checksum=True) as writer:
            for table in tables:
                writer.write_table(table.select(schema.names).cast(schema), row_group_size=row_group_size)
    return FileEntry(sink.size, sink.sha256.hexdigest())
