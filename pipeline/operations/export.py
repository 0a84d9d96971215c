"""Export: rebuild adapters from the store as PEFT folders that peft, vLLM, LoRAX and TGI load.

Several adapters are written in batches (`export_all`): each batch task reads the version's
basis objects once and only its adapters' rows of the loadings and catalog tables, rebuilds its
adapters a slice at a time (one product per module side) and writes their folders on a few
threads while the next slice is rebuilt. A small export runs in-process, a large one on Ray
(pipeline.runners.for_work). Each adapter keeps its original config file and dtype.

Everything that can be checked is checked before any adapter is rebuilt (`plan_export`): the
ids against the catalog, the ids that become folder names against the safe-path rule, the target
folders for files already there, and that --out can be written.
"""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline import peft_format
from pipeline.errors import IntegrityError, PipelineError
from pipeline.io.format import (
    CATALOG,
    LOADINGS,
    RESIDUALS,
    basis_key,
    group_of,
    in_group,
    is_safe_task_id,
    read_joint,
    residual_factors,
    version_path,
)
from pipeline.io.location import Location
from pipeline.io.safetensors_ranges import DTYPES
from pipeline.io.safetensors_ranges import encode as encode_safetensors
from pipeline.io.store import Store
from pipeline.io.targets import check_writable, holding_files
from pipeline.linalg.decompose import reconstruct
from pipeline.linalg.gauge import cut_rank, joint_rebuild, pad_rank
from pipeline.linalg.residual import with_residual
from pipeline.runners import Runner, for_work

SHOWN_IDS = 10  # ids named in one error line
# Adapters per batch task: about two tasks per CPU (each reads the basis once), within bounds
# that keep a task's loadings small and its count of basis reads low.
BATCH_LEAST, BATCH_MOST, BATCHES_PER_CPU = 16, 256, 2
REBUILD_ROWS = 32  # adapters rebuilt at once: one product per module side (a few MiB of float32 each)
WRITE_THREADS = 4  # folders of a batch serialized and written at once: writes wait on storage


@dataclass
class ExportTask:
    store: Location
    version: str
    task_ids: list[str]
    outs: list[Location]


def plan_export(
    store: Store,
    version: str,
    task_ids: list[str] | None,
    out: Location,
    overwrite: bool = False,
) -> ExportTask:
    """What exports `task_ids` (None: every adapter compressed) of `version` to `out`, after every
    check, so a refused export writes nothing. One id is written to `out` itself, several to
    out/<task_id>/. Without `overwrite`, targets that already hold files are refused."""
    ids = select(store, version, task_ids)
    if task_ids is not None and len(task_ids) == 1:
        targets = [""]
    else:
        # Ids come from the store's tables; one that is not a safe relative path would be a
        # folder outside --out. Checked here, where they become paths, whatever read them.
        unsafe = [t for t in ids if not is_safe_task_id(t)]
        if unsafe:
            raise PipelineError(
                f"{store} {version} holds task id(s) that are not safe relative paths, so not folders under "
                f"--out: {_names(unsafe)}; nothing was written (the others export by name)"
            )
        targets = ids
    if not overwrite:
        held = holding_files(out, targets)
        if held == [""]:
            raise PipelineError(
                f"--out {out} already holds files; export writes only into a new or empty folder "
                "(--overwrite writes over them)"
            )
        if held:
            raise PipelineError(
                f"{len(held)} target folder(s) under --out {out} already hold files: {_names(held)}; "
                "nothing was written (--overwrite writes over them)"
            )
    if targets == [""]:
        return ExportTask(store.location, version, ids, [out])
    check_writable(out)  # before fanning out, not in every task
    return ExportTask(store.location, version, ids, [out.child(t) for t in ids])


def export_all(store: Store, plan: ExportTask, runner: Runner) -> list[str]:
    """Write the plan's adapters; returns the folders written. One adapter is written here (a
    storage error is one line); several in batches on `runner`, in-process when they are few
    and small (pipeline.runners.for_work: their rebuilt float32 factors are the bytes counted)."""
    if len(plan.task_ids) == 1:
        return export_batch(plan)
    modules = store.manifest(plan.version)["modules"].values()
    per_adapter = 4 * sum(math.prod(e["a_shape"]) + math.prod(e["b_shape"]) for e in modules)
    run = for_work(runner, len(plan.task_ids), per_adapter * len(plan.task_ids))
    batches = export_batches(plan, run.num_cpus)
    return [w for _, written in run.map_unordered(export_batch, batches) for w in written]


def export_batches(plan: ExportTask, parallelism: int) -> list[ExportTask]:
    """The plan's adapters in consecutive batches, about BATCHES_PER_CPU per CPU."""
    ids, outs = plan.task_ids, plan.outs
    size = min(BATCH_MOST, max(BATCH_LEAST, math.ceil(len(ids) / (BATCHES_PER_CPU * max(parallelism, 1)))))
    return [
        ExportTask(plan.store, plan.version, ids[i : i + size], outs[i : i + size]) for i in range(0, len(ids), size)
    ]


def select(store: Store, version: str, task_ids: list[str] | None) -> list[str]:
    """`task_ids` without repeats, each checked against the catalog (its task_id and status
    columns alone): unknown and quarantined ids are named in one error. None: every adapter ok."""
    wanted = None if task_ids is None else list(dict.fromkeys(task_ids))
    rows = store.read_table(version, CATALOG, wanted, columns=["task_id", "status"]).to_pylist()
    status = {row["task_id"]: row["status"] for row in rows}
    if wanted is None:
        return sorted(t for t, s in status.items() if s == "ok")
    unknown = [t for t in wanted if t not in status]
    quarantined = [t for t in wanted if t in status and status[t] != "ok"]
    problems = [
        f"no adapter {_names(unknown)}" if unknown else "",
        f"quarantined, not compressed: {_names(quarantined)}" if quarantined else "",
    ]
    if unknown or quarantined:
        raise PipelineError(f"cannot export from {store} version {version}: {'; '.join(p for p in problems if p)}")
    return wanted


def _names(ids: list[str]) -> str:
    shown = ", ".join(repr(t) for t in ids[:SHOWN_IDS])
    return shown + (f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")


def export_batch(task: ExportTask) -> list[str]:
    """Write each adapter of the batch to its folder; returns the folders written. A group's
    adapters are rebuilt REBUILD_ROWS at a time (rebuild) and written on WRITE_THREADS threads."""
    store = Store(task.store)
    manifest = store.manifest(task.version)
    catalog = {row["task_id"]: row for row in store.read_table(task.version, CATALOG, task.task_ids).to_pylist()}
    for task_id in task.task_ids:
        row = catalog.get(task_id)
        if row is None:
            raise PipelineError(f"no adapter {task_id!r} in {store} version {task.version}")
        if row["status"] != "ok":
            raise PipelineError(f"adapter {task_id!r} was quarantined, not compressed: {row['reason']}")
    loadings = batch_loadings(store, task)
    basis: dict[str, torch.Tensor] = {}
    for path in sorted({entry["basis"] for entry in manifest["modules"].values()}):
        basis.update(store.read_basis(path, manifest["files"][path]))
    residuals = read_residuals(store, task.version, manifest, task.task_ids)
    members: dict[int | None, list[int]] = {}  # group -> the batch's positions of its adapters
    for position, task_id in enumerate(task.task_ids):
        members.setdefault(group_of(loadings[task_id]), []).append(position)
    with ThreadPoolExecutor(WRITE_THREADS) as writers:
        pending = []
        for group, positions in members.items():
            modules, group_basis = in_group(manifest["modules"], group), in_group(basis, group)
            for start in range(0, len(positions), REBUILD_ROWS):  # writes of one slice overlap the next's rebuild
                part = positions[start : start + REBUILD_ROWS]
                ids = [task.task_ids[p] for p in part]
                rows = [_module_rows(store, task.version, t, loadings[t], group, modules) for t in ids]
                ranks = [adapter_ranks(catalog[t], modules) for t in ids]
                dtypes = [DTYPES[catalog[t]["dtype"]] for t in ids]
                rebuilt = rebuild(modules, group_basis, rows, dtypes, ranks)
                for position, task_id, weights, rank, dtype in zip(part, ids, rebuilt, ranks, dtypes):
                    own = in_group(residuals[task_id], group) if task_id in residuals else None
                    weights, text = _with_residuals(weights, own, catalog[task_id], modules, rank, dtype, manifest)
                    pending.append(writers.submit(write_peft_folder, task.outs[position], weights, text))
        for done in pending:
            done.result()  # a failed write is the batch's error
    return [str(out) for out in task.outs]


def _module_rows(store: Store, version: str, task_id: str, rows: dict, group: int | None, modules: dict) -> dict:
    """An adapter's loadings rows under PEFT module names: one per module of its group, or the store is damaged."""
    named = in_group(rows, group)
    if set(named) != set(modules) or len(rows) != len(modules):
        raise IntegrityError(f"{store} {version}: adapter {task_id!r} lacks one loadings row per module of one group")
    return named


def _with_residuals(weights, own: dict | None, row: dict, modules: dict, ranks: dict, dtype, manifest: dict):
    """An adapter's state dict with its residuals (own: its residual rows, or None) and the config
    text for it: its original config, widened by the residuals' rank, or a minimal one."""
    text = row["config_json"]
    if own is not None:
        weights, extra = add_residuals(weights, own, modules, ranks, dtype)
        ranks = {m: r + extra for m, r in ranks.items()}
        if text:
            text = json.dumps(widened_config(json.loads(text), list(modules), extra), indent=2)
    return weights, text or json.dumps(peft_format.minimal_config(ranks, manifest.get("base_model")), indent=2)


def batch_loadings(store: Store, task: ExportTask) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The batch's rows of the loadings table, read once: task id -> module -> (a, b), as float32
    arrays sliced from the columns (no Python float per value)."""
    table = store.read_table(task.version, LOADINGS, task.task_ids, columns=["task_id", "module", "a", "b"])
    sides = {}
    for side in ("a", "b"):
        column = table.column(side).combine_chunks() if table.num_rows else pa.array([], pa.list_(pa.float32()))
        if column.null_count:
            raise PipelineError(f"{store} {task.version}: {LOADINGS} has rows without loadings ({side})")
        offsets, values = column.offsets.to_numpy(), column.values.to_numpy(zero_copy_only=False)
        sides[side] = [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]
    loadings: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    rows = zip(table.column("task_id").to_pylist(), table.column("module").to_pylist(), sides["a"], sides["b"])
    for task_id, module, a, b in rows:
        loadings.setdefault(task_id, {})[module] = (a, b)
    return loadings


def adapter_ranks(row: dict, modules: dict[str, dict]) -> dict[str, int]:
    """Each module's rank in the adapter's own config (the catalog's rank without one)."""
    config = json.loads(row["config_json"]) if row["config_json"] else {}
    if "r" in config:
        return {m: peft_format.module_rank(config, m) for m in modules}
    return {m: min(row["rank"] or e["a_shape"][0], e["a_shape"][0]) for m, e in modules.items()}


def rebuild(
    modules: dict[str, dict],
    basis: dict[str, torch.Tensor],
    loadings: list[dict[str, tuple]],
    dtypes: list[torch.dtype],
    ranks: list[dict[str, int]] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """PEFT state dicts of adapters of one group from their loadings (module -> (a, b) arrays):
    lora_A (r, d_in), lora_B (d_out, r) at each one's own rank r (`ranks`; default the
    collection's), in its dtype. A flat rebuild of a lower-rank adapter is cut to its best rank-r
    factors; a joint one keeps its core's leading r columns (its rank is at most r). The same
    bytes for an adapter whatever the others rebuilt with it (reconstruct runs in float64)."""
    ranks = ranks or [{} for _ in loadings]
    weights: list[dict[str, torch.Tensor]] = [{} for _ in loadings]
    for module, entry in modules.items():
        values = [
            torch.from_numpy(np.stack([rows[module][side] for rows in loadings]).astype(np.float32, copy=False))
            for side in (0, 1)
        ]
        own_ranks = [r.get(module, entry["a_shape"][0]) for r in ranks]
        joint = read_joint(basis, module)
        if joint is None:
            factors = _flat_factors(
                entry, [_side_basis(basis, module, side) for side in "AB"], values, dtypes, own_ranks
            )
        else:
            c, q = entry["width"], entry["core_rank"]
            factors = [
                joint_rebuild(
                    joint, values[0][i].view(1, q, c)[:, :rank], values[1][i].view(1, c, q)[:, :, :rank], rank
                )
                for i, rank in enumerate(own_ranks)
            ]
        for i, (a, b) in enumerate(factors):
            weights[i][peft_format.weight_key(module, "A")] = _as(a[0], dtypes[i])
            weights[i][peft_format.weight_key(module, "B")] = _as(b[0], dtypes[i])
    return weights


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)  # .to costs ~10 us even as a no-op


def _side_basis(basis: dict, module: str, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat module side's components and mean, float64 (converted once for all the adapters)."""
    return tuple(basis[basis_key(module, side, field)].to(torch.float64) for field in ("components", "mean"))


def _flat_factors(entry: dict, sides, values, dtypes, ranks) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(a, b) of each adapter, (1, r, d_in) and (1, d_out, r), from its loadings on one flat
    module's bases, in one product per side; cast at once where the dtypes agree (an adapter's
    factors are then views of its rows); a cut is made in float32, then cast."""
    a, b = (
        reconstruct(v, components, mean).view(-1, *shape)
        for v, (components, mean), shape in zip(values, sides, (entry["a_shape"], entry["b_shape"]))
    )
    cast_a, cast_b = (a.to(dtypes[0]), b.to(dtypes[0])) if len(set(dtypes)) == 1 else (a, b)
    full = entry["a_shape"][0]
    return [
        cut_rank(a[i : i + 1], b[i : i + 1], rank) if rank < full else (cast_a[i : i + 1], cast_b[i : i + 1])
        for i, rank in enumerate(ranks)
    ]


def read_residuals(store: Store, version: str, manifest: dict, task_ids: list[str]) -> dict[str, dict[str, dict]]:
    """task_id -> module -> residuals row, of these adapters (none when the version has no residuals)."""
    if version_path(version, RESIDUALS) not in manifest["files"]:
        return {}
    found: dict[str, dict[str, dict]] = {}
    for row in store.read_table(version, RESIDUALS, task_ids).to_pylist():
        found.setdefault(row["task_id"], {})[row["module"]] = row
    return found


def refuse_residuals(store: Store, version: str, manifest: dict, why: str, instead: str) -> None:
    """Commands that cannot keep an adapter's residuals refuse a version holding any, naming the
    first adapters that have them."""
    if version_path(version, RESIDUALS) not in manifest["files"]:
        return
    ids = sorted(set(store.read_table(version, RESIDUALS, columns=["task_id"]).column("task_id").to_pylist()))
    raise PipelineError(
        f"{store} {version} holds residuals (adapters the shared bases miss the error bound on: {_names(ids[:5])}"
        f"{f' and {len(ids) - 5} more' if len(ids) > 5 else ''}): {why}; {instead}"
    )


def refuse_groups(store: Store, version: str, manifest: dict, why: str, instead: str) -> None:
    """Commands that know one basis per module refuse a grouped version (clustered bases)."""
    if manifest.get("groups"):
        raise PipelineError(
            f"{store} {version} has {manifest['groups']['count']} groups of adapters, each with its own bases "
            f"(compress --clusters): {why}; {instead}"
        )


def add_residuals(
    weights: dict[str, torch.Tensor], rows: dict[str, dict], modules: dict[str, dict], ranks: dict[str, int], dtype
) -> tuple[dict[str, torch.Tensor], int]:
    """One adapter's PEFT state dict with its residuals: an add residual's factors appended to the
    module's, an exact one's in their place; then every module zero-padded by the same extra rank
    (the largest a module needs), so the adapter keeps one rank pattern. Returns it and the extra."""
    factors = {}
    for module, entry in modules.items():
        key_a, key_b = peft_format.weight_key(module, "A"), peft_format.weight_key(module, "B")
        shared = (weights[key_a], weights[key_b])
        row = rows.get(module)
        if row is None:
            factors[module] = shared
            continue
        a, b = residual_factors(row, entry["a_shape"], entry["b_shape"])
        factors[module] = with_residual(shared, row["kind"], a.to(dtype), b.to(dtype))
    extra = max([0, *(factors[m][0].shape[0] - ranks[m] for m in modules)])
    padded = {}
    for module, (a, b) in factors.items():
        a, b = pad_rank(a[None], b[None], ranks[module] + extra)
        padded[peft_format.weight_key(module, "A")] = a[0].contiguous()
        padded[peft_format.weight_key(module, "B")] = b[0].contiguous()
    return padded, extra


def widened_config(config: dict, modules: list[str], extra: int) -> dict:
    """An adapter's config for its factors widened by `extra` ranks: r and every rank_pattern
    value grow by it, and lora_alpha and alpha_pattern with them so that each module's scaling
    (alpha / r, alpha / sqrt(r) with use_rslora) is unchanged. An adapter with patterns gets one
    entry per module (its rank and alpha differ from module to module)."""
    rslora = bool(config.get("use_rslora"))
    alpha = config.get("lora_alpha", 8)

    def widened(value: float, rank: int) -> float:
        grown = (rank + extra) / rank
        return value * (math.sqrt(grown) if rslora else grown)

    out = {**config, "r": config["r"] + extra, "lora_alpha": widened(alpha, config["r"])}
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        ranks = {m: peft_format.module_rank(config, m) for m in modules}
        alphas = {m: peft_format.pattern_value(config.get("alpha_pattern") or {}, m, alpha) for m in modules}
        out["rank_pattern"] = {re.escape(m): ranks[m] + extra for m in modules}
        out["alpha_pattern"] = {re.escape(m): widened(alphas[m], ranks[m]) for m in modules}
    return out


def write_peft_folder(out: Location, weights: dict[str, torch.Tensor], config_text: str) -> None:
    """Weights first, config last: a folder with a config always has its weights complete."""
    out.write_atomic(encode_safetensors(weights, metadata={"format": "pt"}), peft_format.WEIGHTS_FILE)
    out.write_atomic(config_text.encode(), peft_format.CONFIG_FILE)
