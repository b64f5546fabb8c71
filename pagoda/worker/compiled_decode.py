"""The CPU decode forward compiled by torch.compile (inductor): `-O3` (`optimization_level=3`).

An eager CPU decode step of a small batch is mostly the host dispatching some 6,000 small aten
ops (docs/benchmarks.md, "The CPU step at one stream"). Compiled, the elementwise ones (norms,
rope, activations, residual adds) become a few generated C++ loops and the matmuls are called
directly, from one graph for the whole forward: attention is an opaque op that reads the step's
metadata (pagoda/attention/opaque.py), so no layer breaks the graph. The token count is an
unbacked size, so one graph serves every batch size (a backed size is specialized at 1: two
compilations). Inductor caches what it builds under $PAGODA_CACHE_DIR/inductor: the first start
compiles (about a minute for the default model on two cores), later starts trace the model and
load the rest (seconds).

Only steps in which every request decodes one token run compiled; prefill and mixed steps run
eagerly. A model that does not compile into one graph logs why and runs eagerly."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from pagoda.attention.backend import AttentionBackend, AttentionMetadata
from pagoda.attention.opaque import step_context
from pagoda.loader.cache_dir import pagoda_cache_dir

logger = logging.getLogger("pagoda")


class CompiledDecode:
    def __init__(self, model: nn.Module, backend: AttentionBackend, kv_caches: list[torch.Tensor]) -> None:
        import torch._inductor.config  # here: every other engine would pay for its import
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        # Inductor reads its cache directory from the environment (and writes its default there
        # once anything asked for it): ours unless the user chose another.
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(pagoda_cache_dir() / "inductor")

        # In this process: a pool of compile workers would stay resident beside the engine.
        torch._inductor.config.compile_threads = 1
        # No check of every input's sizes and strides on each call (~660 a step, ~0.3 ms of a 7.7 ms
        # step at one stream): the inputs are the step's fresh ids and positions and tensors that
        # never change (the weights and the pool).
        torch._inductor.config.size_asserts = False
        # The generated loops on one thread: a decode step's norms, rotary and activations are a few
        # thousand values a row, less than a parallel region's fork and join costs (-0.35 ms of a
        # 4.8 ms forward at one stream); the matmuls and attention keep every thread.
        torch._inductor.config.cpp.threads = 1
        self._backend = backend

        def forward(input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
            return model(input_ids, positions, kv_caches, metadata)

        # Its own code object: dynamo keeps a compiled graph on the code it compiled, and without
        # guards another model in this process would run this one's graph (its weights, its layers).
        forward.__code__ = forward.__code__.replace()

        # No guards: the model, its pool and the inputs' types never change, and the sizes are
        # unbacked; guards on every parameter cost ~1.7 ms a step at one stream.
        self._forward: Callable[..., torch.Tensor] = torch.compile(
            forward, fullgraph=True, options={"guard_filter_fn": lambda guards: [False] * len(guards)}
        )

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """One decode step's hidden states (the metadata `prepare`d by the backend)."""
        for x in (input_ids, positions):
            torch._dynamo.decorators.mark_unbacked(x, 0)
        with step_context(self._backend, metadata):
            return self._forward(input_ids, positions, metadata)

    def compile(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> bool:
        """Compile on one dummy decode step; False (and the reason logged) if the model does not
        compile into one graph."""
        started = time.perf_counter()
        try:
            self(input_ids, positions, metadata)
        except Exception as e:  # dynamo's, inductor's or the C++ compiler's: any of them means eager
            first_line = next(iter(str(e).strip().splitlines()), "")
            logger.warning("optimization_level=3: the decode forward does not compile (%s: %s); it runs eagerly",
                           type(e).__name__, first_line)
            return False
        logger.info("decode forward compiled in %.1f s (cache: %s)", time.perf_counter() - started,
                    os.environ["TORCHINDUCTOR_CACHE_DIR"])
        return True
