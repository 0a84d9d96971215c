"""A Subspace as a store version and back: pipeline.Subspace hands over a Snapshot (its bases,
rows and catalog) and gets one back. The objects are those compress writes (docs/store-format.md),
so the CLI reads what the library saves and the library opens what the CLI published.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import ComponentRule, Options
from pipeline.errors import IntegrityError, PipelineError
from pipeline.flow.compute import explained
from pipeline.flow.plan import basis_objects
from pipeline.io.format import (
    CATALOG,
    CATALOG_SCHEMA,
    LOADINGS,
    LOADINGS_KEYS,
    LOADINGS_ROW_GROUP,
    LOADINGS_SCHEMA,
    REPORT,
    basis_file,
    basis_key,
    basis_tensors,
    build_manifest,
    decode_basis,
    encode_basis,
    encode_manifest,
    joint_tensors,
    loadings_matrix,
    loadings_rows,
    module_entry,
    read_decomposition,
    read_joint,
    read_parameters,
    version_path,
    write_parameters,
)
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.io.tables import write_tables
from pipeline.linalg import quantize
from pipeline.linalg.decompose import Decomposition
from pipeline.linalg.gauge import JointBasis
from pipeline.linalg.loadings import Shapes
from pipeline.operations.export import refuse_groups, refuse_residuals
from pipeline.operations.info import stored_bytes


@dataclass
class ModuleBasis:
    """One flat module's bases for lora_A and lora_B; `packed`: quantized components per side, as
    stored; `budget`: the float32 values per adapter a byte budget allows it (manifest `budget`)."""

    a: Decomposition
    b: Decomposition
    shapes: Shapes
    packed: dict[str, dict[str, torch.Tensor]] | None = None
    budget: float | None = None

    def side(self, side: str) -> Decomposition:
        return self.a if side == "A" else self.b


@dataclass
class JointModule:
    """One joint module (docs/store-format.md): U (d_out, c) and V (d_in, c) shared by the
    collection; a task's rows hold its core factors Q (q, c) as `a` and P (c, q) as `b`, flattened,
    and it rebuilds as A' = Q V^T, B' = U P. `explained` and `count` as the manifest records them."""

    basis: JointBasis
    core_rank: int
    shapes: Shapes
    count: int
    explained: float
    budget: float | None = None

    @property
    def width(self) -> int:
        return self.basis.u.shape[1]

    @property
    def k(self) -> int:
        """Loadings per side: q * c."""
        return self.core_rank * self.width


@dataclass
class Rows:
    """Every task's rows of one module: loadings on A and B, error (float64), norm (float64) and
    whether the error was measured from the adapter's factors."""

    a: torch.Tensor
    b: torch.Tensor
    error: torch.Tensor
    norm: torch.Tensor
    measured: torch.Tensor

    @classmethod
    def empty(cls, k_a: int, k_b: int) -> Rows:
        return cls(
            torch.zeros(0, k_a),
            torch.zeros(0, k_b),
            torch.zeros(0, dtype=torch.float64),
            torch.zeros(0, dtype=torch.float64),
            torch.zeros(0, dtype=torch.bool),
        )

    def columns(self) -> tuple[torch.Tensor, ...]:
        return self.a, self.b, self.error, self.norm, self.measured

    def cat(self, other: Rows) -> Rows:
        return Rows(*(torch.cat([x, y.to(x.device, x.dtype)]) for x, y in zip(self.columns(), other.columns())))

    def take(self, index: torch.Tensor) -> Rows:
        return Rows(*(x[index.to(x.device)] for x in self.columns()))


@dataclass
class Snapshot:
    """What a store version holds of an in-process subspace (pipeline.Subspace): per module its
    bases (flat in `modules`, joint in `joint`) and every task's rows (task order), the ok
    adapters' catalog rows (same order), the quarantined ones', and the parameters the manifest
    records."""

    modules: dict[str, ModuleBasis]
    rows: dict[str, Rows]
    task_ids: list[str]
    catalog: list[dict]
    quarantined: list[dict]
    rule: ComponentRule
    route: str
    method: str = "flat"
    quantization: dict | None = None
    source: str | None = None
    origin: tuple[str, str] | None = None  # (store, version) last loaded from or saved to
    error: dict = field(default_factory=dict)  # the error summary, as the manifest records it
    joint: dict[str, JointModule] = field(default_factory=dict)  # the joint modules (rows: in `rows`)
    budget: dict = field(default_factory=dict)  # a byte budget's parameters: `ratio`, `budget_bytes`


BASIS_OBJECT_BYTES = 256 << 20  # components per basis object: export and re-base read whole objects
TASKS_PER_TABLE = 512  # tasks whose loadings rows are encoded at once


def save(sub: Snapshot, uri: str, endpoint_url: str | None = None, replace: bool = False) -> str:
    """Publish as the store's next version; sets `sub.origin` to it."""
    store = Store(Location(uri, endpoint_url))
    if not sub.task_ids:
        raise PipelineError(f"nothing to publish to {store}: the subspace holds no adapters")
    operation = "save"  # the manifest's operation of a version the Python API publishes
    with store.lock(operation) as lock:
        parent = store.current_version()
        if parent is not None and not replace and sub.origin != (str(store), parent):
            raise PipelineError(
                f"store {store} is at {parent}, which this subspace was not loaded from: "
                "load that version and change it, "
                "or save with replace=True to publish this subspace as the store's next version"
            )
        version = store.new_version()
        store.start_run(version, {"operation": operation, "mode": "library", "parent": parent, "started": time.time()})
        try:
            manifest = write(sub, store, version, parent, operation)
            store.publish(version, manifest, lock)
        except BaseException:
            store.discard(version)
            raise
    sub.origin = (str(store), version)
    return version


def measure(sub: Snapshot) -> dict[str, int]:
    """Bytes of what `save` writes, by kind (info.stored_bytes), from writing it to memory."""
    store = Store(Location(f"memory://lora-subspace-measure-{uuid.uuid4().hex}"))
    try:
        manifest = write(sub, store, "v000001", None, "save")
        return stored_bytes(store, manifest, len(encode_manifest(manifest)))
    finally:
        store.location.remove()


def write(sub: Snapshot, store: Store, version: str, parent: str | None, operation: str) -> dict:
    """Write the version's objects; returns its manifest (not yet published)."""
    files, modules = _write_bases(sub, store, version)
    where = store.version_location(version)
    files[version_path(version, LOADINGS)] = write_tables(
        where, LOADINGS, _loadings_tables(sub), LOADINGS_SCHEMA, LOADINGS_ROW_GROUP
    ).to_dict()
    catalog = pa.Table.from_pylist(
        sorted(sub.catalog + sub.quarantined, key=lambda r: r["task_id"]), schema=CATALOG_SCHEMA
    )
    files[version_path(version, CATALOG)] = write_tables(where, CATALOG, [catalog], CATALOG_SCHEMA).to_dict()
    adapters = {
        "ok": len(sub.task_ids),
        "quarantined": len(sub.quarantined),
        "in_basis": sum(bool(r["in_basis"]) for r in sub.catalog),
    }
    report = {
        "version": version,
        "operation": operation,
        "adapters": adapters,
        "error": sub.error,
        "quantization": sub.quantization,
    }
    files[version_path(version, REPORT)] = store.write_object(
        version, REPORT, json.dumps(report, indent=1).encode()
    ).to_dict()
    first = sub.catalog[0] if sub.catalog else {}
    return build_manifest(
        version,
        parent,
        operation,
        source=sub.source,
        parameters=write_parameters(
            Options(
                sub.rule,
                route=sub.route,
                quantize=sub.quantization["scheme"] if sub.quantization else None,
                method=sub.method,
                ratio=sub.budget.get("ratio"),
                budget_bytes=sub.budget.get("budget_bytes"),
            )
        ),
        adapters=adapters,
        original_bytes=sum(r["weights_bytes"] + len((r["config_json"] or "").encode()) for r in sub.catalog),
        base_model=first.get("base_model"),
        dtype=first.get("dtype"),
        error=sub.error,
        quantization=sub.quantization,
        modules=modules,
        files=files,
    )


def _write_bases(sub: Snapshot, store: Store, version: str) -> tuple[dict, dict]:
    """The basis objects (modules in name order, BASIS_OBJECT_BYTES of components an object):
    their file entries and the modules' manifest entries."""
    sizes = {m: sum(4 * d.components.numel() for d in (mb.a, mb.b)) for m, mb in sub.modules.items()}
    sizes.update({m: 4 * (jm.basis.u.numel() + jm.basis.v.numel()) for m, jm in sub.joint.items()})
    files, entries = {}, {}
    for shard in basis_objects(dict(sorted(sizes.items())), BASIS_OBJECT_BYTES):
        path, tensors = version_path(version, basis_file(shard.name)), {}
        for module in shard.modules:
            tensors.update(_module_tensors(sub, module))
            entries[module] = _module_entry(sub, module, path)
        files[path] = store.write_object(version, basis_file(shard.name), encode_basis(tensors)).to_dict()
    return files, entries


def _module_tensors(sub: Snapshot, module: str) -> dict[str, torch.Tensor]:
    if module in sub.joint:
        return joint_tensors(module, sub.joint[module].basis, sub.joint[module].count)
    mb, tensors = sub.modules[module], {}
    for side in "AB":  # packed components as quantize() coded them, not coded again
        tensors.update(basis_tensors(module, side, mb.side(side), mb.packed[side] if mb.packed else None))
    return tensors


def _module_entry(sub: Snapshot, module: str, path: str) -> dict:
    if module in sub.joint:
        jm = sub.joint[module]
        extra = {"method": "joint", "width": jm.width, "core_rank": jm.core_rank}
        return module_entry(
            path, *jm.shapes, jm.k, jm.k, jm.explained, jm.explained, "joint", jm.count, **extra, **_budget(jm)
        )
    mb = sub.modules[module]
    k_a, k_b = len(mb.a.singular_values), len(mb.b.singular_values)
    return module_entry(
        path,
        *mb.shapes,
        k_a,
        k_b,
        explained(mb.a),
        explained(mb.b),
        mb.a.route,
        mb.a.count,
        method="flat",
        **_budget(mb),
    )


def _budget(module: ModuleBasis | JointModule) -> dict:
    return {} if module.budget is None else {"budget": module.budget}


def load(uri: str, version: str | None = None, endpoint_url: str | None = None) -> Snapshot:
    """A store version (default: the current one), every object checked against its manifest."""
    store = Store(Location(uri, endpoint_url))
    version = store.require_version(version)
    manifest = store.manifest(version)
    refuse_residuals(
        store,
        version,
        manifest,
        "the Python API does not hold residuals (it would save and reconstruct these adapters without them)",
        "export them with `lora-subspace export`",
    )
    refuse_groups(
        store,
        version,
        manifest,
        "the Python API holds one basis per module",
        "export the adapters with `lora-subspace export`",
    )
    modules, joint = _read_bases(store, version, manifest)
    catalog = store.read_table(version, CATALOG).to_pylist()
    ok = sorted((r for r in catalog if r["status"] == "ok"), key=lambda r: r["task_id"])
    ids = [r["task_id"] for r in ok]
    widths = {m: (len(mb.a.singular_values), len(mb.b.singular_values)) for m, mb in modules.items()}
    widths.update({m: (jm.k, jm.k) for m, jm in joint.items()})
    stored = read_parameters(manifest["parameters"], where=f"{store} {version}")
    return Snapshot(
        modules,
        _read_rows(store, version, widths, ids),
        ids,
        ok,
        [r for r in catalog if r["status"] != "ok"],
        stored.rule,
        stored.route,
        stored.method,
        manifest.get("quantization"),
        manifest.get("source"),
        (str(store), version),
        joint=joint,
        budget={key: value for key in ("ratio", "budget_bytes") if (value := getattr(stored, key)) is not None},
    )


def _read_bases(store: Store, version: str, manifest: dict) -> tuple[dict[str, ModuleBasis], dict[str, JointModule]]:
    """Every module's bases: flat ones (packed components decoded, the codes kept) and joint ones."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted({e["basis"] for e in manifest["modules"].values()}):
        tensors.update(store.read_basis(path, manifest["files"][path], decode=False))
    decoded = decode_basis(tensors)
    flat, joint = {}, {}
    for module, entry in sorted(manifest["modules"].items()):
        shapes = (tuple(entry["a_shape"]), tuple(entry["b_shape"]))
        if entry.get("method") == "joint":
            joint[module] = _joint_module(f"{store} {version}", module, entry, shapes, decoded)
            continue
        decs = [read_decomposition(decoded, module, side) for side in "AB"]
        for dec in decs:
            dec.route = entry["svd_route"]
        packed = {side: _packed(tensors, module, side) for side in "AB"}
        flat[module] = ModuleBasis(decs[0], decs[1], shapes, packed if packed["A"] else None, entry.get("budget"))
    return flat, joint


def _packed(tensors: dict[str, torch.Tensor], module: str, side: str) -> dict[str, torch.Tensor]:
    """A module side's packed components as stored (empty when float32)."""
    keys = {f: basis_key(module, side, f"components.{f}") for f in quantize.FIELDS}
    return {f: tensors[key] for f, key in keys.items() if key in tensors}


def _joint_module(where: str, module: str, entry: dict, shapes: Shapes, decoded: dict) -> JointModule:
    """A joint module's U and V, checked against its manifest entry (width c, core rank q)."""
    basis, c, q = read_joint(decoded, module), entry["width"], entry["core_rank"]
    (_, d_in), (d_out, _) = shapes
    if (
        basis is None
        or tuple(basis.u.shape) != (d_out, c)
        or tuple(basis.v.shape) != (d_in, c)
        or not entry["k_a"] == entry["k_b"] == q * c
    ):
        raise IntegrityError(
            f"{where}: joint module {module!r} does not hold U, V and cores as its manifest entry says"
        )
    count = int(decoded[basis_key(module, "joint", "count")])
    return JointModule(basis, q, shapes, count, float(entry["explained_variance_a"]), entry.get("budget"))


def _read_rows(store: Store, version: str, widths: dict[str, tuple[int, int]], ids: list[str]) -> dict[str, Rows]:
    """Every module's rows (`widths`: its loadings per side), in the order of `ids`, checked to be
    one row per adapter and module."""
    table = store.read_table(version, LOADINGS).sort_by([("module", "ascending"), ("task_id", "ascending")])
    rows, n = {}, len(ids)
    if table.num_rows != n * len(widths):
        raise IntegrityError(f"{LOADINGS} of {store} {version} has {table.num_rows} rows, expected {n * len(widths)}")
    for j, module in enumerate(sorted(widths)):
        part = table.slice(j * n, n)
        if (
            part.column("module").unique().to_pylist() not in ([module], [])
            or part.column("task_id").to_pylist() != ids
        ):
            raise IntegrityError(f"{LOADINGS} of {store} {version} does not hold one row per adapter and module")
        rows[module] = Rows(
            loadings_matrix(part, "a", widths[module][0]),
            loadings_matrix(part, "b", widths[module][1]),
            torch.from_numpy(part.column("error").to_numpy().astype(np.float64)),
            torch.from_numpy(part.column("norm").to_numpy().astype(np.float64)),
            torch.from_numpy(part.column("measured").to_numpy(zero_copy_only=False).copy()),
        )
    return rows


def _loadings_tables(sub: Snapshot):
    """Rows sorted by task id, then module, TASKS_PER_TABLE tasks at a time."""
    order = sorted(range(len(sub.task_ids)), key=sub.task_ids.__getitem__)
    for start in range(0, len(order), TASKS_PER_TABLE):
        index = torch.tensor(order[start : start + TASKS_PER_TABLE], dtype=torch.long)
        ids = [sub.task_ids[i] for i in index.tolist()]
        tables = [
            loadings_rows(
                ids,
                module,
                rows.a[index.to(rows.a.device)].cpu(),
                rows.b[index.to(rows.b.device)].cpu(),
                rows.error[index],
                rows.norm[index],
                rows.measured[index].numpy(),
            )
            for module, rows in sub.rows.items()
        ]
        yield pa.concat_tables(tables).sort_by([(k, "ascending") for k in LOADINGS_KEYS])
