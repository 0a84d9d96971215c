"""Load: thousands of small adapters and a few large ones finish with bounded memory on a 2-core
machine. Each run is its own process (with its own embedded Ray) whose process tree is sampled."""

import json

from conftest import make_collection

from pipeline.benchmark.peaks import cli, run_with_peaks
from pipeline.io.location import Location
from pipeline.io.store import Store


def test_memory_does_not_grow_with_the_number_of_adapters(tmp_path):
    make_collection(tmp_path / "src", 3000)
    peaks = {}
    for n in (750, 3000):
        listing = tmp_path / f"first-{n}.txt"
        listing.write_text("\n".join(str(p) for p in sorted((tmp_path / "src").iterdir())[:n]))
        run = run_with_peaks(
            cli(
                "compress",
                listing,
                "--out",
                tmp_path / f"store-{n}",
                "--components",
                8,
                "--chunk-size",
                250,
                "--num-cpus",
                2,
            )
        )
        assert run.status == 0, run.stderr[-2000:]
        peaks[n] = run.peaks
    print(f"peak RSS MiB, 750 adapters: {peaks[750]}; 3000 adapters: {peaks[3000]}")
    # Four times the adapters, chunk by chunk: no worker grows by more than allocator noise (held
    # at once, the 3000 adapters' stacks alone are 390 MiB: a worker then peaks near 800 MiB); the
    # driver holds every adapter's scanned header (about 30 MiB more for 3000 tiny ones).
    for kind in ("driver", "worker"):
        assert peaks[3000][kind] <= 1.25 * peaks[750][kind], (kind, peaks)
    assert Store(Location(str(tmp_path / "store-3000"))).manifest()["adapters"]["ok"] == 3000


def test_a_few_large_adapters_stay_within_the_task_memory(tmp_path):
    make_collection(tmp_path / "src", 4, preset="mistral7b-qkv")  # 38 MB of float32 factors each
    run = run_with_peaks(
        cli(
            "compress",
            tmp_path / "src",
            "--out",
            tmp_path / "store",
            "--components",
            3,
            "--task-memory",
            "32MiB",
            "--num-cpus",
            2,
        )
    )
    assert run.status == 0, run.stderr[-2000:]
    peaks = run.peaks
    print(f"peak RSS MiB, 4 mistral7b-qkv adapters: {peaks}")
    store = Store(Location(str(tmp_path / "store")))
    report = json.loads(store.version_location("v000001").read_bytes("report.json"))
    assert max(s["stack_bytes"] for s in report["shards"]) <= 32 << 20
    assert peaks["worker"] < 1024 and peaks["driver"] < 1024
