"""Attention as one op that torch.compile does not look into (`torch.ops.pagoda.paged_attention`).

A compiled forward (pagoda/worker/compiled_decode.py) must be one graph for the whole model to
pay: attention inside it would break the graph at every layer, since the backend reads the
step's Python metadata (lengths, block tables, its per-step plan). So each layer's attention is
an opaque custom op over tensors and the layer's constants, and the op finds the step's backend
and metadata where the runner put them for the forward (`step_context`), as vLLM's unified
attention op reads its forward context."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from pagoda.attention.backend import AttentionBackend, AttentionMetadata

_step: tuple[AttentionBackend, AttentionMetadata] | None = None


@contextmanager
def step_context(backend: AttentionBackend, metadata: AttentionMetadata) -> Iterator[None]:
    """The backend and metadata that `paged_attention` calls in this forward use."""
    global _step
    _step = (backend, metadata)
    try:
        yield
    finally:
        _step = None


# Defined through torch.library.Library, not torch.library.custom_op: the latter's Python wrapper
# cost ~90 us a call on the CPU, more than the decode attention it wraps (~80 us at one stream).
_library = torch.library.Library("pagoda", "FRAGMENT")
_library.define(
    "paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor k_scale, Tensor v_scale, "
    "float scale, int? sliding_window, float? logits_soft_cap) -> Tensor"
)


def _paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
) -> torch.Tensor:
    """The backend's forward for this step (writes k, v into kv_cache) -> [T, Hq, D], contiguous."""
    if _step is None:
        raise RuntimeError("pagoda::paged_attention runs only within step_context()")
    backend, metadata = _step
    out = backend.forward(
        q, k, v, kv_cache, metadata, scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
        kv_scales=(k_scale, v_scale),
    )
    return out.contiguous()  # the layout the compiler assumes (the fake's)


for _device in ("CPU", "CUDA"):
    _library.impl("paged_attention", _paged_attention, _device)


@torch.library.register_fake("pagoda::paged_attention")
def _(q, k, v, kv_cache, k_scale, v_scale, scale, sliding_window, logits_soft_cap) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


paged_attention = torch.ops.pagoda.paged_attention.default
