"""Run by test_cluster_paths in its own process: local paths on a ray.cluster_utils.Cluster whose
nodes were started in another working directory than the driver's.

    python paths_drill.py WORK

WORK/driver holds the source `src`; the nodes (a head without CPUs, two one-CPU workers) start in
WORK/nodes. Prints one JSON line:

- relative: exit status of `compress src --out stores/x` run in WORK/driver, and which of
  WORK/driver/stores/x and WORK/nodes/stores/x hold a published store;
- other_host: a worker node is added with another address (127.0.0.2: a host of its own for Ray,
  though it shares this machine's disk); exit status and error line of a compress to an absolute
  local path, then of the same with WORK declared in LORA_SUBSPACE_SHARED_PATHS.
"""

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster


def _cli(*args: str) -> tuple[int, str]:
    from pipeline.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([*args, "--components", "4", "--task-memory", "1"])
    lines = [line for line in err.getvalue().splitlines() if line.startswith("lora-subspace:")]
    return code, lines[-1] if lines else ""


def main(work: str) -> int:
    work_dir = Path(work).resolve()
    driver, nodes = work_dir / "driver", work_dir / "nodes"
    nodes.mkdir(exist_ok=True)
    os.chdir(nodes)  # every node's processes start here
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        os.chdir(driver)
        ray.init(address=cluster.address, logging_level="ERROR")
        outcome = {}
        code, error = _cli("compress", "src", "--out", "stores/x")
        outcome["relative"] = {
            "code": code,
            "error": error,
            "driver_store": (driver / "stores/x/LATEST").exists(),
            "nodes_store": (nodes / "stores").exists(),
        }

        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2")
        cluster.wait_for_nodes()
        refused = _cli("compress", str(driver / "src"), "--out", str(work_dir / "refused"))
        os.environ["LORA_SUBSPACE_SHARED_PATHS"] = str(work_dir)
        accepted = _cli("compress", str(driver / "src"), "--out", str(work_dir / "accepted"))
        outcome["other_host"] = {
            "refused": list(refused),
            "refused_wrote": sorted(str(p) for p in (work_dir / "refused").rglob("*")),
            "accepted": list(accepted),
            "accepted_store": (work_dir / "accepted/LATEST").exists(),
        }
        print(json.dumps(outcome), flush=True)
        return 0
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
