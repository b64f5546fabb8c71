"""The rules a tensor x pipeline x data parallel layout must follow, checked before any weights load.

Refused (ValueError, naming the setting and the numbers): a TP size that does not divide the
attention heads, the MLP width, or an MoE model's expert width (its expert count under expert
parallelism, or TP x DP's when the experts span the data-parallel replicas); more pipeline
stages than layers; weights that cannot fit one GPU at this TP x PP (the error names the
smallest TP that fits; experts spanning the replicas count 1 / DP a replica); more GPUs than are
visible. Warned: GPUs left idle, with the split that would use them (TP just large enough to hold
the model, DP with the rest).

The GPU rules need the GPU count and memory; `detect_gpus` reads them from NVML (or CUDA), or from
PAGODA_NUM_GPUS and PAGODA_GPU_MEMORY_GIB, so that they can be tested, or a machine planned for,
without the GPUs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from pagoda.config.groups import ParallelConfig
from pagoda.config.model_spec import ModelSpec
from pagoda.distributed.partition import kv_head_shard
from pagoda.layers.moe import FusedMoE
from pagoda.models import model_class
from pagoda.models.llama import is_sparse_layer
from pagoda.quantization.base import QuantizationConfig

logger = logging.getLogger("pagoda")

_GIB = 1 << 30


# vLLM's line for larger default steps: GPUs of 70 GiB or more (it leaves out the A100: 80 GB,
# compute capability 8.0; here from Hopper on).
LARGE_GPU_BYTES = 70 * _GIB


@dataclass(frozen=True)
class GpuInventory:
    count: int
    memory_bytes: int  # of each GPU
    capability: tuple[int, int] = (0, 0)  # CUDA compute capability; (0, 0) where the environment states the GPUs

    @property
    def large(self) -> bool:
        """GPUs whose matrix units want larger steps than the defaults (H100, H200, B200)."""
        return bool(self.count) and self.memory_bytes >= LARGE_GPU_BYTES and self.capability >= (9, 0)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return f"TP={self.tp} x PP={self.pp} x DP={self.dp}"


def detect_gpus() -> GpuInventory:
    """The visible CUDA GPUs (all assumed alike: the first one's memory), unless the environment
    states them: PAGODA_NUM_GPUS and PAGODA_GPU_MEMORY_GIB."""
    count = os.environ.get("PAGODA_NUM_GPUS")
    memory = os.environ.get("PAGODA_GPU_MEMORY_GIB")
    if count is None:
        count = torch.cuda.device_count()
    if memory is not None:
        return GpuInventory(int(count), int(float(memory) * _GIB))
    return GpuInventory(int(count), *_first_gpu()) if int(count) else GpuInventory(0, 0)


def _first_gpu() -> tuple[int, tuple[int, int]]:
    """The first visible GPU's memory and compute capability, read through NVML where it is
    installed: CUDA itself would be initialized by the reading, and a process with CUDA
    initialized can no longer fork its rank workers (see executor/multiproc.py)."""
    try:
        import pynvml
    except ImportError:
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, (props.major, props.minor)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    pynvml.nvmlInit()
    try:
        handle = (pynvml.nvmlDeviceGetHandleByIndex(int(visible)) if visible.isdigit()
                  else pynvml.nvmlDeviceGetHandleByUUID(visible))
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total), (major, minor)
    finally:
        pynvml.nvmlShutdown()


def check_parallel_layout(
    parallel: ParallelConfig, spec: ModelSpec, dtype: torch.dtype, gpu_memory_utilization: float,
    gpus: GpuInventory | None, quant_config: QuantizationConfig | None = None,
) -> None:
    """Raise on a layout that cannot work, warn about idle GPUs. `gpus` None (the CPU): only the
    rules about the model's shape apply. The whole layout, data-parallel copies included, is
    checked once, against the GPUs the front end sees (each core then gets its own)."""
    layout = Layout(parallel.tensor_parallel_size, parallel.pipeline_parallel_size, parallel.data_parallel_size)
    ep_size = layout.tp * layout.dp if parallel.experts_span_replicas else layout.tp
    problem = _tp_problem(spec, layout.tp, parallel.enable_expert_parallel, ep_size)
    if problem:
        raise ValueError(problem)
    layers = spec.num_hidden_layers
    if layout.pp > layers:
        raise ValueError(
            f"pipeline_parallel_size={layout.pp} is more than the model's {layers} layers (num_hidden_layers): "
            f"use at most {layers} stages"
        )
    if gpus is None:
        return
    if not gpus.count:
        raise ValueError(
            "device='cuda', but no CUDA GPU is visible (torch.cuda.device_count() is 0: CUDA_VISIBLE_DEVICES, the "
            "driver, or a CPU build of torch); use --device cpu, or auto to run where the model can"
        )
    room = gpu_memory_utilization * gpus.memory_bytes
    weights = estimate_weight_bytes(spec, dtype, quant_config)
    if parallel.experts_span_replicas:  # what one replica holds: 1 / DP of the routed experts
        weights -= _routed_expert_bytes(spec, dtype) * (layout.dp - 1) // layout.dp
    if weights / (layout.tp * layout.pp) > room:
        raise ValueError(_does_not_fit(spec, weights, room, layout, gpu_memory_utilization, gpus))
    if layout.gpus > gpus.count:
        raise ValueError(
            f"tensor_parallel_size={layout.tp} x pipeline_parallel_size={layout.pp} x "
            f"data_parallel_size={layout.dp} needs {layout.gpus} GPUs, but {gpus.count} are visible"
        )
    if layout.gpus < gpus.count:
        logger.warning(_idle_advice(spec, weights, room, layout, gpus.count))


def estimate_weight_bytes(spec: ModelSpec, dtype: torch.dtype, quant_config: QuantizationConfig | None = None) -> int:
    """Bytes of the weights, as the model's class counts them from its spec (quantized ones as
    `quant_config` holds them)."""
    return model_class(spec.architecture).weight_bytes(spec, dtype, quant_config)


def _routed_expert_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Bytes of the routed experts of every sparse layer (held unquantized: layers/moe.py)."""
    sparse_layers = sum(is_sparse_layer(spec, i) for i in range(spec.num_hidden_layers))
    per_layer = FusedMoE.num_parameters(spec.num_experts, spec.hidden_size, spec.moe_intermediate_size)
    return sparse_layers * per_layer * dtype.itemsize


def _tp_problem(spec: ModelSpec, tp: int, expert_parallel: bool = False, ep_size: int = 0) -> str | None:
    """ep_size: the ranks the experts are spread over with expert_parallel (default: tp)."""
    """Why the model cannot be split over `tp` ranks; None when it can."""
    heads = spec.num_attention_heads
    if heads % tp:
        return (
            f"tensor_parallel_size={tp} must divide the model's {heads} attention heads (num_attention_heads): "
            f"use one of {_divisors(heads)}"
        )
    has_dense_mlp = not spec.num_experts or spec.dense_mlp_layers
    if has_dense_mlp and spec.intermediate_size % tp:
        return (
            f"tensor_parallel_size={tp} must divide the model's MLP width {spec.intermediate_size} "
            "(intermediate_size)"
        )
    if spec.num_experts:
        problem = _moe_problem(spec, tp, expert_parallel, ep_size or tp)
        if problem:
            return problem
    try:
        kv_head_shard(spec.num_key_value_heads, 0, tp)
    except ValueError as error:
        return str(error)
    return None


def _moe_problem(spec: ModelSpec, tp: int, expert_parallel: bool, ep_size: int) -> str | None:
    if spec.shared_expert_intermediate_size % tp:
        return (
            f"tensor_parallel_size={tp} must divide the model's shared expert width "
            f"{spec.shared_expert_intermediate_size} (shared_expert_intermediate_size)"
        )
    if expert_parallel:
        if spec.num_experts % ep_size:
            ranks = f"tensor_parallel_size={tp}" if ep_size == tp else (
                f"tensor_parallel_size={tp} x data_parallel_size={ep_size // tp} = {ep_size}")
            return (
                f"{ranks} with enable_expert_parallel must divide the model's {spec.num_experts} experts "
                "(num_experts)"
            )
    elif spec.moe_intermediate_size % tp:
        return (
            f"tensor_parallel_size={tp} must divide the experts' width {spec.moe_intermediate_size} "
            "(moe_intermediate_size), or place whole experts on ranks: enable_expert_parallel"
        )
    return None


def _valid_tps(spec: ModelSpec) -> list[int]:
    return [tp for tp in _divisors(spec.num_attention_heads) if _tp_problem(spec, tp) is None]


def _smallest_tp_that_fits(spec: ModelSpec, weights: int, room: float, pp: int) -> int | None:
    return next((tp for tp in _valid_tps(spec) if weights / (tp * pp) <= room), None)


def _does_not_fit(
    spec: ModelSpec, weights: int, room: float, layout: Layout, utilization: float, gpus: GpuInventory
) -> str:
    per_gpu = weights / (layout.tp * layout.pp)
    message = (
        f"the weights of one copy of the model take {weights / _GIB:.1f} GiB; over tensor_parallel_size={layout.tp} x "
        f"pipeline_parallel_size={layout.pp} that is {per_gpu / _GIB:.1f} GiB a GPU, more than "
        f"gpu_memory_utilization={utilization} x {gpus.memory_bytes / _GIB:.1f} GiB = {room / _GIB:.1f} GiB"
    )
    tp = _smallest_tp_that_fits(spec, weights, room, layout.pp)
    if tp is None:
        return f"{message}; no tensor_parallel_size fits: add pipeline stages (pipeline_parallel_size)"
    return f"{message}: use tensor_parallel_size={tp}, the smallest that fits"


def _idle_advice(spec: ModelSpec, weights: int, room: float, layout: Layout, count: int) -> str:
    message = f"{count} GPUs are visible and {layout} uses {layout.gpus}: {count - layout.gpus} left idle"
    best = _best_layout(spec, weights, room, layout.pp, count)
    if best is None or best.gpus <= layout.gpus:
        return message
    flags = [f"--tensor-parallel-size {best.tp}"] if best.tp != layout.tp else []
    flags.append(f"--data-parallel-size {best.dp}")
    return f"{message}; use {' '.join(flags)} ({best}): TP just large enough to hold the model, DP with the rest"


def _best_layout(spec: ModelSpec, weights: int, room: float, pp: int, count: int) -> Layout | None:
    """The layout that uses the most GPUs, and among those the smallest TP that holds the model."""
    smallest = _smallest_tp_that_fits(spec, weights, room, pp)
    if smallest is None:
        return None
    candidates = [Layout(tp, pp, count // (tp * pp)) for tp in _valid_tps(spec) if tp >= smallest]
    candidates = [c for c in candidates if c.dp >= 1]
    return max(candidates, key=lambda c: (c.gpus, -c.tp), default=None)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
