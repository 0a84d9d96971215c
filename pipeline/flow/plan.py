"""Plan: group modules into shards that fit the memory bound per task, and share a storage budget
out among modules."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Options
from pipeline.errors import PipelineError
from pipeline.flow.change import Change
from pipeline.flow.scan import ScannedAdapter
from pipeline.io.format import split_group
from pipeline.linalg.budget import FLOAT_BYTES, candidates, fits


@dataclass(frozen=True)
class Shard:
    index: int
    modules: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


def shard_bytes(n_adapters: int, widths: list[int]) -> int:
    """Worker memory for a shard: the float32 stacks of every module, plus the float64 Gram (or
    covariance) matrix of the widest (the SVD works on one module side at a time, and otherwise
    only on fixed-size blocks)."""
    side = min(n_adapters, max(widths))
    return 4 * n_adapters * sum(widths) + 8 * side * side


def plan_shards(widths: dict[str, int], n_adapters: int, task_memory: int, parallelism: int) -> list[Shard]:
    """Consecutive modules (sorted by name) per shard, each shard within task_memory bytes where a
    single module allows it, and at least `parallelism` shards when there are enough modules.

    widths: module -> flattened width of lora_A plus lora_B (r * d_in + d_out * r).
    """
    modules = sorted(widths)
    total = shard_bytes(n_adapters, list(widths.values()))
    target = min(task_memory, max(total // max(parallelism, 1), 1))
    shards: list[list[str]] = [[]]
    for module in modules:
        current = shards[-1]
        if current and shard_bytes(n_adapters, [widths[m] for m in current + [module]]) > target:
            shards.append([module])
        else:
            current.append(module)
    return [Shard(i, tuple(ms)) for i, ms in enumerate(shards)]


def largest_shard_bytes(shards: list[Shard], widths: dict[str, int], n_adapters: int) -> int:
    return max(shard_bytes(n_adapters, [widths[m] for m in s.modules]) for s in shards)


def module_shapes(change: Change, good: list[ScannedAdapter]) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """lora_A and lora_B shapes per (stored) module at the collection's largest rank (lower ranks
    are zero-padded to it); a grouped collection's modules are each group's."""
    if change.parent_manifest:
        return {m: (tuple(e["a_shape"]), tuple(e["b_shape"])) for m, e in change.parent_manifest["modules"].items()}
    ranks: dict[str, int] = {}  # per PEFT module: every group of a grouped store has the same rank
    for adapter in good:
        for module, (a, _) in adapter.modules.items():
            name = split_group(module)[1]
            ranks[name] = max(ranks.get(name, 0), a.shape[0])
    shapes = {}
    for module, members in module_members(good).items():
        (_, d_in), (d_out, _) = members[0].modules[module][0].shape, members[0].modules[module][1].shape
        rank = ranks[split_group(module)[1]]
        shapes[module] = ((rank, d_in), (d_out, rank))
    return shapes


def module_members(good: list[ScannedAdapter]) -> dict[str, list[ScannedAdapter]]:
    """The adapters of each stored module: all of them, or in a grouped collection its group's."""
    members: dict[str, list[ScannedAdapter]] = {}
    for adapter in good:
        for module in adapter.modules:
            members.setdefault(module, []).append(adapter)
    return members


def floats_per_adapter(
    change: Change, good: list[ScannedAdapter], shapes, rows: dict[str, int], options: Options
) -> dict[str, float] | None:
    """Stored floats per adapter per module that the storage budget (`ratio` or `budget_bytes`)
    allows: each module gets the budget's share of its own adapters' tensor bytes. A re-base keeps
    the parent's; None without a budget."""
    parent = change.parent_manifest
    if parent and "budget" in next(iter(parent["modules"].values())):
        return {m: e["budget"] for m, e in parent["modules"].items()}
    if parent or not options.budgeted:
        return None
    members = module_members(good)
    module_bytes = {m: sum(x.end - x.start for a in members[m] for x in a.modules[m]) for m in shapes}
    ratio = options.ratio or sum(module_bytes.values()) / options.budget_bytes
    floats = {m: size / ratio / FLOAT_BYTES / len(members[m]) for m, size in module_bytes.items()}
    for module, per_adapter in floats.items():
        (r, d_in), (d_out, _) = shapes[module]
        if not fits(per_adapter * rows[module], rows[module], r, d_in, d_out, candidates(options.method)):
            raise PipelineError(
                f"a budget of 1/{ratio:.3g} of the adapters' bytes is too small for module {module!r}: "
                f"no {' or '.join(candidates(options.method))} fit takes "
                f"{per_adapter * rows[module] * FLOAT_BYTES:.0f} bytes"
            )
    return floats


def version_shards(change: Change, shapes, rows: dict[str, int], options: Options, parallelism: int) -> list[Shard]:
    """Fit and absorb: modules grouped to fit the memory bound per task for the rows read, at least one
    shard per CPU (each task also streams the parent's loadings once, so a re-base of a few uploads
    makes few, wide shards); a shard never mixes groups. Project and quantize keep the parent's
    grouping: its basis objects are reused, or each read once."""
    if change.mode not in ("project", "quantize"):
        by_group: dict[int | None, dict[str, int]] = {}
        for m, (a, b) in shapes.items():
            by_group.setdefault(split_group(m)[0], {})[m] = a[0] * a[1] + b[0] * b[1]
        planned, each = [], max(1, parallelism // len(by_group))
        for _, widths in sorted(by_group.items(), key=lambda item: -1 if item[0] is None else item[0]):
            planned += plan_shards(widths, max(rows[m] for m in widths), options.task_memory, each)
        return [Shard(i, s.modules) for i, s in enumerate(planned)]
    groups: dict[str, list[str]] = {}
    for module, entry in sorted(change.parent_manifest["modules"].items()):
        groups.setdefault(entry["basis"], []).append(module)
    return [Shard(i, tuple(ms)) for i, (_, ms) in enumerate(sorted(groups.items()))]


def basis_objects(sizes: dict[str, int], limit: int) -> list[Shard]:
    """Consecutive modules (in the order given) per basis object, each object's components within
    `limit` bytes where a single module allows it: how a saved subspace is laid out.

    sizes: module -> bytes of its components (both sides)."""
    shards, current, size = [], [], 0
    for module, need in sizes.items():
        if current and size + need > limit:
            shards.append(Shard(len(shards), tuple(current)))
            current, size = [], 0
        current.append(module)
        size += need
    if current:
        shards.append(Shard(len(shards), tuple(current)))
    return shards
