"""Turns a SchedulerOutput into one flat forward pass over the paged KV cache, then samples.

`launch` queues a step on the device and returns at once; its tokens are read when they are
needed (`PendingStep.result`), so the engine can plan and queue the next step meanwhile. A
decode whose input token was sampled by the step before, still unread, takes it from that step's
samples on the device (with several ranks, broadcast by the rank that sampled them).

A chunk with draft tokens samples every position from its last known token on; `PendingStep`
keeps the drafts that match those samples and one sampled token (pagoda/sample/acceptance.py), so
each request gets a list of new tokens; for a proposer from the target's hidden states (Medusa
heads, EAGLE), the step also hands back its final hidden states (for EAGLE-3, those of the
layers its head reads: the model returns them besides its final ones). Structured
outputs' grammar masks (computed by the engine
core) are applied to the sampled rows' logits before sampling; a step whose masks follow the
tokens of the step before it is launched with its sampling deferred until the core has them. An
embedding engine (--runner pooling) computes no logits: each prompt's final hidden states are
pooled into one vector (worker/pooler.py); a text pair's second text is of token type 1 there
(a BERT cross-encoder's). With LoRA, each chunk's adapter is made resident and
each token's slot written into the static index the LoRA layers (and the decode graphs) read
(pagoda/lora/manager.py). A vision-language model's prefill chunks that reach image placeholders
get the images' encoder features merged into their token embeddings (multimodal/encoder_cache.py),
and an M-RoPE model's (Qwen2-VL) their [3, T] positions (multimodal/mrope.py)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pagoda.attention import AttentionMetadata, get_attention_backend
from pagoda.attention.kv_cache_spec import FullAttentionSpec
from pagoda.config.groups import ResolvedConfig
from pagoda.config.speculative import HIDDEN_STATES_METHODS
from pagoda.core.scheduler import ScheduledChunk, SchedulerOutput
from pagoda.distributed.comm import broadcast_from_sampling_rank
from pagoda.distributed.parallel_state import pp_group, tp_group
from pagoda.host_to_device import pinned, to_device
from pagoda.layers.attention import Attention
from pagoda.layers.moe import SparseMoeBlock
from pagoda.loader.model_loader import build_model
from pagoda.lora.manager import LoRAManager
from pagoda.lora.request import LoRARequest
from pagoda.multimodal.encoder_cache import EncoderCache
from pagoda.multimodal.inputs import ImageInput
from pagoda.multimodal.mrope import mrope_delta, mrope_positions
from pagoda.sample.acceptance import accept_drafts
from pagoda.sample.sampler import (
    DeviceSamples,
    PendingSamples,
    Sampler,
    SamplingRequest,
    TopLogprobs,
    gather_top_logprobs,
    takes_argmax_only,
    warm_up_sampling,
)
from pagoda.spec.proposer import StepHiddenStates
from pagoda.structured_output.bitmask import GrammarBitmask, apply_grammar_bitmask
from pagoda.worker.compiled_decode import CompiledDecode
from pagoda.worker.cuda_graphs import DecodeGraphs, ForwardOutput, capture_sizes
from pagoda.worker.pooler import pool

logger = logging.getLogger("pagoda")


@dataclass
class ModelRunnerOutput:
    # request id -> its new tokens: the drafts accepted, then one sampled token.
    sampled: dict[str, list[int]] = field(default_factory=dict)
    top_logprobs: dict[str, list[TopLogprobs]] = field(default_factory=dict)  # one per new token, when asked
    # request id -> (index of the first prompt token scored, logprobs of each scored token).
    prompt_logprobs: dict[str, tuple[int, list[TopLogprobs]]] = field(default_factory=dict)
    # An embedding engine's: request id -> its prompt's pooled hidden state (worker/pooler.py).
    pooled: dict[str, list[float]] = field(default_factory=dict)
    # For a proposer from the target's hidden states (spec/medusa.py, spec/eagle.py): the step's.
    step_hidden: StepHiddenStates | None = None


class PendingStep:
    """A launched step: its sampled tokens are read back on `result`. A step launched with its
    sampling deferred samples when `sample` gives it its grammar masks."""

    def __init__(
        self,
        output: ModelRunnerOutput,
        sampling: list[ScheduledChunk] | None = None,
        samples: PendingSamples | None = None,
        sample_later: Callable[[GrammarBitmask | None], PendingSamples] | None = None,
    ) -> None:
        self._output = output
        self._sampling = sampling or []  # the chunks that sample, in the order of the sample rows
        self._samples = samples
        self._sample_later = sample_later

    @property
    def awaits_sampling(self) -> bool:
        return self._sample_later is not None

    def sample(self, grammar_bitmask: GrammarBitmask | None) -> None:
        """Queue the deferred sampling, with the masks of the step's constrained rows."""
        assert self._sample_later is not None, "this step's sampling was not deferred"
        self._samples, self._sample_later = self._sample_later(grammar_bitmask), None

    def result(self) -> ModelRunnerOutput:
        """Wait for the step's samples (only those: not for steps queued after it)."""
        assert self._sample_later is None, "a deferred step is read before it sampled"
        out, samples = self._output, self._samples
        if samples is not None:
            self._samples = None
            read = samples.result()
            row = 0
            for chunk in self._sampling:
                rid, drafts = chunk.request.request_id, chunk.draft_token_ids
                end = row + 1 + len(drafts)
                tokens = accept_drafts(drafts, read.token_ids[row:end]) if drafts else read.token_ids[row:end]
                out.sampled[rid] = tokens
                if read.top_logprobs[row] is not None:
                    out.top_logprobs[rid] = read.top_logprobs[row : row + len(tokens)]
                if out.step_hidden is not None:  # the accepted drafts' rows hold real tokens too
                    first, position, known = out.step_hidden.rows[rid]
                    out.step_hidden.rows[rid] = (first, position, known + len(tokens) - 1)
                row = end
        return out


@dataclass
class _Batch:
    """One step's inputs, on the host: the eager path and the CUDA-graph path copy them differently."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    logits_rows: list[int]  # rows of the hidden states whose logits are needed
    sample_rows: list[int]  # indices into logits_rows that sample
    prompt_rows: dict[str, tuple[int, int]]  # request id -> (first, count) in logits_rows
    # Decode rows whose input token is the previous step's sample, still on the device only:
    # their rows in input_ids, and the matching rows of that step's samples.
    unread_rows: list[int]
    unread_sources: list[int]
    # Request id -> the row of its last sample, the next step's input for a decode planned before
    # the samples are read (never a chunk with drafts: the scheduler waits for their verdict).
    last_sample_row: dict[str, int]
    loras: list[LoRARequest | None]  # each chunk's adapter
    # Chunks that may cover image placeholders: (request id, its images, start, length, first row).
    image_chunks: list[tuple[str, list[ImageInput], int, int, int]] = field(default_factory=list)
    # M-RoPE (Qwen2-VL): positions is [3, T] where a chunk reaches into a prompt with images.
    positions_3d: bool = False
    # Each row's token type, where a request is a text pair (a BERT cross-encoder's); None: all 0.
    token_type_ids: list[int] | None = None


class ModelRunner:
    def __init__(
        self, config: ResolvedConfig, device: torch.device, graph_query_lens: list[int] | None = None
    ) -> None:
        """device: this rank's. graph_query_lens: the query tokens per request that decode graphs
        are captured for (a draft model's own; by default 1, and 1 + the drafts a multi-token
        step verifies when a proposer is configured)."""
        self.device = device
        self.max_model_len = config.model.max_model_len
        self.hidden_size, self.dtype = config.model.spec.hidden_size, config.model.dtype
        # An embedding engine decodes nothing: no decode graphs.
        self.use_cuda_graphs = (
            device.type == "cuda" and not config.device.enforce_eager and pp_group().size == 1
            and config.model.pooler is None
        )
        self.max_num_seqs = config.scheduler.max_num_seqs
        speculative = config.speculative
        self.keeps_step_hidden = speculative is not None and speculative.method in HIDDEN_STATES_METHODS
        drafts = config.num_speculative_tokens
        self.graph_query_lens = graph_query_lens or [1] + ([1 + drafts] if drafts else [])
        self.decode_graphs: DecodeGraphs | None = None
        self.compile_decode = config.device.compile_decode
        self.compiled_decode: CompiledDecode | None = None
        self.block_size = config.cache.block_size
        self.attention_backend = get_attention_backend(device)
        started = time.perf_counter()
        self.model = build_model(config.model, device=device, backend=self.attention_backend)
        if config.cache.dtype != config.model.dtype:  # --kv-cache-dtype fp8: every layer's cache
            for layer in self.model.modules():
                if isinstance(layer, Attention):
                    layer.kv_cache_dtype = config.cache.dtype
        if speculative is not None and speculative.aux_hidden_state_layer_ids:
            self.model.set_aux_hidden_state_layers(speculative.aux_hidden_state_layer_ids)
        self.kv_cache_spec = self.model.kv_cache_spec(self.block_size)
        self.lora = None if config.lora is None else LoRAManager(
            self.model, config.lora, config.model.spec,
            max(config.scheduler.max_num_batched_tokens, capture_sizes(self.max_num_seqs)[-1] * (1 + drafts)),
            device, config.model.dtype,
        )
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        logger.info(
            "model built in %.1f s (%s weights, %.2f GiB)", time.perf_counter() - started, config.model.load_format,
            weight_bytes / 2**30,
        )
        # A vision-language model's image features, kept across a request's prefill chunks; the
        # first pipeline stage embeds the tokens, so it alone encodes images.
        self.encoder_cache = EncoderCache() if self.model.is_multimodal and pp_group().is_first else None
        self.mrope_merge_size: int | None = getattr(self.model, "mrope_merge_size", None)
        self.sampler = Sampler(config.model.seed, config.model.logprobs_mode)
        pooler = config.model.pooler
        self.pooling_type = None if pooler is None else pooler.pooling_type  # None: the runner samples
        # A sequence-classification model's head, over each prompt's pooled vector.
        self.pooling_head = self.model.classify if pooler is not None and pooler.labels else None
        # One rank samples: TP rank 0 of the last pipeline stage (every rank there has the logits).
        self.samples = pp_group().is_last and tp_group().rank == 0
        self.kv_caches: list[torch.Tensor] = []
        # The last step's sampled tokens on the device (on the rank that samples), and which
        # request each row belongs to (on every rank).
        self._last_samples: torch.Tensor | None = None
        self._last_sample_rows: dict[str, int] = {}

    # KV cache -----------------------------------------------------------------------------

    def kv_bytes_per_block(self) -> int:
        """Bytes of one block over every attention layer this rank holds."""
        return sum(spec.page_size_bytes for spec in self.kv_cache_spec)

    def profile_free_gpu_bytes(self, gpu_memory_utilization: float, num_tokens: int, max_model_len: int) -> int:
        """Bytes left for the KV pool: the utilisation target minus weights, the peak activations of
        a forward pass over `num_tokens` tokens, what other libraries hold on the device, and the
        decode graphs' memory."""
        started = time.perf_counter()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_run(num_tokens, max_model_len)
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = (total - free) - torch.cuda.memory_reserved(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        graphs = self._graph_bytes()
        logger.info(
            "profiling pass over %d tokens in %.1f s: peak %.2f GiB with the weights, %.2f GiB outside torch, "
            "%.2f GiB for decode graphs", num_tokens, time.perf_counter() - started, peak / 2**30,
            outside_torch / 2**30, graphs / 2**30,
        )
        return int(total * gpu_memory_utilization - peak - outside_torch - graphs)

    def _graph_bytes(self) -> int:
        """What the decode graphs will hold: the largest one, whose memory the others reuse,
        captured once over a one-block pool and released."""
        if not self.use_cuda_graphs:
            return 0
        kv_caches = self._kv_tensors(1)
        graphs = self._decode_graphs(kv_caches, scratch_block=0, sizes=capture_sizes(self.max_num_seqs)[-1:])
        with torch.inference_mode():
            used = graphs.capture()
        del graphs, kv_caches
        torch.cuda.empty_cache()
        return max(0, used)

    @torch.inference_mode()
    def _profile_run(self, num_tokens: int, max_model_len: int) -> None:
        """One forward pass as large as a step can be: prompts of max_model_len filling the budget."""
        bs = self.block_size
        seq_lens = [max_model_len] * (num_tokens // max_model_len)
        if num_tokens % max_model_len:
            seq_lens.append(num_tokens % max_model_len)
        tables, slots, positions, first_block = [], [], [], 0
        for n in seq_lens:
            table = list(range(first_block, first_block + -(-n // bs)))
            first_block += len(table)
            tables.append(table)
            slots.extend(table[p // bs] * bs + p % bs for p in range(n))
            positions.extend(range(n))
        self.kv_caches = self._kv_tensors(first_block)
        metadata = self._build_metadata(slots, seq_lens, seq_lens, tables)
        self.attention_backend.prepare(metadata)
        dev = self.device
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=dev)
        hidden, _ = _split_aux(self.model(input_ids, torch.tensor(positions, device=dev), self.kv_caches, metadata))
        if hidden is not None:  # the last pipeline stage
            self.model.compute_logits(hidden[: min(num_tokens, 256)])
        self.kv_caches = []

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The KV pool, then (on CUDA, unless eager) the decode graphs that read it, or (-O3 on the
        CPU) the compiled decode forward; on CUDA, the sampler's kernels compiled."""
        if not self.kv_cache_spec:
            logger.info("no KV pool: the model's attention reads only each step's own keys and values (an encoder)")
            return
        # Graphs pad batches with rows that write into one extra block, past the pool's; the
        # compiler's dummy step writes there too.
        started = time.perf_counter()
        self.kv_caches = self._kv_tensors(num_blocks + (self.use_cuda_graphs or self.compile_decode))
        logger.info(
            "KV pool of %d blocks (%d tokens, %s) allocated in %.1f s", num_blocks, num_blocks * self.block_size,
            _dtype_names(self.kv_cache_spec), time.perf_counter() - started,
        )
        if self.use_cuda_graphs:
            self.decode_graphs = self._decode_graphs(
                self.kv_caches, scratch_block=num_blocks, sizes=capture_sizes(self.max_num_seqs)
            )
            with torch.inference_mode():
                self.decode_graphs.capture()
        if self.compile_decode:
            self._compile_decode(scratch_block=num_blocks)
        # However the pool was sized (profiled, or stated by --kv-cache-memory-bytes).
        if self.device.type == "cuda" and self.pooling_type is None and pp_group().is_last:
            self.warm_up_sampler()

    @torch.inference_mode()
    def warm_up_sampler(self) -> None:
        """Sample from one row of logits as the model computes them (every rank of the last stage
        computes them: the head may gather across the TP ranks), then compute the logits of each
        row count a decode graph covers once, as head_rows pads them. cuBLAS's first GEMM of a shape
        it has not run held the host until the device's queue had drained (W1 on the H200: ~350 ms
        in each early prefill step, whose sampled rows grow 32, 63, 95, ...), so the next step was
        planned only once the device had run dry."""
        max_rows = min(self.max_num_seqs, capture_sizes(self.max_num_seqs)[-1])
        hidden = torch.zeros(head_rows(max_rows, self.device), self.hidden_size, dtype=self.dtype, device=self.device)
        warm_up_sampling(self.model.compute_logits(hidden[:1]))
        for rows in sorted({head_rows(n, self.device) for n in range(2, max_rows + 1)}):
            self.model.compute_logits(hidden[:rows])

    def _compute_logits(self, hidden: torch.Tensor, argmax_only: bool) -> torch.Tensor:
        """The head's logits of these rows, computed over head_rows of them."""
        rows = hidden.shape[0]
        padded = head_rows(rows, self.device)
        if padded > rows:
            hidden = torch.nn.functional.pad(hidden, (0, 0, 0, padded - rows))
        return self.model.compute_logits(hidden, argmax_only)[:rows]

    @torch.inference_mode()
    def _compile_decode(self, scratch_block: int) -> None:
        if self.model.decodes_in_c():
            logger.info("optimization_level=3: each decoder layer of a decode step runs as one C call, faster "
                        "than the compiled forward: not compiled")
            return
        compiled = CompiledDecode(self.model, self.attention_backend, self.kv_caches)
        slot = scratch_block * self.block_size
        metadata = self._build_metadata([slot], [1], [1], [[scratch_block]])
        self.attention_backend.prepare(metadata)
        dummy = torch.zeros(1, dtype=torch.int64, device=self.device)
        if compiled.compile(dummy, dummy.clone(), metadata):
            self.compiled_decode = compiled

    def _decode_graphs(self, kv_caches: list[torch.Tensor], scratch_block: int, sizes: list[int]) -> DecodeGraphs:
        # The forward closes over the model and the pool, not over self: a runner <-> graphs
        # cycle would outlive `del llm` once the engine's start-up objects are gc.freeze()d.
        model = self.model

        def forward(ids: torch.Tensor, pos: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
            return model(ids, pos, kv_caches, metadata)

        return DecodeGraphs(
            forward if self.lora is None else self.lora.context.always_on(forward),
            self.attention_backend,
            sizes=sizes,
            block_size=self.block_size,
            max_blocks_per_seq=-(-self.max_model_len // self.block_size),
            scratch_block=scratch_block,
            device=self.device,
            query_lens=self.graph_query_lens,
        )

    def _kv_tensors(self, num_blocks: int) -> list[torch.Tensor]:
        """One [2, num_blocks, block_size, KV heads, head size] tensor per attention layer."""
        tensors = []
        for spec in self.kv_cache_spec:
            kv, *block = spec.block_shape
            tensors.append(_zeros((kv, num_blocks, *block), spec.dtype, self.device))
        return tensors

    # One step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute_dummy_batch(self) -> None:
        """This replica's share of a step it has no tokens for, while the replicas whose experts it
        holds run one: each MoE layer of this rank's stage, in order, over no rows. (vLLM runs a
        one-token forward; attention stays within the replica, so the MoE layers alone suffice.)"""
        for block in self.model.modules():
            if isinstance(block, SparseMoeBlock):
                block(block.gate.weight.new_empty(0, block.gate.in_features))

    @torch.inference_mode()
    def launch(self, scheduler_output: SchedulerOutput, defer_sampling: bool = False) -> PendingStep:
        """Queue one step on the device; the host waits only for prompt logprobs and top logprobs.
        defer_sampling: queue the forward pass only; the step samples when given its grammar masks
        (`PendingStep.sample`), which may follow the tokens of the step before it."""
        chunks = scheduler_output.chunks
        batch = self._prepare(chunks)
        hidden, aux_hidden = _split_aux(self._forward(batch))
        if batch.last_sample_row:  # on every rank: the next step's decodes may read these samples
            self._last_sample_rows = batch.last_sample_row
        out = ModelRunnerOutput()
        if hidden is not None and self.pooling_type is not None:
            if self.samples:
                out.pooled = pool(
                    self.pooling_type, hidden, chunks, _query_starts(batch.query_lens), self.pooling_head
                )
            return PendingStep(out)
        if hidden is not None and self.keeps_step_hidden:
            out.step_hidden = _step_hidden(hidden if aux_hidden is None else aux_hidden, chunks, batch.query_lens)
        if hidden is None or not batch.logits_rows:  # hidden is None before the last pipeline stage
            return PendingStep(out)
        # Greedy rows alone, no drafts: the argmax is all that is read (and must stay exact). Only
        # a CPU head has a use for it (layers/lm_head_screen.py): a GPU step skips the ~0.1 ms
        # look at 256 rows' parameters.
        argmax_only = self.device.type == "cpu" and all(
            takes_argmax_only(c.request.sampling_params) and not c.draft_token_ids for c in chunks
        )
        logits = self._compute_logits(_rows(hidden, batch.logits_rows), argmax_only)
        if not self.samples:
            return PendingStep(out)
        for chunk in chunks:
            if chunk.request.request_id in batch.prompt_rows:
                scored = self._prompt_logprobs(logits, chunk, batch)
                out.prompt_logprobs[chunk.request.request_id] = (chunk.start + 1, scored)
        sampling = [c for c in chunks if c.samples]
        if not sampling:
            return PendingStep(out)
        sample_logits = _rows(logits, batch.sample_rows)

        @torch.inference_mode()
        def sample(grammar_bitmask: GrammarBitmask | None) -> PendingSamples:
            if grammar_bitmask is not None:
                apply_grammar_bitmask(sample_logits, grammar_bitmask)
            samples = self._sample(sample_logits, sampling)
            self._last_samples = samples.token_ids
            return PendingSamples(samples)

        if defer_sampling:
            return PendingStep(out, sampling, sample_later=sample)
        return PendingStep(out, sampling, sample(scheduler_output.grammar_bitmask))

    def _forward(self, batch: _Batch) -> ForwardOutput | None:
        graphs = self.decode_graphs
        input_ids = self._input_ids(batch)
        if self.lora is not None:
            self.lora.set_batch(batch.loras, batch.query_lens)
        images = None
        if self.encoder_cache is not None and batch.image_chunks:
            images = self.encoder_cache.step_features(batch.image_chunks, self.model.encode_images)
        plain = images is None and not batch.positions_3d
        if plain and graphs is not None and graphs.captures(batch.query_lens, len(batch.input_ids)):
            return graphs.run(
                input_ids, pinned(batch.positions, torch.int64), pinned(batch.slots, torch.int64),
                pinned(batch.seq_lens, torch.int32), pinned(_padded_tables(batch.block_tables), torch.int32),
            )
        metadata = self._build_metadata(batch.slots, batch.query_lens, batch.seq_lens, batch.block_tables)
        self.attention_backend.prepare(metadata)
        positions = to_device(batch.positions, torch.int64, self.device)
        if images is None:
            if batch.token_type_ids is not None:
                token_types = to_device(batch.token_type_ids, torch.int64, self.device)
                return self.model(input_ids, positions, self.kv_caches, metadata, token_type_ids=token_types)
            if self.compiled_decode is not None and plain and len(batch.input_ids) == len(batch.query_lens):
                return self.compiled_decode(input_ids, positions, metadata)
            return self.model(input_ids, positions, self.kv_caches, metadata)
        rows, features = images
        embeds = self.model.embed_input_ids(input_ids)
        embeds[to_device(rows, torch.int64, self.device)] = features.to(embeds.dtype)
        return self.model(input_ids, positions, self.kv_caches, metadata, inputs_embeds=embeds)

    def _input_ids(self, batch: _Batch) -> torch.Tensor:
        input_ids = to_device(batch.input_ids, torch.int64, self.device)
        if batch.unread_rows:
            rows = to_device([batch.unread_rows, batch.unread_sources], torch.int64, self.device)
            input_ids.index_copy_(0, rows[0], self._unread_tokens(rows[1]))
        return input_ids

    def _unread_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """The previous step's samples at `rows`, on every rank: only the rank that samples has
        them, so it broadcasts them, queued on the device like the rest of the step (one small
        collective instead of every rank sampling alike, which would need their logits and
        random draws to agree to the bit, and would not reach a first pipeline stage)."""
        if self.samples:
            assert self._last_samples is not None
            tokens = self._last_samples.index_select(0, rows)
        else:
            tokens = torch.empty_like(rows)
        return broadcast_from_sampling_rank(tokens)

    def _sample(self, logits: torch.Tensor, chunks: list[ScheduledChunk]) -> DeviceSamples:
        requests: list[SamplingRequest] = [c.request for c in chunks]
        # A sampling chunk ends at the request's last token so far, known or in flight, then its
        # drafts: what lies past the prompt before them was generated before the chunk's first
        # sample (a worker's mirror counts no placeholders).
        num_generated = [
            c.start + c.num_tokens - len(c.draft_token_ids) - c.request.num_prompt_tokens for c in chunks
        ]
        if any(c.draft_token_ids for c in chunks):
            requests, num_generated = _rows_per_position(chunks, num_generated)
        return self.sampler.sample(logits, requests, num_generated)

    def _prompt_logprobs(self, logits: torch.Tensor, chunk: ScheduledChunk, batch: _Batch) -> list[TopLogprobs]:
        first, count = batch.prompt_rows[chunk.request.request_id]
        req = chunk.request
        targets = req.prompt_token_ids[chunk.start + 1 : chunk.start + 1 + count]
        logprobs = logits[first : first + count].float()
        if self.sampler.logprobs_mode.endswith("logprobs"):  # (else the logits themselves: --logprobs-mode)
            logprobs = torch.log_softmax(logprobs, dim=-1)
        chosen = to_device(targets, torch.int64, logprobs.device)
        return gather_top_logprobs(logprobs, chosen, req.sampling_params.prompt_logprobs)

    def _prepare(self, chunks: list[ScheduledChunk]) -> _Batch:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: dict[str, tuple[int, int]] = {}
        unread_rows: list[int] = []
        unread_sources: list[int] = []
        last_sample_row: dict[str, int] = {}
        image_chunks: list[tuple[str, list[ImageInput], int, int, int]] = []
        for chunk in chunks:
            req, s, n = chunk.request, chunk.start, chunk.num_tokens
            starts.append(len(input_ids))
            if req.images and s < req.images[-1].end:
                image_chunks.append((req.request_id, req.images, s, n, starts[-1]))
            if n == 1:  # a decode: most rows of most steps, so no ranges or generators
                if s < len(req.token_ids):
                    input_ids.append(req.token_ids[s])
                else:  # the previous step sampled it: filled in on the device
                    unread_rows.append(len(input_ids))
                    unread_sources.append(self._last_sample_rows[req.request_id])
                    input_ids.append(0)
                positions.append(s)
                slots.append(chunk.block_ids[s // bs] * bs + s % bs)
            else:  # a prefill chunk, or a known last token and its drafts
                drafts = chunk.draft_token_ids
                input_ids.extend(req.token_ids[s : s + n - len(drafts)])
                input_ids.extend(drafts)
                positions.extend(range(s, s + n))
                slots.extend(chunk.block_ids[p // bs] * bs + p % bs for p in range(s, s + n))
            query_lens.append(n)
            seq_lens.append(s + n)
            num_scored = _num_prompt_positions_scored(chunk)
            if num_scored:
                prompt_rows[req.request_id] = (len(logits_rows), num_scored)
                logits_rows.extend(range(starts[-1], starts[-1] + num_scored))
            if chunk.samples:
                k = chunk.num_samples
                sample_rows.extend(range(len(logits_rows), len(logits_rows) + k))
                logits_rows.extend(range(starts[-1] + n - k, starts[-1] + n))
                last_sample_row[req.request_id] = len(sample_rows) - 1
        positions_3d = False
        if self.mrope_merge_size is not None:
            positions, positions_3d = _mrope_positions(chunks, positions, self.mrope_merge_size)
        token_type_ids = None
        if self.pooling_type is not None and any(c.request.pair_start is not None for c in chunks):
            token_type_ids = _token_types(chunks)
        return _Batch(
            input_ids=input_ids,
            positions=positions,
            slots=slots,
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=[c.block_ids for c in chunks],
            logits_rows=logits_rows,
            sample_rows=sample_rows,
            prompt_rows=prompt_rows,
            unread_rows=unread_rows,
            unread_sources=unread_sources,
            last_sample_row=last_sample_row,
            loras=[c.request.lora_request for c in chunks],
            image_chunks=image_chunks,
            positions_3d=positions_3d,
            token_type_ids=token_type_ids,
        )

    def _build_metadata(
        self, slots: list[int], query_lens: list[int], seq_lens: list[int], tables: list[list[int]]
    ) -> AttentionMetadata:
        starts = _query_starts(query_lens)
        dev = self.device
        return AttentionMetadata(
            slot_mapping=to_device(slots, torch.int64, dev),
            query_start_loc=to_device(starts, torch.int32, dev),
            seq_lens=to_device(seq_lens, torch.int32, dev),
            block_tables=to_device(_padded_tables(tables), torch.int32, dev),
            block_size=self.block_size,
            query_starts_cpu=starts[:-1],
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )


def _mrope_positions(chunks: list[ScheduledChunk], positions: list[int], merge: int) -> tuple[list, bool]:
    """M-RoPE positions of a step: [3, T] (and True) where a chunk reaches into a prompt with
    images; else the 1-D positions, those past an image prompt shifted by its delta."""
    out = np.broadcast_to(np.asarray(positions, dtype=np.int64), (3, len(positions))).copy()
    row, has_3d = 0, False
    for chunk in chunks:
        req, s, n = chunk.request, chunk.start, chunk.num_tokens
        if req.images:
            prompt_end = min(s + n, req.num_prompt_tokens)
            if s < prompt_end:
                out[:, row : row + prompt_end - s] = mrope_positions(req.images, s, prompt_end, merge)
                has_3d = True
            out[:, row + max(0, prompt_end - s) : row + n] += mrope_delta(req.images, merge)
        row += n
    return (out.tolist(), True) if has_3d else (out[0].tolist(), False)


def _split_aux(output: ForwardOutput | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the final hidden states, the aux layers' or None) of a forward's output."""
    return output if isinstance(output, tuple) else (output, None)


def _step_hidden(
    hidden: torch.Tensor, chunks: list[ScheduledChunk], query_lens: list[int]
) -> StepHiddenStates:
    """The step's hidden states, each chunk's rows of known tokens (PendingStep adds the accepted
    drafts')."""
    starts = _query_starts(query_lens)
    rows = {
        c.request.request_id: (first, c.start, c.num_tokens - len(c.draft_token_ids)) for c, first in zip(chunks, starts)
    }
    return StepHiddenStates(hidden[: starts[-1]], rows)


def _token_types(chunks: list[ScheduledChunk]) -> list[int]:
    """Each row's token type: 1 from a text pair's second text on (its request's pair_start), else 0."""
    types: list[int] = []
    for chunk in chunks:
        second = chunk.request.pair_start
        rows = range(chunk.start, chunk.start + chunk.num_tokens)
        types.extend(0 if second is None or p < second else 1 for p in rows)
    return types


def _query_starts(query_lens: list[int]) -> list[int]:
    """Each request's first row in the flat batch, then the batch's length."""
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return starts


def _rows_per_position(
    chunks: list[ScheduledChunk], num_generated: list[int]
) -> tuple[list[SamplingRequest], list[int]]:
    """The sampler's rows when chunks have drafts: one per sampled position. Row i of a chunk
    samples as if drafts[:i] had been generated, so min_tokens, seeds and penalties draw exactly
    as one step at a time would on the accepted path."""
    requests: list[SamplingRequest] = []
    counts: list[int] = []
    for c, first in zip(chunks, num_generated):
        drafts = c.draft_token_ids
        requests.append(c.request)
        requests.extend(_DraftPosition(c.request, drafts[:i]) for i in range(1, len(drafts) + 1))
        counts.extend(range(first, first + 1 + len(drafts)))
    return requests, counts


class _DraftPosition:
    """A request as the sampler sees it at a draft's position: the drafts before it generated."""

    def __init__(self, request: SamplingRequest, drafts: list[int]) -> None:
        self.sampling_params = request.sampling_params
        self.prompt_token_ids = request.prompt_token_ids
        self.output_token_ids = request.output_token_ids + drafts
        self.eos_token_ids = request.eos_token_ids


def _num_prompt_positions_scored(chunk: ScheduledChunk) -> int:
    """How many positions of this chunk predict a prompt token (for prompt_logprobs)."""
    req = chunk.request
    if req.sampling_params.prompt_logprobs is None:
        return 0
    end = min(chunk.start + chunk.num_tokens, req.num_prompt_tokens - 1)
    return max(0, end - chunk.start)


def _padded_tables(tables: list[list[int]]) -> np.ndarray:
    """Block tables as one [num_reqs, longest] int32 array, short rows padded with block 0."""
    padded = np.zeros((len(tables), max(len(t) for t in tables)), dtype=np.int32)
    for row, table in zip(padded, tables):
        row[: len(table)] = table
    return padded


def head_rows(rows: int, device: torch.device) -> int:
    """How many rows the LM head computes for `rows` sampled ones: on a GPU, past 8, the next multiple
    of 8 (zero rows added), so that its GEMM comes in a few shapes. cuBLAS's first GEMM of a shape
    holds the host until the device has drained, and start-up runs each shape once (warm_up_sampler:
    39 shapes up to 256 rows, not 256). Up to 8 rows keep their own shapes: one row's GEMV."""
    return rows if device.type != "cuda" or rows <= 8 else -(-rows // 8) * 8


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] for increasing rows; a view when they are consecutive (every decode step), where
    indexing would copy (the logits of 256 rows of a 128k vocabulary are 131 MB)."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return x[rows[0] : rows[-1] + 1]
    return x[to_device(rows, torch.int64, x.device)]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed KV tensor. On the CPU through calloc (numpy's zeros): the OS hands out zero pages
    as they are first touched, where torch.zeros writes every byte now (~2 s for the default 4 GiB
    pool, and all of it resident from the start). Zeros matter: the torch decode path reads whole
    blocks, and garbage past a sequence's end could be NaN, which masking does not cancel."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(num_bytes, dtype=np.uint8)).view(dtype).view(shape)


def _dtype_names(specs: list[FullAttentionSpec]) -> str:
    """The pool's dtypes, e.g. "bfloat16" or "float8_e4m3fn"."""
    return "/".join(sorted({str(spec.dtype).removeprefix("torch.") for spec in specs}))
