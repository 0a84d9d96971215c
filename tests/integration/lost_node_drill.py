"""Run by test_lost_node in its own process: compress on a three-node ray.cluster_utils.Cluster
(a head without CPUs, two one-CPU workers) and remove a worker node while shards run on it.

    python lost_node_drill.py SOURCE STORE
"""

import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_tasks


def main(source: str, store: str) -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    from pipeline.cli import main as cli

    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(rc=cli(["compress", source, "--out", store, "--components", "4", "--memory-budget", "1"])))
    run.start()
    victim = workers[0]
    deadline = time.time() + 120
    while time.time() < deadline:
        running = [t for t in list_tasks(filters=[("state", "=", "RUNNING"), ("name", "=", "compute_shard")])]
        if any(t.node_id == victim.node_id for t in running):
            break
        time.sleep(0.1)
    else:
        print("no shard ever ran on the victim node", file=sys.stderr)
        return 3
    cluster.remove_node(victim, allow_graceful=False)
    print(f"removed node {victim.node_id} while {len(running)} shard task(s) ran", flush=True)
    run.join()
    for _ in range(20):  # for the log only: task events reach the state API a little later
        retried = [t for t in list_tasks(filters=[("name", "=", "compute_shard")], limit=1000) if t.attempt_number > 0]
        if retried:
            break
        time.sleep(0.5)
    print(f"retried shard tasks seen: {len(retried)}", flush=True)
    ray.shutdown()
    cluster.shutdown()
    return outcome.get("rc", 2)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
