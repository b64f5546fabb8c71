"""A local Ray cluster of two simulated nodes (Ray's own test utility: a head and a worker raylet
on this machine), one CPU each, so that two ranks of one CPU each must be placed on both."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import ray
from ray.cluster_utils import Cluster

NODES = 2
CPUS_PER_NODE = 1


@contextlib.contextmanager
def two_node_cluster() -> Iterator[Cluster]:
    """The cluster, with this process connected to it as a driver."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": CPUS_PER_NODE, "include_dashboard": False})
    try:
        for _ in range(NODES - 1):
            cluster.add_node(num_cpus=CPUS_PER_NODE)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def all_cpus_free(timeout_s: float = 30.0) -> bool:
    """Whether the cluster got every CPU back (Ray frees a removed placement group's bundles soon after)."""
    total = NODES * CPUS_PER_NODE
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU") != total and time.monotonic() < deadline:
        time.sleep(0.2)
    return ray.available_resources().get("CPU") == total


def _rank_actors() -> list[dict]:
    """The live rank actors on the cluster, from Ray's actor table (no dashboard needed)."""
    from ray._private.state import actors

    return [a for a in actors().values() if a["ActorClassName"] == "RankActor" and a["State"] == "ALIVE"]


def rank_actor_pids() -> list[int]:
    return [actor["Pid"] for actor in _rank_actors()]


def rank_actor_nodes() -> list[str]:
    """The node id of each live rank actor."""
    return [actor["Address"]["NodeID"] for actor in _rank_actors()]
