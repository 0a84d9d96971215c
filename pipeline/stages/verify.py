"""Verify: re-read everything a version references and check it: sizes and sha256 against the
manifest, every tensor finite, every basis orthonormal and shaped as the manifest says, every
loadings row finite and as long as its module's k, counts as the manifest says."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import torch
from safetensors.torch import load as load_safetensors

from pipeline.errors import IntegrityError, PipelineError
from pipeline.io.store import CATALOG, LOADINGS, Store, basis_key, check_bytes, decode_basis, version_path
from pipeline.io.tables import read_batches

# max |V V^T - I| allowed, by how components are stored. Packed ones are orthonormal only to their
# rounding: measured at most 4e-3 (int8) and 0.1 (nf4) for k <= 64, D >= 64; a corrupt basis
# (scaled, overwritten) is off by order 1.
ORTHONORMAL_TOLERANCE = {None: 1e-4, "int8": 2e-2, "nf4": 0.25}


def verify(store: Store, version: str | None = None) -> dict:
    version = store.require_version(version)
    manifest = store.manifest(version)
    failures: list[str] = []
    bases: dict[str, dict[str, torch.Tensor]] = {}
    for path, entry in sorted(manifest["files"].items()):
        try:
            data = store.location.read_bytes(path)
            check_bytes(data, entry, path)
            if path.endswith(".safetensors"):
                bases[path] = decode_basis(load_safetensors(data))
        except FileNotFoundError:
            failures.append(f"{path}: missing")
        except (IntegrityError, ValueError) as exc:  # safetensors raises ValueError-like errors on garbage
            failures.append(f"{path}: {exc}")
    for module, entry in sorted(manifest["modules"].items()):
        if entry["basis"] in bases:
            failures += _check_module(module, entry, bases[entry["basis"]], (manifest.get("quantization") or {}).get("scheme"))
    if version_path(version, LOADINGS) in manifest["files"]:
        failures += _check_loadings(store, version, manifest)
    failures += _check_catalog(store, version, manifest)
    return {"store": str(store), "version": version, "files": len(manifest["files"]), "failures": failures}


def _check_module(module: str, entry: dict, tensors: dict[str, torch.Tensor], scheme: str | None) -> list[str]:
    if entry.get("method") == "joint":
        return _check_joint(module, entry, tensors)
    failures = []
    for side, k, shape in (("A", entry["k_a"], entry["a_shape"]), ("B", entry["k_b"], entry["b_shape"])):
        width = shape[0] * shape[1]
        try:
            components = tensors[basis_key(module, side, "components")]
            fields = [tensors[basis_key(module, side, f)] for f in ("singular_values", "mean", "total_variance")]
        except KeyError as exc:
            failures.append(f"{module} lora_{side}: basis has no {exc.args[0]}")
            continue
        if tuple(components.shape) != (k, width):
            failures.append(f"{module} lora_{side}: components are {list(components.shape)}, the manifest says [{k}, {width}]")
            continue
        if not all(torch.isfinite(t).all() for t in [components, *fields]):
            failures.append(f"{module} lora_{side}: non-finite values in the basis")
            continue
        drift = _drift(components.T)
        if drift > ORTHONORMAL_TOLERANCE[scheme]:
            failures.append(f"{module} lora_{side}: components are not orthonormal (max |V V^T - I| = {drift:.2e})")
    return failures


def _check_joint(module: str, entry: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    """U (d_out, c) and V (d_in, c) present, finite, orthonormal; rows of q * c loadings."""
    failures = []
    c, q = entry["width"], entry["core_rank"]
    if entry["k_a"] != q * c or entry["k_b"] != q * c:
        failures.append(f"{module}: joint loadings widths {entry['k_a']}, {entry['k_b']} are not core_rank x width = {q * c}")
    for name, d in (("u", entry["b_shape"][0]), ("v", entry["a_shape"][1])):
        matrix = tensors.get(basis_key(module, "joint", name))
        if matrix is None:
            failures.append(f"{module}: basis has no joint {name.upper()}")
        elif tuple(matrix.shape) != (d, c):
            failures.append(f"{module}: joint {name.upper()} is {list(matrix.shape)}, the manifest says [{d}, {c}]")
        elif not torch.isfinite(matrix).all():
            failures.append(f"{module}: non-finite values in joint {name.upper()}")
        elif _drift(matrix) > ORTHONORMAL_TOLERANCE[None]:
            failures.append(f"{module}: joint {name.upper()} is not orthonormal (max |X^T X - I| = {_drift(matrix):.2e})")
    return failures


def _drift(columns: torch.Tensor) -> float:
    """max |X^T X - I| of a matrix's columns, in float64."""
    if not columns.shape[1]:
        return 0.0
    gram = columns.double().T @ columns.double()
    return float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max())


def _check_loadings(store: Store, version: str, manifest: dict) -> list[str]:
    modules = manifest["modules"]
    failures, rows = [], 0
    try:
        for batch in read_batches(store.version_location(version), LOADINGS, ["module", "a", "b", "error"]):
            rows += batch.num_rows
            for column in ("a", "b"):
                values = batch.column(column)
                lengths = pc.list_value_length(values).to_numpy()
                expected = np.array([modules[m][f"k_{column}"] if m in modules else -1 for m in batch.column("module").to_pylist()])
                if (lengths != expected).any():
                    failures.append(f"{LOADINGS}: {int((lengths != expected).sum())} row(s) with loadings '{column}' of the wrong length")
                if not np.isfinite(values.flatten().to_numpy(zero_copy_only=False)).all():
                    failures.append(f"{LOADINGS}: non-finite loadings '{column}'")
            if not np.isfinite(batch.column("error").to_numpy(zero_copy_only=False)).all():
                failures.append(f"{LOADINGS}: non-finite errors")
    except (IntegrityError, OSError, ValueError) as exc:
        return [f"{LOADINGS}: unreadable: {exc}"]
    expected_rows = manifest["adapters"]["ok"] * len(modules)
    if rows != expected_rows:
        failures.append(f"{LOADINGS}: {rows} rows, the manifest implies {expected_rows}")
    return failures


def _check_catalog(store: Store, version: str, manifest: dict) -> list[str]:
    try:
        status = store.read_table(version, CATALOG, columns=["status"]).column("status")
    except (PipelineError, OSError, ValueError) as exc:
        return [f"{CATALOG}: unreadable: {exc}"]
    ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
    counts = {"ok": ok, "quarantined": len(status) - ok}
    expected = {k: manifest["adapters"][k] for k in counts}
    return [] if counts == expected else [f"{CATALOG}: counts {counts}, the manifest says {expected}"]
