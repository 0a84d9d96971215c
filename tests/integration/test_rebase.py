"""Growing a store: discovery, project, incremental and full re-base, chunked compress, versions,
rollback, prune and the writer lock, on local Ray with local folders."""

import hashlib
import json
import os
import shutil
import struct

import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_collection, rebase_twice_at_once, run_cli
from safetensors.torch import load_file
from vlora.io import load_adapter
from vlora.subspace import SharedSubspace

from pipeline import peft_format
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.linalg.metrics import relative_product_error


@pytest.fixture
def uploads(tmp_path):
    """A pool of related adapters in `pool/`; tests move them into `src/` as uploads arrive."""
    pool, src = tmp_path / "pool", tmp_path / "src"
    ids = make_collection(pool, 60, shared_dim=6, noise=0.3, seed=3)
    src.mkdir()

    def upload(*names):
        for name in names:
            shutil.copytree(pool / name, src / name, dirs_exist_ok=True)
        return list(names)

    upload.ids, upload.pool, upload.src = ids, pool, src
    return upload


def _weights(folder):
    """Copies: load_file maps the file, and some tests overwrite it afterwards."""
    return {k: v.clone() for k, v in load_file(str(folder / peft_format.WEIGHTS_FILE)).items()}


def _true_errors(store, originals, ids, out):
    """Mean over modules of ||dW - dW'|| / ||dW|| per adapter, from exported folders and the
    original files (not from anything the store says about itself)."""
    assert run_cli("export", store, "--all", "--out", out) == 0
    errors = []
    for task_id in ids:
        mine, theirs = _weights(out / task_id), _weights(originals / task_id)
        modules = sorted({peft_format.parse_key(k)[0] for k in theirs})
        per_module = [
            float(
                relative_product_error(
                    *(t[peft_format.weight_key(m, s)].float()[None] for t in (theirs,) for s in "AB"),
                    *(t[peft_format.weight_key(m, s)].float()[None] for t in (mine,) for s in "AB"),
                )[0]
            )
            for m in modules
        ]
        errors.append(sum(per_module) / len(per_module))
    return torch.tensor(errors)


def _recorded_errors(store: Store) -> dict[str, float]:
    """Mean over modules of the error the current version records per adapter."""
    table = pq.read_table(store.version_location(store.current_version()).path("loadings.parquet"))
    sums: dict[str, list[float]] = {}
    for task_id, error in zip(table.column("task_id").to_pylist(), table.column("error").to_pylist()):
        sums.setdefault(task_id, []).append(error)
    return {task_id: sum(e) / len(e) for task_id, e in sums.items()}


def _basis(store_path):
    store = Store(Location(str(store_path)))
    merged = {}
    for path in {e["basis"] for e in store.manifest()["modules"].values()}:
        merged.update(store.read_basis(path))
    return merged


def _info(store, capsys) -> dict:
    capsys.readouterr()
    assert run_cli("info", store, "--json") == 0
    return json.loads(capsys.readouterr().out)


def test_untruncated_incremental_rebase_equals_a_full_recompute(runner, uploads, tmp_path, capsys):
    uploads(*uploads.ids[:12])
    assert run_cli("compress", "--max-error", "none", uploads.src, "--out", tmp_path / "store", "--components", 64) == 0
    uploads(*uploads.ids[12:20])
    assert run_cli("rebase", tmp_path / "store", uploads.src) == 0
    assert run_cli("compress", "--max-error", "none", uploads.src, "--out", tmp_path / "full", "--components", 64) == 0

    incremental, full = _basis(tmp_path / "store"), _basis(tmp_path / "full")
    assert incremental.keys() == full.keys()
    for key in full:
        if key.endswith(("singular_values", "mean", "total_variance")):
            torch.testing.assert_close(incremental[key], full[key], rtol=1e-4, atol=1e-6, msg=key)
        elif key.endswith("components"):
            assert incremental[key].shape == full[key].shape == (19, full[key].shape[1])
            torch.testing.assert_close(incremental[key], full[key], atol=2e-3, rtol=0, msg=key)
        else:
            assert torch.equal(incremental[key], full[key]) and int(full[key]) == 20, key
    # Old adapters were moved to the new basis from their stored loadings: still exact.
    errors = _true_errors(tmp_path / "store", uploads.pool, uploads.ids[:20], tmp_path / "out")
    assert errors.max() < 1e-4
    manifest = Store(Location(str(tmp_path / "store"))).manifest()
    assert (
        manifest["operation"] == "rebase" and manifest["parent"] == "v000001" and manifest["adapters"]["in_basis"] == 20
    )
    # info names how many errors are estimates: the 12 moved without being read
    assert _info(tmp_path / "full", capsys)["error"]["estimated_adapters"] == 0
    assert _info(tmp_path / "store", capsys)["error"]["estimated_adapters"] == 12
    assert run_cli("info", tmp_path / "store") == 0
    assert "estimated for 12 adapter(s) moved to new bases without being read" in capsys.readouterr().out


def test_truncated_rebase_stays_within_one_percent_of_a_full_recompute_and_beats_vlora(runner, uploads, tmp_path):
    uploads(*uploads.ids[:40])
    assert run_cli("compress", "--max-error", "none", uploads.src, "--out", tmp_path / "store", "--components", 8) == 0
    uploads(*uploads.ids[40:])
    assert run_cli("rebase", tmp_path / "store", uploads.src) == 0
    assert run_cli("compress", "--max-error", "none", uploads.src, "--out", tmp_path / "full", "--components", 8) == 0
    ours = _true_errors(tmp_path / "store", uploads.pool, uploads.ids, tmp_path / "ours")
    full = _true_errors(tmp_path / "full", uploads.pool, uploads.ids, tmp_path / "fullout")
    assert float(ours.mean()) <= 1.01 * float(full.mean()), (float(ours.mean()), float(full.mean()))
    # Only the 20 new adapters' files were read: one request each per shard.
    report = json.loads(Store(Location(str(tmp_path / "store"))).version_location("v000002").read_bytes("report.json"))
    assert {s["requests"] for s in report["shards"]} == {20}
    # The store's own figures for the old adapters (estimated, their files were not read) are close
    # to the truth; those of the new ones are measured.
    table = Store(Location(str(tmp_path / "store"))).read_table("v000002", "loadings.parquet").to_pydict()
    per_adapter = {}
    for task_id, error, measured in zip(table["task_id"], table["error"], table["measured"]):
        per_adapter.setdefault(task_id, []).append(error)
        assert measured == (task_id in uploads.ids[40:])
    stored = torch.tensor([sum(per_adapter[t]) / len(per_adapter[t]) for t in uploads.ids])
    assert float((stored - ours).abs().max() / ours.mean()) < 0.05

    # vlora-dev's absorb_incremental on the same data: grows the basis without re-diagonalising
    # and leaves old loadings on the moved mean.
    subspace = SharedSubspace.from_adapters(
        [load_adapter(uploads.pool / t) for t in uploads.ids[:40]], uploads.ids[:40], num_components=8
    )
    for task_id in uploads.ids[40:]:
        subspace.absorb_incremental(load_adapter(uploads.pool / task_id), task_id)
    theirs = []
    for task_id in uploads.ids:
        rebuilt, original = subspace.reconstruct(task_id), load_adapter(uploads.pool / task_id)
        per_module = [
            float(
                relative_product_error(
                    original.lora_a[m][None], original.lora_b[m][None], rebuilt.lora_a[m][None], rebuilt.lora_b[m][None]
                )[0]
            )
            for m in original.layer_names
        ]
        theirs.append(sum(per_module) / len(per_module))
    theirs = torch.tensor(theirs)
    print(
        f"mean delta-W error: full {float(full.mean()):.4f}, incremental {float(ours.mean()):.4f}, "
        f"vlora absorb_incremental {float(theirs.mean()):.4f}"
    )
    assert float(theirs.mean()) > 1.05 * float(ours.mean())


def test_discovery_finds_added_unchanged_and_replaced_adapters(runner, uploads, tmp_path, capsys):
    ids = uploads(*uploads.ids[:10])
    store = tmp_path / "store"
    assert run_cli("compress", "--max-error", "none", uploads.src, "--out", store, "--components", 4) == 0
    added = uploads(*uploads.ids[10:13])
    # A re-upload under an existing id: different weights (another adapter's), newer mtime.
    replaced = ids[2]
    shutil.copy(
        uploads.pool / uploads.ids[50] / peft_format.WEIGHTS_FILE, uploads.src / replaced / peft_format.WEIGHTS_FILE
    )
    os.utime(uploads.src / replaced / peft_format.WEIGHTS_FILE, (1e9, 2e9))
    capsys.readouterr()

    assert run_cli("rebase", store, uploads.src, "--dry-run", "--json") == 0
    planned = json.loads(capsys.readouterr().out)["diff"]
    assert planned == {"added": added, "replaced": [replaced], "pending": [], "unchanged": 9, "missing": []}
    assert Store(Location(str(store))).versions() == ["v000001"]  # a dry run writes nothing

    assert run_cli("rebase", store, uploads.src, "--json") == 0
    summary = json.loads(capsys.readouterr().out)["versions"][0]
    assert summary["changes"] == {"added": 3, "replaced": 1, "pending": 0, "unchanged": 9, "missing": 0}
    assert summary["adapters_ok"] == 13
    # The replaced adapter now exports as its new upload.
    assert run_cli("export", store, replaced, "--out", tmp_path / "replaced") == 0
    exported = _weights(tmp_path / "replaced")

    def distance(reference):
        return sum(
            float(torch.linalg.norm(exported[k] - reference[k]) / torch.linalg.norm(reference[k])) for k in reference
        ) / len(reference)

    new, old = distance(_weights(uploads.src / replaced)), distance(_weights(uploads.pool / replaced))
    assert new < 0.5 * old, (new, old)

    # Nothing new: nothing written.
    assert run_cli("rebase", store, uploads.src) == 0
    assert "is up to date" in capsys.readouterr().out
    assert Store(Location(str(store))).versions() == ["v000001", "v000002"]


def test_project_shares_the_basis_flags_outliers_and_rebase_absorbs_them(runner, uploads, tmp_path, capsys):
    uploads(*uploads.ids[:20])
    store_path = tmp_path / "store"
    assert run_cli("compress", "--max-error", "none", uploads.src, "--out", store_path, "--components", 6) == 0
    uploads(*uploads.ids[20:23])
    make_collection(uploads.src, 1, shared_dim=6, noise=0.3, seed=99, prefix="outlier")  # a different structure
    capsys.readouterr()
    assert run_cli("project", store_path, uploads.src, "--json") == 0
    summary = json.loads(capsys.readouterr().out)["versions"][0]
    assert summary["version"] == "v000002" and summary["adapters_ok"] == 24
    assert list(summary["flagged"]) == ["outlier-00000"]
    errors = summary["read_errors"]
    assert sorted(errors) == [*uploads.ids[20:23], "outlier-00000"]
    assert errors["outlier-00000"] > 2 * max(errors[t] for t in uploads.ids[20:23])

    store = Store(Location(str(store_path)))
    parent, child = store.manifest("v000001"), store.manifest("v000002")
    assert {e["basis"] for e in child["modules"].values()} == {e["basis"] for e in parent["modules"].values()}
    assert not (store_path / "versions" / "v000002" / "basis").exists()  # nothing copied
    catalog = {r["task_id"]: r for r in store.read_table("v000002", "catalog.parquet").to_pylist()}
    assert not catalog["outlier-00000"]["in_basis"] and catalog[uploads.ids[0]]["in_basis"]
    # Old adapters' rows are untouched by a projection.
    before = store.read_table("v000001", "loadings.parquet").to_pydict()
    after = store.read_table("v000002", "loadings.parquet", task_ids=before["task_id"]).to_pydict()
    assert before == after

    # rebase absorbs the projected adapters (their files are read again) and the outlier improves.
    assert run_cli("rebase", store_path, uploads.src, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["diff"]["pending"] == [*uploads.ids[20:23], "outlier-00000"]
    catalog = {r["task_id"]: r for r in store.read_table("v000003", "catalog.parquet").to_pylist()}
    assert all(r["in_basis"] for r in catalog.values())
    errors = {
        v: store.read_table(v, "loadings.parquet", task_ids=["outlier-00000"]).column("error").to_pylist()
        for v in ("v000002", "v000003")
    }
    assert sum(errors["v000003"]) < 0.8 * sum(errors["v000002"])


def test_full_rebase_from_the_store_and_from_the_source(runner, uploads, tmp_path, capsys):
    uploads(*uploads.ids[:30])
    store = tmp_path / "store"
    assert run_cli("compress", "--max-error", "none", uploads.src, "--out", store, "--components", 8) == 0
    uploads(*uploads.ids[30:40])
    assert run_cli("rebase", store, uploads.src, "--full") == 0
    assert run_cli("rebase", store, uploads.src, "--full", "--from-source") == 0
    assert run_cli("compress", "--max-error", "none", uploads.src, "--out", tmp_path / "fresh", "--components", 8) == 0
    versions = Store(Location(str(store))).published()
    assert [m["operation"] for m in versions] == ["compress", "rebase-full", "rebase-full"]
    assert versions[2]["adapters"] == {"ok": 40, "quarantined": 0, "in_basis": 40}
    assert versions[1]["adapters"] == {"ok": 40, "quarantined": 0, "in_basis": 40}
    # From the source it is exactly a fresh compress of the same adapters.
    for key, value in _basis(tmp_path / "fresh").items():
        torch.testing.assert_close(_basis(store)[key], value, rtol=1e-4, atol=1e-5)
    # An adapter whose files are gone from the source is not lost: it joins rebuilt from the store.
    shutil.rmtree(uploads.src / uploads.ids[5])
    capsys.readouterr()
    assert run_cli("rebase", store, uploads.src, "--full", "--from-source", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["diff"]["missing"] == [uploads.ids[5]] and result["versions"][0]["adapters_ok"] == 40
    errors = _true_errors(tmp_path / "store", uploads.pool, uploads.ids[:40], tmp_path / "a")
    fresh = _true_errors(tmp_path / "fresh", uploads.pool, uploads.ids[:40], tmp_path / "b")
    assert float(errors.mean()) <= 1.01 * float(fresh.mean())


def test_chunked_compress_holds_one_chunk_at_a_time(runner, uploads, tmp_path, capsys, caplog):
    from pipeline.flow.plan import shard_bytes

    uploads(*uploads.ids[:24])
    width = 8 * 256 + 256 * 8  # tiny preset: one module's lora_A and lora_B, flattened
    budget = shard_bytes(8, [width])  # one module of 8 adapters fits; of 24 it does not
    assert shard_bytes(24, [width]) > budget
    capsys.readouterr()
    assert (
        run_cli(
            "compress",
            uploads.src,
            "--out",
            tmp_path / "store",
            "--components",
            8,
            "--chunk-size",
            8,
            "--task-memory",
            budget,
            "--json",
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["versions"] == ["v000001"] and summary["adapters_ok"] == 24  # one version, rows written once
    assert "over the" not in caplog.text
    store = Store(Location(str(tmp_path / "store")))
    report = json.loads(store.version_location("v000001").read_bytes("report.json"))
    for shard in report["shards"]:
        assert shard["stack_bytes"] == 8 * 4 * width  # one module of one chunk per task
        # each adapter read once, and the first two chunks' once more, to project them on the final bases
        assert len(shard["chunk_seconds"]) == 3 and shard["requests"] == 24 + 16
    manifest = store.manifest()
    assert {e["count"] for e in manifest["modules"].values()} == {24}
    chunked = _true_errors(tmp_path / "store", uploads.pool, uploads.ids[:24], tmp_path / "a")
    recorded = _recorded_errors(store)
    # Every row's error is measured on the final bases, as export writes the adapter. Both sides
    # rebuild the same float32 factors, in other orders: they differ by float32 rounding of
    # delta W, a few ulps of ||B A|| per element, far below 1e-4 of ||B A|| in all.
    for task_id, true in zip(uploads.ids[:24], chunked.tolist()):
        assert recorded[task_id] == pytest.approx(true, abs=1e-4), task_id
    assert _info(tmp_path / "store", capsys)["error"]["estimated_adapters"] == 0

    assert (
        run_cli(
            "compress",
            "--max-error",
            "none",
            uploads.src,
            "--out",
            tmp_path / "whole",
            "--components",
            8,
            "--task-memory",
            budget,
        )
        == 0
    )
    assert "over the" in caplog.text  # the whole collection does not fit the same budget
    whole = _true_errors(tmp_path / "whole", uploads.pool, uploads.ids[:24], tmp_path / "b")
    assert float(chunked.mean()) <= 1.01 * float(whole.mean()), (float(chunked.mean()), float(whole.mean()))


def test_versions_rollback_and_prune_keep_what_they_must(runner, uploads, tmp_path, capsys):
    store_path = tmp_path / "store"
    uploads(*uploads.ids[:8])
    assert run_cli("compress", "--max-error", "none", uploads.src, "--out", store_path, "--components", 4) == 0  # v1
    uploads(*uploads.ids[8:10])
    assert run_cli("rebase", store_path, uploads.src) == 0  # v2
    uploads(*uploads.ids[10:12])
    capsys.readouterr()
    assert run_cli("project", store_path, uploads.src, "--max-error", 0, "--json") == 0  # v3: uses v2's basis
    assert list(json.loads(capsys.readouterr().out)["versions"][0]["flagged"]) == uploads.ids[10:12]
    uploads(*uploads.ids[12:14])
    assert run_cli("project", store_path, uploads.src) == 0  # v4: uses v2's basis
    capsys.readouterr()
    assert run_cli("versions", store_path) == 0
    listing = capsys.readouterr().out
    assert "* v000004" in listing and "project" in listing and "rebase" in listing

    assert run_cli("rollback", store_path, "v000002") == 0
    store = Store(Location(str(store_path)))
    assert store.current_version() == "v000002"
    assert sorted(os.listdir(store_path / "versions")) == [
        "v000001",
        "v000002",
        "v000003",
        "v000004",
    ]  # only the pointer moved
    assert run_cli("export", store_path, uploads.ids[0], "--out", tmp_path / "e") == 0
    assert run_cli("rollback", store_path, "v000009") == 1

    uploads(*uploads.ids[14:16])
    assert run_cli("rebase", store_path, uploads.src) == 0  # v5 grows from v2
    assert store.manifest("v000005")["parent"] == "v000002"

    # Keep 1: v5, its parent v2. v1, v3 and v4 go.
    assert run_cli("prune", store_path, "--keep", 1) == 0
    assert [m["version"] for m in store.published()] == ["v000002", "v000005"]
    for version in ("v000002", "v000005"):
        for path in store.manifest(version)["files"]:
            assert (store_path / path).exists(), path
    # v4 (project) used v2's basis; keeping 2 after v6 must keep v2's basis files but may drop the rest of v2.
    uploads(*uploads.ids[16:18])
    assert run_cli("project", store_path, uploads.src) == 0  # v6 uses v5's basis
    assert run_cli("prune", store_path, "--keep", 1) == 0
    assert [m["version"] for m in store.published()] == ["v000005", "v000006"]
    for path in store.manifest("v000006")["files"]:
        assert (store_path / path).exists(), path
    assert run_cli("export", store_path, uploads.ids[17], "--out", tmp_path / "f") == 0


def test_a_second_writer_fails_cleanly(runner, uploads, tmp_path, capsys):
    store_path = tmp_path / "store"
    uploads(*uploads.ids[:8])
    assert run_cli("compress", "--max-error", "none", uploads.src, "--out", store_path, "--components", 4) == 0
    uploads(*uploads.ids[8:12])
    store = Store(Location(str(store_path)))
    with store.lock("rebase"):
        capsys.readouterr()
        assert run_cli("rebase", store_path, uploads.src) == 1
        err = capsys.readouterr().err
        assert "is locked (rebase by" in err and "remove" in err and "LOCK" in err
    assert store.versions() == ["v000001"]

    # Two at once, for real: exactly one publishes, the other is refused and writes nothing.
    published, refused = rebase_twice_at_once(Location(str(uploads.src)), Location(str(store_path)), runner)
    assert published == ["v000002"] and len(refused) == 1, refused
    assert "is locked" in refused[0] or "is up to date" in refused[0]
    assert store.versions() == ["v000001", "v000002"] and store.current_version() == "v000002"
    assert not (store_path / "LOCK").exists()


def test_bad_uploads_are_quarantined_and_never_replace_a_good_adapter(runner, uploads, tmp_path, capsys):
    from safetensors.torch import save_file

    ids = uploads(*uploads.ids[:10])
    store_path = tmp_path / "store"
    assert run_cli("compress", "--max-error", "none", uploads.src, "--out", store_path, "--components", 4) == 0
    good_before = _weights(store_path.parent / "src" / ids[1])
    # A new adapter holding NaN, and a truncated re-upload of a good one.
    poisoned = uploads(uploads.ids[10])[0]
    weights = _weights(uploads.src / poisoned)
    next(iter(weights.values()))[0, 0] = float("nan")
    save_file(weights, str(uploads.src / poisoned / peft_format.WEIGHTS_FILE))
    target = uploads.src / ids[1] / peft_format.WEIGHTS_FILE
    target.write_bytes(target.read_bytes()[:1000])
    uploads(*uploads.ids[11:13])
    capsys.readouterr()

    assert run_cli("rebase", store_path, uploads.src, "--json", "--chunk-size", 2) == 0
    result = json.loads(capsys.readouterr().out)
    versions = result["versions"]
    assert [v["version"] for v in versions] == ["v000002", "v000003"]  # 4 to read, 2 per step
    quarantined = {t: r for v in versions for t, r in v["quarantined"].items()}
    kept = {t: r for v in versions for t, r in v["kept_previous"].items()}
    assert "NaN" in quarantined[poisoned] and ids[1] in kept
    store = Store(Location(str(store_path)))
    catalog = {r["task_id"]: r for r in store.read_table("v000003", "catalog.parquet").to_pylist()}
    assert catalog[ids[1]]["status"] == "ok" and catalog[poisoned]["status"] == "quarantined"
    assert versions[-1]["adapters_ok"] == 12
    for path in {e["basis"] for e in store.manifest()["modules"].values()}:
        assert all(torch.isfinite(t).all() for t in store.read_basis(path).values())
    # The earlier upload of the damaged adapter is still there to export.
    assert run_cli("export", store_path, ids[1], "--out", tmp_path / "kept") == 0
    exported = _weights(tmp_path / "kept")
    assert (
        sum(
            float(torch.linalg.norm(exported[k] - good_before[k]) / torch.linalg.norm(good_before[k])) for k in exported
        )
        / len(exported)
        < 0.6
    )


def test_a_copy_without_file_times_is_up_to_date_and_a_same_size_change_is_replaced(runner, uploads, tmp_path, capsys):
    ids = uploads(*uploads.ids[:8])
    store = tmp_path / "store"
    assert run_cli("compress", "--max-error", "none", uploads.src, "--out", store, "--components", 4) == 0
    # `cp -r` without -p: the same bytes, new modification times.
    copy = tmp_path / "copy"
    shutil.copytree(uploads.src, copy, copy_function=shutil.copyfile)
    for task_id in ids:
        os.utime(copy / task_id / peft_format.WEIGHTS_FILE, (2e9, 2e9))
    capsys.readouterr()

    assert run_cli("rebase", store, copy, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["diff"] == {"added": [], "replaced": [], "pending": [], "unchanged": 8, "missing": []}
    assert result["versions"] == []
    assert Store(Location(str(store))).versions() == ["v000001"]

    # A real change of the same size (the last float of the file) is still a replacement.
    changed = copy / ids[3] / peft_format.WEIGHTS_FILE
    data = bytearray(changed.read_bytes())
    data[-4:] = struct.pack("<f", struct.unpack("<f", data[-4:])[0] + 1.0)
    changed.write_bytes(bytes(data))
    os.utime(changed, (2e9, 2e9))
    assert run_cli("rebase", store, copy, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["diff"]["replaced"] == [ids[3]] and result["diff"]["unchanged"] == 7
    assert Store(Location(str(store))).versions() == ["v000001", "v000002"]


def test_a_catalog_written_before_weights_sha256_still_reads_and_grows(runner, uploads, tmp_path, capsys):
    ids = uploads(*uploads.ids[:6])
    store_path = tmp_path / "store"
    assert run_cli("compress", "--max-error", "none", uploads.src, "--out", store_path, "--components", 4) == 0
    # The catalog as stores of format 1 wrote it before the column existed, manifest to match.
    store = Store(Location(str(store_path)))
    catalog_path = store_path / "versions" / "v000001" / "catalog.parquet"
    pq.write_table(pq.read_table(catalog_path).drop_columns(["weights_sha256"]), catalog_path, write_page_checksum=True)
    manifest_path = store_path / "versions" / "v000001" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    data = catalog_path.read_bytes()
    manifest["files"]["versions/v000001/catalog.parquet"] = {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    manifest_path.write_text(json.dumps(manifest))
    assert run_cli("verify", store_path) == 0

    added = uploads(*uploads.ids[6:8])
    assert run_cli("rebase", store_path, uploads.src) == 0
    assert store.versions() == ["v000001", "v000002"]
    rows = {r["task_id"]: r for r in store.read_table("v000002", "catalog.parquet").to_pylist()}
    assert [rows[t]["weights_sha256"] for t in ids] == [None] * len(ids)  # carried over as they were
    for task_id in added:
        assert (
            rows[task_id]["weights_sha256"]
            == hashlib.sha256((uploads.src / task_id / peft_format.WEIGHTS_FILE).read_bytes()).hexdigest()
        )
    assert run_cli("verify", store_path, "--all") == 0


def test_an_s3_copy_keeps_its_etags_and_is_up_to_date(runner, s3_endpoint, bucket, tmp_path, capsys):
    import boto3

    make_collection(tmp_path / "src", 6)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for path in sorted((tmp_path / "src").rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"adapters/{path.relative_to(tmp_path / 'src')}")
    store, endpoint = f"s3://{bucket}/subspace", ["--endpoint-url", s3_endpoint]
    assert (
        run_cli(
            "compress", "--max-error", "none", f"s3://{bucket}/adapters", "--out", store, "--components", 4, *endpoint
        )
        == 0
    )
    # A server-side copy (what `aws s3 cp --recursive` does): new LastModified, the same ETag.
    for item in s3.list_objects_v2(Bucket=bucket, Prefix="adapters/")["Contents"]:
        s3.copy_object(
            Bucket=bucket, Key="copy/" + item["Key"].split("/", 1)[1], CopySource={"Bucket": bucket, "Key": item["Key"]}
        )
    capsys.readouterr()
    assert run_cli("rebase", store, f"s3://{bucket}/copy", "--json", *endpoint) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["diff"]["unchanged"] == 6 and result["diff"]["replaced"] == [] and result["versions"] == []
    catalog = Store(Location(store, s3_endpoint)).read_table("v000001", "catalog.parquet").to_pylist()
    assert {row["weights_sha256"] for row in catalog} == {None}  # the ETag identifies the content on S3
