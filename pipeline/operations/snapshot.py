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

from pipeline.config import ComponentRule
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
    loadings_matrix,
    loadings_rows,
    module_entry,
    parameters_rule,
    read_decomposition,
    rule_parameters,
    version_path,
)
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.io.tables import write_tables
from pipeline.linalg import quantize
from pipeline.linalg.decompose import Decomposition
from pipeline.linalg.loadings import Shapes
from pipeline.operations.info import stored_bytes


@dataclass
class ModuleBasis:
    """One module's bases for lora_A and lora_B; `packed`: quantized components per side, as stored."""

    a: Decomposition
    b: Decomposition
    shapes: Shapes
    packed: dict[str, dict[str, torch.Tensor]] | None = None

    def side(self, side: str) -> Decomposition:
        return self.a if side == "A" else self.b


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
    bases and every task's rows (task order), the ok adapters' catalog rows (same order), the
    quarantined ones', and the parameters the manifest records."""

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


BASIS_OBJECT_BYTES = 256 << 20  # components per basis object: export and re-base read whole objects
TASKS_PER_TABLE = 512  # tasks whose loadings rows are encoded at once


def save(
    sub: Snapshot, uri: str, endpoint_url: str | None = None, replace: bool = False, operation: str = "save"
) -> str:
    """Publish as the store's next version; sets `sub.origin` to it."""
    store = Store(Location(uri, endpoint_url))
    if not sub.task_ids:
        raise PipelineError(f"nothing to publish to {store}: the subspace holds no adapters")
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
    files, modules = {}, {}
    sizes = {m: sum(4 * d.components.numel() for d in (mb.a, mb.b)) for m, mb in sub.modules.items()}
    for shard in basis_objects(sizes, BASIS_OBJECT_BYTES):
        tensors = {}
        for module in shard.modules:
            mb = sub.modules[module]
            for side in "AB":  # packed components as quantize() coded them, not coded again
                tensors.update(basis_tensors(module, side, mb.side(side), mb.packed[side] if mb.packed else None))
        path = version_path(version, basis_file(shard.name))
        files[path] = store.write_object(version, basis_file(shard.name), encode_basis(tensors)).to_dict()
        for module in shard.modules:
            mb = sub.modules[module]
            modules[module] = module_entry(
                path,
                mb.shapes[0],
                mb.shapes[1],
                len(mb.a.singular_values),
                len(mb.b.singular_values),
                explained(mb.a),
                explained(mb.b),
                mb.a.route,
                mb.a.count,
            )
    where = store.version_location(version)
    files[version_path(version, LOADINGS)] = write_tables(
        where, LOADINGS, _loadings_tables(sub), LOADINGS_SCHEMA, LOADINGS_ROW_GROUP
    ).to_dict()
    catalog = pa.Table.from_pylist(
        sorted(sub.catalog + sub.quarantined, key=lambda r: r["task_id"]), schema=CATALOG_SCHEMA
    )
    files[version_path(version, CATALOG)] = write_tables(where, CATALOG, [catalog], CATALOG_SCHEMA).to_dict()
    error = sub.error
    adapters = {
        "ok": len(sub.task_ids),
        "quarantined": len(sub.quarantined),
        "in_basis": sum(bool(r["in_basis"]) for r in sub.catalog),
    }
    report = {
        "version": version,
        "operation": operation,
        "adapters": adapters,
        "error": error,
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
        parameters=rule_parameters(
            sub.rule, sub.route, sub.quantization["scheme"] if sub.quantization else None, sub.method
        ),
        adapters=adapters,
        original_bytes=sum(r["weights_bytes"] + len((r["config_json"] or "").encode()) for r in sub.catalog),
        base_model=first.get("base_model"),
        dtype=first.get("dtype"),
        error=error,
        quantization=sub.quantization,
        modules=modules,
        files=files,
    )


def load(uri: str, version: str | None = None, endpoint_url: str | None = None) -> Snapshot:
    store = Store(Location(uri, endpoint_url))
    version = store.require_version(version)
    manifest = store.manifest(version)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted({e["basis"] for e in manifest["modules"].values()}):
        tensors.update(store.read_basis(path, manifest["files"][path], decode=False))
    decoded = decode_basis(tensors)
    joint = sorted(m for m, e in manifest["modules"].items() if e.get("method") == "joint")
    if joint:
        raise PipelineError(
            f"{store} {version} has {len(joint)} joint module(s) (e.g. {joint[0]!r}): the Python API reads flat and "
            "aligned stores; export its adapters with `lora-subspace export`"
        )
    modules = {}
    for module, entry in manifest["modules"].items():
        decs = [read_decomposition(decoded, module, side) for side in "AB"]
        for dec in decs:
            dec.route = entry["svd_route"]
        packed = {
            side: {
                f: tensors[basis_key(module, side, f"components.{f}")]
                for f in quantize.FIELDS
                if basis_key(module, side, f"components.{f}") in tensors
            }
            for side in "AB"
        }
        modules[module] = ModuleBasis(
            decs[0], decs[1], (tuple(entry["a_shape"]), tuple(entry["b_shape"])), packed if packed["A"] else None
        )
    p = manifest["parameters"]
    catalog = store.read_table(version, CATALOG).to_pylist()
    ok = sorted((r for r in catalog if r["status"] == "ok"), key=lambda r: r["task_id"])
    ids = [r["task_id"] for r in ok]
    table = store.read_table(version, LOADINGS).sort_by([("module", "ascending"), ("task_id", "ascending")])
    rows, n = {}, len(ids)
    for j, module in enumerate(sorted(modules)):
        part = table.slice(j * n, n)
        if (
            part.num_rows != n
            or part.column("module").unique().to_pylist() not in ([module], [])
            or part.column("task_id").to_pylist() != ids
        ):
            raise IntegrityError(f"{LOADINGS} of {store} {version} does not hold one row per adapter and module")
        rows[module] = Rows(
            loadings_matrix(part, "a", modules[module].a.singular_values.numel()),
            loadings_matrix(part, "b", modules[module].b.singular_values.numel()),
            torch.from_numpy(part.column("error").to_numpy().astype(np.float64)),
            torch.from_numpy(part.column("norm").to_numpy().astype(np.float64)),
            torch.from_numpy(part.column("measured").to_numpy(zero_copy_only=False).copy()),
        )
    if table.num_rows != n * len(modules):
        raise IntegrityError(f"{LOADINGS} of {store} {version} has {table.num_rows} rows, expected {n * len(modules)}")
    return Snapshot(
        modules,
        rows,
        ids,
        ok,
        [r for r in catalog if r["status"] != "ok"],
        parameters_rule(p),
        p["svd_route"],
        p.get("method", "flat"),
        manifest.get("quantization"),
        manifest.get("source"),
        (str(store), version),
    )


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
