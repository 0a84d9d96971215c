"""Adapters written by peft on a tiny random model come back from the store loadable by peft,
with the same outputs."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import run_cli

N_ADAPTERS = 5


def _base_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def peft_collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    for index in range(N_ADAPTERS):
        torch.manual_seed(100 + index)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(_base_model(), config).save_pretrained(root / f"task-{index}")
    return root


def test_exported_adapters_load_in_peft_and_match_the_originals(runner, peft_collection, tmp_path):
    assert run_cli("compress", peft_collection, "--out", tmp_path / "store", "--components", N_ADAPTERS) == 0
    assert run_cli("export", tmp_path / "store", "--all", "--out", tmp_path / "exported") == 0
    inputs = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for index in range(N_ADAPTERS):
        name = f"task-{index}"
        model = PeftModel.from_pretrained(_base_model(), peft_collection / name, adapter_name="original")
        result = model.load_adapter(tmp_path / "exported" / name, adapter_name="exported")
        assert not result.unexpected_keys
        assert not [k for k in result.missing_keys if "lora_" in k and ".exported." in k]
        with torch.no_grad():
            model.set_adapter("original")
            expected = model(inputs).logits
            model.set_adapter("exported")
            actual = model(inputs).logits
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
        assert model.peft_config["exported"].r == 4 and model.peft_config["exported"].lora_alpha == 8
