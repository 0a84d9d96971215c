"""Export: rebuild adapters from the store as PEFT folders that peft, vLLM, LoRAX and TGI load.

Reads the version's basis objects once per batch and only the batch's rows of the loadings and
catalog tables. Each adapter keeps its original config file and dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import save as save_safetensors

from pipeline import peft_format
from pipeline.errors import PipelineError
from pipeline.io.location import Location
from pipeline.io.safetensors_ranges import DTYPES
from pipeline.io.store import CATALOG, LOADINGS, Store, basis_key
from pipeline.linalg.decompose import reconstruct


@dataclass
class ExportTask:
    store: Location
    version: str
    task_ids: list[str]
    outs: list[Location]


def export_batch(task: ExportTask) -> list[str]:
    """Write each adapter of the batch to its folder; returns the folders written."""
    store = Store(task.store)
    manifest = store.manifest(task.version)
    catalog = {row["task_id"]: row for row in store.read_table(task.version, CATALOG, task.task_ids).to_pylist()}
    for task_id in task.task_ids:
        row = catalog.get(task_id)
        if row is None:
            raise PipelineError(f"no adapter {task_id!r} in {store} version {task.version}")
        if row["status"] != "ok":
            raise PipelineError(f"adapter {task_id!r} was quarantined, not compressed: {row['reason']}")
    rows = store.read_table(task.version, LOADINGS, task.task_ids, columns=["task_id", "module", "a", "b"]).to_pylist()
    loadings: dict[str, dict[str, tuple[list, list]]] = {}
    for row in rows:
        loadings.setdefault(row["task_id"], {})[row["module"]] = (row["a"], row["b"])
    basis: dict[str, torch.Tensor] = {}
    for path in sorted({entry["basis"] for entry in manifest["modules"].values()}):
        basis.update(store.read_basis(path, manifest["files"][path]))
    written = []
    for task_id, out in zip(task.task_ids, task.outs):
        weights = rebuild(manifest["modules"], basis, loadings[task_id], DTYPES[catalog[task_id]["dtype"]])
        config = catalog[task_id]["config_json"] or json.dumps(
            peft_format.minimal_config({m: e["a_shape"][0] for m, e in manifest["modules"].items()}, manifest.get("base_model")),
            indent=2,
        )
        write_peft_folder(out, weights, config)
        written.append(str(out))
    return written


def rebuild(
    modules: dict[str, dict], basis: dict[str, torch.Tensor], loadings: dict[str, tuple[list, list]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """PEFT state dict of one adapter from its loadings: lora_A (r, d_in), lora_B (d_out, r)."""
    weights = {}
    for module, entry in modules.items():
        for side, values, shape in (("A", loadings[module][0], entry["a_shape"]), ("B", loadings[module][1], entry["b_shape"])):
            flat = reconstruct(
                torch.tensor(values, dtype=torch.float32),
                basis[basis_key(module, side, "components")],
                basis[basis_key(module, side, "mean")],
            )
            weights[peft_format.weight_key(module, side)] = flat.reshape(shape).to(dtype)
    return weights


def write_peft_folder(out: Location, weights: dict[str, torch.Tensor], config_text: str) -> None:
    """Weights first, config last: a folder with a config always has its weights complete."""
    out.write_atomic(save_safetensors(weights, metadata={"format": "pt"}), peft_format.WEIGHTS_FILE)
    out.write_atomic(config_text.encode(), peft_format.CONFIG_FILE)
