"""The resolved configuration: frozen, typed groups built once by config/resolve.py from an
EngineConfig and the model's files. The engine core, its workers and the model runner read these
and re-derive nothing: every default applied, every rule checked, before any of them starts. The
defaults live in EngineConfig alone: no field here has one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagoda.config.model_spec import ModelSpec
from pagoda.core.scheduler import SchedulerConfig
from pagoda.loader.model_resolver import ResolvedModel
from pagoda.lora.config import LoRAConfig
from pagoda.pooling import PoolerConfig

if TYPE_CHECKING:  # a process without torch holds its dtypes and devices by name (config/torch_values.py)
    import torch


@dataclass(frozen=True)
class ModelConfig:
    resolved: ResolvedModel  # where its files are
    spec: ModelSpec
    load_format: str
    dtype: torch.dtype  # of the weights and activations
    max_model_len: int
    seed: int  # of sampling without a request seed, and of dummy weights
    eos_token_ids: frozenset[int]  # what ends a request unless it ignores EOS
    # The tokenizer's vocabulary as the grammar compiler needs it (structured outputs), serialized
    # by structured_output/grammar.py; None without a tokenizer, or on a pooling engine.
    grammar_vocab: str | None
    # An embedding engine's pooling (--runner pooling); None: the engine generates tokens.
    pooler: PoolerConfig | None
    # The weight quantization method (--quantization, or the checkpoint's quant_method); None: none.
    quantization: str | None
    # SamplingParams fields a request leaves unset take these (generation_config,
    # override_generation_config): what LLM.get_default_sampling_params and the server apply.
    default_sampling: dict[str, Any]
    multimodal: bool  # its prompts may hold images (the model class's is_multimodal)
    # What no request's max_tokens may pass on the server, as vLLM's: a --generation-config
    # folder's max_new_tokens, or --override-generation-config's (the model's own is a default only).
    max_tokens_cap: int | None = None
    logprobs_mode: str = "raw_logprobs"  # what logprobs hold (--logprobs-mode)

    @property
    def name(self) -> str:
        return self.resolved.name


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    enable_prefix_caching: bool
    dtype: torch.dtype  # of the cached keys and values (--kv-cache-dtype): the model's, a 16-bit one or a float8
    gpu_memory_utilization: float
    num_gpu_blocks_override: int | None
    # Bytes of the KV pool per rank instead of what the GPU's memory leaves (always set on the CPU).
    kv_cache_memory_bytes: int | None


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int  # engine cores, each with its own tensor x pipeline ranks
    # MoE layers place whole experts on ranks: the TP group's, or with several data-parallel
    # cores of an MoE model the ranks of every core (experts_span_replicas).
    enable_expert_parallel: bool = False
    # mp: worker processes on this host, rank r on cuda:r; ray: Ray actors, each seeing one GPU.
    distributed_executor_backend: str = "mp"
    # An MoE model's experts spread over the ranks of all data_parallel_size cores, which then
    # step in lockstep (engine/lockstep.py); set by config/resolve.py.
    experts_span_replicas: bool = False
    # This core's replica, and the directory where the replicas' ranks meet (set per core by
    # engine/core_group.py when the experts span the replicas).
    data_parallel_rank: int = 0
    data_parallel_rendezvous: str = ""

    @property
    def world_size(self) -> int:
        """The ranks (processes, GPUs) one copy of the model runs on."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device  # rank r of several runs on cuda:r (mp) or its actor's one GPU (ray)
    enforce_eager: bool
    # -O3 on the CPU: decode steps through the compiled forward (pagoda/worker/compiled_decode.py).
    compile_decode: bool = False


@dataclass(frozen=True)
class SpeculativeConfig:
    num_speculative_tokens: int  # drafts per request a step may verify (decode graphs capture 1 + this)
    method: str | None = None  # "ngram", "draft_model"; None: a proposer passed in code (EngineCore(config, proposer))
    # ngram: the n-gram lengths matched against the request's earlier tokens, longest first.
    prompt_lookup_min: int = 0
    prompt_lookup_max: int = 0
    model: str | None = None  # draft_model: the draft's source, as given
    draft: ModelConfig | None = None  # draft_model: the draft, resolved (config/resolve.py)
    # eagle3: the target layers whose input hidden states the head reads (ModelRunner asks the model for them).
    aux_hidden_state_layer_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ResolvedConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: DeviceConfig
    speculative: SpeculativeConfig | None = None
    lora: LoRAConfig | None = None  # None: no adapters (enable_lora off)

    @property
    def num_speculative_tokens(self) -> int:
        return 0 if self.speculative is None else self.speculative.num_speculative_tokens

    def rank_device(self, rank: int) -> torch.device:
        import torch

        device = self.device.device
        if device.type != "cuda":
            return device
        if self.parallel.distributed_executor_backend == "ray":  # Ray shows each actor only its own GPU
            return torch.device("cuda", 0)
        return torch.device("cuda", rank) if self.parallel.world_size > 1 else device
