"""`evaluate`: a basis built without a held-out fraction, the held-out adapters' errors against
the mean adapter and each adapter's own SVD at the same bytes."""

import json

from conftest import make_collection, run_cli

from pipeline import Subspace


def test_held_out_adapters_are_served_by_a_basis_of_the_rest(runner, tmp_path, capsys):
    ids = make_collection(tmp_path / "src", 40, preset="micro", shared_dim=4)
    Subspace.from_adapters([str(tmp_path / "src" / t) for t in ids], ids, num_components=4).save(
        str(tmp_path / "store")
    )
    capsys.readouterr()
    assert run_cli("evaluate", tmp_path / "store", tmp_path / "src", "--holdout", "0.2", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert (
        result["held_out"] == 8 and result["adapters"] == 40 and result["k"] == [4, 4] and result["methods"] == ["flat"]
    )
    assert set(result["held_out_ids"]) <= set(ids)
    e = result["error"]
    # A 4-dimensional shared structure: the basis of 32 serves the other 8 far better than the
    # mean adapter, and better than each adapter's own SVD at the store's bytes per adapter.
    assert e["basis"]["mean"] < 0.1 < e["own_svd"]["mean"] < e["mean_adapter"]["mean"]
    assert result["own_svd_rank"] >= 1
    # The held-out adapter each approach serves worst, by name: its error (mean over modules) is
    # the largest of the held-out adapters' means.
    for approach, worst in result["worst"].items():
        assert worst["task_id"] in result["held_out_ids"]
        assert e[approach]["p95"] <= worst["error"] <= e[approach]["max"]
    # The draw is the seed's: the same ids again, others with another seed.
    assert run_cli("evaluate", tmp_path / "store", tmp_path / "src", "--holdout", "0.2", "--json") == 0
    assert json.loads(capsys.readouterr().out)["held_out_ids"] == result["held_out_ids"]
    assert run_cli("evaluate", tmp_path / "store", tmp_path / "src", "--holdout", "0.2", "--seed", "5", "--json") == 0
    assert json.loads(capsys.readouterr().out)["held_out_ids"] != result["held_out_ids"]
    assert run_cli("evaluate", tmp_path / "store", tmp_path / "src") == 0
    assert "each adapter's own rank-" in capsys.readouterr().out
    assert run_cli("evaluate", tmp_path / "store", tmp_path / "src", "--holdout", "0.2") == 0
    out = capsys.readouterr().out
    worst = result["worst"]["basis"]
    assert (
        f"worst held-out adapter under the basis: {worst['task_id']}, error {worst['error']:.4f} "
        f"(mean {e['basis']['mean']:.4f})" in out
    )


def test_a_holdout_that_leaves_no_basis_is_refused(runner, tmp_path, capsys):
    ids = make_collection(tmp_path / "src", 4, preset="micro")
    Subspace.from_adapters([str(tmp_path / "src" / t) for t in ids], ids, num_components=2).save(
        str(tmp_path / "store")
    )
    assert run_cli("evaluate", tmp_path / "store", tmp_path / "src", "--holdout", "0.9") == 1
    assert "leaves fewer than 2 adapters" in capsys.readouterr().err


def test_a_budgeted_auto_store_is_evaluated_as_it_was_built(runner, tmp_path, capsys):
    """On a collection whose gauges differ, the store's auto method chose joint modules: the
    held-out adapters are projected on joint bases of the rest, at the store's budget."""
    make_collection(tmp_path / "src", 24, preset="micro", structure="gauge", shared_dim=3)
    assert run_cli("compress", tmp_path / "src", "--out", tmp_path / "store", "--ratio", 4) == 0
    capsys.readouterr()
    assert run_cli("evaluate", tmp_path / "store", tmp_path / "src", "--holdout", "0.25", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["methods"] == ["joint"] and result["k"] == [] and result["held_out"] == 6
    e = result["error"]
    assert 0 < e["basis"]["mean"] < e["mean_adapter"]["mean"]
    assert result["own_svd_rank"] >= 1 and result["bytes_per_adapter"] > 0
