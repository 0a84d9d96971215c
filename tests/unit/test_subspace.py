"""The in-process Subspace against vlora-dev 0.2.0's SharedSubspace on the same adapters (where the
semantics match) and against a full recompute (where ours is deliberately better)."""

import pytest
import torch
from vlora.io import load_adapter
from vlora.subspace import SharedSubspace

from pipeline.adapter import Adapter
from pipeline.io.location import Location
from pipeline.linalg import quantize
from pipeline.subspace import Projection, Subspace
from pipeline.synthetic import generate

N = 16


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """(ids, our adapters, vlora's LoRAWeights of the same folders)."""
    root = tmp_path_factory.mktemp("micro")
    ids = generate(Location(str(root)), N, preset="micro", shared_dim=5)
    return ids, [Adapter.load(str(root / t)) for t in ids], [load_adapter(root / t) for t in ids]


def _delta_w_errors(sub, originals: dict[str, Adapter], reconstruct=None) -> torch.Tensor:
    """Relative ||B A - B' A'|| per (task, module), formed directly."""
    reconstruct = reconstruct or sub.reconstruct
    errors = []
    for task_id, adapter in originals.items():
        rebuilt = reconstruct(task_id)
        for m in adapter.layer_names:
            dw = adapter.lora_b[m] @ adapter.lora_a[m]
            errors.append(
                torch.linalg.norm(dw - rebuilt.lora_b[m].float() @ rebuilt.lora_a[m].float()) / torch.linalg.norm(dw)
            )
    return torch.stack(errors)


def _projector_distance(v1: torch.Tensor, v2: torch.Tensor) -> float:
    v1, v2 = v1.double(), v2.double()
    return float(torch.linalg.norm(v1.T @ v1 - v2.T @ v2))


def _assert_same_reconstructions(ours, theirs, task_ids, tol=1e-5):
    for task_id in task_ids:
        mine, reference = ours.reconstruct(task_id), theirs.reconstruct(task_id)
        for m in reference.layer_names:
            torch.testing.assert_close(mine.lora_a[m], reference.lora_a[m], atol=tol, rtol=tol)
            torch.testing.assert_close(mine.lora_b[m], reference.lora_b[m], atol=tol, rtol=tol)


@pytest.mark.parametrize("kwargs", [{"num_components": 3}, {}, {"variance_threshold": 0.8, "adaptive_k": True}])
def test_from_adapters_matches_vlora(collection, kwargs):
    ids, ours, theirs = collection
    mine = Subspace.from_adapters(ours, ids, **kwargs)
    reference = SharedSubspace.from_adapters(theirs, ids, **kwargs)
    assert mine.layer_names == reference.layer_names and mine.rank == reference.rank
    assert mine.num_components == reference.num_components
    for m in mine.layer_names:
        for side in "ab":
            mine_sv, their_sv = (
                getattr(mine, f"singular_values_{side}")[m],
                getattr(reference, f"singular_values_{side}")[m],
            )
            torch.testing.assert_close(mine_sv, their_sv, rtol=1e-4, atol=1e-6)
            assert (
                _projector_distance(getattr(mine, f"components_{side}")[m], getattr(reference, f"components_{side}")[m])
                < 1e-4
            )
            torch.testing.assert_close(getattr(mine, f"means_{side}")[m], getattr(reference, f"means_{side}")[m])
    _assert_same_reconstructions(mine, reference, ids)


def test_project_and_add_task_match_vlora_and_measure_the_error(collection):
    ids, ours, theirs = collection
    mine = Subspace.from_adapters(ours[:12], ids[:12], num_components=3)
    reference = SharedSubspace.from_adapters(theirs[:12], ids[:12], num_components=3)
    for adapter, theirs_one, task_id in zip(ours[12:], theirs[12:], ids[12:]):
        projection = mine.project(adapter, task_id)
        mine.add_task(projection)
        reference.add_task(reference.project(theirs_one, task_id))
        measured = _delta_w_errors(mine, {task_id: adapter})
        assert torch.allclose(
            torch.tensor(list(projection.error.values()), dtype=torch.float32), measured, rtol=1e-4, atol=1e-6
        )
        assert projection.catalog["in_basis"] is False
    assert len(mine.tasks) == N and set(mine.tasks) == set(reference.tasks)
    _assert_same_reconstructions(mine, reference, ids)


def test_absorb_is_vlora_full_recompute(collection):
    ids, ours, theirs = collection
    mine = Subspace.from_adapters(ours[:10], ids[:10], num_components=4)
    reference = SharedSubspace.from_adapters(theirs[:10], ids[:10], num_components=4)
    mine.absorb(ours[10], ids[10])
    reference.absorb(theirs[10], ids[10])
    for m in mine.layer_names:
        torch.testing.assert_close(mine.singular_values_a[m], reference.singular_values_a[m], rtol=1e-4, atol=1e-6)
    _assert_same_reconstructions(mine, reference, ids[:11], tol=1e-4)
    # The moved tasks' errors are estimates; the absorbed one's is measured.
    assert mine.tasks[ids[10]].catalog["in_basis"]
    assert mine._rows[mine.layer_names[0]].measured.tolist() == [False] * 10 + [True]


@pytest.mark.parametrize("k", [12, 3])
def test_absorb_incremental_tracks_the_full_recompute_where_vlora_drifts(collection, k):
    ids, ours, theirs = collection
    originals = dict(zip(ids, ours))
    full = Subspace.from_adapters(ours, ids, num_components=k)
    mine = Subspace.from_adapters(ours[:6], ids[:6], num_components=k)
    mine.absorb_incremental(ours[6:], ids[6:])
    reference = SharedSubspace.from_adapters(theirs[:6], ids[:6], num_components=k)
    for adapter, task_id in zip(theirs[6:], ids[6:]):
        reference.absorb_incremental(adapter, task_id)
    m = full.layer_names[0]
    ours_distance = _projector_distance(full.components_a[m], mine.components_a[m])
    vlora_distance = _projector_distance(full.components_a[m], reference.components_a[m][: len(full.components_a[m])])
    ours_error, vlora_error = _delta_w_errors(mine, originals).mean(), _delta_w_errors(reference, originals).mean()
    full_error = _delta_w_errors(full, originals).mean()
    assert ours_error < full_error * 1.05 and ours_error < vlora_error
    assert ours_distance < vlora_distance
    if k == 12:  # the data's spectrum ends within k: nothing is truncated, the update is exact
        assert ours_distance < 1e-4
        torch.testing.assert_close(mine.singular_values_a[m], full.singular_values_a[m], rtol=1e-4, atol=1e-6)
        assert abs(ours_error - full_error) < 1e-5
        # The errors it records (estimated for moved tasks) are those formed directly.
        recorded = torch.stack([r.error for r in mine._rows.values()]).T.reshape(-1)
        assert torch.allclose(recorded.float(), _delta_w_errors(mine, originals), rtol=0.02, atol=1e-4)


def test_streaming_build_reads_batches_and_equals_the_full_svd_when_nothing_is_truncated(collection, tmp_path_factory):
    ids, ours, theirs = collection
    root = tmp_path_factory.getbasetemp() / "micro0"
    paths = [root / t for t in ids]
    full = Subspace.from_adapters(ours, ids, num_components=4)
    mine = Subspace.from_adapters_streaming(paths, num_components=4, batch_size=5)
    reference = SharedSubspace.from_adapters_streaming(paths, num_components=4)
    assert list(mine.tasks) == ids and mine.num_components == 4
    m = full.layer_names[0]
    # k + OVERSAMPLE kept while streaming covers every direction of 16 adapters: the result is the full SVD's.
    assert _projector_distance(full.components_a[m], mine.components_a[m]) < 1e-4
    assert _projector_distance(full.components_a[m], reference.components_a[m]) > 0.1
    originals = dict(zip(ids, ours))
    assert abs(_delta_w_errors(mine, originals).mean() - _delta_w_errors(full, originals).mean()) < 1e-5
    # The second pass projects every adapter on the final basis: errors measured, not estimated.
    recorded = torch.stack([r.error for r in mine._rows.values()]).T.reshape(-1)
    assert all(r.measured.all() for r in mine._rows.values())
    assert torch.allclose(recorded.float(), _delta_w_errors(mine, originals), rtol=1e-4, atol=1e-6)


def test_reconstruct_keeps_dtype_and_config_and_to_moves_everything(collection):
    ids, ours, _ = collection
    sub = Subspace.from_adapters(ours, ids, num_components=3)
    rebuilt = sub.reconstruct(ids[0])
    assert rebuilt.config["r"] == ours[0].config["r"] and rebuilt.lora_a[rebuilt.layer_names[0]].dtype == torch.float32
    assert sub.reconstruct(ids[0], dtype=torch.bfloat16).lora_b[rebuilt.layer_names[0]].dtype == torch.bfloat16
    sub.to(dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in sub.components_a.values())
    assert sub.tasks[ids[0]].loadings_a[rebuilt.layer_names[0]].dtype == torch.float64
    again = sub.to(dtype=torch.float32).reconstruct(ids[0])
    for m in rebuilt.layer_names:
        torch.testing.assert_close(again.lora_a[m], rebuilt.lora_a[m])
    with pytest.raises(KeyError, match="unknown task"):
        sub.reconstruct("nope")


def test_trainable_params_train_the_loadings_and_expansion_keeps_every_task(collection):
    ids, ours, theirs = collection
    sub = Subspace.from_adapters(ours, ids, num_components=3)
    reference = SharedSubspace.from_adapters(theirs, ids, num_components=3)
    params = sub.get_trainable_params(ids[0])
    assert set(params) == set(reference.get_trainable_params(ids[0]))
    assert all(p.requires_grad and p.is_leaf for p in params.values())
    before = {t: sub.reconstruct(t) for t in ids}
    with pytest.warns(UserWarning, match="permanently adds 2 directions"):
        expanded = sub.get_trainable_params(ids[0], num_expand=2)
    m = sub.layer_names[0]
    v = sub.components_a[m].double()
    assert v.shape[0] == 5 and torch.allclose(v @ v.T, torch.eye(5, dtype=torch.float64), atol=1e-6)
    assert expanded[f"{m}.loadings_a"].shape == (5,)
    for t in ids:  # every task, not only the one asked for, still rebuilds the same factors
        torch.testing.assert_close(sub.reconstruct(t).lora_a[m], before[t].lora_a[m], atol=1e-6, rtol=1e-5)
    # A training step on the loadings only, written back with add_task.
    target = ours[1]
    optimiser = torch.optim.SGD(list(expanded.values()), lr=0.5)
    for _ in range(20):
        optimiser.zero_grad()
        loss = sum(
            (
                (expanded[f"{mm}.loadings_a"] @ sub.components_a[mm] + sub.means_a[mm] - target.lora_a[mm].reshape(-1))
                ** 2
            ).sum()
            for mm in sub.layer_names
        )
        loss.backward()
        optimiser.step()
    trained = Projection(
        ids[0],
        {mm: expanded[f"{mm}.loadings_a"].detach() for mm in sub.layer_names},
        {mm: expanded[f"{mm}.loadings_b"].detach() for mm in sub.layer_names},
    )
    sub.add_task(trained)
    moved = torch.linalg.norm(sub.reconstruct(ids[0]).lora_a[m] - target.lora_a[m])
    assert moved < torch.linalg.norm(before[ids[0]].lora_a[m] - target.lora_a[m])
    assert sub.tasks[ids[0]].error[m] == 0.0 and sub.tasks[ids[0]].norm[m] > 0


@pytest.mark.parametrize("bits, scheme, shrink", [(8, "int8", 3.9), (4, "nf4", 7.0)])
def test_quantize_packs_the_components_and_reports_the_error_it_adds(collection, bits, scheme, shrink):
    ids, ours, _ = collection
    sub = Subspace.from_adapters(ours, ids, num_components=4)
    before = {t: sub.reconstruct(t) for t in ids}
    old_errors = {t: dict(sub.tasks[t].error) for t in ids}
    float_bytes = sub.compression_stats()["stored_bytes"]
    sub.quantize(bits)
    stats = sub.compression_stats()
    assert stats["quantization"]["scheme"] == scheme
    assert float_bytes["components"] / stats["stored_bytes"]["components"] > shrink
    assert stats["stored_bytes"]["total"] < float_bytes["total"]
    # The recorded added error is the change of each task's rebuilt delta W, formed directly.
    changes = []
    for t in ids:
        after = sub.reconstruct(t)
        per_module = []
        for m in sub.layer_names:
            dw = ours[ids.index(t)].lora_b[m] @ ours[ids.index(t)].lora_a[m]
            moved = torch.linalg.norm(
                before[t].lora_b[m] @ before[t].lora_a[m] - after.lora_b[m] @ after.lora_a[m]
            ) / torch.linalg.norm(dw)
            per_module.append(float(moved))
            expected = (old_errors[t][m] ** 2 + float(moved) ** 2) ** 0.5
            assert abs(sub.tasks[t].error[m] - expected) < 1e-4 * max(expected, 1)
        changes.append(sum(per_module) / len(per_module))
    assert abs(stats["quantization"]["added_error"]["mean"] - sum(changes) / len(changes)) < 1e-4
    with pytest.raises(ValueError, match="already quantized"):
        sub.quantize(8)
    # A basis change keeps it quantized: the new basis is packed and the new rows fit to it.
    sub.absorb_incremental(ours[0], "again")
    assert sub.quantization == {"scheme": scheme, "added_error": None}
    stored = sub.modules[sub.layer_names[0]]
    assert torch.equal(stored.a.components, quantize.decode(stored.packed["A"], stored.a.mean.shape[0]))
    measured = sub.tasks["again"].error[sub.layer_names[0]]
    assert measured == pytest.approx(float(_delta_w_errors(sub, {"again": ours[0]})[0]), rel=1e-4)


def test_compression_stats_measure_the_original_files(collection, tmp_path_factory):
    ids, ours, _ = collection
    root = tmp_path_factory.getbasetemp() / "micro0"
    sub = Subspace.from_adapters(ours, ids, num_components=3)
    stats = sub.compression_stats()
    on_disk = sum(f.stat().st_size for t in ids for f in (root / t).iterdir())
    assert stats["original_bytes"] == on_disk
    assert stats["num_tasks"] == N and stats["compression_ratio"] == pytest.approx(
        on_disk / stats["stored_bytes"]["total"]
    )
    parts = stats["stored_bytes"]
    assert parts["total"] == sum(parts[k] for k in ("components", "means", "basis_other", "loadings", "metadata"))
    assert (
        parts["components"]
        == parts["float32_components"]
        == 4 * sum(c.numel() for side in (sub.components_a, sub.components_b) for c in side.values())
    )


def test_bad_adapters_are_refused_with_the_reason(collection):
    ids, ours, _ = collection
    sub = Subspace.from_adapters(ours[:4], ids[:4], num_components=2)
    m = sub.layer_names[0]
    wrong = Adapter({**ours[0].lora_a, m: torch.zeros(2, 64)}, {**ours[0].lora_b, m: torch.zeros(64, 2)})
    with pytest.raises(ValueError, match=f"adapter 'wrong' does not fit: module '{m}' is"):
        sub.project(wrong, "wrong")
    broken = Adapter({**ours[0].lora_a, m: torch.full_like(ours[0].lora_a[m], float("nan"))}, dict(ours[0].lora_b))
    with pytest.raises(ValueError, match="NaN or Inf"):
        sub.absorb_incremental(broken, "broken")
    with pytest.raises(ValueError, match="task ids"):
        Subspace.from_adapters(ours[:2], ["same", "same"])
    assert len(sub.tasks) == 4  # nothing was half-added
