"""Subspace: the in-process API, for notebooks and training scripts.

It offers vlora's SharedSubspace (same method names, arguments and semantics: `from_adapters`,
`project` + `add_task`, `reconstruct`, `absorb`, `absorb_incremental`, `from_adapters_streaming`,
`to`, `quantize`, `compression_stats`, `get_trainable_params`, `save` / `load`) on the math the
Ray stages use (pipeline.linalg) and on the same versioned store, so a basis a cluster job built
opens here and one built here is exported, re-based and verified by the CLI. Where it differs
from vlora it is on purpose:

- `absorb_incremental` is the exact update (the SVD of old and new rows together, truncated),
  not residual directions appended to a basis that then drifts;
- every task keeps its relative delta-W error: measured when it was projected from its factors,
  estimated from loadings alone when a basis change moved it (linalg.loadings.Move);
- `quantize` keeps packed codes that `save` writes, so the store really shrinks;
- a changed basis moves every task's loadings with it, so no task is left on an old basis.

Loadings live as one (tasks, k) matrix per module and side: a store of 10,000 adapters opens
as a few hundred tensors, not millions.

A store's joint modules (compress --method joint, or auto with a budget) open too, in `joint`
beside the flat `modules`: tasks, reconstruct, error_summary, compression_stats, quantize (which
packs the flat modules only, as compress --quantize does) and save work on them; project,
add_task, absorb and absorb_incremental refuse a subspace that has any (the CLI's project and
rebase grow such a store).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from pipeline.adapter import Adapter, as_adapter
from pipeline.config import ComponentRule
from pipeline.errors import PipelineError
from pipeline.flow.strategies import fit_sides
from pipeline.io.safetensors_ranges import DTYPES
from pipeline.linalg import quantize as quant
from pipeline.linalg.decompose import OVERSAMPLE, Decomposition, centred_svd, reconstruct
from pipeline.linalg.gauge import align_rows, joint_rebuild
from pipeline.linalg.incremental import absorb, truncate
from pipeline.linalg.loadings import Move, Shapes, factor_basis, project_factors
from pipeline.linalg.metrics import error_summary, pair_grams, rebuilt_inner
from pipeline.operations import snapshot
from pipeline.operations.snapshot import JointModule, ModuleBasis
from pipeline.operations.snapshot import Rows as _Rows


@dataclass
class Projection:
    """One task on the basis (vlora's TaskProjection): per module its loadings on lora_A's and
    lora_B's components, and, when projected from factors, the relative delta-W error and
    ||B A||_F. `catalog`: what the store's catalog records about the adapter."""

    task_id: str
    loadings_a: dict[str, torch.Tensor]
    loadings_b: dict[str, torch.Tensor]
    error: dict[str, float] = field(default_factory=dict)
    norm: dict[str, float] = field(default_factory=dict)
    catalog: dict = field(default_factory=dict)


_DEFAULT_RULE = ComponentRule()  # vlora's rule: k from the variance threshold, decided on the first module's lora_A


class Subspace:
    def __init__(
        self,
        modules: dict[str, ModuleBasis],
        rule: ComponentRule = _DEFAULT_RULE,
        route: str = "auto",
        joint: dict[str, JointModule] | None = None,
    ):
        self.modules = dict(sorted(modules.items()))  # the flat modules (vlora's layers)
        self.joint = dict(sorted((joint or {}).items()))  # the joint modules of a store compressed with them
        self.rule, self.route = rule, route
        self.task_ids: list[str] = []
        self.quantization: dict | None = None  # {"scheme", "added_error"} once quantized
        self.method = "flat"  # "aligned" for a store compressed with --method aligned
        self.source: str | None = None  # the collection's URI, when it came from a store
        self.origin: tuple[str, str] | None = None  # (store, version) last loaded from or saved to
        self.quarantined: list[dict] = []  # catalog rows of a store's quarantined adapters, kept on save
        self.budget: dict = {}  # a budgeted store's `ratio` / `budget_bytes`, kept on save
        self._rows = {
            m: _Rows.empty(len(mb.a.singular_values), len(mb.b.singular_values)) for m, mb in self.modules.items()
        }
        self._rows.update({m: _Rows.empty(jm.k, jm.k) for m, jm in self.joint.items()})
        self._rows = dict(sorted(self._rows.items()))
        self._index: dict[str, int] = {}
        self._catalog: list[dict] = []
        self._pending: list[Projection] = []

    # -- vlora's attributes ----------------------------------------------------------------------

    @property
    def layer_names(self) -> list[str]:
        """Every module, flat and joint."""
        return sorted([*self.modules, *self.joint])

    @property
    def rank(self) -> int:
        return max(m.shapes[0][0] for m in [*self.modules.values(), *self.joint.values()])

    @property
    def num_components(self) -> int:
        """k (the largest over modules and sides, when it varies; q * c for a joint module)."""
        flat = [max(len(mb.a.singular_values), len(mb.b.singular_values)) for mb in self.modules.values()]
        return max(flat + [jm.k for jm in self.joint.values()])

    def _field(self, side: str, name: str) -> dict[str, torch.Tensor]:
        return {m: getattr(mb.side(side), name) for m, mb in self.modules.items()}

    # vlora's per-layer tensors, of the flat modules
    components_a = property(lambda self: self._field("A", "components"))
    components_b = property(lambda self: self._field("B", "components"))
    singular_values_a = property(lambda self: self._field("A", "singular_values"))
    singular_values_b = property(lambda self: self._field("B", "singular_values"))
    means_a = property(lambda self: self._field("A", "mean"))
    means_b = property(lambda self: self._field("B", "mean"))

    @property
    def tasks(self) -> Mapping[str, Projection]:
        """task id -> Projection, read-only (add with add_task)."""
        return _Tasks(self)

    # -- step 1: build ---------------------------------------------------------------------------

    @classmethod
    def from_adapters(
        cls,
        adapters: Sequence,
        task_ids: Sequence[str] | None = None,
        variance_threshold: float = 0.6,
        num_components: int | None = None,
        adaptive_k: bool = False,
        svd_route: str = "auto",
        method: str = "flat",
    ) -> Subspace:
        """Step 1: one centred SVD per module and side over the adapters, which are then projected.
        k: `num_components`; else the fewest components explaining `variance_threshold` of the
        variance, decided on the first module's lora_A and used everywhere, or per module and side
        with `adaptive_k` (vlora's rules). Adapters: Adapter, vlora LoRAWeights, state dicts or
        folder URIs. `method="aligned"` (with num_components) puts every adapter's factors in one
        gauge first, as compress --method aligned does; new adapters are aligned to the basis."""
        adapters = [as_adapter(a) for a in adapters]
        task_ids = _task_ids(task_ids, len(adapters))
        if not adapters:
            raise ValueError("need at least one adapter")
        if method not in ("flat", "aligned") or (method == "aligned" and num_components is None):
            raise ValueError(f"method must be flat, or aligned with num_components; got {method!r}")
        shapes = _layout(adapters, task_ids)
        rule = ComponentRule(None if adaptive_k else num_components, variance_threshold, adaptive_k)
        factors = {m: _factors(adapters, m, shapes[m], method, num_components) for m in shapes}
        bases = _fit(
            rule, list(shapes), lambda m, side, k, t: centred_svd(factors[m]["AB".index(side)], k, t, svd_route)
        )
        sub = cls({m: ModuleBasis(a, b, shapes[m]) for m, (a, b) in bases.items()}, rule, svd_route)
        sub.method = method
        sub._append(adapters, task_ids, in_basis=True)
        return sub

    @classmethod
    def from_adapters_streaming(
        cls,
        adapter_paths: Sequence,
        task_ids: Sequence[str] | None = None,
        num_components: int = 4,
        batch_size: int = 32,
        endpoint_url: str | None = None,
    ) -> Subspace:
        """Build from adapter folders (paths or URIs), `batch_size` adapters in memory at a time.
        A first pass fits the first batch and absorbs each next one by the exact incremental
        update, keeping OVERSAMPLE more components than asked until the end, so truncating as it
        goes loses less (with at least as many components as the data has directions, the basis
        is that of one SVD over all). A second pass reads the adapters again and projects them on
        the final basis: their loadings are exact projections and their errors measured."""
        paths = [str(p) for p in adapter_paths]
        if not paths:
            raise ValueError("need at least one adapter path")
        task_ids = (
            _task_ids(task_ids, len(paths))
            if task_ids is not None
            else [p.rstrip("/").rsplit("/", 1)[-1] for p in paths]
        )

        def batches():
            for start in range(0, len(paths), batch_size):
                yield (
                    [Adapter.load(p, endpoint_url) for p in paths[start : start + batch_size]],
                    task_ids[start : start + batch_size],
                )

        rule, shapes, bases = ComponentRule(num_components + OVERSAMPLE), None, {}
        for batch, ids in batches():
            if shapes is None:
                shapes = _layout(batch, ids)
                bases = _fit(
                    rule, list(shapes), lambda m, side, k, t, batch=batch: centred_svd(_stack(batch, m, side), k, t)
                )
                continue
            _layout(batch, ids, shapes)
            bases = _fit(
                rule,
                list(shapes),
                lambda m, side, k, t, old=bases, batch=batch: absorb(
                    old[m]["AB".index(side)], _stack(batch, m, side), k, t
                ),
            )
        sub = cls(
            {
                m: ModuleBasis(truncate(a, num_components), truncate(b, num_components), shapes[m])
                for m, (a, b) in bases.items()
            },
            ComponentRule(num_components),
        )
        for batch, ids in batches():
            sub._append(batch, ids, in_basis=True)
        return sub

    # -- step 2: project -------------------------------------------------------------------------

    def project(self, adapter, task_id: str) -> Projection:
        """Step 2: the adapter's loadings on the current basis (the basis does not change), with
        the delta-W error they leave. Register it with add_task."""
        self._refuse_joint("project")
        adapter = as_adapter(adapter)
        self._check_fits(adapter, task_id)
        rows = self._project([adapter])
        return Projection(
            task_id,
            {m: r.a[0].cpu() for m, r in rows.items()},
            {m: r.b[0].cpu() for m, r in rows.items()},
            {m: float(r.error[0]) for m, r in rows.items()},
            {m: float(r.norm[0]) for m, r in rows.items()},
            _catalog_row(adapter, task_id, in_basis=False),
        )

    def add_task(self, projection: Projection) -> None:
        """Register a projected task (replacing one with the same id). A Projection made by hand
        (e.g. trained loadings) has no measured error: it is recorded as 0 against itself."""
        self._refuse_joint("add_task")
        for module, mb in self.modules.items():
            for side, loadings in (("A", projection.loadings_a), ("B", projection.loadings_b)):
                k = len(mb.side(side).singular_values)
                if module not in loadings or tuple(loadings[module].shape) != (k,):
                    raise ValueError(
                        f"task {projection.task_id!r}: {module} loadings_{side.lower()} must have shape ({k},)"
                    )
        self._pending.append(projection)

    # -- step 3: absorb --------------------------------------------------------------------------

    def absorb(self, new_adapter, new_task_id) -> None:
        """Step 3, by a full recompute: one SVD per module over every task, rebuilt from its
        loadings, and the new adapter(s), as vlora's absorb. Accepts one adapter and id, or lists."""
        self._refuse_joint("absorb")
        adapters, ids = self._new(new_adapter, new_task_id)
        new = {m: self._factor_rows(adapters, m) for m in self.modules}

        def refit(module, side, k, threshold):
            old, loadings = self.modules[module].side(side), getattr(self._module_rows(module), side.lower())
            x = torch.cat([reconstruct(loadings, old.components, old.mean).cpu(), new[module]["AB".index(side)]])
            return centred_svd(x, k, threshold, self.route)

        self._rebase(self._refit(refit))
        self._append(adapters, ids, in_basis=True)

    def absorb_incremental(self, new_adapter, new_task_id) -> None:
        """Step 3, by the exact incremental update: each module's SVD of old and new rows together
        from the stored singular values, mean and count, truncated to k. Exact when nothing is
        truncated; the old adapters' files are never needed. Accepts one adapter and id, or lists."""
        self._refuse_joint("absorb_incremental")
        adapters, ids = self._new(new_adapter, new_task_id)
        new = {m: self._factor_rows(adapters, m) for m in self.modules}

        def update(module, side, k, threshold):
            old = self.modules[module].side(side)
            return absorb(old, new[module]["AB".index(side)].to(old.components.device), k, threshold)

        self._rebase(self._refit(update))
        self._append(adapters, ids, in_basis=True)

    # -- reconstruct -----------------------------------------------------------------------------

    def reconstruct(self, task_id: str, dtype: torch.dtype | None = None) -> Adapter:
        """The task's factors rebuilt from its loadings at the collection's rank, in its original
        dtype (or `dtype`), with its original config: `.save(folder)` writes a PEFT folder. A
        flat module is `mean + loadings @ components`, a joint one A' = Q V^T, B' = U P, as
        export rebuilds them (export then cuts an adapter of lower rank to its own)."""
        index = self._row(task_id)
        catalog = self._catalog[index]
        dtype = dtype or DTYPES.get(catalog.get("dtype"), torch.float32)
        lora_a, lora_b = {}, {}
        for module, mb in self.modules.items():
            rows = self._rows[module]
            lora_a[module] = reconstruct(rows.a[index], mb.a.components, mb.a.mean).reshape(mb.shapes[0]).to(dtype)
            lora_b[module] = reconstruct(rows.b[index], mb.b.components, mb.b.mean).reshape(mb.shapes[1]).to(dtype)
        for module, jm in self.joint.items():
            rows, q, c = self._rows[module], jm.core_rank, jm.width
            core_a, core_b = rows.a[index].view(1, q, c), rows.b[index].view(1, c, q)
            a, b = joint_rebuild(jm.basis, core_a, core_b, jm.shapes[0][0])
            lora_a[module], lora_b[module] = a[0].to(dtype), b[0].to(dtype)
        lora_a, lora_b = dict(sorted(lora_a.items())), dict(sorted(lora_b.items()))
        text = catalog.get("config_json") or ""
        return Adapter(lora_a, lora_b, json.loads(text) if text else None, config_text=text)

    # -- placement, storage ----------------------------------------------------------------------

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Subspace:
        """Move every basis tensor and loading to a device and/or dtype. Returns self."""
        self._flush()

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() and dtype is not None else None)

        for mb in self.modules.values():
            mb.a, mb.b = (
                dataclasses.replace(
                    d, components=move(d.components), singular_values=move(d.singular_values), mean=move(d.mean)
                )
                for d in (mb.a, mb.b)
            )
        for jm in self.joint.values():
            jm.basis = dataclasses.replace(jm.basis, u=move(jm.basis.u), v=move(jm.basis.v))
        for rows in self._rows.values():
            rows.a, rows.b = move(rows.a), move(rows.b)
        return self

    def quantize(self, bits: int = 8) -> Subspace:
        """Store the components packed: 8 bits (symmetric int8, a scale per component) or 4 bits
        (NF4, a float16 scale per block of 64). The subspace then computes with the decoded
        components, `save` writes the packed codes, and every task's error grows by the measured
        change of its rebuilt delta W (recorded as `quantization["added_error"]`). Means and
        loadings stay float32. A quantized subspace stays so: a later basis change (absorb) packs
        the new basis and fits the loadings to it, as compress --quantize does."""
        scheme = quant.bits_scheme(bits)
        if self.quantization:
            raise ValueError(f"already quantized ({self.quantization['scheme']}); quantize the float subspace instead")
        packed = {
            m: {side: quant.encode(mb.side(side).components, scheme) for side in "AB"} for m, mb in self.modules.items()
        }
        bases = {m: (_decoded(mb.a, packed[m]["A"]), _decoded(mb.b, packed[m]["B"])) for m, mb in self.modules.items()}
        added = self._rebase(bases, packed, keep_loadings=True)
        per_task = torch.stack(list(added.values())) if added else torch.zeros(0, 0)
        self.quantization = {"scheme": scheme, "added_error": _error_summary(per_task)}
        return self

    def compression_stats(self) -> dict:
        """Measured bytes: what `save` writes (basis components and other basis fields, means,
        loadings, metadata: catalog, manifest, report), encoded in memory, against the original
        adapters' bytes (their weights files and configs). vlora's parameter counts are kept."""
        self._flush()
        stored = snapshot.measure(self._snapshot())
        original = sum(row["weights_bytes"] + len((row["config_json"] or "").encode()) for row in self._catalog)
        n = len(self.task_ids)
        shapes = [m.shapes for m in [*self.modules.values(), *self.joint.values()]]
        params_original = sum(n * (a[0] * a[1] + b[0] * b[1]) for a, b in shapes)
        params = sum(
            d.components.numel() + d.mean.numel() + n * len(d.singular_values)
            for mb in self.modules.values()
            for d in (mb.a, mb.b)
        ) + sum(jm.basis.u.numel() + jm.basis.v.numel() + 2 * n * jm.k for jm in self.joint.values())
        per_layer = {m: (len(mb.a.singular_values), len(mb.b.singular_values)) for m, mb in self.modules.items()}
        per_layer.update({m: (jm.k, jm.k) for m, jm in self.joint.items()})
        return {
            "num_tasks": n,
            "num_layers": len(per_layer),
            "components_per_layer": dict(sorted(per_layer.items())),
            "original_bytes": original,
            "stored_bytes": stored,
            "compression_ratio": original / stored["total"] if stored["total"] else 0.0,
            "error": self.error_summary(),
            "quantization": self.quantization,
            "total_params_original": params_original,
            "total_params_compressed": params,
        }

    def error_summary(self) -> dict[str, float]:
        """Relative delta-W error over tasks (each task's mean over modules): mean, p50, p95, and
        the max over every module; as a store's manifest records it."""
        self._flush()
        if not self.task_ids:
            return {}
        errors = torch.stack([rows.error for rows in self._rows.values()])
        return error_summary(errors.mean(dim=0).numpy(), errors.amax(dim=0).numpy())

    def get_trainable_params(self, task_id: str, num_expand: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
        """Loadings of a task as leaf tensors with requires_grad, `<module>.loadings_a` / `_b`,
        for a training loop that keeps the basis frozen. `num_expand` > 0 first adds that many
        orthonormal directions per module and side (random, from `seed`, orthogonal to the basis;
        singular value 0), room for the optimiser to leave the subspace: a permanent change, and
        every task's loadings grow by zeros so all of them still rebuild exactly."""
        index = self._row(task_id)
        if num_expand > 0:
            warnings.warn(
                f"get_trainable_params(num_expand={num_expand}) permanently adds {num_expand} "
                "directions per module and side",
                stacklevel=2,
            )
            generator = torch.Generator().manual_seed(seed)
            bases = {
                m: tuple(_expand(mb.side(s), num_expand, generator) for s in "AB") for m, mb in self.modules.items()
            }
            self._rebase(bases)
            self.rule = dataclasses.replace(
                self.rule, components=None if self.rule.components is None else self.rule.components + num_expand
            )
        params = {}
        for module, rows in self._rows.items():
            params[f"{module}.loadings_a"] = rows.a[index].clone().detach().requires_grad_(True)
            params[f"{module}.loadings_b"] = rows.b[index].clone().detach().requires_grad_(True)
        return params

    def save(self, uri: str, endpoint_url: str | None = None, replace: bool = False) -> str:
        """Publish the subspace as a new version of the store at uri (path, file:// or s3://) and
        return its id. The store's current version must be the one this subspace was loaded from
        (or the store empty), unless `replace`: nothing another writer published is overwritten."""
        snap = self._snapshot()
        version = snapshot.save(snap, uri, endpoint_url, replace)
        self.origin = snap.origin
        return version

    @classmethod
    def load(cls, uri: str, version: str | None = None, endpoint_url: str | None = None) -> Subspace:
        """A store version (default: the current one), every object checked against its manifest."""
        snap = snapshot.load(uri, version, endpoint_url)
        sub = cls(snap.modules, snap.rule, snap.route, snap.joint)
        sub._add(snap.task_ids, snap.rows, snap.catalog)
        sub.quarantined, sub.quantization, sub.source, sub.origin = (
            snap.quarantined,
            snap.quantization,
            snap.source,
            snap.origin,
        )
        sub.method, sub.budget = snap.method, dict(snap.budget)
        return sub

    def __repr__(self) -> str:
        q = f", {self.quantization['scheme']}" if self.quantization else ""
        return (
            f"Subspace({len(self.layer_names)} modules, {len(self.task_ids) + len(self._pending)} tasks, "
            f"k={self.num_components}{q})"
        )

    # -- internals -------------------------------------------------------------------------------

    def _snapshot(self) -> snapshot.Snapshot:
        """What a store version holds of this subspace (the rows as they are, not copied)."""
        self._flush()
        return snapshot.Snapshot(
            self.modules,
            self._rows,
            self.task_ids,
            self._catalog,
            self.quarantined,
            self.rule,
            self.route,
            self.method,
            self.quantization,
            self.source,
            self.origin,
            self.error_summary(),
            joint=self.joint,
            budget=self.budget,
        )

    def _refit(self, fit) -> dict[str, tuple[Decomposition, Decomposition]]:
        """fit(module, side, k, threshold) on every module (absorb, absorb_incremental)."""
        return _fit(self.rule, list(self.modules), fit, self.modules)

    def _refuse_joint(self, method: str) -> None:
        if self.joint:
            module = next(iter(self.joint))
            raise PipelineError(
                f"Subspace.{method}: module {module!r} is joint (shared U and V), which {method} does not "
                "handle in process; grow the store with `lora-subspace project` or `rebase`"
            )

    def _row(self, task_id: str) -> int:
        self._flush()
        if task_id not in self._index:
            raise KeyError(f"unknown task {task_id!r}")
        return self._index[task_id]

    def _module_rows(self, module: str) -> _Rows:
        self._flush()
        return self._rows[module]

    def _new(self, adapters, task_ids) -> tuple[list[Adapter], list[str]]:
        if isinstance(task_ids, str):
            adapters, task_ids = [adapters], [task_ids]
        adapters = [as_adapter(a) for a in adapters]
        task_ids = _task_ids(task_ids, len(adapters))
        for adapter, task_id in zip(adapters, task_ids):
            self._check_fits(adapter, task_id)
        return adapters, task_ids

    def _factor_rows(self, adapters: list[Adapter], module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapters' flattened factors of one module, as the basis holds them: as they are,
        or aligned into its gauge."""
        mb = self.modules[module]
        return _factors(adapters, module, mb.shapes, self.method, bases=(mb.a, mb.b))

    def _check_fits(self, adapter: Adapter, task_id: str) -> None:
        _layout([adapter], [task_id], {m: mb.shapes for m, mb in self.modules.items()})

    def _project(self, adapters: list[Adapter]) -> dict[str, _Rows]:
        """The adapters' rows on the current basis, with their measured errors."""
        rows = {}
        for module, mb in self.modules.items():
            xa, xb = (x.to(mb.a.components.device) for x in self._factor_rows(adapters, module))
            la, lb, error, norm = project_factors(xa, xb, mb.a, mb.b, mb.shapes)
            rows[module] = _Rows(la, lb, error.cpu(), norm.cpu(), torch.ones(len(adapters), dtype=torch.bool))
        return rows

    def _append(self, adapters: list[Adapter], task_ids: list[str], in_basis: bool) -> None:
        """Project adapters on the current basis and add them as tasks."""
        self._add(task_ids, self._project(adapters), [_catalog_row(a, t, in_basis) for a, t in zip(adapters, task_ids)])

    def _add(self, task_ids: list[str], rows: dict[str, _Rows], catalog: list[dict]) -> None:
        """Append rows; a task id already present is replaced."""
        replaced = [t for t in task_ids if t in self._index]
        if len(set(task_ids)) != len(task_ids):
            raise ValueError("duplicate task ids")
        if replaced:
            keep = [i for i, t in enumerate(self.task_ids) if t not in set(replaced)]
            self.task_ids = [self.task_ids[i] for i in keep]
            self._catalog = [self._catalog[i] for i in keep]
            index = torch.tensor(keep, dtype=torch.long)
            self._rows = {m: r.take(index) for m, r in self._rows.items()}
        for module in self._rows:
            self._rows[module] = self._rows[module].cat(rows[module])
        self.task_ids += list(task_ids)
        self._catalog += catalog
        self._index = {t: i for i, t in enumerate(self.task_ids)}

    def _flush(self) -> None:
        """Add the projections add_task queued, as rows (one concatenation for all of them)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        last = {p.task_id: p for p in pending}  # the later of two with one id wins
        pending = list(last.values())
        rows = {}
        for module, mb in self.modules.items():
            la = torch.stack([p.loadings_a[module].to(torch.float32).cpu() for p in pending])
            lb = torch.stack([p.loadings_b[module].to(torch.float32).cpu() for p in pending])
            norm = torch.tensor([p.norm.get(module, math.nan) for p in pending], dtype=torch.float64)
            unknown = norm.isnan()
            if unknown.any():  # ||B' A'|| of what the loadings rebuild: the task is what it rebuilds
                basis = factor_basis(mb.a, mb.b, mb.shapes)
                rebuilt = rebuilt_inner(pair_grams(basis, basis), la, lb, la, lb).clamp_min(0).sqrt()
                norm = torch.where(unknown, rebuilt, norm)
            error = torch.tensor([p.error.get(module, 0.0) for p in pending], dtype=torch.float64)
            measured = torch.tensor([module in p.error for p in pending])
            rows[module] = _Rows(la, lb, error, norm, measured)
        catalog = [p.catalog or _catalog_row(None, p.task_id, in_basis=False) for p in pending]
        self._add([p.task_id for p in pending], rows, catalog)

    def _rebase(
        self,
        bases: dict[str, tuple[Decomposition, Decomposition]],
        packed: dict | None = None,
        keep_loadings: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Move every task to new bases (their errors estimated: linalg.loadings.Move); returns the
        relative change of each task's rebuilt delta W, per module. `packed`: the new bases'
        quantized components; without it, a quantized subspace packs the new bases itself."""
        self._flush()
        scheme = self.quantization["scheme"] if self.quantization and packed is None else None
        moved = {}
        for module, (a, b) in bases.items():
            codes = packed[module] if packed else None
            if scheme:
                codes = {"A": quant.encode(a.components, scheme), "B": quant.encode(b.components, scheme)}
                a, b = _decoded(a, codes["A"]), _decoded(b, codes["B"])
            mb, rows = self.modules[module], self._rows[module]
            move = Move((mb.a, mb.b), (a, b), mb.shapes, keep_loadings)
            la, lb, error, change = move(rows.a, rows.b, rows.error, rows.norm)
            self._rows[module] = _Rows(
                la.to(torch.float32), lb.to(torch.float32), error, rows.norm, rows.measured & (change == 0)
            )
            self.modules[module] = dataclasses.replace(mb, a=a, b=b, packed=codes)
            moved[module] = change
        if scheme:  # the errors are now those of the packed basis, as compress --quantize records them
            self.quantization = {"scheme": scheme, "added_error": None}
        return moved


class _Tasks(Mapping):
    def __init__(self, sub: Subspace):
        self._sub = sub

    def __getitem__(self, task_id: str) -> Projection:
        index = self._sub._row(task_id)
        s = self._sub
        return Projection(
            task_id,
            {m: r.a[index] for m, r in s._rows.items()},
            {m: r.b[index] for m, r in s._rows.items()},
            {m: float(r.error[index]) for m, r in s._rows.items()},
            {m: float(r.norm[index]) for m, r in s._rows.items()},
            dict(s._catalog[index]),
        )

    def __iter__(self) -> Iterator[str]:
        self._sub._flush()
        return iter(list(self._sub.task_ids))

    def __len__(self) -> int:
        self._sub._flush()
        return len(self._sub.task_ids)


def _task_ids(task_ids: Iterable[str] | None, n: int) -> list[str]:
    ids = [f"task_{i}" for i in range(n)] if task_ids is None else [str(t) for t in task_ids]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} task ids for {n} adapters")
    if len(set(ids)) != n:
        raise ValueError("task ids must be unique")
    return ids


def _fit(
    rule: ComponentRule, modules: list[str], fit, kept: Mapping[str, ModuleBasis] | None = None
) -> dict[str, tuple[Decomposition, Decomposition]]:
    """fit(module, side, k, threshold) for every module and side, with k as the flow's strategies
    decide it (strategies.fit_sides: vlora's collection-wide rule decides it on the first module's
    lora_A); a module of `kept` with a byte budget keeps its k, as a budgeted store's re-base does."""
    bases, k = {}, None
    for module in modules:
        mb = (kept or {}).get(module)
        decs, k = fit_sides(
            rule,
            k,
            lambda side, limit, threshold, module=module: fit(module, side, limit, threshold),
            {"A": mb.a, "B": mb.b} if mb is not None and mb.budget is not None else None,
        )
        bases[module] = (decs["A"], decs["B"])
    return bases


def _shapes(adapter: Adapter) -> dict[str, Shapes]:
    return {m: (tuple(adapter.lora_a[m].shape), tuple(adapter.lora_b[m].shape)) for m in adapter.layer_names}


def _layout(adapters: list[Adapter], names: list[str], expected: dict[str, Shapes] | None = None) -> dict[str, Shapes]:
    """Module -> (lora_A shape, lora_B shape), the same for every adapter (and as `expected`), or
    ValueError naming the first adapter that differs and how."""
    expected = expected or _shapes(adapters[0])
    for i, adapter in enumerate(adapters):
        mine = _shapes(adapter)
        if mine != expected:
            module = next(m for m in sorted(set(mine) | set(expected)) if mine.get(m) != expected.get(m))
            raise ValueError(
                f"adapter {names[i]!r} does not fit: module {module!r} is {mine.get(module)}, "
                f"expected {expected.get(module)}"
            )
    return dict(sorted(expected.items()))


def _factors(
    adapters: list[Adapter],
    module: str,
    shapes: Shapes,
    method: str,
    components: int | None = None,
    bases: tuple[Decomposition, Decomposition] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, D) float32 rows of lora_A and lora_B: as they are (flat), or aligned (linalg.gauge):
    among themselves towards `components` directions, or into the gauge of `bases`."""
    xa, xb = _stack(adapters, module, "A"), _stack(adapters, module, "B")
    return align_rows(xa, xb, shapes, components, bases) if method == "aligned" else (xa, xb)


def _stack(adapters: list[Adapter], module: str, side: str) -> torch.Tensor:
    """(n, D) float32 rows of one factor; NaN or Inf is refused, as compress quarantines it."""
    factors = [(a.lora_a if side == "A" else a.lora_b)[module] for a in adapters]
    x = torch.stack([f.detach().cpu().reshape(-1).to(torch.float32) for f in factors])
    bad = (~torch.isfinite(x).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"adapter {bad[0]}: NaN or Inf in {module} lora_{side}")
    return x


def _decoded(dec: Decomposition, packed: dict[str, torch.Tensor]) -> Decomposition:
    """dec with the components that `packed` stores."""
    components = quant.decode(packed, dec.mean.shape[0]).to(dec.components.device, dec.components.dtype)
    return dataclasses.replace(dec, components=components)


def _expand(dec: Decomposition, count: int, generator: torch.Generator) -> Decomposition:
    """dec with `count` random orthonormal directions appended, orthogonal to its components."""
    v = dec.components.to("cpu", torch.float64)
    extra = torch.randn(count, v.shape[1], generator=generator, dtype=torch.float64)
    for _ in range(2):  # twice is enough (Kahan): orthogonal to working precision
        extra -= (extra @ v.T) @ v
    extra = torch.linalg.qr(extra.T).Q.T
    device, dtype = dec.components.device, dec.components.dtype
    return dataclasses.replace(
        dec,
        components=torch.cat([dec.components, extra.to(device, dtype)]),
        singular_values=torch.cat(
            [
                dec.singular_values,
                torch.zeros(count, dtype=dec.singular_values.dtype, device=dec.singular_values.device),
            ]
        ),
    )


def _catalog_row(adapter: Adapter | None, task_id: str, in_basis: bool) -> dict:
    """The store's catalog row (version.CATALOG_SCHEMA) for an adapter given in memory."""
    config = (adapter.config if adapter else None) or {}
    return {
        "task_id": task_id,
        "uri": adapter.uri if adapter else "",
        "status": "ok",
        "reason": "",
        "warnings": [],
        "weights_bytes": adapter.size_bytes() - len(adapter.config_text.encode()) if adapter else 0,
        "weights_tag": "",
        "rank": adapter.rank if adapter else 0,
        "lora_alpha": config.get("lora_alpha"),
        "use_rslora": bool(config.get("use_rslora")),
        "base_model": config.get("base_model_name_or_path"),
        "dtype": adapter.dtype if adapter else "F32",
        "config_json": adapter.config_text if adapter else "",
        "in_basis": in_basis,
    }


def _error_summary(per_module: torch.Tensor) -> dict[str, float]:
    """mean / max over tasks of each task's mean over modules, from a (modules, tasks) tensor."""
    if per_module.numel() == 0:
        return {}
    means = per_module.mean(dim=0)
    return {"mean": float(means.mean()), "max": float(per_module.max())}
