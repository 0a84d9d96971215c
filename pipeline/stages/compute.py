"""Compute: one task per shard. Reads just the shard's tensor byte ranges from every adapter,
stacks, finds each module's basis, writes the shard's basis object and returns the small results
(loadings, errors, spectra summaries) to the driver."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pipeline.io.adapters import read_ranges
from pipeline.io.location import Location
from pipeline.io.safetensors_ranges import TensorInfo, decode
from pipeline.io.store import FileEntry, Store, basis_file, basis_key, encode_basis
from pipeline.linalg.decompose import centred_svd, explained_variance, project, reconstruct
from pipeline.linalg.metrics import relative_product_error
from pipeline.stages.plan import Shard

READ_BATCH = 256  # adapters per cat_ranges call: bounds the raw bytes held at once


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


@dataclass
class ShardTask:
    shard: Shard
    rule: ComponentRule
    source: Location  # whose filesystem reads the adapters
    store: Location
    version: str
    weights: list[tuple[str, dict[str, tuple[TensorInfo, TensorInfo]]]]  # per adapter: path, module infos
    fixed_k: int | None = None  # the collection-wide k, once the first module decided it
    route: str = "auto"


@dataclass
class ModuleResult:
    module: str
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    explained_a: float
    explained_b: float
    route: str
    loadings_a: torch.Tensor  # (N, k_a)
    loadings_b: torch.Tensor  # (N, k_b)
    errors: torch.Tensor  # (N,) relative delta-W error

    @property
    def k_a(self) -> int:
        return self.loadings_a.shape[1]

    @property
    def k_b(self) -> int:
        return self.loadings_b.shape[1]


@dataclass
class ShardResult:
    shard: Shard
    file: FileEntry | None = None
    modules: list[ModuleResult] = field(default_factory=list)
    nonfinite: dict[int, str] = field(default_factory=dict)  # adapter index -> reason
    decided_k: int | None = None
    bytes_read: int = 0
    requests: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def compute_shard(task: ShardTask) -> ShardResult:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = ShardResult(task.shard)
    started = time.perf_counter()
    stacks = _read_stacks(task, result)
    result.seconds["read"] = time.perf_counter() - started
    if result.nonfinite:
        return result
    started = time.perf_counter()
    k = task.fixed_k
    tensors: dict[str, torch.Tensor] = {}
    for module in task.shard.modules:
        xa, xb = (x.to(device) for x in stacks.pop(module))
        a_shape, b_shape = (tuple(i.shape) for i in task.weights[0][1][module])
        side_results = []
        for side, x in (("A", xa), ("B", xb)):
            rule = task.rule
            if rule.components is not None:
                dec = centred_svd(x, k=rule.components, route=task.route)
            elif rule.adaptive or k is None:
                dec = centred_svd(x, threshold=rule.variance_threshold, route=task.route)
                if not rule.adaptive:
                    k = result.decided_k = max(len(dec.singular_values), 1)
            else:
                dec = centred_svd(x, k=k, route=task.route)
            for name, value in (("components", dec.components), ("singular_values", dec.singular_values), ("mean", dec.mean)):
                tensors[basis_key(module, side, name)] = value.cpu()
            side_results.append((dec, project(x, dec.components, dec.mean)))
        (da, la), (db, lb) = side_results
        n = xa.shape[0]
        errors = relative_product_error(
            xa.view(n, *a_shape), xb.view(n, *b_shape),
            reconstruct(la, da.components, da.mean).view(n, *a_shape),
            reconstruct(lb, db.components, db.mean).view(n, *b_shape),
        )
        result.modules.append(ModuleResult(
            module, a_shape, b_shape,
            _ratio(da), _ratio(db), da.route, la.cpu(), lb.cpu(), errors.cpu(),
        ))
    result.seconds["compute"] = time.perf_counter() - started
    started = time.perf_counter()
    result.file = Store(task.store).write_object(task.version, basis_file(task.shard.name), encode_basis(tensors))
    result.seconds["write"] = time.perf_counter() - started
    return result


def _ratio(dec) -> float:
    ratios = explained_variance(dec.singular_values, dec.total_variance)
    return float(ratios[-1]) if len(ratios) else (1.0 if dec.total_variance == 0 else 0.0)


def _read_stacks(task: ShardTask, result: ShardResult) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(N, r*d_in) and (N, d_out*r) float32 stacks per module; non-finite rows are reported."""
    fs = task.source.fs
    n = len(task.weights)
    first = task.weights[0][1]
    stacks = {
        m: (torch.empty(n, first[m][0].shape[0] * first[m][0].shape[1]), torch.empty(n, first[m][1].shape[0] * first[m][1].shape[1]))
        for m in task.shard.modules
    }
    for begin in range(0, n, READ_BATCH):
        batch = task.weights[begin : begin + READ_BATCH]
        requests = [(path, [info for m in task.shard.modules for info in infos[m]]) for path, infos in batch]
        blobs = read_ranges(fs, requests)
        result.requests += len(requests)
        for offset, (request, buffers) in enumerate(zip(requests, blobs)):
            row = begin + offset
            for position, (info, buffer) in enumerate(zip(request[1], buffers)):
                module, side = task.shard.modules[position // 2], "AB"[position % 2]
                values = decode(buffer, info).to(torch.float32).reshape(-1)
                result.bytes_read += len(buffer)
                if not torch.isfinite(values).all():
                    result.nonfinite.setdefault(row, f"NaN or Inf in {module} lora_{side}")
                stacks[module]["AB".index(side)][row] = values
    return stacks
