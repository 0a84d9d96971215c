"""--max-error: every module of every stored adapter, as `export` writes it, is within the bound;
where the shared bases miss it, the adapter's module has a residual in residuals.parquet.
Measured on the exported files against the original adapters' files."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_collection, run_cli
from safetensors.torch import load_file, save_file

from pipeline import peft_format

BOUND = 0.05
LOW = 4  # the rank of every third adapter (the others have the collection's 8)


def _mixed_ranks(src, ids, dtype):
    for index, task_id in enumerate(ids):
        folder = src / task_id
        tensors = load_file(str(folder / peft_format.WEIGHTS_FILE))
        if index % 3 == 0:
            tensors = {k: (v[:LOW] if ".lora_A." in k else v[:, :LOW]) for k, v in tensors.items()}
            config = json.loads((folder / peft_format.CONFIG_FILE).read_text())
            (folder / peft_format.CONFIG_FILE).write_text(json.dumps({**config, "r": LOW}))
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / peft_format.WEIGHTS_FILE))


def _delta(folder, module):
    tensors = load_file(str(folder / peft_format.WEIGHTS_FILE))
    config = json.loads((folder / peft_format.CONFIG_FILE).read_text())
    a = tensors[peft_format.weight_key(module, "A")].to(torch.float64)
    b = tensors[peft_format.weight_key(module, "B")].to(torch.float64)
    rank = peft_format.module_rank(config, module)
    assert a.shape[0] == rank == b.shape[1]
    alpha = peft_format.pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return (alpha / (rank**0.5 if config.get("use_rslora") else rank)) * (b @ a)


def exported_errors(src, out, ids, modules) -> dict[tuple[str, str], float]:
    """(task id, module) -> relative error of the exported (scaled) delta W against the original."""
    errors = {}
    for task_id in ids:
        for module in modules:
            original = _delta(src / task_id, module)
            exported = _delta(out / task_id, module)
            errors[task_id, module] = float(torch.linalg.norm(exported - original) / torch.linalg.norm(original))
    return errors


def _modules(folder):
    return sorted({peft_format.parse_key(k)[0] for k in load_file(str(folder / peft_format.WEIGHTS_FILE))})


def _residual_rows(store, version):
    path = store / "versions" / version / "residuals.parquet"
    return pq.read_table(path).to_pylist() if path.exists() else []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(
    "method",
    [["--components", "3"], ["--method", "joint", "--components", "12"], ["--method", "aligned", "--components", "3"]],
    ids=["flat", "joint", "aligned"],
)
def test_compress_bound_holds_on_exported_files(runner, tmp_path, dtype, method):
    src, store, out = tmp_path / "src", tmp_path / "store", tmp_path / "out"
    ids = make_collection(src, 9, shared_dim=3, noise=0.2, structure="gauge")
    _mixed_ranks(src, ids, dtype)
    assert run_cli("compress", src, "--out", store, "--max-error", BOUND, *method) == 0
    assert run_cli("verify", store) == 0
    assert run_cli("export", store, "--all", "--out", out) == 0
    errors = exported_errors(src, out, ids, _modules(src / ids[0]))
    assert max(errors.values()) <= BOUND, max(errors.items(), key=lambda e: e[1])
    rows = _residual_rows(store, "v000001")
    assert rows, "the collection was meant to need residuals"
    # Without the bound, the same compress misses it on exactly the modules given residuals.
    assert run_cli("compress", src, "--out", tmp_path / "plain", *method) == 0
    assert run_cli("export", tmp_path / "plain", "--all", "--out", tmp_path / "plain-out") == 0
    plain = exported_errors(src, tmp_path / "plain-out", ids, _modules(src / ids[0]))
    assert {(r["task_id"], r["module"]) for r in rows} == {k for k, e in plain.items() if e > BOUND * (1 - 1e-3)}
    manifest = json.loads((store / "versions/v000001/manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["parameters"]["max_error"] == BOUND
    assert manifest["residuals"]["modules"] == len(rows)
    assert json.loads((store / "LATEST").read_text())["format_version"] == 2
