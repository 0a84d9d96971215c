"""`compress --method aligned`: factors put in one gauge before the flat SVD, so a collection whose
adapters were re-parameterised (A -> R A, B -> B R^T; delta W unchanged) compresses as well as its
un-rotated twin; project and rebase align new adapters to the stored basis."""

import json

import pytest
import torch
from conftest import make_collection, run_cli
from safetensors.torch import load_file

from pipeline import Subspace, peft_format
from pipeline.io.location import Location
from pipeline.io.store import Store


def _compress(tmp_path, structure, *flags, capsys):
    make_collection(tmp_path / structure, 24, preset="micro", structure=structure, shared_dim=3)
    capsys.readouterr()
    assert (
        run_cli(
            "compress",
            tmp_path / structure,
            "--out",
            tmp_path / f"store-{structure}",
            "--components",
            3,
            "--max-error",
            "none",  # the shared bases' own errors, compared across methods
            *flags,
            "--json",
        )
        == 0
    )
    return json.loads(capsys.readouterr().out)


def test_aligned_compress_sees_through_the_gauge(runner, tmp_path, capsys):
    flat_gauge = _compress(tmp_path / "flat", "gauge", capsys=capsys)["error"]["mean"]
    shared = _compress(tmp_path, "shared", "--method", "aligned", capsys=capsys)["error"]["mean"]
    gauge = _compress(tmp_path, "gauge", "--method", "aligned", capsys=capsys)["error"]["mean"]
    assert gauge == pytest.approx(shared, rel=1e-3)  # the same delta W: the same result, whatever the gauges
    assert gauge < 0.5 * flat_gauge
    store = tmp_path / "store-gauge"
    assert Store(Location(str(store))).manifest()["parameters"]["method"] == "aligned"
    assert run_cli("verify", store) == 0
    # Exported factors are in the collection's gauge, but rebuild the adapter's delta W.
    assert run_cli("export", store, "adapter-00003", "--out", tmp_path / "out") == 0
    original = load_file(str(tmp_path / "gauge" / "adapter-00003" / peft_format.WEIGHTS_FILE))
    exported = load_file(str(tmp_path / "out" / peft_format.WEIGHTS_FILE))
    module = "model.layers.0.self_attn.q_proj"
    a, b = (original[peft_format.weight_key(module, s)].double() for s in "AB")
    a2, b2 = (exported[peft_format.weight_key(module, s)].double() for s in "AB")
    recorded = Subspace.load(str(store)).tasks["adapter-00003"].error[module]
    assert float(torch.linalg.norm(b @ a - b2 @ a2) / torch.linalg.norm(b @ a)) == pytest.approx(
        recorded, rel=1e-3, abs=1e-5
    )


def test_project_and_rebase_align_new_adapters_to_the_basis(runner, tmp_path, capsys):
    _compress(tmp_path, "gauge", "--method", "aligned", capsys=capsys)
    store = tmp_path / "store-gauge"
    make_collection(tmp_path / "gauge", 4, preset="micro", structure="gauge", shared_dim=3, start=24)
    assert run_cli("project", store, tmp_path / "gauge", "--json") == 0
    projected = json.loads(capsys.readouterr().out)["versions"][0]
    assert run_cli("rebase", store, tmp_path / "gauge", "--json") == 0
    rebased = json.loads(capsys.readouterr().out)["versions"][0]
    assert len(projected["read_errors"]) == 4 and len(rebased["read_errors"]) == 4
    # New uploads in their own gauges land as well as the collection did.
    assert projected["read_error"]["mean"] < 2 * projected["error"]["mean"]
    # Absorbing them (k = 3, truncated) moves the stored adapters a little: errors within 2%.
    assert rebased["error"]["mean"] <= projected["error"]["mean"] * 1.02
    assert run_cli("verify", store, "--all") == 0
    # The library aligns what it adds to an aligned store the same way.
    sub = Subspace.load(str(store))
    assert sub.method == "aligned"
    projection = sub.project(str(tmp_path / "gauge" / "adapter-00025"), "again")
    assert sum(projection.error.values()) / len(projection.error) == pytest.approx(
        rebased["read_errors"]["adapter-00025"], rel=0.2
    )


def test_the_library_builds_aligned_subspaces_too(tmp_path):
    results = {}
    for structure in ("shared", "gauge"):
        ids = make_collection(tmp_path / structure, 24, preset="micro", structure=structure, shared_dim=3)
        paths = [str(tmp_path / structure / t) for t in ids]
        sub = Subspace.from_adapters(paths[:20], ids[:20], num_components=3, method="aligned")
        sub.absorb_incremental(paths[20:], ids[20:])
        results[structure] = sub.error_summary()["mean"]
        flat = Subspace.from_adapters(paths, ids, num_components=3).error_summary()["mean"]
    assert results["gauge"] == pytest.approx(results["shared"], rel=1e-3)
    assert results["gauge"] < 0.5 * flat  # flat on the gauge twin
    with pytest.raises(ValueError, match="aligned with num_components"):
        Subspace.from_adapters(paths, ids, method="aligned")


def test_aligned_needs_components(tmp_path, capsys):
    make_collection(tmp_path / "src", 4, preset="micro")
    assert (
        run_cli("compress", "--max-error", "none", tmp_path / "src", "--out", tmp_path / "store", "--method", "aligned")
        == 1
    )
    assert "--method aligned needs --components" in capsys.readouterr().err
