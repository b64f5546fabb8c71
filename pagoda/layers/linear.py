"""Linear and embedding layers, sharded across the tensor-parallel (TP) group.

Projections that read the same input (q|k|v, gate|up) are merged into one matmul; checkpoints
store them apart and whole, so every layer loads a full checkpoint tensor and keeps its rank's
slice. With one rank every layer is a plain matmul or lookup: no copies, no collectives.

How a linear layer holds and multiplies its weight is its LinearMethod (after vLLM's
LinearMethodBase): unquantized by default; a quantization method (pagoda/quantization/) plugs in
there, per layer. A method's parameters say how the loader slices a whole checkpoint tensor for
them: `output_dim` / `output_divisor` (the dim indexing output features, and features per index
along it: packed int4 words hold 8), `input_dim` / `input_divisor` likewise for input features,
`per_part` (one per-tensor value per part of a packed layer); a parameter with none is copied whole."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.distributed.comm import all_gather_last_dim, all_reduce
from pagoda.distributed.parallel_state import tp_group
from pagoda.kernels import cpu_native
from pagoda.layers.lm_head_screen import Q8ScreenedHead, ScreenedHead
from pagoda.layers.q8_rows import Q8Rows

if TYPE_CHECKING:
    from pagoda.quantization.int4pack import NativeInt4

_SKINNY_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # A compiled decode forward (its row count unknown while it is traced) takes the decode path.
    if x.device.type == "cpu" and x.dim() == 2 and (torch.compiler.is_compiling() or x.shape[0] <= _SKINNY_ROWS):
        # CPU BLAS runs W @ x^T ~1.5x faster than x @ W^T when x has few rows (decode steps).
        out = torch.mm(weight, x.t()).t().contiguous()
        return out if bias is None else out + bias
    if x.device.type == "cuda" and x.dim() == 2 and x.shape[1] >= 3 * weight.shape[0]:
        from pagoda.kernels.fp8_gemm import gemm_persistent, long_k_16bit_config  # a CUDA GPU: Triton is there

        config = long_k_16bit_config(x, weight)  # a decode batch's down_proj, where it beats cuBLAS
        if config is not None:
            out = gemm_persistent(x, weight, config)
            return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def load_param(module: nn.Module, param_name: str, tensor: torch.Tensor, part: str | None = None) -> None:
    """Copy a whole checkpoint tensor into a module's parameter: sharded layers keep their slice."""
    loader = getattr(module, "load_weight", None)
    if loader is not None:
        loader(param_name, tensor, part)
    else:
        _copy(getattr(module, param_name).data, tensor, param_name)


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor for {what} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


def sliced_param(data: torch.Tensor, **slicing: int | bool) -> nn.Parameter:
    """A frozen parameter with the attributes that tell the loader how to slice a checkpoint
    tensor for it (output_dim, output_divisor, input_dim, input_divisor, per_part)."""
    param = nn.Parameter(data, requires_grad=False)
    for name, value in slicing.items():
        setattr(param, name, value)
    return param


class InputQuantization(NamedTuple):
    """How a linear layer's FP8 matmul takes its input: in `fp8_dtype`, with one float32 scale per
    row, each row's own (static_scale None) or the checkpoint's one for every row."""

    fp8_dtype: torch.dtype
    static_scale: torch.Tensor | None


@dataclass(frozen=True)
class Fp8Input:
    """A linear layer's input already quantized as its method asks (`input_quantization`), by the
    kernel that produced it (a norm, an activation): data [M, K] in fp8, scale [M, 1] float32,
    and the dtype of the unquantized input, which the output takes."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


class LinearMethod(ABC):
    """How a linear layer holds and applies its weight. `create_weights` registers the parameters
    the loader fills, in the checkpoint's [output, input] layout (a column-parallel layer's rows
    and a row-parallel layer's columns are its rank's shard); `process_weights_after_loading`
    turns them into the form `apply` multiplies with."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None: ...

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Nothing by default: the loaded weights are what `apply` reads."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def input_quantization(self, layer: nn.Module) -> InputQuantization | None:
        """How `apply` would quantize its input, so that the kernel producing that input can do it
        in its own pass and hand `apply` an Fp8Input; None (the default): it takes the input as it is."""
        return None

    def c_int4_weight(self, layer: nn.Module) -> NativeInt4 | None:
        """The layer's weight where `apply` is exactly the CPU's C int4 matmul of its input plus the
        layer's bias (pagoda/models/cpu_decode_layer.py then runs it inside a whole decoder layer's C
        call): a NativeInt4. None (the default): `apply` does more, or other arithmetic."""
        return None


class UnquantizedLinearMethod(LinearMethod):
    """The weight as the checkpoint stores it, in the model's dtype. Parameters start
    uninitialised: the loader (or dummy init) fills them, so building an 8B model costs no
    random-number time."""

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        layer.weight = sliced_param(torch.empty(output_size, input_size), output_dim=0, input_dim=1)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(x, layer.weight, bias)


class Linear(nn.Module):
    """y = x @ W.T + b, W held and applied by the layer's LinearMethod. `part_sizes`: this rank's
    output features of each part of a packed layer, which a method may need (per-part scales)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, linear_method: LinearMethod | None = None,
        part_sizes: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.part_sizes = part_sizes or [output_size]
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.linear_method.create_weights(self, input_size, output_size)
        self.bias = sliced_param(torch.empty(output_size), output_dim=0) if bias else None

    def forward(self, x: torch.Tensor | Fp8Input) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)

    def input_quantization(self) -> InputQuantization | None:
        return self.linear_method.input_quantization(self)


@dataclass(frozen=True)
class Shard:
    """Rows [start, start + size) of a checkpoint tensor that has `full` rows."""

    start: int
    size: int
    full: int


def even_shard(full: int) -> Shard:
    """This TP rank's equal share of `full` rows (the caller checked that they divide)."""
    group = tp_group()
    size = full // group.size
    return Shard(group.rank * size, size, full)


class ColumnParallelLinear(Linear):
    """Output features split across TP ranks: each rank holds its shard of every named part
    (q|k|v, gate|up) side by side, so one matmul still serves all parts, and its output is this
    rank's share of each part, ready for the next layer without communication."""

    def __init__(
        self, input_size: int, parts: dict[str, Shard], bias: bool = False, linear_method: LinearMethod | None = None
    ) -> None:
        sizes = [s.size for s in parts.values()]
        super().__init__(input_size, sum(sizes), bias, linear_method, part_sizes=sizes)
        self.parts = dict(parts)
        self._offsets: dict[str, int] = {}
        offset = 0
        for name, shard in parts.items():
            self._offsets[name] = offset
            offset += shard.size

    def load_weight(self, param_name: str, tensor: torch.Tensor, part: str | None) -> None:
        """Copy this rank's share of a whole checkpoint tensor into its part, along the
        parameter's output dim; with no part, the tensor holds every part fused, in order (Phi-3's
        qkv_proj)."""
        param = getattr(self, param_name)
        if getattr(param, "per_part", False):
            # One value per part; a fused checkpoint tensor's one value serves every part.
            indices = range(len(self.parts)) if part is None else [list(self.parts).index(part)]
            for i in indices:
                param.data[i].copy_(tensor.reshape(()))
            return
        dim = getattr(param, "output_dim", None)
        if dim is None:
            _copy(param.data, tensor, param_name)
            return
        divisor = getattr(param, "output_divisor", 1)
        if part is None:
            sizes = [s.full // divisor for s in self.parts.values()]
            if tensor.shape[dim] != sum(sizes):
                raise ValueError(
                    f"fused checkpoint tensor for {param_name} has {tensor.shape[dim]} rows, expected {sum(sizes)}"
                )
            for name, rows in zip(self.parts, tensor.split(sizes, dim)):
                self.load_weight(param_name, rows, name)
            return
        shard = self.parts[part]
        if tensor.shape[dim] * divisor != shard.full:
            raise ValueError(
                f"checkpoint tensor for {part}.{param_name} has {tensor.shape[dim]} rows, expected {shard.full // divisor}"
            )
        size = shard.size // divisor
        param.data.narrow(dim, self._offsets[part] // divisor, size).copy_(tensor.narrow(dim, shard.start // divisor, size))


class RowParallelLinear(Linear):
    """Input features split across TP ranks (they come from a column-parallel layer): each rank's
    partial product is summed by an all-reduce, and the bias is added once, after it."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, linear_method: LinearMethod | None = None
    ) -> None:
        self.tp = tp_group()
        self.input_shard = Shard(self.tp.rank * (input_size // self.tp.size), input_size // self.tp.size, input_size)
        super().__init__(self.input_shard.size, output_size, bias, linear_method)

    def forward(self, x: torch.Tensor | Fp8Input) -> torch.Tensor:
        if self.tp.size == 1:
            return self.linear_method.apply(self, x, self.bias)
        out = all_reduce(self.linear_method.apply(self, x, None), self.tp)
        return out if self.bias is None else out + self.bias

    def load_weight(self, param_name: str, tensor: torch.Tensor, part: str | None = None) -> None:
        """Copy a whole checkpoint tensor, keeping this rank's share along the parameter's input dim."""
        param = getattr(self, param_name)
        dim = getattr(param, "input_dim", None)
        if getattr(param, "per_part", False):
            tensor = tensor.reshape(param.shape)
        elif dim is not None:
            divisor = getattr(param, "input_divisor", 1)
            shard = self.input_shard
            if tensor.dim() != param.dim() or tensor.shape[dim] * divisor != shard.full:
                raise ValueError(
                    f"checkpoint tensor for {param_name} has shape {tuple(tensor.shape)}, expected "
                    f"{shard.full // divisor} along dim {dim}"
                )
            tensor = tensor.narrow(dim, shard.start // divisor, shard.size // divisor)
        _copy(param.data, tensor, param_name)


class VocabParallelEmbedding(nn.Module):
    """Vocabulary rows split across TP ranks, ceil(vocab / tp) each; the last rank's rows beyond
    the vocabulary are zero padding. A token another rank holds embeds to zero here, and the
    all-reduce sums each token's one real row."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp = tp_group()
        self.num_embeddings = num_embeddings
        per_rank = -(-num_embeddings // self.tp.size)
        self.start = self.tp.rank * per_rank
        self.end = min(num_embeddings, self.start + per_rank)
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim), requires_grad=False)
        self.q8: Q8Rows | None = None  # the rows in Q8_0 form instead of `weight` (see hold_q8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.q8 is not None:
            return self.q8[ids]
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        out = F.embedding((ids - self.start).masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill_(outside[:, None], 0), self.tp)

    def load_weight(self, param_name: str, tensor: torch.Tensor, part: str | None = None) -> None:
        if tensor.shape[0] != self.num_embeddings:
            raise ValueError(
                f"checkpoint tensor for {param_name} has {tensor.shape[0]} rows, expected {self.num_embeddings}"
            )
        rows = self.end - self.start
        _copy(self.weight.data[:rows], tensor[self.start : self.end], param_name)
        self.weight.data[rows:].zero_()

    def hold_q8(self, rows: Q8Rows) -> None:
        """Read the rows from `rows` (this weight's values, exactly: Q8Rows.lossless) and free the
        float32 weight, which stays as an empty parameter (its device and dtype still say the layer's)."""
        assert self.tp.size == 1, "a rank's shard reads other ranks' rows: one rank only"
        self.q8 = rows
        self.weight = nn.Parameter(self.weight.data.new_empty(0, self.weight.shape[1]), requires_grad=False)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, sharded as the embedding is (and sharing its weight when tied)."""

    def forward(self, hidden: torch.Tensor, argmax_only: bool = False) -> torch.Tensor:
        """Logits over the whole vocabulary in the weight's dtype, on every rank of the TP group: the
        sampler's greedy kernel reads them as they are (a float32 copy of 256 rows of a 128k
        vocabulary costs a decode step ~0.1 ms on an H200), every other use in float32.
        argmax_only: the caller reads each row's argmax alone; a float32 head on the CPU then
        screens through a float16 copy (layers/lm_head_screen.py), keeping the argmax exact."""
        if self.q8 is not None:  # every step through its screen: the float32 rows are not held
            return self._q8_screen.logits(hidden, self.q8)
        screen = self._screen() if argmax_only else None
        if screen is not None:
            return screen.logits(hidden, self.weight)
        logits = linear(hidden, self.weight)
        if self.tp.size > 1:
            logits = all_gather_last_dim(logits, self.tp)[:, : self.num_embeddings]
        return logits

    def hold_q8(self, rows: Q8Rows) -> None:
        """As the embedding's, and every step's logits through a screen (layers/lm_head_screen.py):
        within its bound of the float32 head's, exact within twice it of each row's maximum, so the
        argmax is the float32 head's. The screen must serve the weight (ScreenedHead.serves); where
        the CPU has AVX512-VNNI or AVX2 it reads the Q8_0 rows themselves (Q8ScreenedHead)."""
        self._q8_screen = Q8ScreenedHead(rows) if cpu_native.int_matmuls_available() else ScreenedHead(self.weight)
        super().hold_q8(rows)

    def _screen(self) -> ScreenedHead | None:
        """Built on first use (~0.7 s for the default model's head) and again if the weight has
        changed since; None where it does not serve (a TP shard's screen would need every rank's
        maximum)."""
        version = self.weight._version
        if getattr(self, "_screened", (None, -1))[1] != version:
            serves = self.tp.size == 1 and ScreenedHead.serves(self.weight)
            self._screened = (ScreenedHead(self.weight) if serves else None, version)
        return self._screened[0]
