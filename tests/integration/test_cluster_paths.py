"""Local paths on a multi-node cluster (ray.cluster_utils.Cluster, in its own process since this
session already has its Ray; see paths_drill.py).

The nodes of such a cluster all run on this machine and share its disk, so the drill shows:
(a) a relative path is resolved where the command runs, not in the nodes' working directory;
(b) the rule for nodes on other hosts, with a node given another address (127.0.0.2), which Ray
treats as another host: a local path is refused before any task runs (no store object left), and
accepted once declared shared."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_collection

DRILL = Path(__file__).with_name("paths_drill.py")


def test_local_paths_are_resolved_on_the_driver_and_refused_for_other_hosts_unless_shared(tmp_path):
    make_collection(tmp_path / "driver" / "src", 8)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LORA_SUBSPACE_SHARED_PATHS")}
    done = subprocess.run(
        [sys.executable, str(DRILL), str(tmp_path)],
        env={**env, "PYTHONPATH": str(Path(__file__).parents[2])},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])

    relative = outcome["relative"]
    assert relative == {"code": 0, "error": "", "driver_store": True, "nodes_store": False}, relative

    other = outcome["other_host"]
    code, error = other["refused"]
    assert code == 1 and other["refused_wrote"] == []  # no store object: refused before any task
    assert error == (
        f"lora-subspace: error: {tmp_path.resolve() / 'driver' / 'src'} is a local path, "
        "but the Ray cluster has nodes on other hosts (127.0.0.2) "
        "that would not see it: use s3://..., or a file system every node mounts at the same path, "
        "declared in LORA_SUBSPACE_SHARED_PATHS"
    )
    assert other["accepted"] == [0, ""] and other["accepted_store"]
