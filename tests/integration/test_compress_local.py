"""compress -> info -> export on a real local Ray with a local folder store."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from conftest import MINILM, make_collection, run_cli
from safetensors.torch import load_file

from pipeline.io.location import Location
from pipeline.io.store import Store


def _load(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_compress_info_export_round_trip_with_all_components(runner, tmp_path, capsys):
    make_collection(tmp_path / "src", 12)
    assert (
        run_cli("compress", "--max-error", "none", tmp_path / "src", "--out", tmp_path / "store", "--components", 16)
        == 0
    )
    capsys.readouterr()
    assert run_cli("info", tmp_path / "store", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == "v000001" and info["adapters"] == {"ok": 12, "quarantined": 0, "in_basis": 12}
    assert info["modules"] == 8 and info["error"]["max"] < 1e-3
    assert info["compression_ratio"] > 0 and info["store_bytes"] > 0

    assert run_cli("export", tmp_path / "store", "adapter-00003", "--out", tmp_path / "out") == 0
    original, exported = _load(tmp_path / "src" / "adapter-00003"), _load(tmp_path / "out")
    assert exported.keys() == original.keys()
    for key in original:
        assert exported[key].dtype == original[key].dtype
        torch.testing.assert_close(exported[key], original[key], atol=1e-5, rtol=1e-4)
    assert (tmp_path / "out" / "adapter_config.json").read_bytes() == (
        tmp_path / "src" / "adapter-00003" / "adapter_config.json"
    ).read_bytes()


def test_store_layout_manifest_checksums_and_pointer(runner, tmp_path):
    import hashlib

    make_collection(tmp_path / "src", 6)
    assert (
        run_cli("compress", "--max-error", "none", tmp_path / "src", "--out", tmp_path / "store", "--components", 3)
        == 0
    )
    pointer = json.loads((tmp_path / "store" / "LATEST").read_text())
    assert pointer == {"version": "v000001", "format_version": 1}
    root = tmp_path / "store" / "versions" / "v000001"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["parent"] is None and manifest["parameters"]["components"] == 3
    assert not (root / "staging").exists()
    for name, entry in manifest["files"].items():
        data = (tmp_path / "store" / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"])
    assert {e["k_a"] for e in manifest["modules"].values()} == {3}
    loadings = pq.read_table(root / "loadings.parquet")
    assert loadings.num_rows == 6 * 8 and loadings.column_names == [
        "task_id",
        "module",
        "a",
        "b",
        "error",
        "measured",
        "norm",
    ]
    assert all(len(v) == 3 for v in loadings.column("a").to_pylist())
    catalog = pq.read_table(root / "catalog.parquet").to_pylist()
    assert [r["status"] for r in catalog] == ["ok"] * 6 and catalog[0]["lora_alpha"] == 16


def test_a_second_compress_is_a_new_version_with_its_parent(runner, tmp_path):
    make_collection(tmp_path / "src", 5)
    for _ in range(2):  # file:// URIs work as plain paths do
        assert (
            run_cli(
                "compress",
                "--max-error",
                "none",
                f"file://{tmp_path}/src",
                "--out",
                f"file://{tmp_path}/store",
                "--components",
                2,
            )
            == 0
        )
    store = Store(Location(str(tmp_path / "store")))
    assert store.current_version() == "v000002" and store.manifest()["parent"] == "v000001"


def test_threshold_and_adaptive_choose_k(runner, tmp_path, capsys):
    make_collection(tmp_path / "src", 20, shared_dim=3, noise=0.01)
    assert (
        run_cli(
            "compress",
            "--max-error",
            "none",
            tmp_path / "src",
            "--out",
            tmp_path / "fixed",
            "--variance-threshold",
            "0.9",
        )
        == 0
    )
    assert (
        run_cli(
            "compress", tmp_path / "src", "--out", tmp_path / "adaptive", "--variance-threshold", "0.9", "--adaptive"
        )
        == 0
    )
    fixed, adaptive = (Store(Location(str(tmp_path / s))).manifest()["modules"] for s in ("fixed", "adaptive"))
    assert len({(e["k_a"], e["k_b"]) for e in fixed.values()}) == 1
    assert all(min(e["explained_variance_a"], e["explained_variance_b"]) >= 0.9 - 1e-6 for e in adaptive.values())
    assert all(e["k_a"] <= 3 and e["k_b"] <= 3 for e in adaptive.values())


def test_export_all_writes_every_adapter_in_parallel(runner, tmp_path):
    ids = make_collection(tmp_path / "src", 20)
    assert (
        run_cli("compress", "--max-error", "none", tmp_path / "src", "--out", tmp_path / "store", "--components", 20)
        == 0
    )
    assert run_cli("export", tmp_path / "store", "--all", "--out", tmp_path / "all") == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ids
    torch.testing.assert_close(_load(tmp_path / "all" / ids[7]), _load(tmp_path / "src" / ids[7]), atol=1e-5, rtol=1e-4)


def test_real_peft_adapters_round_trip(runner, tmp_path):
    assert run_cli("compress", "--max-error", "none", MINILM, "--out", tmp_path / "store", "--components", 4) == 0
    for task in ("sentiment", "topic8"):
        assert run_cli("export", tmp_path / "store", task, "--out", tmp_path / task) == 0
        original, exported = _load(MINILM / task), _load(tmp_path / task)
        assert exported.keys() == original.keys()
        for key in original:
            torch.testing.assert_close(exported[key], original[key], atol=1e-5, rtol=1e-4)
        assert json.loads((tmp_path / task / "adapter_config.json").read_text()) == json.loads(
            (MINILM / task / "adapter_config.json").read_text()
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (["compress", "{tmp}/nowhere", "--out", "{tmp}/store"], "source {tmp}/nowhere does not exist"),
        (["compress", "{tmp}/empty", "--out", "{tmp}/store"], "no adapters found under {tmp}/empty"),
        (["compress", "{tmp}/src", "--out", "/proc/no-store-here"], "cannot write to store /proc/no-store-here"),
        (["info", "{tmp}/store"], "no store at {tmp}/store"),
        (["export", "{tmp}/good", "missing-id", "--out", "{tmp}/x"], "no adapter 'missing-id'"),
    ],
)
def test_user_errors_are_one_line_with_nonzero_exit(runner, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    make_collection(tmp_path / "src", 3)
    if "good" in " ".join(args):
        assert (
            run_cli("compress", "--max-error", "none", tmp_path / "src", "--out", tmp_path / "good", "--components", 2)
            == 0
        )
    capsys.readouterr()
    assert run_cli(*[a.format(tmp=tmp_path) for a in args]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lora-subspace: error: ") and message.format(tmp=tmp_path) in err
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "store" / "LATEST").exists()


def test_sharding_does_not_change_the_result(runner, tmp_path):
    """One in-process shard and Ray's several shards give the same bases and loadings."""
    from pipeline.config import ComponentRule, Options
    from pipeline.operations.compress import compress
    from pipeline.runners import SerialRunner

    make_collection(tmp_path / "src", 10)
    source = Location(str(tmp_path / "src"))
    stores = {}
    for name, executor in (("serial", SerialRunner()), ("ray", runner)):
        stores[name] = Store(Location(str(tmp_path / name)))
        compress(source, stores[name], executor, Options(ComponentRule(components=4)))
    serial, ray_store = stores["serial"], stores["ray"]
    assert len({e["basis"] for e in serial.manifest()["modules"].values()}) == 1
    assert len({e["basis"] for e in ray_store.manifest()["modules"].values()}) > 1

    def bases(store):
        merged = {}
        for path in {e["basis"] for e in store.manifest()["modules"].values()}:
            merged.update(store.read_basis(path))
        return merged

    torch.testing.assert_close(bases(serial), bases(ray_store), atol=1e-5, rtol=1e-4)
    loadings = [s.read_table(s.current_version(), "loadings.parquet").to_pydict() for s in (serial, ray_store)]
    assert loadings[0]["task_id"] == loadings[1]["task_id"] and loadings[0]["module"] == loadings[1]["module"]
    torch.testing.assert_close(torch.tensor(loadings[0]["a"]), torch.tensor(loadings[1]["a"]), atol=1e-5, rtol=1e-4)
