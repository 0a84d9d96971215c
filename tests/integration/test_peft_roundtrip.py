"""Adapters written by peft on a tiny random model come back from the store loadable by peft,
with the same outputs."""

from conftest import PEFT_ADAPTERS, assert_same_outputs, run_cli


def test_exported_adapters_load_in_peft_and_match_the_originals(runner, peft_collection, tmp_path):
    assert run_cli("compress", peft_collection, "--out", tmp_path / "store", "--components", PEFT_ADAPTERS) == 0
    assert run_cli("export", tmp_path / "store", "--all", "--out", tmp_path / "exported") == 0
    assert_same_outputs(peft_collection, tmp_path / "exported")
