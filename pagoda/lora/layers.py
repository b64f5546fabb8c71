"""The LoRA layers: a base linear layer's LinearMethod wrapped so that its output gains each
token's adapter update, x @ A.T @ B.T (scale folded into B), read from the device slots.

Wrapping the method rather than the layer keeps the layer's own forward: a column-parallel
layer's output rows are this rank's shard (B's rows split as the weight's), and a row-parallel
layer's update is added to its partial product before the all-reduce sums the ranks (A's
columns split as the weight's), so tensor parallelism needs no collective of its own. Whatever
method the base layer has (a quantized one too) computes the base output.

A fused layer (qkv_proj, gate_up_proj) keeps its parts' adapters side by side: A stacks the
parts' ranks [parts * R, in], B is block-diagonal [out, parts * R], so one shrink and one
expand serve every part."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pagoda.host_to_device import to_device
from pagoda.layers.linear import LinearMethod
from pagoda.lora.peft import LoRAWeights

if TYPE_CHECKING:
    from pagoda.kernels.lora import TokenGroups


class LoRAContext:
    """Each token's adapter slot for the step (-1: none), in one static device buffer that every
    LoRA layer reads the first rows of: CUDA graphs capture it as an input. The kernels' grouping
    of the tokens by slot is computed from it once per forward pass, by its first LoRA layer (in
    a captured graph, inside the graph)."""

    def __init__(self, max_tokens: int, num_slots: int, device: torch.device) -> None:
        self.indices = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        self.num_slots = num_slots
        self.active = False  # some token of the step has an adapter: eager steps without skip the work
        self._groups: TokenGroups | None = None
        self._clean = True  # every row is -1

    def set_batch(self, chunk_slots: list[int], query_lens: list[int]) -> None:
        """Each chunk's slot (-1: none) and its number of tokens."""
        self.active = any(s >= 0 for s in chunk_slots)
        self._groups = None
        device = self.indices.device
        if not self.active:
            if not self._clean:  # a graph replay reads rows past the batch too
                self.indices.fill_(-1)
                self._clean = True
            return
        token_slots: list[int] = []
        for slot, n in zip(chunk_slots, query_lens):
            token_slots.extend([slot] * n)
        self.indices[: len(token_slots)].copy_(to_device(token_slots, torch.int32, device))
        self.indices[len(token_slots) :].fill_(-1)
        self._clean = False

    def groups(self, num_tokens: int) -> TokenGroups:
        """The first num_tokens tokens grouped by slot, for the Triton kernels: computed by the
        first layer that asks, reused by the others."""
        from pagoda.kernels.lora import group_tokens

        if self._groups is None or self._groups.order.shape[0] != num_tokens:
            self._groups = group_tokens(self.indices[:num_tokens], self.num_slots)
        return self._groups

    def always_on(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        """`forward` with every LoRA layer's work included whatever the indices: what a CUDA graph
        captures must serve steps with adapters too."""

        def run(*args: Any) -> Any:
            with self._on():
                return forward(*args)

        return run

    @contextmanager
    def _on(self):
        # The grouping is dropped on both sides: a capture computes its own inside the graph, and
        # the graph's tensors are no eager step's.
        was = self.active
        self.active, self._groups = True, None
        try:
            yield
        finally:
            self.active, self._groups = was, None


class LoRALinearMethod(LinearMethod):
    """The base method, then the adapters' updates. parts: this rank's output rows of each part
    (one entry for an unfused layer)."""

    def __init__(
        self, base: LinearMethod, context: LoRAContext, num_slots: int, max_rank: int, in_features: int,
        part_rows: list[int], dtype: torch.dtype, device: torch.device,
    ) -> None:
        self.base = base
        self.context = context
        self.max_rank = max_rank
        self.part_rows = part_rows
        self.lora_a = torch.zeros(num_slots, len(part_rows) * max_rank, in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(num_slots, sum(part_rows), len(part_rows) * max_rank, dtype=dtype, device=device)

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        self.base.create_weights(layer, input_size, output_size)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.base.process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = self.base.apply(layer, x, bias)
        if self.context.active:
            self._add_lora(out, x)
        return out

    def _add_lora(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """The Triton kernels on CUDA, the torch path elsewhere."""
        num_tokens = x.shape[0]
        if x.device.type != "cuda":
            add_lora_torch(out, x, self.lora_a, self.lora_b, self.context.indices[:num_tokens])
            return
        from pagoda.kernels.lora import add_lora_triton

        add_lora_triton(out, x, self.lora_a, self.lora_b, self.context.groups(num_tokens))

    def set_slot(self, slot: int, parts: list[LoRAWeights | None]) -> None:
        """Put one adapter's (sharded) parts into a slot; None: that part has no update."""
        r = self.max_rank
        a, b = torch.zeros_like(self.lora_a[slot]), torch.zeros_like(self.lora_b[slot])
        row = 0
        for i, (weights, rows) in enumerate(zip(parts, self.part_rows)):
            if weights is not None:
                rank = weights.a.shape[0]
                a[i * r : i * r + rank] = weights.a
                b[row : row + rows, i * r : i * r + rank] = weights.b
            row += rows
        self.lora_a[slot].copy_(a)
        self.lora_b[slot].copy_(b)


def add_lora_torch(
    out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor
) -> None:
    """out[t] += x[t] @ lora_a[s].T @ lora_b[s].T where s = indices[t] >= 0, in place: each slot's
    tokens in one pair of matmuls, in float32."""
    for slot in indices.unique().tolist():
        if slot < 0:
            continue
        rows = (indices == slot).nonzero().squeeze(1)
        delta = (x[rows].float() @ lora_a[slot].float().T) @ lora_b[slot].float().T
        out.index_add_(0, rows, delta.to(out.dtype))
