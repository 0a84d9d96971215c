"""Run by test_lost_node in its own process: compress on a three-node ray.cluster_utils.Cluster
(a head without CPUs, two one-CPU workers) and remove a worker node while shards run on it.

    python lost_node_drill.py SOURCE STORE

Every shard task starts with a delay (LORA_SUBSPACE_DELAYPOINT=shard-start:S, set by the test), so
once the first shard has finished, both worker nodes are busy with the next ones: removing one
then kills a running task, which Ray must run again on the other.
"""

import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster


def main(source: str, store: str) -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        return _drill(cluster, source, store)
    finally:
        ray.shutdown()
        cluster.shutdown()


def _drill(cluster: Cluster, source: str, store: str) -> int:
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    from pipeline.cli import main as cli

    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(rc=cli(["compress", source, "--out", store, "--components", "4", "--memory-budget", "1"])))
    run.start()
    deadline = time.time() + 120
    while not list(Path(store).glob("versions/*/staging/*.json")):
        if time.time() > deadline or not run.is_alive():
            print("no shard finished in time", file=sys.stderr)
            return 3
        time.sleep(0.05)
    cluster.remove_node(workers[0], allow_graceful=False)
    print(f"removed node {workers[0].node_id} after the first shard finished", flush=True)
    run.join()
    return outcome.get("rc", 2)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
