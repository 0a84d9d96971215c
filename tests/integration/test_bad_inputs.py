"""Every kind of bad adapter is quarantined with its reason; the good ones still compress."""

import json
import shutil
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_collection, run_cli
from safetensors.torch import load_file, save_file

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


def _narrower(tensors):
    """One module's lora_A loses an input column: d_in differs (a pair still, rank unchanged)."""
    key = sorted(k for k in tensors if ".lora_A." in k)[0]
    tensors[key] = tensors[key][:, :-1].contiguous()
    return tensors


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


def _edit_header(change):
    def edit(folder):
        data = _weights(folder).read_bytes()
        length = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + length])
        change(header, sorted(k for k in header if k != "__metadata__"))
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        _weights(folder).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])

    return edit


def _overlap(header, keys):
    header[keys[1]]["data_offsets"] = header[keys[0]]["data_offsets"]


def _huge_shape(header, keys):
    header[keys[0]]["shape"] = [2**40, 2**20]  # 4 EiB declared: checked against the offsets, never allocated


def _zero_rank(tensors):
    key = sorted(k for k in tensors if ".lora_A." in k)[0]
    tensors[key] = torch.zeros(0, tensors[key].shape[1])
    return tensors


def _key_traversal(tensors):
    key = sorted(tensors)[0]
    tensors[key.replace("model.layers.0", "../../../etc")] = tensors.pop(key)
    return tensors


def _deep_header(folder):
    """A header whose metadata nests 100,000 arrays: json raises RecursionError on it."""
    data = _weights(folder).read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    body = json.dumps({k: v for k, v in header.items() if k != "__metadata__"})[1:-1]
    raw = ('{"__metadata__": ' + "[" * 100_000 + "]" * 100_000 + ", " + body + "}").encode()
    raw += b" " * (-len(raw) % 8)
    _weights(folder).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def _huge_config(folder):
    """A 4 GiB config (sparse: nothing is written): read no further than a config may go."""
    with open(_config(folder), "r+b") as handle:
        handle.truncate(4 << 30)


def _many_patterns(folder):
    _set_config(folder, rank_pattern={f"layers\\.{i}\\.mlp": 8 for i in range(5000)})


HOSTILE = {
    "deep-config": (
        lambda f: _config(f).write_text("[" * 100_000 + "]" * 100_000),
        "adapter_config.json is JSON nested too deeply",
    ),
    "deeper-than-16": (
        lambda f: _set_config(f, extra=json.loads("[" * 500 + "]" * 500)),
        "nested 501 levels deep (at most 16)",
    ),
    "deep-header": (_deep_header, "safetensors header is JSON nested too deeply"),
    "huge-config": (_huge_config, "adapter_config.json is larger than 262144 bytes"),
    "padded-config": (
        lambda f: _config(f).write_text(_config(f).read_text() + " " * 300_000),
        "is larger than 262144 bytes",
    ),
    "many-patterns": (_many_patterns, "config rank_pattern has 5000 entries (at most 1024)"),
    "many-targets": (
        lambda f: _set_config(f, target_modules=[f"m{i}" for i in range(10_000)]),
        "target_modules lists 10000 modules",
    ),
    "absurd-alpha": (
        lambda f: _config(f).write_text(_config(f).read_text().replace('"lora_alpha": 16', '"lora_alpha": 1e999')),
        "config lora_alpha=inf is not a finite number",
    ),
    "absurd-rank": (lambda f: _set_config(f, r=10**30), "is not a positive rank (at most 65536)"),
    "bad-pattern": (
        lambda f: _set_config(f, rank_pattern={"(": 8}),
        "rank_pattern key '(' is not a valid regular expression",
    ),
    "pattern-value": (
        lambda f: _set_config(f, rank_pattern={"q_proj": [8]}),
        "rank_pattern['q_proj'] = [8] is not a rank",
    ),
}

EVERY_FIELD_WRONG = {
    "r": "8",
    "lora_alpha": [16],
    "use_rslora": "yes",
    "rank_pattern": [],
    "alpha_pattern": 1,
    "target_modules": 5,
    "base_model_name_or_path": 7,
}

BAD = {
    "no-weights": (lambda f: _weights(f).unlink(), "missing adapter_model.safetensors"),
    "pickled-bin": (_bin_only, "adapter_model.bin is a pickle and is never loaded"),
    "truncated": (lambda f: _weights(f).write_bytes(_weights(f).read_bytes()[:5]), "truncated"),
    "bad-header-json": (_header_json_broken, "not valid JSON"),
    "offsets-past-end": (_offsets_past_end, "lie outside the file"),
    "has-nan": (lambda f: _rewrite(f, _nan), "NaN or Inf in model.layers.1.self_attn.q_proj lora_B"),
    "config-contradicts": (lambda f: _set_config(f, r=4), "has rank 8 but the config says r=4"),
    "other-width": (lambda f: _rewrite(f, _narrower), "d_in x d_out 255 x 256 differs from the collection's 256 x 256"),
    "fewer-modules": (lambda f: _rewrite(f, _drop_module), "module set differs from the collection's; missing 1"),
    "other-base": (
        lambda f: _set_config(f, base_model_name_or_path="someone/else"),
        "base model 'someone/else' differs",
    ),
    "wrong-type": (lambda f: _set_config(f, lora_alpha="sixteen"), "config field 'lora_alpha' has type str"),
    "every-field-wrong": (lambda f: _set_config(f, **EVERY_FIELD_WRONG), "config field 'r' has type str, expected int"),
    "header-too-long": (
        lambda f: _weights(f).write_bytes(struct.pack("<Q", 10**12) + _weights(f).read_bytes()[8:]),
        "header length 1000000000000 does not fit",
    ),
    "overlapping": (_edit_header(_overlap), "overlap in the safetensors file"),
    "unknown-dtype": (_edit_header(lambda h, k: h[k[0]].update(dtype="I4")), "unsupported dtype 'I4'"),
    "huge-shape": (_edit_header(_huge_shape), "needs 4611686018427387904 bytes, offsets span 8192"),
    "zero-rank": (lambda f: _rewrite(f, _zero_rank), "do not form a LoRA pair"),
    "wrong-key-names": (
        lambda f: _rewrite(f, lambda t: {k.replace("lora_A", "lora_down"): v for k, v in t.items()}),
        "tensors that are not LoRA factors",
    ),
    "key-traversal": (
        lambda f: _rewrite(f, _key_traversal),
        "module name '../../../etc.self_attn.q_proj' holds '/', which no PEFT module path does",
    ),
    "odd name;rm -rf": (lambda f: None, "is not a safe relative path"),
    **HOSTILE,
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


@pytest.mark.parametrize("chunks", [[], ["--chunk-size", 3]], ids=["whole", "chunked"])
def test_each_bad_adapter_gets_its_reason_and_the_rest_compress(runner, tmp_path, capsys, chunks):
    src = _collection(tmp_path)
    assert run_cli("compress", src, "--out", tmp_path / "store", "--components", 4, *chunks) == 0
    summary = capsys.readouterr().out
    store = Store(Location(str(tmp_path / "store")))
    catalog = {r["task_id"]: r for r in pq.read_table(tmp_path / "store/versions/v000001/catalog.parquet").to_pylist()}
    for name, (_, reason) in BAD.items():
        assert catalog[name]["status"] == "quarantined", name
        assert reason in catalog[name]["reason"], (name, catalog[name]["reason"])
        assert f"quarantined {name}: " in summary
    for name in WARNED:
        assert catalog[name]["status"] == "ok" and "rank read off the shapes" in catalog[name]["warnings"][0]
    assert store.manifest()["adapters"] == {
        "ok": GOOD + len(WARNED),
        "quarantined": len(BAD),
        "in_basis": GOOD + len(WARNED),
    }
    # The quarantined NaN adapter never reached a basis: every stored tensor is finite.
    for path in {e["basis"] for e in store.manifest()["modules"].values()}:
        assert all(torch.isfinite(t).all() for t in store.read_basis(path).values())
    # Nothing was written outside the store: the source folder is as it was, the test folder
    # holds only the source and the store.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "store"]
    assert not list(tmp_path.parent.glob("etc"))
    # An adapter without a config exports with a usable minimal one.
    assert run_cli("export", tmp_path / "store", "no-config", "--out", tmp_path / "nc") == 0
    config = json.loads((tmp_path / "nc" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"


def test_a_store_with_quarantined_uploads_is_up_to_date_with_them(runner, tmp_path, capsys):
    """An upload quarantined when scanned (its header unreadable) is not taken for a replaced one
    by the next re-base: with nothing new, no version is written."""
    src = tmp_path / "src"
    make_collection(src, 4)
    _variant(src / "adapter-00000", src, "truncated", BAD["truncated"][0])
    assert run_cli("compress", src, "--out", tmp_path / "store", "--components", 2) == 0
    capsys.readouterr()
    assert run_cli("rebase", tmp_path / "store", src, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["versions"] == [] and result["diff"]["replaced"] == [], result


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


def test_task_ids_that_try_to_escape_are_quarantined_and_nothing_lands_outside(runner, tmp_path):
    ids = make_collection(tmp_path / "src", 4)
    hostile = ["../../outside", "/etc/passwd-lookalike", "ok/../../up", "fine-one"]
    table = pa.table({"uri": [str(tmp_path / "src" / i) for i in ids], "task_id": hostile})
    pq.write_table(table, tmp_path / "list.parquet")
    assert run_cli("compress", tmp_path / "list.parquet", "--out", tmp_path / "store", "--components", 2) == 0
    catalog = {r["task_id"]: r for r in pq.read_table(tmp_path / "store/versions/v000001/catalog.parquet").to_pylist()}
    for task_id in hostile[:3]:
        assert (
            catalog[task_id]["status"] == "quarantined" and "is not a safe relative path" in catalog[task_id]["reason"]
        )
    assert run_cli("export", tmp_path / "store", "--all", "--out", tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fine-one"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.parquet", "out", "src", "store"]


def test_hostile_uploads_are_quarantined_by_a_rebase_too(runner, tmp_path, capsys):
    """The nightly re-base: uploads of every hostile kind arrive; it publishes with them
    quarantined and prints its result."""
    src = tmp_path / "src"
    make_collection(src, GOOD)
    assert run_cli("compress", src, "--out", tmp_path / "store", "--components", 4) == 0
    for name, (edit, _) in HOSTILE.items():
        _variant(src / "adapter-00000", src, name, edit)
    capsys.readouterr()
    assert run_cli("rebase", tmp_path / "store", src, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    (version,) = result["versions"]
    assert set(version["quarantined"]) == set(HOSTILE)
    for name, (_, reason) in HOSTILE.items():
        assert reason in version["quarantined"][name], (name, version["quarantined"][name])
    assert Store(Location(str(tmp_path / "store"))).manifest()["adapters"]["ok"] == GOOD


def test_links_out_of_the_source_and_control_characters_in_names(runner, tmp_path, capsys, caplog):
    src, outside = tmp_path / "src", tmp_path / "outside"
    make_collection(src, 3)
    make_collection(outside, 1, seed=7)
    linked = src / "linked"
    linked.mkdir()
    shutil.copy(_config(src / "adapter-00000"), _config(linked))
    _weights(linked).symlink_to(_weights(outside / "adapter-00000"))
    inside = src / "linked-inside"  # a link that stays in the source is followed
    inside.mkdir()
    shutil.copy(_config(src / "adapter-00001"), _config(inside))
    _weights(inside).symlink_to(_weights(src / "adapter-00001"))
    shutil.copytree(src / "adapter-00002", src / "line\nbreak")
    assert run_cli("compress", src, "--out", tmp_path / "store", "--components", 2) == 0
    printed = capsys.readouterr()
    catalog = {r["task_id"]: r for r in pq.read_table(tmp_path / "store/versions/v000001/catalog.parquet").to_pylist()}
    assert catalog["linked"]["status"] == "quarantined"
    assert (
        catalog["linked"]["reason"]
        == "adapter_model.safetensors is a symbolic link that leads outside the source; it is not followed"
    )
    assert catalog["linked-inside"]["status"] == "ok"
    assert catalog["line\nbreak"]["status"] == "quarantined" and "'line\\nbreak'" in catalog["line\nbreak"]["reason"]
    # Every printed and logged line that names it shows the escaped name: none is cut in two.
    lines = (printed.out + printed.err + caplog.text).splitlines()
    assert not [line for line in lines if line.startswith("break")]
    assert any("quarantined line\\nbreak: " in line for line in lines)
