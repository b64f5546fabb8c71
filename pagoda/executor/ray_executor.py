"""One Ray actor per rank, on any node of a Ray cluster (--distributed-executor-backend ray).

The executor attaches to the Ray cluster of this machine (`ray start --head` here, or
`ray start --address=HEAD:6379` on a node of one; RAY_ADDRESS names another) or, with none,
starts a local one. A placement group reserves one bundle per rank (a GPU and a CPU, or a CPU on
CPU runs) before any actor starts, packed onto as few nodes as hold them, so ranks that are
consecutive (a TP group) share a node where they can. Rank 0's actor names its node's address and
a free port; every rank joins the process groups there (NCCL on GPUs, gloo on CPUs).

A step goes out as the multiprocess executor's does, as one StepMessage: put into Ray's object
store once and passed to every actor. An actor runs one caller's calls in the order they were
made, so a step is launched without waiting for its answer (executor.base.RankExecutor), and the
answers are gathered when its tokens are read. A rank that fails, or whose actor or node dies, fails the
call with an ExecutorDeadError naming the rank and its node: the other ranks may be stuck in a
collective waiting for it, so every actor is killed and the executor is done."""

from __future__ import annotations

import logging
import socket
import time
import weakref
from typing import Any

from pagoda.config.groups import ResolvedConfig
from pagoda.executor.base import ExecutorDeadError, RankExecutor
from pagoda.worker.worker import Worker, set_up_rank

logger = logging.getLogger("pagoda")

INSTALL_HINT = "--distributed-executor-backend ray needs Ray: pip install 'pagoda[ray]'"
# Ranks wait this long for the cluster to offer their bundles (nodes may still be joining).
PLACEMENT_TIMEOUT_S = 1800.0
_PLACEMENT_LOG_EVERY_S = 30.0


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    return ray


class RankActor:
    """A rank's Worker inside a Ray actor; its methods are the executor's calls."""

    def __init__(self, config: ResolvedConfig, rank: int) -> None:
        self._config = config
        self._rank = rank
        self._worker: Worker | None = None

    def node(self) -> tuple[str, str]:
        """This actor's node: its address, and Ray's id of it (nodes may share an address)."""
        import ray

        return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def start(self, init_method: str) -> None:
        set_up_rank(self._config, self._rank, init_method)
        self._worker = Worker(self._config, self._rank)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self._worker, method)(*args)


class RayExecutor(RankExecutor):
    def __init__(self, config: ResolvedConfig) -> None:
        ray = self._ray = _import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init()  # the running cluster this machine belongs to (or RAY_ADDRESS's), else a new local one
        world_size = config.parallel.world_size
        super().__init__(config)
        bundle = {"GPU": 1, "CPU": 1} if config.device.device.type == "cuda" else {"CPU": 1}
        self._group = placement_group([bundle] * world_size, strategy="PACK")
        self._actors: list[Any] = []
        self._nodes: list[tuple[str, str]] = []  # each rank's node (address, id), once every actor has started
        self._finalizer = weakref.finalize(self, _stop_actors, ray, self._actors, self._group)
        self._unanswered: list[Any] = []  # each rank's answer to the calls posted, in order, not yet read
        self._wait_for_placement(bundle, world_size)
        actor_class = ray.remote(RankActor)
        for rank in range(world_size):
            strategy = PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=rank)
            self._actors.append(actor_class.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), scheduling_strategy=strategy
            ).remote(config, rank))
        self._nodes = self._gather([actor.node.remote() for actor in self._actors])
        port = self._gather([self._actors[0].free_port.remote()])[0]
        self._gather([actor.start.remote(f"tcp://{self._nodes[0][0]}:{port}") for actor in self._actors])
        placed = ", ".join(f"rank {rank}{self._on_node(rank)}" for rank in range(world_size))
        logger.info("Ray executor: %d ranks: %s", world_size, placed)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._call("allocate_kv_cache", num_blocks)

    def shutdown(self) -> None:
        self._finalizer()

    def _wait_for_placement(self, bundle: dict[str, int], world_size: int) -> None:
        """Wait for the cluster to offer every bundle, saying what is missing while it waits."""
        ready = self._group.ready()
        deadline = time.monotonic() + PLACEMENT_TIMEOUT_S
        while not self._ray.wait([ready], timeout=_PLACEMENT_LOG_EVERY_S)[0]:
            wanted = f"{world_size} x {bundle}; the cluster has {self._ray.available_resources()} free"
            if time.monotonic() > deadline:
                self.shutdown()
                raise RuntimeError(f"Ray could not place the ranks within {PLACEMENT_TIMEOUT_S:.0f} s: {wanted}")
            logger.warning("waiting for Ray to place the ranks: %s", wanted)

    def _post(self, method: str, *args: Any) -> None:
        if not self._finalizer.alive:
            raise ExecutorDeadError("the executor's Ray actors have stopped (shut down, or a rank failed)")
        # One copy in the object store, read by every actor, instead of one pickle per actor.
        refs = [self._ray.put(arg) for arg in args]
        self._unanswered.extend(actor.call.remote(method, *refs) for actor in self._actors)

    def _call(self, method: str, *args: Any) -> list[Any]:
        self._post(method, *args)
        refs, self._unanswered = self._unanswered, []
        return self._gather(refs)[-len(self._actors) :]

    def _gather(self, refs: list[Any]) -> list[Any]:
        """The answers, in order, of calls made to the ranks in rank order (ref i is rank
        i % ranks'); the first failure kills all actors and raises."""
        ray = self._ray
        index_of = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            index = index_of[ready[0]]
            rank = index % len(self._actors)
            try:
                results[index] = ray.get(ready[0])
            except ray.exceptions.RayActorError as error:
                self._fail(f"worker rank {rank}{self._on_node(rank)} died ({type(error).__name__}): {error}")
            except ray.exceptions.RayError as error:
                self._fail(f"worker rank {rank}{self._on_node(rank)} failed:\n{error}")
        return results

    def _on_node(self, rank: int) -> str:
        """' on node ADDRESS (id ...)' once the ranks' nodes are known (a failure before has none)."""
        if not self._nodes:
            return ""
        address, node_id = self._nodes[rank]
        return f" on node {address} (id {node_id[:12]})"

    def _fail(self, message: str) -> None:
        self.shutdown()
        raise ExecutorDeadError(message)


def _stop_actors(ray: Any, actors: list[Any], group: Any) -> None:
    """Kill every rank's actor and free the placement group's reservation."""
    if not ray.is_initialized():  # Ray already shut down (interpreter exit): nothing is left to free
        return
    for actor in actors:
        ray.kill(actor)
    ray.util.remove_placement_group(group)
