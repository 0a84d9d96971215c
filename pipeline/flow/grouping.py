"""Groups (clustered bases, `--clusters`): before compute, every adapter read gets a group, and
its modules the group's stored names (pipeline.io.format.grouped), so that each group's bases
are fitted, absorbed and projected as modules of their own. A new collection is partitioned by
the similarity of its adapters' delta W (pipeline.linalg.groups); in a grouped store, new
adapters join the nearest group. Each version records its groups' sketch sums (groups.safetensors).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pipeline.config import Options
from pipeline.errors import PipelineError
from pipeline.flow.change import Change
from pipeline.flow.scan import ScannedAdapter
from pipeline.io.adapters import read_ranges
from pipeline.io.format import grouped, read_groups, sketch_width
from pipeline.io.location import Location, printable
from pipeline.io.safetensors_ranges import decode
from pipeline.io.store import Store
from pipeline.linalg import groups as groups_math
from pipeline.linalg.budget import FLOAT_BYTES
from pipeline.progress import Progress
from pipeline.runners import Runner

log = logging.getLogger(__name__)

SKETCH_BATCH = 32
MIN_AUTO_GROUP = 16  # auto never makes groups of fewer adapters on average
MAX_AUTO_GROUPS = 8


@dataclass
class Groups:
    """A version's groups: each one's sum of member sketches (K, S) and members assigned (K,)."""

    sums: torch.Tensor
    counts: torch.Tensor

    @property
    def count(self) -> int:
        return self.sums.shape[0]


def group_adapters(change: Change, good: list[ScannedAdapter], store: Store, runner: Runner, options: Options):
    """The new version's Groups (None for an ungrouped one); each adapter in `good` gets its
    group's module names. Adapters whose factors hold NaN or Inf are quarantined here."""
    parent = change.parent_manifest
    if parent and parent.get("groups"):
        entry = parent["groups"]
        path = entry["sketches"]
        tensors = store.read_basis(path, parent["files"][path])
        width = sketch_width(parent["modules"])
        sums, counts = read_groups(tensors, entry["count"], width, f"{store} {change.parent} {path}")
        good = _sketched(good, runner, options.strict)
        labels = groups_math.nearest(torch.stack([s for _, s in good]), sums) if good else torch.zeros(0, dtype=int)
    elif change.mode == "fit" and not parent and options.clusters is not None:
        good = _sketched(good, runner, options.strict)
        if not good:
            return None  # all quarantined: compute says so
        count, labels = _partition(torch.stack([s for _, s in good]), good, options)
        if count == 1:
            log.info("groups: 1, of %d adapters: one basis per module", len(good))
            return None  # a store of one group is an ungrouped one
        sums, counts = torch.zeros(count, good[0][1].shape[0], dtype=torch.float64), torch.zeros(count, dtype=int)
        log.info("groups: %d, of %s adapters", count, "/".join(map(str, torch.bincount(labels).tolist())))
    else:
        return None
    for (adapter, sketch), label in zip(good, labels.tolist()):
        adapter.modules = {grouped(m, label): infos for m, infos in adapter.modules.items()}
        sums[label] += sketch.double()
        counts[label] += 1
    return Groups(sums, counts)


def _partition(sketches: torch.Tensor, good: list, options: Options) -> tuple[int, torch.Tensor]:
    n = len(good)
    if options.clusters != "auto":
        if n < 2 * options.clusters:
            raise PipelineError(f"--clusters {options.clusters} needs at least 2 adapters a group: found {n}")
        return options.clusters, groups_math.partition(sketches, options.clusters)
    largest = max(1, min(MAX_AUTO_GROUPS, n // MIN_AUTO_GROUP))
    rank_for = _shared_rank(good[0][0], n, options)
    return groups_math.choose_groups(sketches, list(range(1, largest + 1)), rank_for, options.bound)


def _shared_rank(adapter: ScannedAdapter, n: int, options: Options):
    """rank_for(size): the components per module side a group of `size` adapters keeps at the
    budget, flat bases (a mean and k components) paid by the group and k loadings per side by
    each adapter (a proxy for auto)."""
    tensor_bytes = sum(x.end - x.start for pair in adapter.modules.values() for x in pair)
    ratio = options.ratio or tensor_bytes * n / options.budget_bytes
    per_adapter = tensor_bytes / ratio / FLOAT_BYTES  # floats each adapter may take
    widths = sum(a.shape[0] * a.shape[1] + b.shape[0] * b.shape[1] for a, b in adapter.modules.values())
    sides = 2 * len(adapter.modules)

    def rank_for(size: int) -> int:
        return max(0, int((per_adapter * size - widths) // (widths + sides * size)))

    return rank_for


def _sketched(good: list[ScannedAdapter], runner: Runner, strict: bool) -> list[tuple[ScannedAdapter, torch.Tensor]]:
    """(adapter, its sketch) for every adapter whose factors are finite; the others quarantined."""
    if not good:
        return []
    items = [
        (good[0].location, [(a.weights_path, [a.modules[m] for m in sorted(a.modules)]) for a in batch])
        for batch in (good[i : i + SKETCH_BATCH] for i in range(0, len(good), SKETCH_BATCH))
    ]
    sketches: list[torch.Tensor] = [None] * len(good)  # type: ignore[list-item]
    progress = Progress("sketch", len(good), "adapters")
    for index, found in runner.map_unordered(sketch_batch, items):
        sketches[index * SKETCH_BATCH : index * SKETCH_BATCH + len(found)] = found
        progress.advance(len(found))
    progress.close()
    kept = []
    for adapter, sketch in zip(good, sketches):
        if torch.isfinite(sketch).all():
            kept.append((adapter, sketch))
        elif strict:
            raise PipelineError(f"--strict: adapter {adapter.task_id!r} quarantined: NaN or Inf in its factors")
        else:
            adapter.quarantine("NaN or Inf in its factors")
            log.warning("quarantined %s: %s", printable(adapter.task_id), adapter.reason)
    return kept


def sketch_batch(item: tuple[Location, list]) -> list[torch.Tensor]:
    """Sketches of a batch of adapters: (reader, [(weights path, [(lora_A, lora_B) infos per module])])."""
    reader, requests = item
    flat = [(path, [info for pair in pairs for info in pair]) for path, pairs in requests]
    blobs, _ = read_ranges(reader.fs, flat)
    out = []
    for (_, infos), buffers in zip(flat, blobs):
        tensors = [decode(buffer, info).float() for info, buffer in zip(infos, buffers)]
        out.append(groups_math.sketch(list(zip(tensors[0::2], tensors[1::2]))))
    return out
