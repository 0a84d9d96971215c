"""Small shared types: the configuration every layer may read (entry points build it, operations
and the flow's steps pass it down). Imports nothing of the pipeline."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ComponentRule:
    """How many components each module keeps: an explicit count, or the fewest explaining
    `variance_threshold` of the variance, per module (`adaptive`) or once for all (vlora's rule:
    decided on the first module's lora_A, then used everywhere)."""

    components: int | None = None
    variance_threshold: float = 0.6
    adaptive: bool = False

    @property
    def needs_first_module(self) -> bool:
        return self.components is None and not self.adaptive

    def limits(self, fixed_k: int | None) -> tuple[int | None, float | None]:
        """(k, threshold) for one module side, given the collection-wide k if decided."""
        if self.components is not None:
            return self.components, None
        if self.adaptive or fixed_k is None:
            return None, self.variance_threshold
        return fixed_k, None


@dataclass(frozen=True)
class Options:
    rule: ComponentRule = ComponentRule()
    memory_budget: int = 1 << 30  # bytes of stacked factors per shard task
    strict: bool = False
    route: str = "auto"
    max_error: float | None = None  # flag new adapters above this delta-W error
    quantize: str | None = None  # int8 | nf4: bases stored packed (linalg.quantize)
    # flat (vlora's) | aligned (one gauge first) | joint (shared U, V) | auto: flat, or with a budget the better
    method: str = "auto"
    ratio: float | None = (
        None  # byte budget: bases and loadings (float32 values) at most the adapters' tensor bytes / ratio
    )
    budget_bytes: int | None = None  # byte budget given as bytes (turned into a ratio of the collection's)
