"""Reconstructions equal vlora-dev 0.2.0's SharedSubspace.from_adapters on the same adapters."""

import pytest
import torch
from conftest import MINILM, make_collection, run_cli
from safetensors.torch import load_file
from vlora.io import load_adapter
from vlora.subspace import SharedSubspace

from pipeline import peft_format


def _vlora_reconstructions(folders, **kwargs):
    adapters = [load_adapter(f) for f in folders]
    subspace = SharedSubspace.from_adapters(adapters, task_ids=[f.name for f in folders], **kwargs)
    return {f.name: subspace.reconstruct(f.name) for f in folders}


def _assert_parity(folders, store, out, expected):
    for folder in folders:
        assert run_cli("export", store, folder.name, "--out", out / folder.name) == 0
        ours = load_file(str(out / folder.name / "adapter_model.safetensors"))
        theirs = expected[folder.name]
        for module in theirs.layer_names:
            for side, reference in (("A", theirs.lora_a[module]), ("B", theirs.lora_b[module])):
                mine = ours[peft_format.weight_key(module, side)].float()
                error = torch.linalg.norm(mine - reference) / torch.linalg.norm(reference)
                assert error < 1e-4, (folder.name, module, side, float(error))


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (["--components", "3"], {"num_components": 3}),
        ([], {}),  # default: variance threshold 0.6, one k for all modules
        (["--variance-threshold", "0.8", "--adaptive"], {"variance_threshold": 0.8, "adaptive_k": True}),
    ],
)
def test_synthetic_collection(runner, tmp_path, ours, theirs):
    make_collection(tmp_path / "src", 24, shared_dim=5)
    folders = sorted((tmp_path / "src").iterdir())
    assert run_cli("compress", "--max-error", "none", tmp_path / "src", "--out", tmp_path / "store", *ours) == 0
    _assert_parity(folders, tmp_path / "store", tmp_path / "out", _vlora_reconstructions(folders, **theirs))


def test_real_peft_adapters(runner, tmp_path):
    folders = sorted(p for p in MINILM.iterdir() if p.is_dir())
    assert run_cli("compress", "--max-error", "none", MINILM, "--out", tmp_path / "store", "--components", 2) == 0
    _assert_parity(folders, tmp_path / "store", tmp_path / "out", _vlora_reconstructions(folders, num_components=2))
