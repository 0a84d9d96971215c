"""The in-process Subspace on the store: save/load (local and S3), the CLI and the library reading
each other's versions, quantized stores, and vlora's folder layout both ways."""

import json

import pytest
import torch
from conftest import PEFT_ADAPTERS, assert_same_outputs, make_collection, run_cli
from safetensors.torch import load_file
from vlora.io import load_adapter
from vlora.subspace import SharedSubspace

from pipeline import peft_format
from pipeline.adapter import Adapter
from pipeline.errors import PipelineError
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.operations.info import describe
from pipeline.subspace import Subspace


def _adapters(root, ids):
    return [Adapter.load(str(root / t)) for t in ids]


def _assert_same(a: Subspace, b: Subspace, tol=1e-6):
    assert a.layer_names == b.layer_names and list(a.tasks) == list(b.tasks)
    for m in a.layer_names:
        for side in ("components_a", "components_b", "means_a", "singular_values_b"):
            torch.testing.assert_close(getattr(a, side)[m], getattr(b, side)[m], atol=tol, rtol=tol)
    for t in a.tasks:
        x, y = a.tasks[t], b.tasks[t]
        for m in a.layer_names:
            torch.testing.assert_close(x.loadings_a[m], y.loadings_a[m], atol=tol, rtol=tol)
            assert x.error[m] == pytest.approx(y.error[m], rel=1e-5, abs=1e-6)
        assert x.catalog["config_json"] == y.catalog["config_json"] and x.catalog["dtype"] == y.catalog["dtype"]


def test_save_and_load_round_trip_and_the_cli_reads_it(runner, tmp_path):
    ids = make_collection(tmp_path / "src", 10, preset="micro")
    sub = Subspace.from_adapters(_adapters(tmp_path / "src", ids[:8]), ids[:8], num_components=3)
    sub.add_task(sub.project(Adapter.load(str(tmp_path / "src" / ids[8])), ids[8]))
    version = sub.save(str(tmp_path / "store"))
    assert version == "v000001" and sub.origin == (str(tmp_path / "store"), "v000001")
    loaded = Subspace.load(str(tmp_path / "store"))
    _assert_same(sub, loaded)
    assert loaded.rule == sub.rule and loaded.tasks[ids[8]].catalog["in_basis"] is False
    assert run_cli("verify", tmp_path / "store") == 0
    info = describe(Store(Location(str(tmp_path / "store"))))
    assert info["adapters"] == {"ok": 9, "quarantined": 0, "in_basis": 8}
    # compression_stats measures exactly what save wrote (metadata up to the manifest's timestamp).
    measured = sub.compression_stats()["stored_bytes"]
    assert {k: v for k, v in measured.items() if k not in ("metadata", "total")} == {
        k: v for k, v in info["stored_bytes"].items() if k not in ("metadata", "total")
    }
    assert abs(measured["metadata"] - info["stored_bytes"]["metadata"]) <= 16
    # The CLI grows a library-saved store; the library opens what the CLI published.
    assert run_cli("rebase", tmp_path / "store", tmp_path / "src") == 0
    grown = Subspace.load(str(tmp_path / "store"))
    assert grown.origin[1] == "v000002" and set(grown.tasks) == set(ids)
    assert all(grown.tasks[t].catalog["in_basis"] for t in ids)


def test_a_cli_compressed_store_is_what_from_adapters_builds(runner, tmp_path):
    ids = make_collection(tmp_path / "src", 12, preset="micro")
    assert (
        run_cli("compress", "--max-error", "none", tmp_path / "src", "--out", tmp_path / "store", "--components", 4)
        == 0
    )
    from_store = Subspace.load(str(tmp_path / "store"))
    in_memory = Subspace.from_adapters(_adapters(tmp_path / "src", ids), ids, num_components=4)
    _assert_same(from_store, in_memory, tol=1e-5)
    for m in in_memory.layer_names:
        assert from_store.modules[m].a.count == 12 and from_store.modules[m].a.total_variance == pytest.approx(
            in_memory.modules[m].a.total_variance
        )


def test_library_saved_adapters_export_loadable_by_peft(runner, peft_collection, tmp_path):
    ids = [f"task-{i}" for i in range(PEFT_ADAPTERS)]
    sub = Subspace.from_adapters([str(peft_collection / t) for t in ids], ids, num_components=PEFT_ADAPTERS)
    sub.save(str(tmp_path / "store"))
    assert run_cli("export", tmp_path / "store", "--all", "--out", tmp_path / "exported") == 0
    assert_same_outputs(peft_collection, tmp_path / "exported")
    sub.reconstruct(ids[0]).save(str(tmp_path / "one"))  # the library writes the same folder
    exported, own = (
        load_file(str(tmp_path / "exported" / ids[0] / peft_format.WEIGHTS_FILE)),
        load_file(str(tmp_path / "one" / peft_format.WEIGHTS_FILE)),
    )
    assert exported.keys() == own.keys() and all(torch.equal(exported[k], own[k]) for k in own)


def test_save_never_overwrites_a_version_it_did_not_start_from(tmp_path):
    ids = make_collection(tmp_path / "src", 6, preset="micro")
    adapters = _adapters(tmp_path / "src", ids)
    first = Subspace.from_adapters(adapters, ids, num_components=2)
    first.save(str(tmp_path / "store"))
    stale = Subspace.load(str(tmp_path / "store"))
    first.absorb_incremental(adapters[0], "again")
    assert first.save(str(tmp_path / "store")) == "v000002"
    with pytest.raises(PipelineError, match="at v000002, which this subspace was not loaded from"):
        stale.save(str(tmp_path / "store"))
    other = Subspace.from_adapters(adapters[:3], ids[:3], num_components=1)
    with pytest.raises(PipelineError, match="replace=True"):
        other.save(str(tmp_path / "store"))
    assert other.save(str(tmp_path / "store"), replace=True) == "v000003"
    assert Store(Location(str(tmp_path / "store"))).current_version() == "v000003"
    assert run_cli("rollback", tmp_path / "store", "v000002") == 0


@pytest.mark.s3
def test_save_load_and_quantize_on_s3(runner, s3_endpoint, bucket, tmp_path):
    ids = make_collection(tmp_path / "src", 8, preset="micro")
    sub = Subspace.from_adapters(_adapters(tmp_path / "src", ids), ids, num_components=3)
    uri = f"s3://{bucket}/store"
    sub.save(uri, endpoint_url=s3_endpoint)
    _assert_same(sub, Subspace.load(uri, endpoint_url=s3_endpoint))
    assert run_cli("quantize", uri, "--bits", "8", "--endpoint-url", s3_endpoint) == 0
    loaded = Subspace.load(uri, endpoint_url=s3_endpoint)
    assert loaded.quantization["scheme"] == "int8" and loaded.origin[1] == "v000002"
    assert run_cli("verify", uri, "--all", "--endpoint-url", s3_endpoint) == 0


def test_quantized_stores_are_smaller_and_read_back_as_stored(runner, tmp_path, capsys):
    ids = make_collection(tmp_path / "src", 12, preset="tiny")
    assert (
        run_cli("compress", "--max-error", "none", tmp_path / "src", "--out", tmp_path / "store", "--components", 6)
        == 0
    )
    store = Store(Location(str(tmp_path / "store")))
    float_info = describe(store)
    capsys.readouterr()
    assert run_cli("quantize", tmp_path / "store", "--bits", "4") == 0
    assert "nf4" in capsys.readouterr().out
    nf4 = describe(store)
    # Measured from the basis objects' headers: the packed components are 7.5x smaller.
    assert float_info["stored_bytes"]["components"] == nf4["stored_bytes"]["float32_components"]
    assert nf4["stored_bytes"]["float32_components"] / nf4["stored_bytes"]["components"] > 7.0
    assert nf4["store_bytes"] < 0.5 * float_info["store_bytes"]
    assert 0 < nf4["quantization"]["added_error"]["mean"] < 0.2 and nf4["error"]["mean"] > float_info["error"]["mean"]
    assert run_cli("info", tmp_path / "store") == 0
    out = capsys.readouterr().out
    assert "quantized    nf4: added delta-W error mean" in out and "as float32" in out
    assert run_cli("verify", tmp_path / "store", "--all") == 0
    # Export and the library rebuild the same factors from the packed basis.
    assert run_cli("export", tmp_path / "store", ids[0], "--out", tmp_path / "out") == 0
    exported = load_file(str(tmp_path / "out" / peft_format.WEIGHTS_FILE))
    rebuilt = Subspace.load(str(tmp_path / "store")).reconstruct(ids[0])
    for m in rebuilt.layer_names:
        assert torch.equal(exported[peft_format.weight_key(m, "A")], rebuilt.lora_a[m])
    assert run_cli("quantize", tmp_path / "store", "--bits", "8") == 1
    assert "already quantized (nf4)" in capsys.readouterr().err


def test_compress_quantize_keeps_its_scheme_through_project_and_rebase(runner, tmp_path):
    make_collection(tmp_path / "src", 10, preset="micro")
    assert (
        run_cli(
            "compress",
            "--max-error",
            "none",
            tmp_path / "src",
            "--out",
            tmp_path / "store",
            "--components",
            3,
            "--quantize",
            "int8",
        )
        == 0
    )
    make_collection(tmp_path / "src", 3, preset="micro", start=10)
    assert run_cli("project", tmp_path / "store", tmp_path / "src") == 0
    assert run_cli("rebase", tmp_path / "store", tmp_path / "src") == 0
    store = Store(Location(str(tmp_path / "store")))
    for version in ("v000001", "v000002", "v000003"):
        manifest = store.manifest(version)
        assert manifest["parameters"]["quantize"] == "int8" and manifest["quantization"]["scheme"] == "int8"
        for path in {e["basis"] for e in manifest["modules"].values()}:
            assert any(k.endswith(".components.int8") for k in store.tensor_bytes(path))
    assert run_cli("verify", tmp_path / "store", "--all") == 0
    assert len(Subspace.load(str(tmp_path / "store")).tasks) == 13


def test_vlora_folders_import_and_export_both_ways(runner, tmp_path, capsys):
    ids = make_collection(tmp_path / "src", 10, preset="micro")
    theirs = [load_adapter(tmp_path / "src" / t) for t in ids]
    reference = SharedSubspace.from_adapters(theirs[:8], ids[:8], num_components=3)
    reference.absorb_incremental(theirs[8], ids[8])  # vlora's update leaves a basis that is not orthonormal
    reference.add_task(reference.project(theirs[9], ids[9]))
    reference.save(tmp_path / "vlora")
    assert run_cli("vlora-import", tmp_path / "vlora", tmp_path / "store") == 0
    assert run_cli("verify", tmp_path / "store") == 0
    imported = Subspace.load(str(tmp_path / "store"))
    assert set(imported.tasks) == set(ids)
    for t in ids:  # lossless: the store rebuilds what vlora rebuilds
        mine, expected = imported.reconstruct(t), reference.reconstruct(t)
        for m in expected.layer_names:
            torch.testing.assert_close(mine.lora_a[m], expected.lora_a[m], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(mine.lora_b[m], expected.lora_b[m], atol=1e-5, rtol=1e-4)
    # ...and back: vlora loads our export and rebuilds what the store does.
    assert run_cli("vlora-export", tmp_path / "store", tmp_path / "back") == 0
    back = SharedSubspace.load(tmp_path / "back")
    assert sorted(back.tasks) == sorted(ids) and back.rank == 4
    for t in ids:
        mine, theirs_again = imported.reconstruct(t), back.reconstruct(t)
        for m in mine.layer_names:
            torch.testing.assert_close(theirs_again.lora_a[m], mine.lora_a[m], atol=1e-6, rtol=1e-5)
    # A folder vlora did not finish is refused with what is missing, and nothing is published.
    (tmp_path / "back" / f"task_{ids[0]}.safetensors").unlink()
    capsys.readouterr()
    assert run_cli("vlora-import", tmp_path / "back", tmp_path / "store2") == 1
    assert f"task '{ids[0]}' has no task_{ids[0]}.safetensors" in capsys.readouterr().err
    assert Store(Location(str(tmp_path / "store2"))).current_version() is None
    meta = json.loads((tmp_path / "back" / "subspace_meta.json").read_text())
    assert meta["num_components"] == 3 and meta["layer_names"] == imported.layer_names
    # A folder with no tasks has nothing to publish.
    (tmp_path / "back" / "subspace_meta.json").write_text(json.dumps({**meta, "task_ids": []}))
    assert run_cli("vlora-import", tmp_path / "back", tmp_path / "store3") == 1
    assert "holds no adapters" in capsys.readouterr().err
    assert Store(Location(str(tmp_path / "store3"))).current_version() is None


def test_a_vlora_folder_listing_a_task_twice_is_refused(tmp_path, capsys):
    """task_ids naming one task twice (one loadings file for both) is refused in one line naming
    the task, and nothing is published."""
    ids = make_collection(tmp_path / "src", 4, preset="micro")
    theirs = [load_adapter(tmp_path / "src" / t) for t in ids]
    SharedSubspace.from_adapters(theirs, ids, num_components=2).save(tmp_path / "vlora")
    meta_path = tmp_path / "vlora" / "subspace_meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "task_ids": [*meta["task_ids"], ids[1]]}))
    capsys.readouterr()
    assert run_cli("vlora-import", tmp_path / "vlora", tmp_path / "store", "--runner", "local") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"lora-subspace: error: {tmp_path / 'vlora'}/subspace_meta.json: task {ids[1]!r} is listed more than once "
        "in task_ids"
    ]
    assert Store(Location(str(tmp_path / "store"))).current_version() is None
