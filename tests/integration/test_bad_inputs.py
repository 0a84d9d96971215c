"""Every kind of bad adapter is quarantined with its reason; the good ones still compress."""

import json
import shutil
import struct

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_collection, run_cli
from pipeline.io.location import Location
from pipeline.io.store import Store

GOOD = 6


def _weights(folder):
    return folder / "adapter_model.safetensors"


def _config(folder):
    return folder / "adapter_config.json"


def _variant(src, root, name, edit):
    target = root / name
    shutil.copytree(src, target)
    edit(target)


def _rewrite(folder, change):
    tensors = load_file(str(_weights(folder)))
    save_file(change(tensors), str(_weights(folder)))


def _set_config(folder, **fields):
    config = json.loads(_config(folder).read_text())
    config.update(fields)
    _config(folder).write_text(json.dumps(config))


def _nan(tensors):
    key = sorted(tensors)[5]
    tensors[key][0, 0] = float("nan")
    return tensors


def _rank4(tensors):
    return {k: (v[:4] if ".lora_A." in k else v[:, :4]).contiguous() for k, v in tensors.items()}


def _drop_module(tensors):
    return {k: v for k, v in tensors.items() if "layers.3.self_attn.v_proj" not in k}


def _bin_only(folder):
    _weights(folder).unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04\x95 not loaded, ever")


def _header_json_broken(folder):
    data = bytearray(_weights(folder).read_bytes())
    data[8] = ord("[")
    data[9] = ord("!")
    _weights(folder).write_bytes(bytes(data))


def _offsets_past_end(folder):
    data = _weights(folder).read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    _weights(folder).write_bytes(data[: 8 + length + 100])


BAD = {
    "no-weights": (lambda f: _weights(f).unlink(), "missing adapter_model.safetensors"),
    "pickled-bin": (_bin_only, "adapter_model.bin is a pickle and is never loaded"),
    "truncated": (lambda f: _weights(f).write_bytes(_weights(f).read_bytes()[:5]), "truncated"),
    "bad-header-json": (_header_json_broken, "not valid JSON"),
    "offsets-past-end": (_offsets_past_end, "lie outside the file"),
    "has-nan": (lambda f: _rewrite(f, _nan), "NaN or Inf in model.layers.1.self_attn.q_proj lora_B"),
    "config-contradicts": (lambda f: _set_config(f, r=4), "has rank 8 but the config says r=4"),
    "other-rank": (lambda f: (_rewrite(f, _rank4), _set_config(f, r=4)), "rank 4 differs from the collection's rank 8"),
    "fewer-modules": (lambda f: _rewrite(f, _drop_module), "module set differs from the collection's; missing 1"),
    "other-base": (lambda f: _set_config(f, base_model_name_or_path="someone/else"), "base model 'someone/else' differs"),
    "wrong-type": (lambda f: _set_config(f, lora_alpha="sixteen"), "config field 'lora_alpha' has type str"),
}
WARNED = {
    "no-config": lambda f: _config(f).unlink(),
    "broken-config": lambda f: _config(f).write_text("{not json"),
}


def _collection(tmp_path):
    src = tmp_path / "src"
    make_collection(src, GOOD)
    template = src / "adapter-00000"
    for name, (edit, _) in BAD.items():
        _variant(template, src, name, edit)
    for name, edit in WARNED.items():
        _variant(template, src, name, edit)
    return src


def test_each_bad_adapter_gets_its_reason_and_the_rest_compress(runner, tmp_path, capsys):
    src = _collection(tmp_path)
    assert run_cli("compress", src, "--out", tmp_path / "store", "--components", 4) == 0
    summary = capsys.readouterr().out
    store = Store(Location(str(tmp_path / "store")))
    catalog = {r["task_id"]: r for r in pq.read_table(tmp_path / "store/versions/v000001/catalog.parquet").to_pylist()}
    for name, (_, reason) in BAD.items():
        assert catalog[name]["status"] == "quarantined", name
        assert reason in catalog[name]["reason"], (name, catalog[name]["reason"])
        assert f"quarantined {name}: " in summary
    for name in WARNED:
        assert catalog[name]["status"] == "ok" and "rank read off the shapes" in catalog[name]["warnings"][0]
    assert store.manifest()["adapters"] == {"ok": GOOD + len(WARNED), "quarantined": len(BAD), "in_basis": GOOD + len(WARNED)}
    # The quarantined NaN adapter never reached a basis: every stored tensor is finite.
    for path in {e["basis"] for e in store.manifest()["modules"].values()}:
        assert all(torch.isfinite(t).all() for t in store.read_basis(path).values())
    # An adapter without a config exports with a usable minimal one.
    assert run_cli("export", tmp_path / "store", "no-config", "--out", tmp_path / "nc") == 0
    config = json.loads((tmp_path / "nc" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"


@pytest.mark.parametrize(
    "bad, message",
    [
        ("truncated", "--strict: 1 adapter(s) quarantined, first 'truncated'"),  # found by the scan
        ("has-nan", "--strict: adapter 'has-nan' quarantined: NaN or Inf"),  # found during compute
    ],
)
def test_strict_makes_any_quarantine_fatal_and_publishes_nothing(runner, tmp_path, capsys, bad, message):
    src = tmp_path / "src"
    make_collection(src, 3)
    _variant(src / "adapter-00000", src, bad, BAD[bad][0])
    assert run_cli("compress", src, "--out", tmp_path / "store", "--strict") == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "store" / "LATEST").exists()
    assert not list((tmp_path / "store").glob("versions/*"))


def test_duplicate_task_ids_from_a_manifest(runner, tmp_path):
    for part in ("p1", "p2"):
        make_collection(tmp_path / part, 3, seed=len(part))
    listing = tmp_path / "lists" / "adapters.txt"
    listing.parent.mkdir()
    uris = [tmp_path / p / f"adapter-0000{i}" for p in ("p1", "p2") for i in range(3)]
    listing.write_text("# nightly list\n" + "\n".join(str(u) for u in uris) + "\n")
    assert run_cli("compress", listing, "--out", tmp_path / "store", "--components", 2) == 0
    catalog = pq.read_table(tmp_path / "store/versions/v000001/catalog.parquet").to_pylist()
    duplicates = [r for r in catalog if r["status"] == "quarantined"]
    assert len(duplicates) == 3 and all(r["reason"].startswith("duplicate task id (also at ") for r in duplicates)


def test_all_quarantined_is_a_clear_error(runner, tmp_path, capsys):
    src = tmp_path / "src"
    make_collection(src, 1)
    BAD["truncated"][0](src / "adapter-00000")
    assert run_cli("compress", src, "--out", tmp_path / "store") == 1
    assert "no usable adapters: all 1 quarantined" in capsys.readouterr().err
