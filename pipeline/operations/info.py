"""Info: what a store version holds and how well it represents its adapters: per module (method,
bases, explained variance, error over adapters) and per adapter (the error distribution and the
worst adapters by name)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import IntegrityError
from pipeline.io.format import CATALOG, LOADINGS, MANIFEST, RESIDUALS, split_group, version_path
from pipeline.io.location import printable
from pipeline.io.store import Store

WORST_LISTED = 20  # worst adapters kept in describe's result (info prints 5, the report all)
WORST_PRINTED = 5


def describe(store: Store, version: str | None = None) -> dict:
    version = store.require_version(version)
    manifest = store.manifest(version)
    errors = store.read_table(version, LOADINGS, columns=["task_id", "module", "error", "measured"])
    catalog = store.read_table(version, CATALOG, columns=["task_id", "status", "reason"])
    stored = version_bytes(store, version, manifest)
    modules = manifest["modules"]
    quarantined = pc.equal(catalog.column("status"), "quarantined")
    return {
        "store": str(store),
        "version": version,
        "parent": manifest["parent"],
        "operation": manifest["operation"],
        "created": manifest["created"],
        "current": version == _current(store),
        "base_model": manifest.get("base_model"),
        "parameters": manifest["parameters"],
        "adapters": manifest["adapters"],
        "quarantined": dict(
            zip(
                catalog.filter(quarantined).column("task_id").to_pylist(),
                catalog.filter(quarantined).column("reason").to_pylist(),
            )
        ),
        "modules": len(modules),
        "k": {m: [e["k_a"], e["k_b"]] for m, e in modules.items() if e.get("method") != "joint"},
        "methods": {m: _choice(e) for m, e in modules.items()},
        "explained_variance": {m: [e["explained_variance_a"], e["explained_variance_b"]] for m, e in modules.items()},
        "svd_routes": sorted({e["svd_route"] for e in modules.values()}),
        "original_bytes": manifest["original_bytes"],
        "store_bytes": stored["total"],
        "stored_bytes": stored,
        "compression_ratio": manifest["original_bytes"] / stored["total"],
        "quantization": manifest.get("quantization"),
        "max_error": manifest["parameters"].get("max_error"),
        "residuals": manifest.get("residuals"),
        **_residual_figures(store, version, manifest, errors),
        "groups": _groups(manifest, errors),
        **_error_figures(errors),
    }


def _groups(manifest: dict, errors: pa.Table) -> list[dict] | None:
    """Per group (clustered bases): its adapters and their mean error, mean and max over the
    group; None for an ungrouped version."""
    if not manifest.get("groups"):
        return None
    per_adapter: dict[str, tuple[int, list[float]]] = {}
    modules, values = errors.column("module").to_pylist(), errors.column("error").to_numpy()
    for task_id, module, error in zip(errors.column("task_id").to_pylist(), modules, values.tolist()):
        per_adapter.setdefault(task_id, (split_group(module)[0], []))[1].append(error)
    groups = [{"adapters": 0, "means": []} for _ in range(manifest["groups"]["count"])]
    for task_id, (group, adapter_errors) in per_adapter.items():
        if group is None or not 0 <= group < len(groups):
            raise IntegrityError(f"{LOADINGS} holds rows of adapter {task_id!r} outside the version's groups")
        groups[group]["adapters"] += 1
        groups[group]["means"].append(float(np.mean(adapter_errors)))
    return [
        {
            "adapters": g["adapters"],
            "error_mean": float(np.mean(g["means"] or [0])),
            "error_max": max(g["means"] or [0]),
        }
        for g in groups
    ]


def _residual_figures(store: Store, version: str, manifest: dict, errors: pa.Table) -> dict:
    """The adapters with residuals, sorted, and the WORST_LISTED of them the shared bases alone
    serve worst (by their mean error without residuals), with their errors with and without."""
    rows = residual_rows(store, version, manifest)
    if not rows:
        return {"residual_adapters": [], "worst_residual_adapters": []}
    module_errors: dict[str, dict[str, float]] = {}
    for task_id, module, error in zip(*(errors.column(c).to_pylist() for c in ("task_id", "module", "error"))):
        if task_id in rows:
            module_errors.setdefault(task_id, {})[module] = error
    pictures = {t: residual_picture(module_errors.get(t, {}), rows[t], manifest["modules"]) for t in rows}
    ranked = sorted(pictures, key=lambda t: (-pictures[t]["shared_mean"], t))
    return {
        "residual_adapters": sorted(rows),
        "worst_residual_adapters": [{"task_id": t, **pictures[t]} for t in ranked[:WORST_LISTED]],
    }


def residual_rows(
    store: Store, version: str, manifest: dict, task_ids: list[str] | None = None
) -> dict[str, dict[str, dict]]:
    """task_id -> module -> {rank, shared_error} of the adapters with residuals (of task_ids, or
    all); empty when the version has no residuals.parquet."""
    if version_path(version, RESIDUALS) not in manifest["files"]:
        return {}
    table = store.read_table(version, RESIDUALS, task_ids, columns=["task_id", "module", "rank", "shared_error"])
    found: dict[str, dict[str, dict]] = {}
    for row in table.to_pylist():
        found.setdefault(row["task_id"], {})[row["module"]] = {"rank": row["rank"], "shared_error": row["shared_error"]}
    return found


def residual_picture(module_errors: dict[str, float], residuals: dict[str, dict], modules: dict[str, dict]) -> dict:
    """One adapter's residuals: the modules that have one, their float32 bytes (rank s of
    A_s (s, d_in) and B_s (d_out, s)), and its delta-W error, mean and max over its modules, with
    them (the loadings' errors) and without them (the shared bases alone: each residual's
    shared_error in place of its module's error)."""
    shared = {**module_errors, **{m: r["shared_error"] for m, r in residuals.items()}}
    with_them = list(module_errors.values()) or [r["shared_error"] for r in residuals.values()]
    return {
        "modules": len(residuals),
        "bytes": sum(
            4 * r["rank"] * (modules[m]["a_shape"][1] + modules[m]["b_shape"][0]) for m, r in residuals.items()
        ),
        "mean": float(np.mean(with_them)),
        "max": float(np.max(with_them)),
        "shared_mean": float(np.mean(list(shared.values()))),
        "shared_max": float(np.max(list(shared.values()))),
    }


def _error_figures(errors: pa.Table) -> dict:
    """The loadings' relative delta-W errors summarised per adapter (mean and max over its modules:
    their distribution over adapters, the worst by name) and per module (mean and max over adapters)."""
    task_ids, module_names = errors.column("task_id").to_pylist(), errors.column("module").to_pylist()
    values = errors.column("error").to_numpy()
    per_adapter = _grouped(task_ids, values)
    means = np.array([e["mean"] for e in per_adapter.values()])
    ranked = sorted(per_adapter, key=lambda t: (-per_adapter[t]["mean"], t))
    estimated = pc.unique(errors.filter(pc.invert(errors.column("measured"))).column("task_id"))
    return {
        "error": {
            "mean": float(means.mean()),
            "max": max(e["max"] for e in per_adapter.values()),
            "worst": ranked[:WORST_PRINTED],
            "estimated_adapters": len(estimated),  # of which a module's error is an estimate
        },
        "error_distribution": {
            "adapters": len(means),
            "min": float(means.min()),
            **{f"p{q}": float(np.quantile(means, q / 100)) for q in (50, 90, 99)},
            "max": float(means.max()),
        },
        "worst_adapters": [{"task_id": t, **per_adapter[t]} for t in ranked[:WORST_LISTED]],
        "per_adapter_error": per_adapter,
        "module_error": _grouped(module_names, values),
    }


def _current(store: Store) -> str | None:
    """What LATEST names; None when it is unreadable (info --version still describes a version)."""
    try:
        return store.current_version()
    except IntegrityError:
        return None


def version_bytes(store: Store, version: str, manifest: dict | None = None) -> dict[str, int]:
    """stored_bytes of a published version, its manifest object included."""
    manifest = manifest or store.manifest(version)
    return stored_bytes(store, manifest, len(store.version_location(version).read_bytes(MANIFEST)))


def stored_bytes(store: Store, manifest: dict, manifest_bytes: int) -> dict[str, int]:
    """Measured bytes of a version's objects by kind: basis components (as stored, and what they
    would be as float32), means, the rest of the basis objects, loadings, and metadata (catalog,
    report, manifest). Basis objects are measured from their headers."""
    sizes = {"components": 0, "means": 0, "basis_other": 0, "loadings": 0, "metadata": manifest_bytes}
    for path, entry in manifest["files"].items():
        if path.endswith(".safetensors"):
            tensors = store.tensor_bytes(path)
            components = sum(
                n for key, n in tensors.items() if ".components" in key or key.endswith((".joint.u", ".joint.v"))
            )
            means = sum(n for key, n in tensors.items() if key.endswith(".mean"))
            sizes["components"] += components
            sizes["means"] += means
            sizes["basis_other"] += entry["bytes"] - components - means
        elif path.endswith(LOADINGS):
            sizes["loadings"] += entry["bytes"]
        elif path.endswith(RESIDUALS):  # a key only where there are residuals
            sizes["residuals"] = entry["bytes"]
        else:
            sizes["metadata"] += entry["bytes"]
    sizes["total"] = sum(sizes.values())
    sizes["float32_components"] = sum(
        4 * e["width"] * (e["a_shape"][1] + e["b_shape"][0])
        if e.get("method") == "joint"
        else 4 * (e["k_a"] * e["a_shape"][0] * e["a_shape"][1] + e["k_b"] * e["b_shape"][0] * e["b_shape"][1])
        for e in manifest["modules"].values()
    )
    return sizes


def _choice(entry: dict) -> dict:
    """What a module stores: flat k per side, or joint width c and core rank q."""
    if entry.get("method") == "joint":
        return {"method": "joint", "width": entry["width"], "core_rank": entry["core_rank"]}
    return {"method": "flat", "k": [entry["k_a"], entry["k_b"]]}


def methods_line(methods: dict[str, dict]) -> str:
    """e.g. 'flat 20 modules (k 4..12), joint 4 modules (c 24..40, q 8)'."""
    parts = []
    for method, fields in (("flat", ("k",)), ("joint", ("width", "core_rank"))):
        chosen = [c for c in methods.values() if c["method"] == method]
        if not chosen:
            continue
        ranges = []
        for name, label in zip(fields, ("c", "q") if method == "joint" else ("k",)):
            values = sorted({v for c in chosen for v in (c[name] if isinstance(c[name], list) else [c[name]])})
            ranges.append(f"{label} {values[0]}" + (f"..{values[-1]}" if len(values) > 1 else ""))
        parts.append(f"{method} {len(chosen)} module{'s' * (len(chosen) != 1)} ({', '.join(ranges)})")
    return ", ".join(parts)


def _grouped(keys: list[str], errors: np.ndarray) -> dict[str, dict[str, float]]:
    """Mean and max of the errors sharing a key (an adapter's over its modules, a module's over adapters)."""
    grouped: dict[str, list[float]] = {}
    for key, error in zip(keys, errors.tolist()):
        grouped.setdefault(key, []).append(error)
    return {k: {"mean": float(np.mean(v)), "max": float(np.max(v))} for k, v in grouped.items()}


def format_info(info: dict) -> str:
    ev = [v for pair in info["explained_variance"].values() for v in pair]
    b, quantization = info["stored_bytes"], info["quantization"]
    q = f" ({quantization['scheme']}; {b['float32_components']:,} as float32)" if quantization else ""
    lines = [
        f"store        {info['store']}",
        f"version      {info['version']}{' (current)' if info['current'] else ''} by {info['operation']}, "
        f"parent {info['parent'] or '-'}, created {info['created']}",
        f"base model   {info['base_model'] or '-'}",
        f"adapters     {info['adapters']['ok']} ok{_projected(info['adapters'])}, "
        f"{info['adapters']['quarantined']} quarantined",
        f"modules      {info['modules']}: {methods_line(info['methods'])}",
        f"explained    variance {min(ev):.3f}..{max(ev):.3f} (per module and side)",
        f"bytes        {info['original_bytes']:,} original -> "
        f"{info['store_bytes']:,} stored ({info['compression_ratio']:.1f}x)",
        f"stored       components {b['components']:,}{q}, means {b['means']:,}, "
        f"other basis fields {b['basis_other']:,}, loadings {b['loadings']:,}, metadata {b['metadata']:,}",
        f"delta-W err  mean {info['error']['mean']:.4f}, max {info['error']['max']:.4f} "
        f"(relative ||dW - dW'|| / ||dW||; {_measured(info['error']['estimated_adapters'])})",
        f"per adapter  {distribution_line(info)}",
        f"worst        {_worst_line(info['worst_adapters'][:WORST_PRINTED])}",
    ]
    if quantization:
        added = quantization.get("added_error")
        lines.append(
            f"quantized    {quantization['scheme']}: "
            + (
                f"added delta-W error mean {added['mean']:.4f}, max {added['max']:.4f} "
                "(measured when quantized; included above)"
                if added
                else "errors above were measured on the quantized basis"
            )
        )
    if info.get("max_error") is not None or info.get("residuals"):
        lines.append(f"residuals    {residuals_line(info)}")
    if info.get("groups"):
        lines.append(groups_line(info["groups"]))
    for task_id, reason in info["quarantined"].items():
        lines.append(f"quarantined  {printable(task_id)}: {printable(reason or '')}")
    return "\n".join(lines)


def residuals_line(info: dict) -> str:
    """The error bound and what the residuals that keep it take (info's and the report's)."""
    residuals = info.get("residuals") or {"adapters": 0, "modules": 0, "bytes": 0}
    bound = info.get("max_error")
    without = info["store_bytes"] - residuals["bytes"]
    return (
        f"{residuals['adapters']} adapter(s), {residuals['modules']} module(s), "
        f"{residuals['bytes']:,} bytes (ratio {info['compression_ratio']:.1f}x with them, "
        f"{info['original_bytes'] / without:.1f}x without); bound "
        + (f"{bound:g} on every module's delta-W error, as exported" if bound is not None else "none")
        + _named(info.get("residual_adapters") or [])
    )


def groups_line(groups: list[dict]) -> str:
    """e.g. 'groups       3, each with its own bases per module: g0 16 adapters (error mean 0.03, max 0.05), ...'."""
    shown = ", ".join(
        f"g{i} {g['adapters']} adapters (error mean {g['error_mean']:.4f}, max {g['error_max']:.4f})"
        for i, g in enumerate(groups)
    )
    return f"groups       {len(groups)}, each with its own bases per module: {shown}"


def _named(ids: list[str]) -> str:
    if not ids:
        return ""
    more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
    return f"; {', '.join(printable(t) for t in ids[:5])}{more}"


def distribution_line(info: dict) -> str:
    """e.g. 'min 0.0100, p50 0.0200, p90 0.0300, p99 0.0400, max 0.0500 of 24 adapters' mean error over modules'."""
    d, quarantined = info["error_distribution"], info["adapters"]["quarantined"]
    figures = ", ".join(f"{name} {d[name]:.4f}" for name in ("min", "p50", "p90", "p99", "max"))
    left_out = f" ({quarantined} quarantined, without errors)" if quarantined else ""
    return f"{figures} of {d['adapters']} adapters' mean error over modules{left_out}"


def _measured(estimated: int) -> str:
    if not estimated:
        return "measured for every adapter"
    return (
        f"estimated for {estimated} adapter(s) moved to new bases without being read; "
        "`rebase --full --from-source` measures those whose files are in the source"
    )


def _worst_line(worst: list[dict]) -> str:
    return ", ".join(f"{printable(w['task_id'])} ({w['mean']:.4f})" for w in worst)


def _projected(adapters: dict) -> str:
    projected = adapters["ok"] - adapters["in_basis"]
    return f" ({adapters['in_basis']} in the basis, {projected} projected)" if projected else ""


def to_json(info: dict) -> str:
    return json.dumps(info, indent=1, sort_keys=True)
