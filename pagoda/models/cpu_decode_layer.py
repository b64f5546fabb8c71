"""A Llama-style model's decoder layers for a decode step in one C call on the CPU (cpu_native.c's
`decode_layers`).

At one stream of the default model a layer's modules made ~50 torch ops and Python calls around
seven C kernels: ~170 us a layer, of which the kernels' arithmetic was ~70. The C call runs the
same kernels the modules call one by one (RMSNorm with its residual add, the int4 matmul, the
rotary embedding, the decode attention, SiLU-and-mul), in the same order on the same values: its
outputs are the modules' bit for bit (tests/test_cpu_decode_layer.py).

It serves a layer of that kind only: 4-bit weights in the C matmul's blocks for all four
matmuls with nothing but their biases added (no LoRA), plain RMSNorms (Qwen3's per-head q/k norms
too), plain rotary, no sliding window or soft cap, one tensor-parallel rank; and a step whose
every row is a decode that the C attention serves (TorchAttentionBackend.c_decode). Where every
layer of the model is of that kind, one call runs them all (LlamaModel.built_c_stack); otherwise
each such layer runs in a call of its own and the modules run the rest."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from pagoda.attention.backend import AttentionMetadata
from pagoda.attention.torch_backend import TorchAttentionBackend
from pagoda.kernels import cpu_native
from pagoda.layers.activation import SiluAndMul
from pagoda.layers.mlp import GatedMLP
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RotaryEmbedding

@dataclass(frozen=True)
class CDecodeLayer:
    """What `decode_layers` reads of one layer: its tensors, held here so that the addresses its
    C form keeps stay theirs (a loaded model's weights stay where they are), and its shapes."""

    # The two norms' weights, the four matmuls' blocks and their biases (qkv, o, gate_up, down: None where absent)
    weights: tuple[torch.Tensor | None, ...]
    qk_norms: tuple[torch.Tensor | None, torch.Tensor | None]  # Qwen3's per-head norms of q and k
    cos_sin: torch.Tensor
    # hidden, intermediate, rotary_dim, heads, KV heads, head_dim; eps, qk_eps, scale
    shape: tuple[int, int, int, int, int, int]
    constants: tuple[float, float, float]
    backend: TorchAttentionBackend

    @classmethod
    def of(cls, layer: nn.Module) -> CDecodeLayer | None:
        """A LlamaDecoderLayer's C form where it is of the kind decode_layers computes (module
        docstring), else None."""
        attn, mlp = layer.self_attn, layer.mlp
        if not (cpu_native.int_matmuls_available() and isinstance(mlp, GatedMLP) and isinstance(mlp.act, SiluAndMul)):
            return None
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        int4 = [linear.linear_method.c_int4_weight(linear) for linear in linears]
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        qk_norms = (attn.q_norm, attn.k_norm)
        rotary, attention = attn.rotary, attn.attn
        if (
            any(w is None for w in int4) or attn.o_proj.tp.size > 1 or mlp.down_proj.tp.size > 1
            or not all(_plain(norm) for norm in norms) or not all(n is None or _plain(n) for n in qk_norms)
            or any(lin.bias is not None and lin.bias.dtype != torch.float32 for lin in linears)
            or type(rotary) is not RotaryEmbedding or rotary.cos_sin.dtype != torch.float32
            or attention.sliding_window is not None or attention.logits_soft_cap is not None
            or not isinstance(attention.backend, TorchAttentionBackend)
        ):
            return None
        return cls(
            weights=(*(norm.weight for norm in norms), *(w.blocks for w in int4), *(lin.bias for lin in linears)),
            qk_norms=(None, None) if qk_norms[0] is None else (qk_norms[0].weight, qk_norms[1].weight),
            cos_sin=rotary.cos_sin,
            shape=(norms[0].weight.shape[0], int4[3].blocks.shape[1] * cpu_native.INT4_INPUTS, rotary.rotary_dim,
                   attention.num_heads, attention.num_kv_heads, attention.head_dim),
            constants=(norms[0].eps, 1e-6 if qk_norms[0] is None else qk_norms[0].eps, attention.scale),
            backend=attention.backend,
        )

    def c_form(self) -> cpu_native.DecoderLayer:
        """The layer as decode_layers reads it, its KV pool not yet set (CDecodeStack does)."""
        addresses = (_address(tensor) for tensor in (*self.weights, *self.qk_norms, self.cos_sin))
        return cpu_native.DecoderLayer(*addresses, None, None, 0, *self.shape, 0, *self.constants)


class CDecodeStack:
    """Successive layers' decode step in one C call (cpu_native.c's `decode_layers`): called from
    Python one by one, each layer cost ~50 us of argument passing and glue at one stream."""

    def __init__(self, layers: list[CDecodeLayer]) -> None:
        self.layers = layers  # the tensors whose addresses the C forms keep
        self.c_layers = (cpu_native.DecoderLayer * len(layers))(*(layer.c_form() for layer in layers))
        self.pools: list[torch.Tensor] | None = None  # the KV caches the C forms point at

    def __call__(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
        kv_caches: list[torch.Tensor], metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The last layer's (output, residual), as the layers' forwards return them, with
        kv_caches the layers' own; None where this step is not one decode_layers computes (the
        modules then run)."""
        library = self.layers[0].backend.c_decode(metadata, kv_caches[0])
        if (
            library is None or hidden.dtype != torch.float32 or not hidden.is_contiguous()
            or not (residual is None or residual.is_contiguous()) or positions.dtype != torch.int64
        ):
            return None
        if self.pools is None or any(pool is not held for pool, held in zip(kv_caches, self.pools)):
            self._point_at(library, kv_caches)
        out = torch.empty_like(hidden)
        first = residual is None
        if first:
            residual = torch.empty_like(hidden)
        failed = library.decode_layers(
            self.c_layers, len(self.layers), hidden.data_ptr(), residual.data_ptr(), first, hidden.shape[0],
            positions.data_ptr(), metadata.slot_mapping.data_ptr(), metadata.block_tables.data_ptr(),
            metadata.block_tables.stride(0), metadata.seq_lens.data_ptr(), out.data_ptr(),
        )
        if failed:
            raise MemoryError("the CPU decode layers: no memory for their activations")
        return out, residual

    def _point_at(self, library: ctypes.CDLL, kv_caches: list[torch.Tensor]) -> None:
        """Each layer's KV pool [2, blocks, block_size, KV heads, head_dim] and its attention."""
        for c_layer, pool in zip(self.c_layers, kv_caches, strict=True):
            c_layer.attend = cpu_native.decode_attention_address(library, pool.dtype)
            c_layer.pool, c_layer.half, c_layer.block_size = pool.data_ptr(), pool[0].numel(), pool.shape[2]
        self.pools = list(kv_caches)


def _plain(norm: nn.Module) -> bool:
    """An RMSNorm of float32 weights (not Gemma's 1 + weight)."""
    return type(norm) is RMSNorm and norm.weight.dtype == torch.float32


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()
