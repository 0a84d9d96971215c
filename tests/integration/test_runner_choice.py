"""Small runs stay small: project, rebase and export of a few adapters run in-process and never
start Ray; --address, RAY_ADDRESS or --runner ray put them on Ray; in-process and Ray runs
publish the same version; export --all writes batches whose files equal one-by-one exports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import make_collection, run_cli

from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.operations.export import BATCH_LEAST, export_all, plan_export
from pipeline.runners import SerialRunner

ROOT = Path(__file__).parents[2]
PROBE = "; print('RAY_IMPORTED', 'ray' in sys.modules, file=sys.stderr)"


@pytest.fixture
def ray_tmp():
    """Ray's temporary folder for the commands a test runs (short: Ray's socket paths have a
    length limit), where any Ray they start leaves its session folder."""
    folder = Path(tempfile.mkdtemp(prefix="rt"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _cli(ray_tmp: Path, *args) -> subprocess.CompletedProcess:
    """The CLI in a process of its own, with no RAY_ADDRESS and Ray's temporary folder `ray_tmp`;
    it reports whether Ray was imported at all (Ray cannot start without it)."""
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environment.update({"PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp)})
    code = "import sys; from pipeline import cli; rc = cli.main(sys.argv[1:])" + PROBE + "; sys.exit(rc)"
    run = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300, env=environment
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _ray_sessions(ray_tmp: Path) -> list[str]:
    return sorted(p.name for p in ray_tmp.glob("ray/session_*"))


@pytest.fixture
def grown(runner, tmp_path):
    """A store of 6 micro adapters (compressed on the session's Ray), and a source with 3 more."""
    ids = make_collection(tmp_path / "pool", 9, preset="micro")
    for name in ids[:6]:
        shutil.copytree(tmp_path / "pool" / name, tmp_path / "src" / name)
    assert run_cli("compress", tmp_path / "src", "--out", tmp_path / "store", "--components", 2) == 0
    for name in ids[6:]:
        shutil.copytree(tmp_path / "pool" / name, tmp_path / "src" / name)
    return ids


def test_small_project_rebase_and_export_start_no_ray(grown, tmp_path, ray_tmp):
    store, src = tmp_path / "store", tmp_path / "src"
    for args in (
        ["project", store, src],
        ["rebase", store, src],
        ["export", store, *grown[:3], "--out", tmp_path / "some"],
        ["export", store, "--all", "--out", tmp_path / "all"],
        ["info", store],
        ["versions", store],
        ["verify", store, "--all"],
    ):
        run = _cli(ray_tmp, *args)
        assert "RAY_IMPORTED False" in run.stderr, (args, run.stderr[-2000:])
    assert _ray_sessions(ray_tmp) == []
    published = Store(Location(str(store))).published()
    assert [m["operation"] for m in published] == ["compress", "project", "rebase"]
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == grown


def test_address_or_runner_ray_puts_a_small_export_on_ray(grown, tmp_path, ray_tmp):
    import ray

    store = tmp_path / "store"
    joined = _cli(ray_tmp, "export", store, *grown[:2], "--out", tmp_path / "a", "--address", _gcs(ray))
    assert "RAY_IMPORTED True" in joined.stderr
    assert _ray_sessions(ray_tmp) == []  # it joined the session's cluster, and started none
    forced = _cli(ray_tmp, "export", store, *grown[:2], "--out", tmp_path / "b", "--runner", "ray", "--num-cpus", 1)
    assert "RAY_IMPORTED True" in forced.stderr
    assert _ray_sessions(ray_tmp) != []  # an embedded Ray, started for two adapters
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def _gcs(ray) -> str:
    return ray.get_runtime_context().gcs_address


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_in_process_and_ray_runs_publish_the_same_version(grown, tmp_path):
    """The in-process runner plans the same shards (parallelism 2, as the session's Ray) and
    computes the same values."""
    shutil.copytree(tmp_path / "store", tmp_path / "twin")
    assert run_cli("rebase", tmp_path / "store", tmp_path / "src", "--runner", "local", "--num-cpus", 2) == 0
    assert run_cli("rebase", tmp_path / "twin", tmp_path / "src", "--runner", "ray") == 0
    local, on_ray = (Store(Location(str(tmp_path / name))) for name in ("store", "twin"))
    assert local.manifest()["modules"].keys() == on_ray.manifest()["modules"].keys()
    assert [e["basis"] for e in local.manifest()["modules"].values()] == [
        e["basis"] for e in on_ray.manifest()["modules"].values()
    ]
    for path in {e["basis"] for e in local.manifest()["modules"].values()}:
        ours, theirs = local.read_basis(path), on_ray.read_basis(path)
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    ours, theirs = (s.read_table(s.current_version(), "loadings.parquet").to_pydict() for s in (local, on_ray))
    assert ours["task_id"] == theirs["task_id"] and ours["module"] == theirs["module"]
    torch.testing.assert_close(torch.tensor(ours["a"]), torch.tensor(theirs["a"]), rtol=1e-5, atol=1e-6)


class Recording(SerialRunner):
    """In-process, keeping each task's adapters."""

    num_cpus = 2

    def __init__(self):
        self.tasks: list[list[str]] = []

    def map_unordered(self, fn, items, **options):
        self.tasks.extend(list(item.task_ids) for item in items)
        return super().map_unordered(fn, items, **options)


def test_export_all_writes_batches_equal_to_one_by_one_exports(runner, tmp_path):
    ids = make_collection(tmp_path / "src", 2 * BATCH_LEAST + 3, preset="micro")
    assert run_cli("compress", tmp_path / "src", "--out", tmp_path / "store", "--components", 2) == 0
    store = Store(Location(str(tmp_path / "store")))
    recording = Recording()
    plan = plan_export(store, store.current_version(), None, Location(str(tmp_path / "all")))
    written = export_all(store, plan, recording)
    assert sorted(written) == sorted(str(tmp_path / "all" / t) for t in ids)
    assert sorted(t for task in recording.tasks for t in task) == ids  # each adapter once
    assert len(recording.tasks) == 3 and all(len(task) >= 3 for task in recording.tasks)
    for task_id in ids:
        assert run_cli("export", tmp_path / "store", task_id, "--out", tmp_path / "one" / task_id) == 0
    assert _files(tmp_path / "all") == _files(tmp_path / "one")


def test_runner_flag_and_job_key_are_checked(tmp_path, capsys):
    assert (
        run_cli("export", tmp_path / "s", "x", "y", "--out", tmp_path / "o", "--runner", "local", "--address", "h:1")
        == 1
    )
    assert "--runner local runs in-process" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("export", tmp_path / "s", "--all", "--out", tmp_path / "o", "--runner", "threads")
    from pipeline.jobspec import main

    config = tmp_path / "export.yaml"
    config.write_text(f"store: {tmp_path / 's'}\nout: {tmp_path / 'o'}\nall: true\nrunner: local\naddress: h:1\n")
    assert main("export", ["--config", str(config)]) == 1
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "'runner': local runs in-process" in line["error"]


def test_small_quantize_and_vlora_round_trip_start_no_ray(tmp_path, ray_tmp):
    """quantize, vlora-export and vlora-import of a few adapters run in-process too."""
    make_collection(tmp_path / "src", 6, preset="micro")
    store = tmp_path / "store"
    for args in (
        ["compress", tmp_path / "src", "--out", store, "--components", 2, "--max-error", "none", "--runner", "local"],
        ["vlora-export", store, tmp_path / "vlora"],
        ["vlora-import", tmp_path / "vlora", tmp_path / "imported"],
        ["quantize", store, "--bits", 8],
    ):
        run = _cli(ray_tmp, *args)
        assert "RAY_IMPORTED False" in run.stderr, (args, run.stderr[-2000:])
    assert _ray_sessions(ray_tmp) == []
    assert [m["operation"] for m in Store(Location(str(store))).published()] == ["compress", "quantize"]
    assert Store(Location(str(tmp_path / "imported"))).manifest()["adapters"]["ok"] == 6
