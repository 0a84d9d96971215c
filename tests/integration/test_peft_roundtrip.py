"""Adapters written by peft on a tiny random model come back from the store loadable by peft,
with the same outputs."""

import torch
from conftest import PEFT_ADAPTERS, assert_same_outputs, make_collection, run_cli
from safetensors.torch import load_file

from pipeline.peft_format import WEIGHTS_FILE


def test_exported_adapters_load_in_peft_and_match_the_originals(runner, peft_collection, tmp_path):
    assert run_cli("compress", peft_collection, "--out", tmp_path / "store", "--components", PEFT_ADAPTERS) == 0
    assert run_cli("export", tmp_path / "store", "--all", "--out", tmp_path / "exported") == 0
    assert_same_outputs(peft_collection, tmp_path / "exported")


def test_an_adapter_exports_to_the_same_bytes_alone_or_with_others(runner, tmp_path):
    """export --all rebuilds adapters a slice at a time (one product per module side, one cast
    where their dtypes agree): what it writes for an adapter must not depend on the others in its
    slice. Here slices mix bf16 and float32 adapters."""
    make_collection(tmp_path / "src", 20, dtype=torch.bfloat16)
    make_collection(tmp_path / "src", 20, dtype=torch.float32, prefix="fp32", start=20)
    assert run_cli("compress", tmp_path / "src", "--out", tmp_path / "store", "--components", "4") == 0
    assert run_cli("export", tmp_path / "store", "--all", "--out", tmp_path / "all") == 0
    for task_id in ("adapter-00003", "adapter-00019", "fp32-00020", "fp32-00039"):
        assert run_cli("export", tmp_path / "store", task_id, "--out", tmp_path / "one" / task_id) == 0
        alone, batched = (tmp_path / kind / task_id / WEIGHTS_FILE for kind in ("one", "all"))
        assert alone.read_bytes() == batched.read_bytes(), task_id
    assert (
        load_file(tmp_path / "all" / "fp32-00020" / WEIGHTS_FILE)[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        ].dtype
        == torch.float32
    )
