"""Verify: re-read everything a version references and check it: the manifest's fields, ids and
paths, sizes and sha256 against the manifest, every tensor finite, every basis orthonormal and
shaped as the manifest says, every loadings row finite and as long as its module's k, every task
id a safe relative path, counts as the manifest says. With --all, every version of the store and
the pointer: nothing to verify, or a LATEST that names no sound version, is a failure too."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from pipeline.errors import IntegrityError, PipelineError
from pipeline.io.format import (
    CATALOG,
    LOADINGS,
    MANIFEST,
    POINTER,
    RESIDUALS,
    basis_key,
    check_bytes,
    decode_basis,
    is_object_path,
    manifest_problems,
    read_groups,
    residual_factors,
    sketch_width,
    split_group,
    unsafe_task_ids,
    version_path,
)
from pipeline.io.store import PUBLISHED, UNREADABLE, Store
from pipeline.io.tables import read_batches
from pipeline.linalg.residual import KINDS

# max |V V^T - I| allowed, by how components are stored. Packed ones are orthonormal only to their
# rounding: measured at most 4e-3 (int8) and 0.1 (nf4) for k <= 64, D >= 64; a corrupt basis
# (scaled, overwritten) is off by order 1.
ORTHONORMAL_TOLERANCE = {None: 1e-4, "int8": 2e-2, "nf4": 0.25}
SHOWN_IDS = 20  # unsafe task ids listed per table


def verify_store(store: Store, version: str | None = None, every: bool = False) -> list[dict]:
    """Reports ({"version", "files", "failures"}) of `version` (default the current one) or, with
    `every`, of every published version and every version whose manifest is unreadable, after a
    report of LATEST when it names no sound version. Unfinished versions are not checked."""
    if not every:
        return [verify(store, store.require_version(version))]
    survey = store.survey()
    checked = [s.version for s in survey.versions if s.state in (PUBLISHED, UNREADABLE)]
    if not checked:
        bucket = store.missing_bucket()
        where = f"bucket {bucket!r} does not exist (store {store})" if bucket else f"no published version in {store}"
        raise PipelineError(f"verify: nothing to verify: {where}" + (f" ({survey.problem})" if survey.problem else ""))
    reports = (
        [{"store": str(store), "version": POINTER, "files": None, "failures": [survey.problem]}]
        if survey.problem
        else []
    )
    return reports + [verify(store, v) for v in checked]


def verify(store: Store, version: str | None = None) -> dict:
    version = store.require_version(version)
    report = {"store": str(store), "version": version, "files": None, "failures": []}
    try:
        manifest = store.raw_manifest(version)
    except FileNotFoundError:
        report["failures"] = [f"version {version} of {store} has no manifest"]
        return report
    except IntegrityError as exc:
        report["failures"] = [str(exc)]
        return report
    problems = [f"{version_path(version, MANIFEST)}: {p}" for p in manifest_problems(manifest, version)]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        report["failures"] = problems
        return report
    # A path that is not a store path is reported above and never read (it could lead anywhere).
    files = {
        path: e
        for path, e in manifest["files"].items()
        if is_object_path(path) and isinstance(e, dict) and {"bytes", "sha256"} <= set(e)
    }
    report["files"] = len(manifest["files"])
    failures: list[str] = []
    bases: dict[str, dict[str, torch.Tensor]] = {}
    for path, entry in sorted(files.items()):
        try:
            data = store.location.read_bytes(path)
            check_bytes(data, entry, path)
            if path.endswith(".safetensors"):
                bases[path] = decode_basis(load_safetensors(data))
        except FileNotFoundError:
            failures.append(f"{path}: missing")
        except (IntegrityError, ValueError, KeyError, TypeError, OverflowError, SafetensorError) as exc:
            failures.append(f"{path}: {exc}")  # what garbage makes of a safetensors header
    if problems:  # the objects' invariants are not checked against an unsound manifest
        report["failures"] = problems + failures
        return report
    for module, entry in sorted(manifest["modules"].items()):
        if entry["basis"] in bases:
            failures += _check_module(
                module, entry, bases[entry["basis"]], (manifest.get("quantization") or {}).get("scheme")
            )
    failures += _check_groups(manifest.get("groups"), manifest["modules"], bases)
    if version_path(version, LOADINGS) in manifest["files"]:
        failures += _check_loadings(store, version, manifest)
    failures += _check_catalog(store, version, manifest)
    failures += _check_residuals(store, version, manifest)
    report["failures"] = failures
    return report


def _check_groups(groups: dict | None, modules: dict, bases: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """A grouped version's sketch sums: one row per group, finite (the object's checksum is checked above)."""
    if not groups or groups["sketches"] not in bases:
        return []
    try:
        read_groups(bases[groups["sketches"]], groups["count"], sketch_width(modules), groups["sketches"])
    except IntegrityError as exc:
        return [str(exc)]
    return []


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
            failures.append(
                f"{module} lora_{side}: components are {list(components.shape)}, the manifest says [{k}, {width}]"
            )
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
        failures.append(
            f"{module}: joint loadings widths {entry['k_a']}, {entry['k_b']} are not core_rank x width = {q * c}"
        )
    for name, d in (("u", entry["b_shape"][0]), ("v", entry["a_shape"][1])):
        matrix = tensors.get(basis_key(module, "joint", name))
        if matrix is None:
            failures.append(f"{module}: basis has no joint {name.upper()}")
        elif tuple(matrix.shape) != (d, c):
            failures.append(f"{module}: joint {name.upper()} is {list(matrix.shape)}, the manifest says [{d}, {c}]")
        elif not torch.isfinite(matrix).all():
            failures.append(f"{module}: non-finite values in joint {name.upper()}")
        elif _drift(matrix) > ORTHONORMAL_TOLERANCE[None]:
            failures.append(
                f"{module}: joint {name.upper()} is not orthonormal (max |X^T X - I| = {_drift(matrix):.2e})"
            )
    return failures


def _drift(columns: torch.Tensor) -> float:
    """max |X^T X - I| of a matrix's columns, in float64."""
    if not columns.shape[1]:
        return 0.0
    gram = columns.double().T @ columns.double()
    return float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max())


def _check_loadings(store: Store, version: str, manifest: dict) -> list[str]:
    modules = manifest["modules"]
    failures, rows, groups_of = [], 0, {}
    try:
        for batch in read_batches(store.version_location(version), LOADINGS, ["task_id", "module", "a", "b", "error"]):
            rows += batch.num_rows
            for task_id, module in zip(batch.column("task_id").to_pylist(), batch.column("module").to_pylist()):
                groups_of.setdefault(task_id, set()).add(split_group(module)[0])
            failures += _unsafe_ids(LOADINGS, batch.column("task_id"))
            for column in ("a", "b"):
                values = batch.column(column)
                lengths = pc.list_value_length(values).to_numpy()
                expected = np.array(
                    [modules[m][f"k_{column}"] if m in modules else -1 for m in batch.column("module").to_pylist()]
                )
                if (lengths != expected).any():
                    failures.append(
                        f"{LOADINGS}: {int((lengths != expected).sum())} row(s) "
                        f"with loadings '{column}' of the wrong length"
                    )
                if not np.isfinite(values.flatten().to_numpy(zero_copy_only=False)).all():
                    failures.append(f"{LOADINGS}: non-finite loadings '{column}'")
            if not np.isfinite(batch.column("error").to_numpy(zero_copy_only=False)).all():
                failures.append(f"{LOADINGS}: non-finite errors")
    except (IntegrityError, OSError, ValueError) as exc:
        return [f"{LOADINGS}: unreadable: {exc}"]
    # Each adapter has a row per module of its group (a grouped version holds modules per group).
    expected_rows = manifest["adapters"]["ok"] * len(modules) // (manifest.get("groups") or {"count": 1})["count"]
    if rows != expected_rows:
        failures.append(f"{LOADINGS}: {rows} rows, the manifest implies {expected_rows}")
    mixed = sorted(t for t, found in groups_of.items() if len(found) != 1)
    if mixed:
        failures.append(f"{LOADINGS}: {len(mixed)} adapter(s) with rows in several groups (e.g. {mixed[0]!r})")
    return failures


def _check_catalog(store: Store, version: str, manifest: dict) -> list[str]:
    failures, counts = [], {"ok": 0, "quarantined": 0}
    try:
        for batch in read_batches(store.version_location(version), CATALOG, ["task_id", "status"]):
            failures += _unsafe_ids(CATALOG, batch.column("task_id"))
            ok = int(pc.sum(pc.equal(batch.column("status"), "ok")).as_py() or 0)
            counts["ok"] += ok
            counts["quarantined"] += batch.num_rows - ok
    except FileNotFoundError:
        return [f"{CATALOG}: missing"]
    except (PipelineError, OSError, ValueError) as exc:
        return [f"{CATALOG}: unreadable: {exc}"]
    expected = {k: manifest["adapters"][k] for k in counts}
    return failures + ([] if counts == expected else [f"{CATALOG}: counts {counts}, the manifest says {expected}"])


def _unsafe_ids(table: str, column) -> list[str]:
    """A problem per task id that is not a safe relative path (export would write outside its folder)."""
    bad = unsafe_task_ids(pc.unique(column))
    shown = [f"{table}: task id {t!r} is not a safe relative path" for t in bad[:SHOWN_IDS]]
    return shown + ([f"{table}: {len(bad) - SHOWN_IDS} more unsafe task id(s)"] if len(bad) > SHOWN_IDS else [])


def _check_residuals(store: Store, version: str, manifest: dict) -> list[str]:
    """Each residuals row: kind known, factors that fit its module's shapes and finite, an adapter
    the catalog holds as compressed; the counts as the manifest's `residuals` says. A version
    without residuals has neither the object nor the summary, and is format 1."""
    listed, summary = version_path(version, RESIDUALS) in manifest["files"], manifest.get("residuals")
    if not listed:
        return [f"{MANIFEST}: a residuals summary but no {RESIDUALS} among the files"] if summary else []
    if not (isinstance(summary, dict) and manifest.get("format_version") == 2):
        return [f"{MANIFEST}: {RESIDUALS} is listed, but the manifest is not format 2 with a residuals summary"]
    try:
        catalog = store.read_table(version, CATALOG, columns=["task_id", "status"]).to_pylist()
        ok = {r["task_id"] for r in catalog if r["status"] == "ok"}
        rows = store.read_table(version, RESIDUALS).to_pylist()
    except (PipelineError, OSError, ValueError) as exc:
        return [f"{RESIDUALS}: unreadable: {exc}"]
    failures = [problem for row in rows for problem in _residual_problems(row, manifest["modules"], ok)]
    counts = {"adapters": len({r["task_id"] for r in rows}), "modules": len(rows)}
    expected = {k: summary.get(k) for k in counts}
    return failures + ([] if counts == expected else [f"{RESIDUALS}: counts {counts}, the manifest says {expected}"])


def _residual_problems(row: dict, modules: dict, ok: set[str]) -> list[str]:
    where = f"{RESIDUALS}: {row['task_id']!r} {row['module']!r}"
    if row["task_id"] not in ok:
        return [f"{where}: no such compressed adapter in the catalog"]
    if row["module"] not in modules:
        return [f"{where}: no such module"]
    if row["kind"] not in KINDS:
        return [f"{where}: kind {row['kind']!r} is not one of {', '.join(KINDS)}"]
    entry = modules[row["module"]]
    try:
        a, b = residual_factors(row, entry["a_shape"], entry["b_shape"])
    except IntegrityError as exc:
        return [f"{RESIDUALS}: {exc}"]
    shared = row["shared_error"]
    if not (torch.isfinite(a).all() and torch.isfinite(b).all() and shared is not None and np.isfinite(shared)):
        return [f"{where}: non-finite values"]
    return []
