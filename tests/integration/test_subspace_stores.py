"""Subspace.load reads every kind of store the CLI writes (flat in chunks, aligned, joint, auto
stores that mix flat and joint modules, quantized ones): it rebuilds the factors export writes,
and a saved copy verifies and exports the same adapters. A joint module is refused, by name, by
the methods that change the basis or add tasks in process."""

import pytest
import torch
from conftest import make_collection, run_cli
from safetensors.torch import load_file, save_file

from pipeline import peft_format
from pipeline.adapter import Adapter
from pipeline.errors import PipelineError
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.operations.info import describe
from pipeline.subspace import Subspace

Q_PROJ, V_PROJ = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"


def _mixed(root):
    """24 micro adapters whose q_proj differ by each adapter's gauge (auto picks joint there) and
    whose v_proj share PEFT's init (auto keeps flat)."""
    ids = make_collection(root / "src", 24, preset="micro", structure="gauge", shared_dim=3)
    make_collection(root / "same-init", 24, preset="micro", structure="same-init")
    for t in ids:
        path = root / "src" / t / peft_format.WEIGHTS_FILE
        weights, other = load_file(str(path)), load_file(str(root / "same-init" / t / peft_format.WEIGHTS_FILE))
        weights.update({k: v for k, v in other.items() if V_PROJ in k})
        save_file(weights, str(path), metadata={"format": "pt"})
    return ids


STORES = {
    "flat-chunked": (["--components", 3, "--chunk-size", 10], {}),
    "aligned": (["--method", "aligned", "--components", 3], {}),
    "joint": (["--method", "joint", "--components", 8], {Q_PROJ: "joint", V_PROJ: "joint"}),
    "auto": (["--ratio", 4], {Q_PROJ: "joint", V_PROJ: "flat"}),
    "auto-int8": (["--ratio", 4, "--quantize", "int8"], {Q_PROJ: "joint", V_PROJ: "flat"}),
    # the first chunk chooses per module, for every adapter's budget: as one fit does
    "auto-chunked": (["--ratio", 4, "--chunk-size", 16], {Q_PROJ: "joint", V_PROJ: "flat"}),
}


def _exported(folder, ids):
    return {t: load_file(str(folder / t / peft_format.WEIGHTS_FILE)) for t in ids}


@pytest.mark.parametrize("kind", sorted(STORES))
def test_every_cli_store_opens_rebuilds_what_export_writes_and_saves_a_copy_that_verifies(runner, tmp_path, kind):
    flags, methods = STORES[kind]
    ids = _mixed(tmp_path)
    store = tmp_path / "store"
    assert run_cli("compress", "--max-error", "none", tmp_path / "src", "--out", store, *flags) == 0
    manifest = Store(Location(str(store))).manifest()
    assert {m: e.get("method", "flat") for m, e in manifest["modules"].items()} == (
        methods or {Q_PROJ: "flat", V_PROJ: "flat"}
    )
    sub = Subspace.load(str(store))
    joint = sorted(m for m, e in manifest["modules"].items() if e.get("method") == "joint")
    assert sorted(sub.joint) == joint and sorted(sub.modules) == sorted(set(manifest["modules"]) - set(joint))
    assert sub.layer_names == sorted(manifest["modules"]) and list(sub.tasks) == ids

    # reconstruct gives the factors export writes, bit for bit (every adapter has the collection's rank).
    assert run_cli("export", store, "--all", "--out", tmp_path / "out") == 0
    exported = _exported(tmp_path / "out", ids)
    for t in ids:
        rebuilt = sub.reconstruct(t)
        for m in sub.layer_names:
            assert torch.equal(rebuilt.lora_a[m], exported[t][peft_format.weight_key(m, "A")])
            assert torch.equal(rebuilt.lora_b[m], exported[t][peft_format.weight_key(m, "B")])
    for m in joint:
        entry = manifest["modules"][m]
        assert sub.tasks[ids[0]].loadings_a[m].shape == (entry["core_rank"] * entry["width"],)
        assert sub.compression_stats()["components_per_layer"][m] == (entry["k_a"], entry["k_b"])

    # error_summary is the manifest's (from the same float32 rows); compression_stats measures the
    # bases as stored (the loadings table's encoding depends on how its writer batched the rows).
    summary = sub.error_summary()
    assert summary["mean"] == pytest.approx(manifest["error"]["mean"], rel=1e-5)
    assert summary["max"] == pytest.approx(manifest["error"]["max"], rel=1e-5)
    stats, info = sub.compression_stats(), describe(Store(Location(str(store))))
    for key in ("components", "means"):
        assert stats["stored_bytes"][key] == info["stored_bytes"][key]

    # save round-trips the store: verify accepts the copy and export writes the same adapters.
    assert sub.save(str(tmp_path / "copy")) == "v000001"
    assert run_cli("verify", tmp_path / "copy") == 0
    copied = Store(Location(str(tmp_path / "copy"))).manifest()
    for m, entry in manifest["modules"].items():
        same = ("method", "width", "core_rank", "k_a", "k_b", "a_shape", "b_shape", "count", "budget")
        assert {k: copied["modules"][m].get(k) for k in same} == {k: entry.get(k) for k in same}
    for key in ("method", "ratio", "quantize", "components"):
        assert copied["parameters"][key] == manifest["parameters"].get(key)
    assert run_cli("export", tmp_path / "copy", "--all", "--out", tmp_path / "out-copy") == 0
    again = _exported(tmp_path / "out-copy", ids)
    assert all(torch.equal(again[t][k], exported[t][k]) for t in ids for k in exported[t])


def test_methods_that_change_a_joint_module_refuse_it_by_name(runner, tmp_path):
    ids = _mixed(tmp_path)
    assert run_cli("compress", "--max-error", "none", tmp_path / "src", "--out", tmp_path / "store", "--ratio", 4) == 0
    sub = Subspace.load(str(tmp_path / "store"))
    adapter = sub.reconstruct(ids[0])
    calls = {
        "project": lambda: sub.project(adapter, "new"),
        "add_task": lambda: sub.add_task(sub.tasks[ids[0]]),
        "absorb": lambda: sub.absorb(adapter, "new"),
        "absorb_incremental": lambda: sub.absorb_incremental(adapter, "new"),
    }
    for method, call in calls.items():
        with pytest.raises(PipelineError, match=rf"^Subspace\.{method}: module '{Q_PROJ}' is joint") as caught:
            call()
        assert "\n" not in str(caught.value)
    assert list(sub.tasks) == ids  # nothing was added
    # quantize packs the flat modules only, as compress --quantize does; the copy verifies.
    sub.quantize(8)
    assert sub.modules[V_PROJ].packed is not None and Q_PROJ in sub.joint
    sub.save(str(tmp_path / "store"))
    assert run_cli("verify", tmp_path / "store") == 0
    assert Store(Location(str(tmp_path / "store"))).manifest()["quantization"]["scheme"] == "int8"


def test_absorbing_into_a_budgeted_store_keeps_each_modules_k_as_rebase_does(runner, tmp_path):
    """The library's absorb goes through the flow's k rule: a budgeted store keeps each module's k
    (the vlora rule its parameters also record would decide another), and absorb_incremental gives
    the bases `lora-subspace rebase` publishes."""
    src, store = tmp_path / "src", tmp_path / "store"
    make_collection(src, 16, preset="micro", structure="same-init")
    assert (
        run_cli("compress", "--max-error", "none", src, "--out", store, "--budget-bytes", "20KiB", "--method", "flat")
        == 0
    )
    sub = Subspace.load(str(store))
    assert not sub.joint and sub.budget == {"budget_bytes": 20 * 1024}
    before = {m: (len(mb.a.singular_values), len(mb.b.singular_values)) for m, mb in sub.modules.items()}
    new = make_collection(src, 4, preset="micro", structure="same-init", start=16)
    sub.absorb_incremental([Adapter.load(str(src / t)) for t in new], new)
    assert {m: (len(mb.a.singular_values), len(mb.b.singular_values)) for m, mb in sub.modules.items()} == before
    assert run_cli("rebase", store, src) == 0
    rebased = Subspace.load(str(store))
    for m, mb in sub.modules.items():
        for side in "AB":
            torch.testing.assert_close(mb.side(side).singular_values, rebased.modules[m].side(side).singular_values)
