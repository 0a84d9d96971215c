"""The job entrypoints, in process on the session's Ray: config in, one JSON line out, a report
next to every version written."""

import json

from conftest import make_collection

from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.jobspec import main


def _run(capsys, job, *sets, config=None):
    args = (["--config", str(config)] if config else []) + [a for s in sets for a in ("--set", s)]
    status = main(job, args)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    return status, json.loads(line)


def test_compress_rebase_export_jobs(runner, tmp_path, capsys):
    ids = make_collection(tmp_path / "pool", 12)
    (tmp_path / "src").mkdir()
    for name in ids[:8]:
        (tmp_path / "pool" / name).rename(tmp_path / "src" / name)
    config = tmp_path / "compress.yaml"
    config.write_text(f"source: {tmp_path / 'src'}\nstore: {tmp_path / 'store'}\ncomponents: 4\nlog_format: json\n")
    status, line = _run(capsys, "compress", config=config)
    assert status == 0 and line["status"] == "ok" and line["version"] == "v000001" and line["adapters"] == 8
    report = (tmp_path / "store" / "reports" / "v000001.html").read_text()
    assert (
        report.startswith("<!doctype html>")
        and report.count("<svg") == 5  # explained variance, bases, error per module, over adapters, history
        and "adapter-00000" not in report.split("Worst")[0]
    )

    for name in ids[8:]:
        (tmp_path / "pool" / name).rename(tmp_path / "src" / name)
    status, line = _run(capsys, "rebase", f"source={tmp_path / 'src'}", f"store={tmp_path / 'store'}", "prune_keep=1")
    assert status == 0 and line["version"] == "v000002" and line["absorbed"] == 4 and line["quarantined"] == 0
    assert (
        line["pruned"] == [] and (tmp_path / "store" / "reports" / "v000002.html").exists()
    )  # v1 is v2's parent: kept
    status, line = _run(capsys, "rebase", f"source={tmp_path / 'src'}", f"store={tmp_path / 'store'}")
    assert status == 0 and line["up_to_date"] and line["version"] is None

    status, line = _run(
        capsys, "export", f"store={tmp_path / 'store'}", f"out={tmp_path / 'out'}", f"task_ids=[{ids[0]}, {ids[9]}]"
    )
    assert status == 0 and line["exported"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [ids[0], ids[9]]
    assert Store(Location(str(tmp_path / "store"))).current_version() == "v000002"


def test_a_failing_job_exits_1_with_a_json_line(runner, tmp_path, capsys):
    status, line = _run(capsys, "compress", f"source={tmp_path / 'nowhere'}", f"store={tmp_path / 'store'}")
    assert status == 1 and line["status"] == "error" and "does not exist" in line["error"]
