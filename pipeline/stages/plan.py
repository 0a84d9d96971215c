"""Plan: group modules into shards that fit a worker's memory budget."""

from __future__ import annotations

from dataclasses import dataclass


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


def plan_shards(widths: dict[str, int], n_adapters: int, budget_bytes: int, parallelism: int) -> list[Shard]:
    """Consecutive modules (sorted by name) per shard, each shard within budget_bytes where a
    single module allows it, and at least `parallelism` shards when there are enough modules.

    widths: module -> flattened width of lora_A plus lora_B (r * d_in + d_out * r).
    """
    modules = sorted(widths)
    total = shard_bytes(n_adapters, list(widths.values()))
    target = min(budget_bytes, max(total // max(parallelism, 1), 1))
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
