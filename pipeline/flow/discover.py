"""Discover: what a run reads. The source's adapters (pipeline.io.adapters.discover lists them),
compared against a store's catalog (Diff: added, replaced, pending, unchanged, missing), and split
into chunks of consecutive task ids."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.adapters import AdapterRef, FileStat, list_adapter_files, weights_sha256
from pipeline.io.format import CATALOG
from pipeline.io.store import Store
from pipeline.peft_format import WEIGHTS_FILE
from pipeline.runners import Runner, SerialRunner

log = logging.getLogger(__name__)

STAT_BATCH = 64
HASH_IN_PROCESS_BYTES = 256 << 20  # weights to compare by content in the driver; more go to Ray tasks


@dataclass
class Diff:
    """The source against the current version's catalog."""

    added: list[AdapterRef]
    replaced: list[AdapterRef]  # same task id, different weights: size, ETag, or (local) mtime and content
    pending: list[AdapterRef]  # projected earlier, not yet absorbed into the basis
    unchanged: int
    missing: list[str]  # in the store, gone from the source: kept

    def counts(self) -> dict[str, int]:
        return {
            "added": len(self.added),
            "replaced": len(self.replaced),
            "pending": len(self.pending),
            "unchanged": self.unchanged,
            "missing": len(self.missing),
        }

    def to_dict(self) -> dict:
        return {
            "added": [r.task_id for r in self.added],
            "replaced": [r.task_id for r in self.replaced],
            "pending": [r.task_id for r in self.pending],
            "unchanged": self.unchanged,
            "missing": self.missing,
        }


def diff(refs: list[AdapterRef], catalog: list[dict]) -> Diff:
    known = {row["task_id"]: row for row in catalog}
    seen = set()
    added, replaced, pending, unchanged = [], [], [], 0
    for ref in refs:
        row = known.get(ref.task_id)
        if row is None or ref.task_id in seen:
            added.append(ref)  # a second ref with one id: scan quarantines it as a duplicate
            continue
        seen.add(ref.task_id)
        if _changed((ref.files or {}).get(WEIGHTS_FILE, FileStat(-1, "")), row):
            replaced.append(ref)
        elif row["status"] == "ok" and not row["in_basis"]:
            pending.append(ref)
        else:
            unchanged += 1
    missing = sorted(set(known) - seen)
    return Diff(added, replaced, pending, unchanged, missing)


def _changed(weights: FileStat, row: dict) -> bool:
    """A different size is a change; so is a different tag, unless both sides know the content's
    SHA-256 and it is the same (a local copy that did not keep file times)."""
    if weights.size != row["weights_bytes"]:
        return True
    if weights.tag == row["weights_tag"]:
        return False
    return weights.sha256 is None or weights.sha256 != row.get("weights_sha256")


def with_digests(refs: list[AdapterRef], catalog: list[dict], runner: Runner) -> list[AdapterRef]:
    """Hash the weights files whose time changed but whose size did not, where the catalog has
    the content's SHA-256 to compare with (local sources; S3 tags are ETags, which a copy keeps)."""
    known = {row["task_id"]: row for row in catalog}
    todo = []
    for ref in refs:
        row, weights = known.get(ref.task_id), (ref.files or {}).get(WEIGHTS_FILE)
        if (
            row
            and weights
            and ref.location.is_local
            and row.get("weights_sha256")
            and weights.sha256 is None
            and weights.size == row["weights_bytes"]
            and weights.tag != row["weights_tag"]
        ):
            todo.append(ref)
    if not todo:
        return refs
    log.info("%d weights file(s) have new times but their old sizes: comparing their contents", len(todo))
    batches = [todo[i : i + STAT_BATCH] for i in range(0, len(todo), STAT_BATCH)]
    if sum(ref.files[WEIGHTS_FILE].size for ref in todo) <= HASH_IN_PROCESS_BYTES:
        runner = SerialRunner()  # a few files: hashed here, without starting a cluster
    for index, digests in runner.map_unordered(weights_sha256, batches, num_cpus=1):
        for ref, digest in zip(batches[index], digests):
            weights = ref.files[WEIGHTS_FILE]
            ref.files[WEIGHTS_FILE] = FileStat(weights.size, weights.tag, digest)
    return refs


def with_files(refs: list[AdapterRef], runner: Runner) -> list[AdapterRef]:
    """Refs from a manifest file carry no listing yet: list their folders in parallel."""
    bare = [r for r in refs if r.files is None]
    if not bare:
        return refs
    batches = [bare[i : i + STAT_BATCH] for i in range(0, len(bare), STAT_BATCH)]
    for index, listed in runner.map_unordered(list_adapter_files, batches, num_cpus=0.5):
        for ref, files in zip(batches[index], listed):
            ref.files = files
    return refs


def stored_catalog(store: Store, version: str) -> list[dict]:
    """What discovery compares against, one small row per stored adapter (weights_sha256 is
    absent from catalogs written before it existed)."""
    where = store.version_location(version)
    try:
        present = set(pq.read_schema(where.path(CATALOG), filesystem=where.fs).names)
    except (FileNotFoundError, pa.ArrowInvalid):
        present = set()  # read_table says what is wrong with it
    columns = ["task_id", "status", "weights_bytes", "weights_tag", "in_basis"] + (
        ["weights_sha256"] if "weights_sha256" in present else []
    )
    return store.read_table(version, CATALOG, columns=columns).to_pylist()


def chunks(refs: list[AdapterRef], size: int | None) -> list[list[AdapterRef]]:
    """Consecutive refs, `size` at a time; refs sharing a task id stay together (so duplicates
    are caught within one chunk)."""
    if not size:
        return [refs]
    out: list[list[AdapterRef]] = []
    for ref in refs:
        if not out or (len(out[-1]) >= size and out[-1][-1].task_id != ref.task_id):
            out.append([])
        out[-1].append(ref)
    return out
