"""`info`, `report` and `evaluate` show the per-adapter picture (the error distribution, the worst
adapters by name) and `report` renders stores of every method, per module with labels that keep
the layer number; every task id shown is escaped."""

import json
import re

import numpy as np
import pyarrow.parquet as pq
from conftest import make_collection, run_cli
from safetensors.torch import load_file, save_file

from pipeline import peft_format
from pipeline.io.format import LOADINGS

LAYERS = 4  # the tiny preset's
MODULES = [f"model.layers.{layer}.self_attn.{name}" for layer in range(LAYERS) for name in ("q_proj", "v_proj")]


def _json(capsys, *args):
    capsys.readouterr()
    assert run_cli(*args, "--json") == 0
    return json.loads(capsys.readouterr().out)


def _report(capsys, store, out):
    assert run_cli("report", store, "--out", out) == 0
    capsys.readouterr()
    return out.read_text()


def _chart(page, heading):
    """The SVG under a heading: its bars' hover titles and its axis labels."""
    svg = page.split(f"<h2>{heading}</h2>", 1)[1].split("</svg>", 1)[0]
    return re.findall(r"<title>([^<]*)</title>", svg), re.findall(r'font-size="9" text-anchor="middle">([^<]*)<', svg)


def _mixed(src, n):
    """n tiny adapters whose q_proj modules come from the `gauge` structure (their factors do not
    line up: joint bases serve them) and v_proj modules from `same-init` (flat bases do)."""
    make_collection(src.parent / "gauge", n, preset="tiny", structure="gauge", shared_dim=3)
    ids = make_collection(src.parent / "same-init", n, preset="tiny", structure="same-init")
    for task_id in ids:
        (src / task_id).mkdir(parents=True)
        weights = {}
        for structure, name in (("gauge", "q_proj"), ("same-init", "v_proj")):
            folder = src.parent / structure / task_id
            weights |= {k: v for k, v in load_file(str(folder / peft_format.WEIGHTS_FILE)).items() if name in k}
        save_file(weights, str(src / task_id / peft_format.WEIGHTS_FILE))
        config = src.parent / "gauge" / task_id / peft_format.CONFIG_FILE
        (src / task_id / peft_format.CONFIG_FILE).write_bytes(config.read_bytes())


def _assert_modules_charted(page, methods):
    """Every module in each per-module chart, labelled with its layer number, and in the table."""
    assert f"<th>modules</th><td>{len(MODULES)}: " in page
    for heading in ("Explained variance per module", "Bases per module", "Error per module over adapters"):
        titles, labels = _chart(page, heading)
        assert len(titles) == 2 * len(MODULES)
        assert labels == [m.split(".")[2] + "." + m.split(".")[-1] for m in MODULES]  # e.g. 3.v_proj
    titles, _ = _chart(page, "Bases per module")
    for module, method in methods.items():
        names = ("k_a", "k_b") if method == "flat" else ("c", "q")
        assert sum(t.startswith(f"{module} {names[0]}: ") for t in titles) == 1
        assert f"<tr><td>{module}</td><td>{method}</td>" in page


def test_report_of_a_joint_store_charts_every_module(runner, tmp_path, capsys):
    make_collection(tmp_path / "src", 12, preset="tiny", structure="gauge", shared_dim=3)
    store = tmp_path / "joint"
    assert run_cli("compress", tmp_path / "src", "--out", store, "--method", "joint", "--components", 8) == 0
    info = _json(capsys, "info", store)
    assert info["modules"] == len(MODULES) and set(info["module_error"]) == set(MODULES)
    page = _report(capsys, store, tmp_path / "joint.html")
    _assert_modules_charted(page, {m: "joint" for m in MODULES})
    assert "joint 8 modules (c 8, q " in page


def test_report_of_a_mixed_auto_store_shows_each_modules_method(runner, tmp_path, capsys):
    _mixed(tmp_path / "src", 24)
    store = tmp_path / "auto"
    assert run_cli("compress", tmp_path / "src", "--out", store, "--ratio", 4) == 0
    methods = {m: c["method"] for m, c in _json(capsys, "info", store)["methods"].items()}
    assert set(methods) == set(MODULES) and set(methods.values()) == {"flat", "joint"}
    page = _report(capsys, store, tmp_path / "auto.html")
    _assert_modules_charted(page, methods)
    titles, _ = _chart(page, "Bases per module")
    assert any(" c: " in t for t in titles) and any(" k_a: " in t for t in titles)


def test_info_names_the_worst_adapters_and_the_error_distribution(runner, tmp_path, capsys):
    """A basis of twelve adapters of one shared structure (k 2), and two adapters of another
    seed's projected on it: info names those two first, with the errors the loadings hold."""
    make_collection(tmp_path / "src", 12, preset="micro", shared_dim=2, noise=0.01)
    store = tmp_path / "store"
    assert run_cli("compress", tmp_path / "src", "--out", store, "--components", 2) == 0
    odd = make_collection(tmp_path / "src", 2, preset="micro", seed=9, prefix="odd")
    assert run_cli("project", store, tmp_path / "src") == 0
    loadings = pq.read_table(store / "versions" / "v000002" / LOADINGS, columns=["task_id", "error"]).to_pylist()
    known = {
        t: float(np.mean([r["error"] for r in loadings if r["task_id"] == t])) for t in {r["task_id"] for r in loadings}
    }
    means = np.array(sorted(known.values()))

    info = _json(capsys, "info", store)
    worst = info["worst_adapters"]
    assert [w["task_id"] for w in worst] == sorted(known, key=lambda t: -known[t])
    assert {w["task_id"] for w in worst[:2]} == set(odd) and info["error"]["worst"] == [w["task_id"] for w in worst[:5]]
    assert all(w["mean"] == known[w["task_id"]] for w in worst)  # the same float32 values, averaged alike
    d = info["error_distribution"]
    assert d["adapters"] == 14 and d["min"] == means[0] and d["max"] == means[-1]
    assert d["p50"] == np.median(means) and d["p90"] == np.quantile(means, 0.9) and d["p99"] == np.quantile(means, 0.99)

    capsys.readouterr()
    assert run_cli("info", store) == 0
    out = capsys.readouterr().out
    assert f"per adapter  min {means[0]:.4f}, p50 {np.median(means):.4f}, " in out and "of 14 adapters'" in out
    line = next(line for line in out.splitlines() if line.startswith("worst  "))
    assert line == "worst        " + ", ".join(f"{w['task_id']} ({w['mean']:.4f})" for w in worst[:5])


def test_report_escapes_a_hostile_task_id(runner, tmp_path, capsys):
    ids = make_collection(tmp_path / "src", 6, preset="micro")
    hostile = tmp_path / "src" / '<img src=x onerror="alert(1)">&'
    hostile.mkdir()
    (hostile / peft_format.CONFIG_FILE).write_bytes((tmp_path / "src" / ids[0] / peft_format.CONFIG_FILE).read_bytes())
    assert run_cli("compress", tmp_path / "src", "--out", tmp_path / "store", "--components", 2) == 0
    page = _report(capsys, tmp_path / "store", tmp_path / "report.html")
    assert "<img" not in page and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;" in page
    assert "<h2>Quarantined adapters (1)</h2>" in page and "<h2>Worst 6 adapters</h2>" in page
    info = _json(capsys, "info", tmp_path / "store")
    assert info["adapters"]["quarantined"] == 1 and info["error_distribution"]["adapters"] == 6
