"""Where the server's engine core processes come from: forks of one server process (multiprocessing's
forkserver) that has already imported what a core runs.

A spawned core would import torch, the engine and the model code after the front end has finished
its own imports (seconds each, one after the other). The fork server starts as soon as `pagoda
serve` has bound its port, so its imports run beside the front end's; each core is then a fork of
a process with one thread, which is safe where a fork of the front end (its threads, its event
loop) is not. It never touches CUDA: each core initializes its own GPUs. This module imports
nothing heavy, so that the front end can start the server before its own imports."""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
from collections.abc import Sequence
from multiprocessing.context import BaseContext

# What a core imports before it can build its engine: the core's loop and engine, the model code,
# and the configuration classes its pickled config needs (transformers' take seconds to import).
CORE_MODULES = ["pagoda.engine.core_proc", "pagoda.models", "transformers.activations"]
# Random weights are drawn under the names of transformers' own model of the config, which the
# core builds on the meta device: its modeling code takes seconds more to import.
DUMMY_WEIGHT_MODULES = ["transformers.modeling_utils"]


def core_process_context(preload: Sequence[str] = CORE_MODULES) -> BaseContext:
    """The multiprocessing context the engine cores start from."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    return context


def start_core_server(dummy_weights: bool) -> None:
    """Start the fork server now (the first core would otherwise start it, and wait for its
    imports then), with the core's modules to preload."""
    # Sets the preload list, which the server reads when it starts.
    core_process_context([*CORE_MODULES, *DUMMY_WEIGHT_MODULES] if dummy_weights else CORE_MODULES)
    multiprocessing.forkserver.ensure_running()
