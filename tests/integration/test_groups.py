"""Clustered bases (--clusters): adapters partitioned by the similarity of their delta W, each group
with its own bases per module; new adapters join the nearest group; export, verify, info and the
error bound understand groups. The collections are synthetic families: each seed is a family with
its own mean factors and direction (shared_dim=1), unrelated to the others."""

import json

import pyarrow.parquet as pq
import pytest
from conftest import make_collection, run_cli
from test_residuals import _modules, _residual_rows, exported_errors

FAMILIES = 3


def _families(src, n, start=0, seeds=range(FAMILIES)):
    ids = []
    for seed in seeds:
        ids += make_collection(src, n, seed=seed, prefix=f"fam{seed}", shared_dim=1, start=start)
    return ids


def _groups(store, version) -> dict[str, set[str]]:
    """task id -> the groups of its loadings rows (one each, in a sound version)."""
    rows = pq.read_table(store / "versions" / version / "loadings.parquet", columns=["task_id", "module"])
    found: dict[str, set[str]] = {}
    for row in rows.to_pylist():
        found.setdefault(row["task_id"], set()).add(row["module"].split("/")[0])
    return found


def _family(task_id: str) -> str:
    return task_id.split("-")[0]


def _latest(store) -> str:
    return json.loads((store / "LATEST").read_text())["version"]


def test_families_become_groups_and_uploads_join_their_family(runner, tmp_path, capsys):
    src, store, out = tmp_path / "src", tmp_path / "store", tmp_path / "out"
    ids = _families(src, 8)
    assert run_cli("compress", src, "--out", store, "--clusters", FAMILIES, "--components", 4) == 0
    groups = _groups(store, "v000001")
    assert all(len(g) == 1 for g in groups.values())
    by_family = {f: {next(iter(groups[t])) for t in ids if _family(t) == f} for f in map(_family, ids)}
    assert all(len(g) == 1 for g in by_family.values()) and len(set.union(*by_family.values())) == FAMILIES
    manifest = json.loads((store / "versions/v000001/manifest.json").read_text())
    assert manifest["groups"]["count"] == FAMILIES and manifest["parameters"]["clusters"] == FAMILIES
    assert run_cli("verify", store) == 0
    # Export writes every adapter under its PEFT names, at the error the store records.
    assert run_cli("export", store, "--all", "--out", out) == 0
    modules = _modules(src / ids[0])
    errors = exported_errors(src, out, ids, modules)
    recorded = pq.read_table(store / "versions/v000001/loadings.parquet").to_pylist()
    for row in recorded:
        module = row["module"].split("/", 1)[1]
        assert abs(errors[row["task_id"], module] - row["error"]) <= 1e-3 * max(row["error"], 1.0)
    # Uploads of one family land in its group.
    uploads = _families(src, 2, start=100, seeds=[1])
    assert run_cli("project", store, src) == 0
    assert {next(iter(_groups(store, _latest(store))[t])) for t in uploads} == by_family["fam1"]
    capsys.readouterr()
    assert run_cli("info", store, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert sorted(g["adapters"] for g in info["groups"]) == [8, 8, 10]


GROWTH = {"project": ["project"], "rebase": ["rebase"], "rebase-full": ["rebase", "--full"]}


@pytest.mark.parametrize(
    "growth, method",
    [("project", "flat"), ("rebase", "flat"), ("rebase-full", "flat"), ("rebase", "joint")],
)
def test_the_bound_holds_in_a_grouped_store(runner, tmp_path, growth, method):
    """Compress with groups and a bound, then grow with uploads of every family and of one the store
    does not know: every exported module stays within the bound, verify passes on every version."""
    src, store, out = tmp_path / "src", tmp_path / "store", tmp_path / "out"
    bound = 0.03
    fit = ["--components", "2"] if method == "flat" else ["--method", "joint", "--components", "12"]
    ids = _families(src, 6)
    assert run_cli("compress", src, "--out", store, "--clusters", FAMILIES, "--max-error", bound, *fit) == 0
    ids += _families(src, 2, start=50) + _families(src, 3, seeds=[9])
    assert run_cli(*GROWTH[growth][:1], store, src, *GROWTH[growth][1:]) == 0
    assert run_cli("verify", store, "--all") == 0
    assert run_cli("export", store, "--all", "--out", out) == 0
    errors = exported_errors(src, out, ids, _modules(src / ids[0]))
    assert max(errors.values()) <= bound, max(errors.items(), key=lambda e: e[1])
    assert _residual_rows(store, _latest(store)), "the collection was meant to need residuals"
    assert all(len(g) == 1 for g in _groups(store, _latest(store)).values())


def test_auto_without_a_budget_and_too_many_groups_are_refused(runner, tmp_path, capsys):
    src = tmp_path / "src"
    _families(src, 2)
    assert run_cli("compress", src, "--out", tmp_path / "a", "--clusters", "auto") == 1
    assert "--clusters auto chooses the number of groups for a budget" in capsys.readouterr().err
    assert run_cli("compress", src, "--out", tmp_path / "b", "--clusters", 4) == 1
    assert "--clusters 4 needs at least 2 adapters a group: found 6" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_commands_of_one_basis_per_module_refuse_a_grouped_store(runner, tmp_path, capsys):
    from pipeline import Subspace

    src, store = tmp_path / "src", tmp_path / "store"
    _families(src, 4)
    assert run_cli("compress", src, "--out", store, "--clusters", FAMILIES, "--components", 2) == 0
    capsys.readouterr()
    assert run_cli("vlora-export", store, tmp_path / "vlora") == 1
    assert "has 3 groups of adapters, each with its own bases" in capsys.readouterr().err
    with pytest.raises(Exception, match="the Python API holds one basis per module"):
        Subspace.load(str(store))


def test_unrelated_families_compress_better_with_groups_at_the_same_budget(runner, tmp_path, capsys):
    """Four families of 32 (micro preset, each its own mean and two directions per factor): at
    --ratio 8 one flat basis cannot hold every family's directions, while each group's can."""
    src = tmp_path / "src"
    for seed in range(4):
        make_collection(src, 32, preset="micro", seed=seed, prefix=f"fam{seed}", shared_dim=2, noise=0.01)
    figures = {}
    for name, groups in (("one", []), ("four", ["--clusters", 4]), ("auto", ["--clusters", "auto"])):
        store = tmp_path / name
        flags = ["--ratio", 8, "--method", "flat", "--max-error", "none", *groups]
        assert run_cli("compress", src, "--out", store, *flags) == 0
        capsys.readouterr()
        assert run_cli("info", store, "--json") == 0
        figures[name] = json.loads(capsys.readouterr().out)
    one = figures["one"]
    for name in ("four", "auto"):
        grouped = figures[name]
        assert grouped["error"]["mean"] < 0.75 * one["error"]["mean"], (name, grouped["error"], one["error"])
        # The budget bounds the bases' and loadings' float32 values alike; more modules and the
        # groups object add a little metadata.
        assert grouped["compression_ratio"] >= 0.8 * one["compression_ratio"]
    assert len(figures["four"]["groups"]) == 4 and len(figures["auto"]["groups"]) > 1


def test_one_group_is_an_ungrouped_store_and_slashes_in_module_names_are_quarantined(runner, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from pipeline import peft_format

    src = tmp_path / "src"
    ids = _families(src, 3)
    weights = src / ids[0] / peft_format.WEIGHTS_FILE  # a module path no PEFT model has: g0/...
    tensors = load_file(str(weights))
    save_file({k.replace("model.layers.0", "g0/layers.0"): v for k, v in tensors.items()}, str(weights))
    assert run_cli("compress", src, "--out", tmp_path / "store", "--clusters", 1, "--components", 2) == 0
    manifest = json.loads((tmp_path / "store/versions/v000001/manifest.json").read_text())
    assert "groups" not in manifest and not any("/" in m for m in manifest["modules"])
    assert manifest["adapters"] == {"ok": 8, "quarantined": 1, "in_basis": 8}
    capsys.readouterr()
    assert run_cli("info", tmp_path / "store") == 0
    assert "holds '/', which no PEFT module path does" in capsys.readouterr().out


def _rehash(store, version, name, data: bytes) -> None:
    """Replace a version's object and its manifest entry, as a hostile writer would."""
    import hashlib

    (store / "versions" / version / name).write_bytes(data)
    path = store / "versions" / version / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"][f"versions/{version}/{name}"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["mixed-rows", "narrow-sketches", "garbage-sketches"])
def test_a_tampered_grouped_store_is_named_in_one_line(runner, tmp_path, capsys, damage):
    import io

    import pyarrow as pa
    import torch
    from safetensors.torch import save

    src, store = tmp_path / "src", tmp_path / "store"
    ids = _families(src, 3)
    assert run_cli("compress", src, "--out", store, "--clusters", FAMILIES, "--components", 2) == 0
    if damage == "mixed-rows":  # one row of an adapter moved to another group's module
        table = pq.read_table(store / "versions/v000001/loadings.parquet")
        rows = table.to_pylist()
        group = rows[0]["module"].split("/")[0]
        other = next(r["module"].split("/")[0] for r in rows if not r["module"].startswith(group))
        rows[0]["module"] = rows[0]["module"].replace(group, other, 1)
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), sink)
        _rehash(store, "v000001", "loadings.parquet", sink.getvalue())
        expected = "with rows in several groups"
    elif damage == "narrow-sketches":
        sums = torch.zeros(FAMILIES, 100, dtype=torch.float64)
        data = save({"sums": sums, "counts": torch.zeros(FAMILIES, dtype=torch.int64)})
        _rehash(store, "v000001", "groups.safetensors", data)
        expected = "not the sketch sums"
    else:
        _rehash(store, "v000001", "groups.safetensors", b"\xff" * 8 + b"garbage")
        expected = "versions/v000001/groups.safetensors: Error while deserializing"
    capsys.readouterr()
    assert run_cli("verify", store) == 1
    assert expected in capsys.readouterr().out
    make_collection(src, 1, seed=0, prefix="fam0", shared_dim=1, start=50)
    command = ["export", store, ids[0], "--out", tmp_path / "out"] if damage == "mixed-rows" else ["rebase", store, src]
    assert run_cli(*command) == 1
    err = capsys.readouterr().err
    assert err.startswith("lora-subspace: error: ") and "unexpected" not in err, err


def test_evaluate_builds_a_grouped_store_as_the_store_was_built(runner, tmp_path, capsys):
    """evaluate compresses the rest with the store's --clusters and reads errors per PEFT module."""
    src, store = tmp_path / "src", tmp_path / "store"
    _families(src, 8)
    assert run_cli("compress", src, "--out", store, "--clusters", FAMILIES, "--components", 2) == 0
    capsys.readouterr()
    assert run_cli("evaluate", store, src, "--holdout", "0.25", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["held_out"] == 6 and len(result["held_out_ids"]) == 6
    basis = result["error"]["basis"]
    assert 0 <= basis["mean"] <= basis["max"] < 1  # each held-out adapter projected on its family's group
