"""From what the user set (EngineConfig) and the model's files to the ResolvedConfig every part of
the engine is built from: the one place where the model's config is read, defaults that depend on
the model or the machine are applied, and the rules that span knobs are checked (each error names
the knob to change). The front end calls it once, before any engine core starts."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from pagoda.attention.backend import TRITON_MIN_BLOCK_SIZE, attention_backend_name
from pagoda.config.engine_config import (
    DEFAULT_CPU_KV_CACHE_GIB,
    DTYPES,
    GENERATION_CONFIG_FIELDS,
    KV_CACHE_DTYPES,
    POOLING_TASKS,
    EngineConfig,
)
from pagoda.config.groups import (
    CacheConfig,
    DeviceConfig,
    ModelConfig,
    ParallelConfig,
    ResolvedConfig,
    SpeculativeConfig,
)
from pagoda.config.model_spec import ModelSpec
from pagoda.config.speculative import (
    EAGLE_METHODS,
    HIDDEN_STATES_METHODS,
    MODEL_METHODS,
    resolve_speculative,
)
from pagoda.core.scheduler import SchedulerConfig
from pagoda.layers.rotary import rope_parameters
from pagoda.loader.model_loader import (
    gguf_checkpoint_quantization,
    load_generation_defaults,
    load_generation_eos,
    load_hf_config,
)
from pagoda.loader.model_resolver import ResolvedModel, resolve_model
from pagoda.loader.weights import hf_checkpoint_shapes
from pagoda.lora.config import LoRAConfig
from pagoda.models import model_architecture, model_class
from pagoda.models.bert import position_offset
from pagoda.models.eagle import EAGLE_ARCHITECTURE
from pagoda.models.eagle3 import (
    EAGLE3_ARCHITECTURE,
    NUM_AUX_HIDDEN_STATES,
    eagle3_checkpoint_shapes,
    uses_aux_hidden_states,
)
from pagoda.models.transformers_fallback import TRANSFORMERS_ARCHITECTURE
from pagoda.multimodal.processing import is_multimodal_config
from pagoda.parallel_config import check_parallel_layout, detect_gpus
from pagoda.pooling import PoolerConfig, classifier_config, read_pooler_config
from pagoda.quantization import get_quantization_config, resolve_quantization
from pagoda.sampling_params import SamplingParams
from pagoda.structured_output.grammar import grammar_vocab

logger = logging.getLogger(__name__)


def resolve_config(
    args: EngineConfig, resolved: ResolvedModel, tokenizer: Any | None = None, server: bool = False
) -> ResolvedConfig:
    """resolved: where the model's files are (loader/model_resolver.py); tokenizer: the front
    end's (None: skip_tokenizer_init), whose EOS token ends requests besides those the model's
    configs name, and whose vocabulary grammars are compiled against; server: with `pagoda
    serve`'s defaults (its step budget), as vLLM's server has its own."""
    speculative = resolve_speculative(args.speculative_config, args.speculative_model, args.num_speculative_tokens)
    device = args.torch_device()
    model = _model_config(args, resolved, tokenizer, device, speculative is not None)
    if model.spec.architecture == EAGLE3_ARCHITECTURE:
        raise ValueError(f"model={model.name!r} is an EAGLE-3 head, which drafts for a target: give it as "
                         "speculative_config's model (method 'eagle3') with its target as the model")
    _check_block_size(args.block_size, device)
    parallel = _parallel_config(args, model, device)
    if parallel.experts_span_replicas:
        _check_experts_span_replicas(parallel, speculative)
    if speculative is not None and speculative.method in MODEL_METHODS:
        _check_proposer_placement(speculative, parallel)
    if speculative is not None and speculative.method in ("draft_model", *EAGLE_METHODS):
        draft = _draft_model_config(args, speculative, model, device)
        aux_layers = _eagle3_aux_layers(speculative, draft.spec, model.spec) if speculative.method == "eagle3" else ()
        speculative = dataclasses.replace(speculative, draft=draft, aux_hidden_state_layer_ids=aux_layers)
    if model.pooler is not None:
        # Each prompt runs whole in one step from its first token (its hidden states are pooled
        # there), and nothing is decoded after it: no chunks, no cached prefix, no overlapped steps.
        args = dataclasses.replace(
            args, enable_chunked_prefill=False, enable_prefix_caching=False, async_scheduling=False
        )
    return ResolvedConfig(
        model=model,
        cache=CacheConfig(
            args.block_size, args.enable_prefix_caching, _kv_cache_dtype(args.kv_cache_dtype, model, device),
            args.gpu_memory_utilization,
            args.num_gpu_blocks_override, _kv_cache_memory_bytes(args.kv_cache_memory_bytes, device),
        ),
        scheduler=SchedulerConfig(
            args.max_num_seqs, _max_num_batched_tokens(args, model.max_model_len, device, server), model.max_model_len,
            args.enable_chunked_prefill, _async_scheduling(args.async_scheduling, device, parallel),
            _long_prefill_token_threshold(args, model.max_model_len), args.max_num_partial_prefills,
            args.max_long_partial_prefills,
            max_loras=args.max_loras if args.enable_lora else 0, pooling=model.pooler is not None,
            priority_scheduling=args.scheduling_policy == "priority",
        ),
        parallel=parallel,
        device=DeviceConfig(
            device, _enforce_eager(args.enforce_eager or args.optimization_level == 0, model.spec, device, parallel),
            compile_decode=_compile_decode(args, model, device, parallel, speculative),
        ),
        speculative=speculative,
        lora=_lora_config(args),
    )


def _lora_config(args: EngineConfig) -> LoRAConfig | None:
    if not args.enable_lora:
        return None
    max_cpu_loras = args.max_loras if args.max_cpu_loras is None else args.max_cpu_loras
    return LoRAConfig(args.max_loras, args.max_lora_rank, max_cpu_loras)


def _model_config(
    args: EngineConfig, resolved: ResolvedModel, tokenizer: Any | None, device: torch.device, speculative: bool
) -> ModelConfig:
    hf_config = load_hf_config(resolved)
    spec = model_spec(hf_config, args.model_impl)
    _log_model_impl(spec, args.model_impl)
    if resolved.weights_gguf is not None:
        if spec.architecture == TRANSFORMERS_ARCHITECTURE:
            raise ValueError(
                f"{resolved.weights_gguf}: a GGUF file runs on a native architecture only (model_impl='pagoda')"
            )
        if args.load_format != "dummy":  # the GGUF types pick each layer's method, as a quantization_config would
            spec = dataclasses.replace(spec, quantization=gguf_checkpoint_quantization(resolved, spec))
    eos_token_ids = _eos_token_ids(load_generation_eos(resolved), hf_config, tokenizer)
    pooler = _pooler(args, resolved, hf_config, spec, speculative)
    # A pooling engine samples nothing, so it compiles no grammars (whose vocabulary needs an EOS
    # token, which a BERT tokenizer lacks).
    sampling = tokenizer is not None and pooler is None
    vocab = grammar_vocab(tokenizer, spec.vocab_size, eos_token_ids) if sampling else None
    dtype = _dtype(args.dtype, spec, device)
    defaults = default_sampling(args, resolved.model_dir)
    return ModelConfig(
        resolved, spec, args.load_format, dtype, _max_model_len(args.max_model_len, spec),
        args.seed, eos_token_ids, vocab, pooler, _quantization(args.quantization, spec, device, dtype),
        defaults, model_class(spec.architecture).is_multimodal, max_tokens_cap(args, defaults), args.logprobs_mode,
    )


def max_tokens_cap(args: EngineConfig, defaults: dict[str, Any]) -> int | None:
    """The server's bound on every request's max_tokens (vLLM's override_max_tokens): max_new_tokens
    of a generation_config folder (defaults: default_sampling's) or of override_generation_config;
    None with the model's own."""
    if args.generation_config in ("auto", "vllm", "pagoda"):
        return (args.override_generation_config or {}).get("max_new_tokens")
    return defaults.get("max_tokens")


def default_sampling(args: EngineConfig, model_dir: Path) -> dict[str, Any]:
    """vLLM's generation_config and override_generation_config: the SamplingParams defaults of
    requests that leave them unset. 'auto': the generation_config.json in model_dir (the model's
    folder as resolved), 'vllm' or 'pagoda': none, else a folder holding one; the overrides are
    set over them (as vLLM's, an override of null unsets the field)."""
    choice = args.generation_config
    defaults: dict[str, Any] = {}
    if choice not in ("vllm", "pagoda"):
        directory = model_dir if choice == "auto" else Path(choice)
        if not (directory / "generation_config.json").is_file() and choice != "auto":
            raise ValueError(f"generation_config={choice!r}: no generation_config.json in that folder")
        defaults = load_generation_defaults(directory)
    overrides = args.override_generation_config or {}
    defaults.update({GENERATION_CONFIG_FIELDS[name]: value for name, value in overrides.items()})
    defaults = {name: value for name, value in defaults.items() if value is not None}
    try:
        SamplingParams(**defaults)  # a bad value fails here, not in every request that takes it
    except ValueError as error:
        raise ValueError(f"generation_config={choice!r} with override_generation_config="
                         f"{args.override_generation_config} gives an invalid default: {error}") from None
    if defaults:
        logger.info("default sampling parameters (generation_config=%s): %s", choice, defaults)
    return defaults


def _quantization(stated: str | None, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> str | None:
    """The weight quantization method (the flag, or the checkpoint's), checked against the
    checkpoint, the architecture and the device before anything is built."""
    method = resolve_quantization(stated, spec.quantization)
    if method is None:
        return None
    if spec.architecture == TRANSFORMERS_ARCHITECTURE:
        raise ValueError(
            f"quantization={method!r}: the transformers fallback runs unquantized models only; "
            "use a natively supported architecture"
        )
    get_quantization_config(method, spec.quantization).check_supported(device, dtype)
    logger.info("weight quantization: %s%s", method, "" if spec.quantization else " (quantized at load)")
    return method


def _check_proposer_placement(speculative: SpeculativeConfig, parallel: ParallelConfig) -> None:
    """A draft model runs in the engine's process on the first rank's device (TP 1, whatever the
    target's); Medusa heads read hidden states that only a one-rank target has in that process."""
    if parallel.distributed_executor_backend == "ray":
        raise ValueError(f"speculative_config's method={speculative.method!r} is not built with Ray yet: its "
                         "proposer runs in the engine's process (use distributed_executor_backend='mp')")
    if speculative.method in HIDDEN_STATES_METHODS and parallel.world_size > 1:
        raise ValueError(f"speculative_config's method={speculative.method!r} is not built with several ranks yet: "
                         "the heads read the target's hidden states in the engine's process "
                         "(tensor_parallel_size=1, pipeline_parallel_size=1)")


def _draft_model_config(
    args: EngineConfig, speculative: SpeculativeConfig, target: ModelConfig, device: torch.device
) -> ModelConfig:
    """The draft of method='draft_model' (or the head of 'eagle' or 'eagle3'): the target's dtype,
    context and EOS ids; its vocabulary must be the target's (its drafts are token ids of the
    target). An EAGLE head is built with random weights that spec/eagle.py replaces with its
    checkpoint's and the target's, and runs over the target's context whatever its config's
    max_position_embeddings says (published heads say 2048, as vLLM runs them)."""
    assert speculative.model is not None
    resolved = resolve_model(speculative.model, args.load_format)
    draft_args = dataclasses.replace(args, max_model_len=target.max_model_len)
    if speculative.method in EAGLE_METHODS:
        draft_args = dataclasses.replace(draft_args, load_format="dummy", max_model_len=None)
    draft = _model_config(draft_args, resolved, None, device, False)
    if draft.spec.vocab_size != target.spec.vocab_size:
        raise ValueError(
            f"speculative_config's model={speculative.model!r} has a vocabulary of {draft.spec.vocab_size} tokens, "
            f"the target {target.name!r} one of {target.spec.vocab_size}: a draft must share the target's vocabulary"
        )
    if speculative.method in EAGLE_METHODS:
        draft = dataclasses.replace(draft, spec=_eagle_head_spec(speculative, draft.spec, target.spec))
    return dataclasses.replace(
        draft, dtype=target.dtype, eos_token_ids=target.eos_token_ids, max_model_len=target.max_model_len
    )


def _eagle_head_spec(speculative: SpeculativeConfig, head: ModelSpec, target: ModelSpec) -> ModelSpec:
    """An EAGLE head's spec in its method's layout (models/eagle.py, models/eagle3.py); it reads
    the target's hidden states, so its hidden size must be the target's."""
    source = speculative.model
    if speculative.method == "eagle" and head.architecture == EAGLE3_ARCHITECTURE:
        raise ValueError(f"speculative_config's model={source!r} is an EAGLE-3 head (its config's architectures: "
                         f"{head.hf_config.get('architectures')}): use method 'eagle3'")
    for hidden in (head.hidden_size, head.hf_config.get("target_hidden_size") or head.hidden_size):
        if hidden != target.hidden_size:
            raise ValueError(f"speculative_config's model={source!r} is an EAGLE head of hidden size {hidden}, "
                             f"the target's is {target.hidden_size}: they must match")
    # A head's random weights (spec/eagle.py loads its checkpoint over them) in its layout, from
    # its plain Llama's.
    head = dataclasses.replace(head, checkpoint_shapes=hf_checkpoint_shapes(head.hf_config))
    if speculative.method == "eagle3":
        return dataclasses.replace(
            head, architecture=EAGLE3_ARCHITECTURE, checkpoint_shapes=eagle3_checkpoint_shapes(head)
        )
    # EAGLE-1's layout: fc, and no input norm in its layer, no final norm.
    shapes = tuple((name, shape) for name, shape in head.checkpoint_shapes
                   if not name.endswith("input_layernorm.weight") and name != "model.norm.weight")
    hidden = head.hidden_size
    return dataclasses.replace(head, architecture=EAGLE_ARCHITECTURE,
                               checkpoint_shapes=(*shapes, ("fc.weight", (hidden, 2 * hidden))))


def _eagle3_aux_layers(speculative: SpeculativeConfig, head: ModelSpec, target: ModelSpec) -> tuple[int, ...]:
    """The target layers whose input hidden states an EAGLE-3 head reads, in layer order: its
    config's `eagle_aux_hidden_state_layer_ids`, else vLLM's default (2, n // 2, n - 3) for a
    target of n layers; layer n is the last layer's output. Empty for a head that reads the
    target's final hidden states (`eagle_config.use_aux_hidden_state: false`)."""
    if not uses_aux_hidden_states(head):
        return ()
    n = target.num_hidden_layers
    stated = head.hf_config.get("eagle_aux_hidden_state_layer_ids")
    layers = tuple(stated) if stated else (2, n // 2, n - 3)
    in_range = all(isinstance(i, int) and 0 <= i <= n for i in layers)
    if not in_range or len(set(layers)) != NUM_AUX_HIDDEN_STATES:
        given = "its config's eagle_aux_hidden_state_layer_ids" if stated else "vLLM's default (2, n // 2, n - 3)"
        raise ValueError(f"speculative_config's model={speculative.model!r} is an EAGLE-3 head, which reads the "
                         f"hidden states of {NUM_AUX_HIDDEN_STATES} distinct layers of the target's 0..{n}: {given} "
                         f"gives {list(layers)} (set eagle_aux_hidden_state_layer_ids in the head's config.json)")
    return tuple(sorted(layers))


def _parallel_config(args: EngineConfig, model: ModelConfig, device: torch.device) -> ParallelConfig:
    """The TP x PP x DP (x EP) layout, checked whole against the model and the visible GPUs."""
    parallel = ParallelConfig(
        args.tensor_parallel_size, args.pipeline_parallel_size, args.data_parallel_size, args.enable_expert_parallel,
        args.distributed_executor_backend,
        # vLLM's rule: a dense model's replicas stay independent, the flag meaning nothing to them.
        experts_span_replicas=(
            args.data_parallel_size > 1 and args.enable_expert_parallel and bool(model.spec.num_experts)
        ),
    )
    _check_fallback_parallel(model.spec, parallel)
    # Ray's ranks use the cluster's GPUs, not this host's: its placement group checks that they exist.
    gpus = detect_gpus() if device.type == "cuda" and parallel.distributed_executor_backend == "mp" else None
    quant_config = (
        None if model.quantization is None else get_quantization_config(model.quantization, model.spec.quantization)
    )
    check_parallel_layout(parallel, model.spec, model.dtype, args.gpu_memory_utilization, gpus, quant_config)
    return parallel


def _pooler(
    args: EngineConfig, resolved: ResolvedModel, hf_config: Any, spec: ModelSpec, speculative: bool
) -> PoolerConfig | None:
    """The pooling of an embedding engine (--runner pooling, or --task embed; runner auto picks it
    for an encoder-only model, as vLLM's does); None: it generates."""
    pooling_task = args.task in POOLING_TASKS
    if args.runner == "generate" and pooling_task:
        raise ValueError(f"task={args.task!r} is invalid with runner='generate': it needs runner='pooling'")
    encoder = model_class(spec.architecture).is_encoder_only
    if encoder:
        if args.runner == "generate" or args.task == "generate":
            knob = "runner" if args.runner == "generate" else "task"
            raise ValueError(
                f"{knob}='generate' is invalid for {spec.architecture}: an encoder-only model embeds and generates no "
                "text; use runner='pooling' (--runner pooling)"
            )
    elif args.runner != "pooling" and not pooling_task:
        return None
    if speculative:
        raise ValueError("speculative_config is invalid with runner='pooling': an embedding engine decodes no tokens")
    if model_class(spec.architecture).is_cross_encoder:
        return classifier_config(hf_config)
    # Without a sentence-transformers Pooling module: an encoder's [CLS] token, a decoder's last (vLLM's defaults).
    return read_pooler_config(resolved.model_dir, hf_config, "CLS" if encoder else "LAST")


def model_spec(hf_config: Any, model_impl: str = "auto") -> ModelSpec:
    """The typed spec of a Hugging Face config (ValueError: an architecture Pagoda runs neither
    natively nor through the transformers fallback, as model_impl allows). Fields only native
    models read (the MLP width, the norm's epsilon) are 0 for a fallback config that lacks them.
    A vision-language model's shape is its language model's (text_config); hf_config keeps all."""
    architecture = model_architecture(hf_config, model_impl)
    whole = hf_config.to_dict()
    if is_multimodal_config(hf_config):
        hf_config = hf_config.text_config
    heads = hf_config.num_attention_heads
    rope, local_rope = _rope_parameters(hf_config)
    # transformers >= 4.56 reads a config.json's "torch_dtype" into `dtype` (the old name warns).
    declared = getattr(hf_config, "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, DTYPES[declared]) if declared in DTYPES else None
    quantization = getattr(hf_config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    return ModelSpec(
        architecture=architecture,
        model_type=hf_config.model_type,
        num_hidden_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        intermediate_size=getattr(hf_config, "intermediate_size", None) or 0,
        num_attention_heads=heads,
        num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        vocab_size=hf_config.vocab_size,
        hidden_act=getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", None) or "silu",
        rms_norm_eps=getattr(hf_config, "rms_norm_eps", 0.0),
        rope_parameters=rope,
        max_position_embeddings=_max_positions(hf_config, whole),
        layer_sliding_windows=_layer_sliding_windows(hf_config),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        dtype=declared if isinstance(declared, torch.dtype) else None,
        quantization=quantization,
        hf_config=whole,
        local_rope_parameters=local_rope,
        query_pre_attn_scalar=getattr(hf_config, "query_pre_attn_scalar", None),
        attn_logit_softcapping=getattr(hf_config, "attn_logit_softcapping", None),
        final_logit_softcapping=getattr(hf_config, "final_logit_softcapping", None),
        **_moe_fields(hf_config),
    )


def _max_positions(hf_config: Any, whole: dict[str, Any]) -> int | None:
    """The positions a prompt can use: RoBERTa's first ones are taken by its padding index."""
    table = getattr(hf_config, "max_position_embeddings", None)
    return None if table is None else table - position_offset(whole)


def _moe_fields(hf_config: Any) -> dict[str, Any]:
    """ModelSpec's MoE fields: Mixtral names its experts num_local_experts, Qwen num_experts."""
    num_experts = getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None) or 0
    if not num_experts:
        return {}
    step = getattr(hf_config, "decoder_sparse_step", None) or 1
    mlp_only = set(getattr(hf_config, "mlp_only_layers", None) or ())
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=hf_config.num_experts_per_tok,
        moe_intermediate_size=getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size,
        norm_topk_prob=bool(getattr(hf_config, "norm_topk_prob", True)),
        shared_expert_intermediate_size=getattr(hf_config, "shared_expert_intermediate_size", None) or 0,
        dense_mlp_layers=tuple(
            i for i in range(hf_config.num_hidden_layers) if i in mlp_only or (i + 1) % step
        ),
    )


def _log_model_impl(spec: ModelSpec, model_impl: str) -> None:
    if spec.architecture == TRANSFORMERS_ARCHITECTURE:
        architectures = spec.hf_config.get("architectures") or [spec.model_type]
        logger.info(
            "model implementation: transformers (%s through transformers' modeling code with Pagoda's paged "
            "attention; model_impl=%s)", ", ".join(architectures), model_impl,
        )
    else:
        logger.info("model implementation: pagoda (native %s; model_impl=%s)", spec.architecture, model_impl)


def _check_experts_span_replicas(parallel: ParallelConfig, speculative: SpeculativeConfig | None) -> None:
    """What the replicas' lockstep (engine/lockstep.py) does not support yet."""
    if parallel.distributed_executor_backend != "mp":
        raise ValueError(
            f"distributed_executor_backend={parallel.distributed_executor_backend!r} with data_parallel_size="
            f"{parallel.data_parallel_size} and enable_expert_parallel: experts spanning the replicas need 'mp'"
        )
    if speculative is not None:
        raise ValueError(
            "speculative_config with data_parallel_size > 1 and enable_expert_parallel is not supported: the "
            "replicas step in lockstep, one forward pass each"
        )


def _check_fallback_parallel(spec: ModelSpec, parallel: ParallelConfig) -> None:
    if spec.architecture == TRANSFORMERS_ARCHITECTURE and parallel.world_size > 1:
        raise ValueError(
            f"tensor_parallel_size={parallel.tensor_parallel_size} x pipeline_parallel_size="
            f"{parallel.pipeline_parallel_size}: the transformers fallback runs on one rank (its layers are not "
            "split); use 1 and 1 (data_parallel_size works), or a natively supported architecture"
        )


def _compile_decode(
    args: EngineConfig, model: ModelConfig, device: torch.device, parallel: ParallelConfig,
    speculative: SpeculativeConfig | None,
) -> bool:
    """-O3 on the CPU: the decode forward compiled, where it is one rank's model stepping one token
    per request (what the compiled graph was tested for); elsewhere it says why not."""
    if args.optimization_level < 3 or device.type != "cpu" or args.enforce_eager:
        return False
    reasons = {
        "tensor or pipeline parallelism": parallel.tensor_parallel_size * parallel.pipeline_parallel_size > 1,
        "speculative decoding": speculative is not None,
        "LoRA adapters": args.enable_lora,
        "the transformers fallback": model.spec.architecture == TRANSFORMERS_ARCHITECTURE,
        "a pooling model": model.pooler is not None,
        "a multimodal model": model.multimodal,
    }
    unsupported = [reason for reason, applies in reasons.items() if applies]
    if unsupported:
        logger.info("optimization_level=3: the decode forward runs eagerly with %s", " and ".join(unsupported))
    return not unsupported


def _enforce_eager(stated: bool, spec: ModelSpec, device: torch.device, parallel: ParallelConfig) -> bool:
    if device.type != "cuda" or stated:
        return stated
    # transformers' modeling code is not known to be free of host syncs, which break a CUDA graph's capture.
    if spec.architecture == TRANSFORMERS_ARCHITECTURE:
        logger.info("the transformers fallback runs eagerly: no CUDA graphs")
        return True
    # A graph would replay one replica's share of the MoE exchange at the sizes it was captured with.
    if parallel.experts_span_replicas:
        logger.info("MoE experts spanning the data-parallel replicas: every step runs eagerly, no CUDA graphs")
        return True
    return False


def _layer_sliding_windows(hf_config: Any) -> tuple[int | None, ...]:
    """Each layer's window: the config's `layer_types` say which layers slide (Gemma, Qwen2);
    without them every layer does (Mistral, Phi-3)."""
    uses_window = getattr(hf_config, "use_sliding_window", True)
    window = getattr(hf_config, "sliding_window", None) if uses_window else None
    if window is None:
        return ()
    types = getattr(hf_config, "layer_types", None) or ["sliding_attention"] * hf_config.num_hidden_layers
    return tuple(window if kind == "sliding_attention" else None for kind in types)


def _rope_parameters(hf_config: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the rope of full-attention layers, that of sliding-window layers where it differs):
    Gemma 3's configs hold one rope per layer type."""
    params = rope_parameters(hf_config)
    if "full_attention" not in params:
        return params, None
    return _normalised_rope(params["full_attention"]), _normalised_rope(params["sliding_attention"])


def _normalised_rope(params: dict[str, Any]) -> dict[str, Any]:
    params = dict(params)
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def _dtype(dtype: str, spec: ModelSpec, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, DTYPES[dtype])
    if device.type == "cpu":
        # fp32 is what CPU matmul libraries run fastest and most exactly.
        return torch.float32
    return spec.dtype if spec.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def _max_model_len(max_model_len: int | None, spec: ModelSpec) -> int:
    limit = spec.max_position_embeddings
    if max_model_len is None:
        if limit is None:
            raise ValueError("the model config has no max_position_embeddings: set max_model_len (--max-model-len)")
        return int(limit)
    if limit is not None and max_model_len > limit:
        raise ValueError(
            f"max_model_len={max_model_len} is larger than the model's maximum context "
            f"({limit}, max_position_embeddings in its config); lower --max-model-len"
        )
    return max_model_len


def _check_block_size(block_size: int, device: torch.device) -> None:
    if device.type == "cuda" and attention_backend_name(device) == "triton" and block_size < TRITON_MIN_BLOCK_SIZE:
        raise ValueError(
            f"block_size={block_size} is invalid on the GPU: it must be >= {TRITON_MIN_BLOCK_SIZE} "
            "(a tensor-core tile of the attention kernels); raise --block-size"
        )


def _kv_cache_dtype(stated: str, model: ModelConfig, device: torch.device) -> torch.dtype:
    """The cached keys' and values' dtype: auto's, a 16-bit one, or an fp8 format, where it can run."""
    dtype = getattr(torch, KV_CACHE_DTYPES[stated]) if KV_CACHE_DTYPES[stated] else _auto_kv_cache_dtype(model, device)
    if dtype.itemsize != 1:
        if dtype != model.dtype and device.type != "cpu":
            raise ValueError(
                f"kv_cache_dtype={stated!r} differs from the model's dtype ({model.dtype}); a 16- or 32-bit cache "
                "of another dtype runs on the CPU only: use --kv-cache-dtype auto, fp8 or fp8_e5m2 here"
            )
        return dtype
    if model.spec.architecture == TRANSFORMERS_ARCHITECTURE:
        raise ValueError(
            f"kv_cache_dtype={stated!r} runs on native architectures only, not through the transformers fallback: "
            "use --kv-cache-dtype auto"
        )
    if dtype == torch.float8_e4m3fn and device.type == "cuda" and attention_backend_name(device) == "triton":
        _check_triton_fp8_e4m3(stated, torch.cuda.get_device_capability(device))
    return dtype


def _auto_kv_cache_dtype(model: ModelConfig, device: torch.device) -> torch.dtype:
    """The model's dtype, but float16 for a GGUF model computing in float32 on the CPU, as
    llama.cpp's cache: half the memory (the default model's whole footprint then fits in
    llama-server's), within the precision its quantized weights already gave up, and read as fast
    by the C decode attention."""
    if device.type == "cpu" and model.quantization == "gguf" and model.dtype == torch.float32:
        return torch.float16
    return model.dtype


def _check_triton_fp8_e4m3(stated: str, capability: tuple[int, int]) -> None:
    # Triton converts float8_e4m3 only on GPUs with fp8 (compute capability >= 8.9); float8_e5m2 on any.
    if capability < (8, 9):
        raise ValueError(
            f"kv_cache_dtype={stated!r} (float8_e4m3) needs a GPU with fp8, of compute capability >= 8.9; this one "
            f"is {capability[0]}.{capability[1]}: use --kv-cache-dtype fp8_e5m2 (which the attention kernels convert "
            "on any GPU) or auto"
        )


def _kv_cache_memory_bytes(stated: int | None, device: torch.device) -> int | None:
    """The CPU has no device memory to profile: its pool gets a stated budget, as vLLM's
    VLLM_CPU_KVCACHE_SPACE does; a GPU's is what its memory leaves unless stated."""
    if stated is not None or device.type != "cpu":
        return stated
    gib = float(os.environ.get("PAGODA_CPU_KVCACHE_SPACE", DEFAULT_CPU_KV_CACHE_GIB))
    return int(gib * (1 << 30))


# Offline steps' default budgets, vLLM's LLM class's: 16,384 tokens on large GPUs (W1 on an H200:
# 6.46-6.50 s against 6.53-6.60 at 8,192, half the prefill steps; docs/benchmarks.md, session 22).
MAX_NUM_BATCHED_TOKENS = 8192
LARGE_GPU_MAX_NUM_BATCHED_TOKENS = 16384
# A server's step budget, as vLLM's server defaults it: a step holds at most this many tokens, so a
# prefill chunk beside the running decodes delays each of their next tokens by one step of that
# size, not a long one. Large GPUs (GpuInventory.large) get larger steps (vLLM gives them 8192):
# their matrix units want more rows a step. W3 on an H200 served 95 % of offline's throughput at
# 2,048, 97 % at 6,144 with a p99 ITL of 153 ms, and 8,192 took that to 198-223 ms, past the
# 200 ms target (docs/benchmarks.md, session 21). Offline LLM keeps its larger default.
SERVER_MAX_NUM_BATCHED_TOKENS = 2048
LARGE_GPU_SERVER_MAX_NUM_BATCHED_TOKENS = 6144


def _max_num_batched_tokens(args: EngineConfig, max_model_len: int, device: torch.device, server: bool) -> int:
    if args.max_num_batched_tokens is not None:
        return args.max_num_batched_tokens
    if not args.enable_chunked_prefill:  # whole prompts: the budget must hold the longest
        return max(max_model_len, 2048)
    if device.type == "cpu":
        return 2048
    if server:
        return LARGE_GPU_SERVER_MAX_NUM_BATCHED_TOKENS if detect_gpus().large else SERVER_MAX_NUM_BATCHED_TOKENS
    return LARGE_GPU_MAX_NUM_BATCHED_TOKENS if detect_gpus().large else MAX_NUM_BATCHED_TOKENS


def _long_prefill_token_threshold(args: EngineConfig, max_model_len: int) -> int:
    # vLLM's rule: several partial prefills need a line between long prompts and short ones.
    if args.long_prefill_token_threshold == 0 and args.max_num_partial_prefills > 1:
        return int(max_model_len * 0.04)
    return args.long_prefill_token_threshold


def _async_scheduling(stated: bool | None, device: torch.device, parallel: ParallelConfig) -> bool:
    # On for GPUs, where the host's share of a step is worth hiding; off on the CPU, where the
    # host runs the model too.
    if parallel.experts_span_replicas:
        if stated:
            raise ValueError(
                "async_scheduling=True with data_parallel_size > 1 and enable_expert_parallel: the replicas step "
                "in lockstep, each step's forward pass run before the next is planned"
            )
        return False
    return device.type == "cuda" if stated is None else stated


def _eos_token_ids(generation_eos: set[int], hf_config: Any, tokenizer: Any | None) -> frozenset[int]:
    """generation_config.json's EOS ids, the model config's and the tokenizer's."""
    ids = set(generation_eos)
    declared = getattr(hf_config, "eos_token_id", None)
    ids.update([declared] if isinstance(declared, int) else declared or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
