"""Run by the multi-node tests in their own process: compress on a three-node
ray.cluster_utils.Cluster (a head without CPUs, two one-CPU workers).

    python cluster_drill.py spread SOURCE STORE      # print how many shard tasks ran on each node
    python cluster_drill.py lose-node SOURCE STORE   # remove a worker node while shards run on it

For lose-node, every shard task starts with a delay (LORA_SUBSPACE_DELAYPOINT=shard-start:S, set
by the test), so once the first shard has finished both worker nodes are busy with the next ones:
removing one then kills a running task, which Ray must run again on the other.
"""

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster


def main(mode: str, source: str, store: str) -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR")
        return _spread(source, store) if mode == "spread" else _lose_node(cluster, workers[0], source, store)
    finally:
        ray.shutdown()
        cluster.shutdown()


def _compress(source: str, store: str):
    from pipeline.config import ComponentRule, Options
    from pipeline.io.location import Location
    from pipeline.io.store import Store
    from pipeline.operations.compress import compress
    from pipeline.runners.ray_runner import RayRunner

    runner = RayRunner()
    compress(Location(source), Store(Location(store)), runner, Options(ComponentRule(components=4), task_memory=1))
    return runner


def _spread(source: str, store: str) -> int:
    runner = _compress(source, store)
    print(json.dumps({"tasks_per_node": dict(runner.tasks_per_node)}), flush=True)
    return 0


def _lose_node(cluster: Cluster, victim, source: str, store: str) -> int:
    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(runner=_compress(source, store)))
    run.start()
    deadline = time.time() + 120
    while not list(Path(store).glob("versions/*/staging/*.json")):
        if time.time() > deadline or not run.is_alive():
            print("no shard finished in time", file=sys.stderr)
            return 3
        time.sleep(0.05)
    cluster.remove_node(victim, allow_graceful=False)
    print(f"removed node {victim.node_id} after the first shard finished", flush=True)
    run.join()
    return 0 if "runner" in outcome else 2


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
