"""EngineConfig: every engine knob a user sets (`LLM(...)` keywords, `pagoda serve` flags), each
default and help text once, its range checked on construction with an error naming it. What the
knobs mean for one model on one machine is resolved once, in config/resolve.py."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy", "pt")
MODEL_IMPLS = ("auto", "pagoda", "transformers")
# vLLM's --runner: generate (tokens) or pooling (one vector per prompt: embeddings); auto: pooling
# for an encoder-only model (BERT), else generate.
RUNNERS = ("auto", "generate", "pooling")
# vLLM's older --task: embed (or "embedding"), classify and score mean the pooling runner, generate
# the generating one.
POOLING_TASKS = ("embed", "embedding", "classify", "score")
TASKS = ("auto", "generate", *POOLING_TASKS)
# vLLM's --distributed-executor-backend: mp, worker processes on this host; ray, Ray actors on any
# node of a Ray cluster.
EXECUTOR_BACKENDS = ("mp", "ray")
# --dtype's values and the torch dtype each names (by its name in torch: the server's front end,
# which reads these flags, imports no torch).
DTYPES = {
    "float32": "float32",
    "float": "float32",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
}
# vLLM's --kv-cache-dtype values: auto (the model's dtype; float16 for a GGUF model on the CPU, as
# llama.cpp's) or an fp8 format, fp8 meaning fp8_e4m3; and Pagoda's 16- and 32-bit ones (the CPU's).
KV_CACHE_DTYPES = {
    "auto": None,
    "bfloat16": "bfloat16",
    "float16": "float16",
    "float32": "float32",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}
# vLLM's --tokenizer-mode values: auto and hf load the fast tokenizer, slow the Python one; mistral
# (mistral_common's) and custom (a registered class) are vLLM's own loaders, which Pagoda has not.
TOKENIZER_MODES = ("auto", "hf", "slow", "mistral", "custom")
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")
SUPPORTED_TOKENIZER_MODES = ("auto", "hf", "slow")
# The generation_config.json fields that are default sampling parameters (vLLM's, for
# --generation-config and --override-generation-config) -> their SamplingParams names.
GENERATION_CONFIG_FIELDS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens",
}
# vLLM's -O levels (see optimization_level).
OPTIMIZATION_LEVELS = range(4)
# The CPU has no device memory to profile: its KV pool gets a stated budget, as vLLM's
# VLLM_CPU_KVCACHE_SPACE does.
DEFAULT_CPU_KV_CACHE_GIB = 4.0


def _json_object(text: str) -> dict[str, Any]:
    """A JSON object flag's value (argparse reports the ArgumentTypeError with the flag's name)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, not {text!r}")
    return value


_SUFFIXED = re.compile(r"(\d+(?:\.\d+)?)([kmgtKMGT]?)")
# vLLM's human-readable integers: a lowercase suffix is a power of 1000, an uppercase one of 1024.
_MULTIPLIERS = {s: 1000**i for i, s in enumerate("kmgt", 1)} | {s: 1024**i for i, s in enumerate("KMGT", 1)}


def human_readable_int(text: str) -> int:
    """A flag's integer as vLLM reads it: 2048, 32k (32,000), 32K (32,768), 25.6k (25,600); a
    fraction only with a decimal suffix."""
    match = _SUFFIXED.fullmatch(text.strip())
    if match is None or (match[2] in ("", *"KMGT") and "." in match[1]):
        raise argparse.ArgumentTypeError(
            f"invalid integer {text!r}: digits, with an optional k, m, g, t (powers of 1000) or K, M, G, T "
            "(powers of 1024) after them; a fraction only before k, m, g or t"
        )
    number, suffix = match.groups()
    return int(float(number) * _MULTIPLIERS[suffix]) if suffix else int(number)


def _knob(default: Any, help: str, **flag: Any) -> Any:
    """A field with its command-line help (and argparse extras: aliases, action, choices): the
    flags of `pagoda serve` and the benches are generated from these (entrypoints/engine_args.py)."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class EngineConfig:
    model: str | None = _knob(None, "a local HF directory, a GGUF file or a cached model id (default: the embedded model)")
    tokenizer: str | None = _knob(None, "the tokenizer's folder or cached id (default: the model's)")
    revision: str | None = _knob(
        None, "a model id's branch, tag or commit in the Hugging Face cache (default: main; nothing is downloaded)")
    download_dir: str | None = _knob(
        None, "the Hugging Face cache a model id is looked up in (default: HF_HUB_CACHE, else HF_HOME's)")
    tokenizer_mode: str = _knob(
        "auto", "auto or hf: the fast tokenizer; slow: the slow (Python) one, where the model has one; vLLM's "
        "mistral and custom are refused (Pagoda loads tokenizers through transformers only)", choices=TOKENIZER_MODES)
    hf_overrides: dict[str, Any] | None = _knob(
        None, 'fields set on the model\'s Hugging Face config after it is read, as JSON: {"max_position_embeddings": '
        '4096}; a key the config lacks is added, a nested config (text_config) is updated key by key', type=_json_object)
    generation_config: str = _knob(
        "auto", "default sampling parameters for requests that leave them unset: auto takes them from the model's "
        "generation_config.json, vllm (or pagoda) uses the engine's own defaults, a folder takes its "
        "generation_config.json")
    override_generation_config: dict[str, Any] | None = _knob(
        None, 'default sampling parameters set over generation_config\'s, as JSON of generation-config names: '
        '{"temperature": 0.5, "max_new_tokens": 128}; keys: ' + ", ".join(GENERATION_CONFIG_FIELDS),
        type=_json_object)
    dtype: str = _knob("auto", "weights and activations: auto (the model's bf16/fp16 on a GPU, float32 on the CPU), "
                       "or one of " + ", ".join(DTYPES), choices=("auto", *DTYPES))
    max_model_len: int | None = _knob(
        None, "the longest prompt + output in tokens, e.g. 8192, 32k or 32K (default: the model's context)",
        type=human_readable_int)
    max_num_seqs: int = _knob(256, "requests in one batch at most")
    max_num_batched_tokens: int | None = _knob(
        None, "tokens in one step at most, prefill chunks and decodes together: the prefill a step may hold beside "
        "the running decodes (default: 8192 on a GPU, 2048 on the CPU and for `pagoda serve`; max(max_model_len, "
        "2048) with chunked prefill off)", type=human_readable_int)
    block_size: int = _knob(16, "tokens in one KV cache block (a power of two)")
    gpu_memory_utilization: float = _knob(0.9, "the share of GPU memory for weights, activations and the KV cache")
    num_gpu_blocks_override: int | None = _knob(None, "the number of KV cache blocks, instead of what fits")
    kv_cache_memory_bytes: int | None = _knob(
        None, "bytes for the KV cache, instead of what gpu_memory_utilization leaves (on the CPU: "
        f"$PAGODA_CPU_KVCACHE_SPACE GiB, default {DEFAULT_CPU_KV_CACHE_GIB:g}), e.g. 8G", type=human_readable_int)
    kv_cache_dtype: str = _knob(
        "auto", "the KV cache's dtype: auto (the model's; float16 for a GGUF model on the CPU, as llama.cpp's), "
        "bfloat16, float16 or float32 (another than a float32 model's on the CPU only), fp8 (= fp8_e4m3) or "
        "fp8_e5m2: one byte a value, so the pool holds twice the tokens of a 16-bit cache; "
        "fp8 keys and values are divided by the checkpoint's per-layer k_scale/v_scale (1.0 where it has none)",
        choices=tuple(KV_CACHE_DTYPES))
    enable_prefix_caching: bool = _knob(True, "share the KV blocks of common prompt prefixes",
                                        action=argparse.BooleanOptionalAction)
    enable_chunked_prefill: bool = _knob(True, "split long prompts across steps, beside the running decodes",
                                         action=argparse.BooleanOptionalAction)
    long_prefill_token_threshold: int = _knob(
        0, "chunked prefill: one request's prefill chunk per step at most; a prompt longer than this is long "
        "(default 0: no cap, or 4%% of max_model_len when max_num_partial_prefills > 1)")
    max_num_partial_prefills: int = _knob(
        1, "chunked prefill: prompts a step may leave partly prefilled at most")
    max_long_partial_prefills: int = _knob(
        1, "chunked prefill: of those, prompts longer than long_prefill_token_threshold at most; fewer than "
        "max_num_partial_prefills lets shorter prompts jump ahead of long ones")
    scheduling_policy: str = _knob(
        "fcfs", "the order requests wait and run in: fcfs (first come, first served) or priority (by each "
        "request's priority, lower first, then arrival; the lowest-priority running request is preempted first)",
        choices=("fcfs", "priority"))
    max_logprobs: int = _knob(20, "the most logprobs (and prompt_logprobs) a request may ask for per token; -1: no cap, "
                              "so that -1 (the whole vocabulary) may be asked for")
    logprobs_mode: str = _knob(
        "raw_logprobs", "what logprobs and prompt_logprobs hold (vLLM's values): raw_logprobs (the log-softmax of the "
        "model's logits, before any processing), raw_logits, processed_logprobs or processed_logits (after "
        "every processor: logit_bias, penalties, bad_words, temperature, top-k/top-p/min-p)", choices=LOGPROBS_MODES)
    seed: int = _knob(0, "the random seed of sampling without a request seed, and of dummy weights")
    structured_outputs_config: dict[str, Any] | None = _knob(
        None, 'structured outputs, as JSON: {"backend": "auto" or "xgrammar" (the one built in), '
        '"disable_any_whitespace": true (JSON schemas allow only the fixed separators, no other whitespace)}',
        type=_json_object)
    guided_decoding_backend: str | None = _knob(
        None, "older spelling of structured_outputs_config's backend: auto or xgrammar")
    model_impl: str = _knob(
        "auto", "which implementation runs the model: auto (Pagoda's native one where it has the architecture, "
        "else transformers' modeling code with Pagoda's paged attention), pagoda (native only) or transformers",
        choices=MODEL_IMPLS)
    quantization: str | None = _knob(
        None, "weight quantization: fp8 (an fp16/bf16 checkpoint quantized at load, or an fp8 checkpoint) or "
        "compressed-tensors, awq, gptq, gguf (a GGUF model's quantized weights kept quantized on the CPU); default: the "
        "checkpoint's quantization_config.quant_method, if any, and gguf for a GGUF model and the default model",
        aliases=("-q",))
    trust_remote_code: bool = _knob(
        False, "run a config, tokenizer or processor class that the model's folder defines in its own Python files "
        "(its architecture must still be one Pagoda or transformers has)", action="store_true")
    load_format: str = _knob(
        "auto", "how to read the weights (dummy: random, for benchmarks; safetensors: the default model's float32 "
        "conversion instead of its GGUF weights kept quantized)", choices=LOAD_FORMATS)
    device: str = _knob("auto", "auto (a GPU when there is one), cpu, cuda or cuda:N")
    skip_tokenizer_init: bool = _knob(False, "load no tokenizer: prompts must be token ids, outputs carry no text",
                                      action="store_true")
    limit_mm_per_prompt: dict[str, int] | None = _knob(
        None, 'the most items of each modality in one prompt, as JSON: {"image": N} (default: 999)',
        type=_json_object)
    allow_image_url_fetch: bool = _knob(
        False, "fetch http(s) image URLs of chat content parts (off: only data: URLs are taken)", action="store_true")
    allowed_local_media_path: str | None = _knob(
        None, "take file:// image URLs of chat content parts from under this folder of the server's (only in a "
        "trusted environment: requests may then read any image there)")
    enforce_eager: bool = _knob(False, "run every step eagerly: no CUDA graphs (faster start-up, slower "
                                "small-batch decode)", action="store_true")
    # vLLM's optimization levels, what each means here: 0 no CUDA graphs (as --enforce-eager);
    # 1 and 2 (vLLM's default) CUDA graphs for decode steps; 3 also compiles the CPU decode forward
    # (pagoda/worker/compiled_decode.py), a minute or two the first time, cached after.
    optimization_level: int = _knob(
        2, "0: every step eager (no CUDA graphs); 1-2: CUDA graphs for decode steps on GPUs; 3: also compile the "
        "CPU decode forward with torch.compile (faster small-batch steps; the first start compiles for about a "
        "minute, later starts load it from the cache)", aliases=("-O",), choices=OPTIMIZATION_LEVELS, metavar="{0,1,2,3}")
    # Plan and queue step N+1 while the device runs step N. None: on for GPUs, where the host's
    # share of a step is worth hiding; off on the CPU, where it runs the model too.
    async_scheduling: bool | None = _knob(None, "plan and queue each step while the GPUs run the one before "
                                          "(default: on with GPUs)", action=argparse.BooleanOptionalAction)
    tensor_parallel_size: int = _knob(1, "GPUs (or CPU ranks) each layer is split across", aliases=("-tp",))
    pipeline_parallel_size: int = _knob(1, "consecutive stages the layers are split into", aliases=("-pp",))
    # Engine cores behind one server, each on its own TP x PP GPUs (the server reads it; one
    # LLMEngine is one core).
    data_parallel_size: int = _knob(1, "engine cores behind this server, each on its own tensor x pipeline GPUs",
                                    aliases=("-dp",))
    enable_expert_parallel: bool = _knob(
        False, "MoE layers: whole experts on each rank (expert parallelism) instead of a slice of every expert: the "
        "ranks of the tensor-parallel group, or with --data-parallel-size those of every replica, which then step "
        "in lockstep", action="store_true")
    distributed_executor_backend: str = _knob(
        "mp", "how the ranks run: mp (one worker process per rank on this host) or ray (one Ray actor per rank, "
        "on any node of the Ray cluster this attaches to or starts; pip install pagoda[ray])",
        choices=EXECUTOR_BACKENDS)
    runner: str = _knob("auto", "generate: sample tokens; pooling: one embedding per prompt (POST /v1/embeddings, "
                        "LLM.embed; /score, /rerank, /classify); auto: pooling for an encoder-only model (BERT, "
                        "cross-encoders), else generate", choices=RUNNERS)
    task: str = _knob("auto", "vLLM's older spelling of runner: embed, classify and score mean --runner pooling",
                      choices=TASKS)
    speculative_config: dict[str, Any] | None = _knob(
        None, 'speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": k, '
        '"prompt_lookup_min": n, "prompt_lookup_max": m} (ngram: drafts copied from where the request\'s last '
        'n..m tokens occurred before; default 5..5), or {"method": "draft_model", "model": PATH, '
        '"num_speculative_tokens": k} (a smaller model with the same vocabulary proposes k greedy tokens); '
        'method "eagle", "eagle3" or "medusa" with "model" a head\'s checkpoint',
        type=_json_object)
    num_speculative_tokens: int | None = _knob(
        None, "drafts a step verifies per request (older spelling of speculative_config's num_speculative_tokens)")
    speculative_model: str | None = _knob(
        None, 'the draft\'s source: "[ngram]" for prompt lookup, else a draft model\'s path or name (older '
        'spelling of speculative_config\'s method and model)')
    enable_lora: bool = _knob(False, "serve LoRA adapters (PEFT format) over the base model: requests name one "
                              "(LLM.generate's lora_request, the server's model field)", action="store_true")
    max_loras: int = _knob(1, "LoRA adapters resident on the device at once: the most one batch mixes")
    max_lora_rank: int = _knob(16, "the highest LoRA rank served (the size of each device slot)")
    max_cpu_loras: int | None = _knob(None, "LoRA adapters kept read in host memory (default: max_loras)")

    def __post_init__(self) -> None:
        _check(self.load_format in LOAD_FORMATS, "load_format", self.load_format, f"one of {LOAD_FORMATS}")
        _check(self.model_impl in MODEL_IMPLS, "model_impl", self.model_impl, f"one of {MODEL_IMPLS}")
        _check(self.runner in RUNNERS, "runner", self.runner, f"one of {RUNNERS}")
        _check(self.distributed_executor_backend in EXECUTOR_BACKENDS, "distributed_executor_backend",
               self.distributed_executor_backend, f"one of {EXECUTOR_BACKENDS}")
        _check(self.task in TASKS, "task", self.task, f"one of {TASKS}")
        _check(self.dtype == "auto" or self.dtype in DTYPES, "dtype", self.dtype, f"'auto' or one of {tuple(DTYPES)}")
        _check(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", self.kv_cache_dtype,
               f"one of {tuple(KV_CACHE_DTYPES)}")
        _check_structured_outputs(self.structured_outputs_config, self.guided_decoding_backend)
        _check_tokenizer_mode(self.tokenizer_mode)
        for name in ("hf_overrides", "override_generation_config"):
            _check(getattr(self, name) is None or isinstance(getattr(self, name), dict), name, getattr(self, name),
                   "a dict (a JSON object)")
        _check_generation_overrides(self.override_generation_config or {})
        _check(self.max_logprobs >= -1, "max_logprobs", self.max_logprobs, ">= 0, or -1 (no cap)")
        _check(self.logprobs_mode in LOGPROBS_MODES, "logprobs_mode", self.logprobs_mode, f"one of {LOGPROBS_MODES}")
        _check(self.optimization_level in OPTIMIZATION_LEVELS, "optimization_level", self.optimization_level,
               "0, 1, 2 or 3")
        _check(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, ">= 1")
        _check(self.max_loras >= 1, "max_loras", self.max_loras, ">= 1")
        _check(self.max_lora_rank >= 1, "max_lora_rank", self.max_lora_rank, ">= 1")
        _check(self.max_cpu_loras is None or self.max_cpu_loras >= self.max_loras, "max_cpu_loras",
               self.max_cpu_loras, f">= max_loras ({self.max_loras})")
        _check(
            self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0 and self.block_size <= 256,
            "block_size", self.block_size, "a power of two from 1 to 256",
        )
        _check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", self.gpu_memory_utilization, "(0, 1]")
        _check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
               "num_gpu_blocks_override", self.num_gpu_blocks_override, ">= 1")
        _check(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", self.max_model_len, ">= 2")
        _check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
               "max_num_batched_tokens", self.max_num_batched_tokens, ">= 1")
        _check(self.long_prefill_token_threshold >= 0, "long_prefill_token_threshold",
               self.long_prefill_token_threshold, ">= 0")
        _check(self.max_num_partial_prefills >= 1, "max_num_partial_prefills", self.max_num_partial_prefills, ">= 1")
        _check(1 <= self.max_long_partial_prefills <= self.max_num_partial_prefills, "max_long_partial_prefills",
               self.max_long_partial_prefills, f"from 1 to max_num_partial_prefills={self.max_num_partial_prefills}")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               "device", self.device, "'auto', 'cpu' or 'cuda[:N]'")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        if self.device.startswith("cuda:") and self.world_size > 1:
            raise ValueError(
                f"device={self.device!r} names one GPU, but tensor_parallel_size x pipeline_parallel_size = "
                f"{self.world_size} ranks use cuda:0..{self.world_size - 1}: use device='cuda', and "
                "CUDA_VISIBLE_DEVICES to choose the GPUs"
            )

    @property
    def world_size(self) -> int:
        """The ranks (processes, GPUs) one copy of the model runs on."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


# vLLM's structured-output backends; xgrammar alone is built in (docs/structured_outputs.md says why).
STRUCTURED_OUTPUT_BACKENDS = ("auto", "xgrammar")
_OTHER_BACKENDS = ("guidance", "outlines", "lm-format-enforcer")


def _check_structured_outputs(config: dict[str, Any] | None, older_backend: str | None) -> None:
    if config is not None:
        unknown = sorted(set(config) - {"backend", "disable_any_whitespace"})
        if unknown:
            raise ValueError(f"structured_outputs_config has unknown keys {unknown}: it takes backend and "
                             "disable_any_whitespace")
        _check(isinstance(config.get("disable_any_whitespace", False), bool),
               "structured_outputs_config.disable_any_whitespace", config.get("disable_any_whitespace"), "true or false")
    for name, backend in (("structured_outputs_config.backend", (config or {}).get("backend")),
                          ("guided_decoding_backend", older_backend)):
        if backend is not None and backend not in STRUCTURED_OUTPUT_BACKENDS:
            known = backend in _OTHER_BACKENDS
            raise ValueError(f"{name}={backend!r} is invalid: " + (
                "Pagoda builds structured outputs on xgrammar alone: use 'xgrammar' or 'auto'" if known
                else f"must be one of {STRUCTURED_OUTPUT_BACKENDS}"))


def _check_tokenizer_mode(mode: str) -> None:
    _check(mode in TOKENIZER_MODES, "tokenizer_mode", mode, f"one of {TOKENIZER_MODES}")
    if mode not in SUPPORTED_TOKENIZER_MODES:
        raise ValueError(
            f"tokenizer_mode={mode!r} is not supported: Pagoda loads tokenizers through transformers "
            f"({', '.join(SUPPORTED_TOKENIZER_MODES)}), not vLLM's {mode} loader (mistral needs mistral_common)"
        )


def _check_generation_overrides(overrides: dict[str, Any]) -> None:
    unknown = [key for key in overrides if key not in GENERATION_CONFIG_FIELDS]
    if unknown:
        raise ValueError(
            f"override_generation_config has unknown keys {unknown}: the accepted ones are "
            + ", ".join(GENERATION_CONFIG_FIELDS)
        )


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")
