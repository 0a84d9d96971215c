"""The delta-W error a version records for an adapter is that of what `export` writes: the
rebuilt factors cut to the adapter's own rank and cast to its dtype. Checked by exporting and
comparing the exported delta W with the original's, per adapter and module."""

import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_collection, mixed_ranks, run_cli
from safetensors.torch import load_file

from pipeline import peft_format

# |recorded - exported| allowed, in units of relative delta-W error: compute and export rebuild
# the same float32 values, but a batched product may round differently from a single one, and a
# last-bit difference can move one entry to the neighbouring bf16/fp16 value.
TOLERANCE = 1e-5


def _delta(tensors, module):
    a = tensors[peft_format.weight_key(module, "A")].to(torch.float64)
    b = tensors[peft_format.weight_key(module, "B")].to(torch.float64)
    return b @ a


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(
    "method",
    [["--components", "3"], ["--components", "64"], ["--method", "joint", "--components", "12"]],
    ids=["flat-k3", "flat-full", "joint"],
)
def test_recorded_error_is_the_exported_error(runner, tmp_path, dtype, method):
    src = tmp_path / "src"
    ids = make_collection(src, 9, shared_dim=3, noise=0.2)
    mixed_ranks(src, ids, dtype)
    assert run_cli("compress", src, "--out", tmp_path / "store", *method) == 0
    assert run_cli("export", tmp_path / "store", "--all", "--out", tmp_path / "out") == 0
    rows = pq.read_table(
        tmp_path / "store/versions/v000001/loadings.parquet", columns=["task_id", "module", "error"]
    ).to_pylist()
    gaps = []
    for row in rows:
        original = load_file(str(src / row["task_id"] / peft_format.WEIGHTS_FILE))
        exported = load_file(str(tmp_path / "out" / row["task_id"] / peft_format.WEIGHTS_FILE))
        assert exported[peft_format.weight_key(row["module"], "A")].dtype == dtype
        delta = _delta(original, row["module"])
        error = float(torch.linalg.norm(_delta(exported, row["module"]) - delta) / torch.linalg.norm(delta))
        gaps.append((abs(error - row["error"]), row["task_id"], row["module"], error, row["error"]))
    worst = max(gaps)
    assert worst[0] <= TOLERANCE, worst
    if method[1] == "64":
        # Every adapter lies in the basis: what export writes of one at the collection's rank is
        # the original, and so records 0. One cut to a lower rank is written in its balanced
        # factors, which a float32 file holds exactly and bf16/fp16 round (recorded as such).
        full = [g for g in gaps if ids.index(g[1]) % 3]
        assert max(g[3] for g in full) < 1e-5 and max(g[4] for g in full) < 1e-5
        if dtype == torch.float32:
            assert max(g[4] for g in gaps) < 1e-5
