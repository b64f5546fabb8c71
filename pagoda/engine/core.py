"""EngineCore: the engine loop, token ids in and token ids out (or, for an embedding engine, one
pooled vector per request, which ends it). schedule -> execute -> update -> CoreOutputs, one step at a time; with a token proposer, drafts for the next step after each update
(multi-token steps); structured outputs' grammars compiled, matched and turned into each step's
masks (pagoda/structured_output/manager.py). It knows engine requests only (n=1 each) and loads no
tokenizer: it is built from the ResolvedConfig the front end made (EOS ids and the grammar
vocabulary included) and re-derives none of it. Text, stop strings and n>1 gathering are the front
end's (engine/llm_engine.py, engine/async_llm.py)."""

from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import time
from collections.abc import Sequence

from pagoda.config.groups import ResolvedConfig, SpeculativeConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.request import Request, RequestStatus
from pagoda.core.scheduler import Scheduler, SchedulerOutput
from pagoda.engine.messages import CoreOutput, EngineCoreRequest
from pagoda.executor import make_executor
from pagoda.executor.base import LaunchedStep
from pagoda.spec import build_proposer
from pagoda.spec.proposer import (
    HiddenStatesProposer,
    ProposerWithKVCache,
    StepHiddenStates,
    TokenProposer,
)
from pagoda.structured_output.manager import StructuredOutputManager
from pagoda.worker.model_runner import ModelRunnerOutput
from pagoda.worker.worker import KVBudget

logger = logging.getLogger("pagoda")

# How long a step with nothing to run waits for a grammar being compiled: short, as the core
# also reads its input between steps.
_GRAMMAR_WAIT_S = 0.01


class EngineCore:
    def __init__(
        self, config: ResolvedConfig, proposer: TokenProposer | HiddenStatesProposer | None = None
    ) -> None:
        """config: resolved by the front end, once (config/resolve.py); proposer: drafts tokens
        that each step verifies along with the next one (None: the one config.speculative names,
        if any; without either, one token per request a step)."""
        started = time.perf_counter()
        if proposer is not None:
            config = dataclasses.replace(config, speculative=SpeculativeConfig(proposer.num_speculative_tokens))
        elif config.speculative is not None:
            proposer = build_proposer(config)
        self.config = config
        self.proposer = proposer
        self.model_name = config.model.name
        self.eos_token_ids = config.model.eos_token_ids
        self.max_model_len = config.model.max_model_len
        self.executor = make_executor(config)
        try:
            self.num_kv_blocks = self._num_kv_blocks()
            self.executor.allocate_kv_cache(self.num_kv_blocks)
            if isinstance(proposer, ProposerWithKVCache):
                proposer.allocate_kv_cache(self.num_kv_blocks)
                logger.info("the draft model's KV pool: %d blocks too (%.2f GiB)", self.num_kv_blocks,
                            self.num_kv_blocks * proposer.kv_bytes_per_block() / 2**30)
        except BaseException:
            self.executor.shutdown()
            raise
        cache = config.cache
        kv_manager = KVCacheManager(
            self.num_kv_blocks, cache.block_size, cache.enable_prefix_caching, self._resident_kv_blocks()
        )
        self.scheduler = Scheduler(config.scheduler, kv_manager)
        self.structured_outputs = StructuredOutputManager(config.model.grammar_vocab)
        self.async_scheduling = config.scheduler.async_scheduling
        self._in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None  # launched, tokens unread
        # Requests whose sampling reads their output tokens on the host (penalties): while one is
        # unfinished, steps run one at a time.
        self._needs_known_tokens: set[str] = set()
        self.num_batched_tokens = 0  # tokens computed by the step whose outputs step() last returned
        logger.info(
            "engine ready in %.1f s: %s on %s (%s), %d KV blocks of %d tokens in %s (%d tokens; %.1f requests of "
            "max_model_len=%d), steps of %d tokens at most", time.perf_counter() - started, self.model_name,
            config.device.device, config.model.dtype, self.num_kv_blocks, cache.block_size, cache.dtype,
            self.num_kv_blocks * cache.block_size, self.num_kv_blocks * cache.block_size / self.max_model_len,
            self.max_model_len, config.scheduler.max_num_batched_tokens,
        )
        # What start-up built lives as long as the engine: keep the collector from rescanning it
        # every few steps (each step's outputs make enough garbage to trigger full collections).
        gc.collect()
        gc.freeze()
        atexit.register(gc.unfreeze)  # let interpreter shutdown collect it as usual

    # Set-up ---------------------------------------------------------------------------------

    @property
    def _blocks_per_request(self) -> int:
        """The KV blocks one request of max_model_len holds."""
        return -(-self.max_model_len // self.config.cache.block_size)

    def _num_kv_blocks(self) -> int:
        cache, scheduler = self.config.cache, self.config.scheduler
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        budget = KVBudget(
            cache.kv_cache_memory_bytes, cache.gpu_memory_utilization, scheduler.max_num_batched_tokens,
            self.max_model_len,
            self.proposer.kv_bytes_per_block() if isinstance(self.proposer, ProposerWithKVCache) else 0,
        )
        num_blocks = self.executor.num_kv_blocks_that_fit(budget)
        if cache.kv_cache_memory_bytes is None:
            knob = "gpu_memory_utilization"
        elif self.config.device.device.type == "cpu":
            knob = "kv_cache_memory_bytes or PAGODA_CPU_KVCACHE_SPACE (GiB, per rank)"
        else:
            knob = "kv_cache_memory_bytes"
        if num_blocks < self._blocks_per_request:
            raise ValueError(
                f"the KV cache has room for {num_blocks * cache.block_size} tokens, fewer than one request of "
                f"max_model_len={self.max_model_len}: raise {knob} or lower max_model_len"
            )
        # More blocks than every sequence at full length could use would only cost memory.
        return min(num_blocks, self._blocks_per_request * scheduler.max_num_seqs)

    def _resident_kv_blocks(self) -> int | None:
        """On the CPU, where the pool's pages become resident as they are first written, the
        blocks used before freed ones are preferred to never-used ones: one request of
        max_model_len (the prefix cache's room then, and the resident part's size unless more
        blocks are held at once; for the default model 8,192 tokens, the bytes of the 16,384-token
        float16 cache that scripts/bench_vs_llamacpp.sh gives llama-server). A GPU's pool is
        allocated whole: None."""
        if self.config.device.device.type != "cpu":
            return None
        blocks = self._blocks_per_request
        if blocks < self.num_kv_blocks:
            logger.info("the KV pool's pages are written as its blocks are first used: past %d blocks (one request "
                        "of max_model_len) freed blocks are reused first", blocks)
        return blocks

    # Requests -------------------------------------------------------------------------------

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue the engine requests of one user request, all or none (ValueError: the engine is
        left as it was)."""
        requests = [
            Request(
                child_id, list(request.prompt_token_ids), params, self.eos_token_ids, self.max_model_len,
                lora_request=request.lora_request,
                images=request.images,
                cache_salt=request.cache_salt,
                priority=request.priority,
                pair_start=request.pair_start,
            )
            for child_id, params in request.children
        ]
        added: list[str] = []
        try:
            for req in requests:
                self.scheduler.add_request(req)
                added.append(req.request_id)
                self.structured_outputs.add_request(req)
        except ValueError:
            self.scheduler.finish_requests(added, RequestStatus.FINISHED_ABORTED)
            raise
        self._needs_known_tokens.update(r.request_id for r in requests if _reads_known_tokens(r))

    def reset_prefix_cache(self) -> bool:
        """Forget the cached prefix blocks; False, forgetting nothing, while requests hold blocks."""
        return self.scheduler.kv_cache_manager.block_pool.reset_prefix_cache()

    def abort_requests(self, request_ids: Sequence[str] | None = None) -> list[str]:
        """Stop engine requests (None: all) and free their blocks; returns those that were
        unfinished (unknown ids are ignored)."""
        requests = self.scheduler.requests
        ids = list(requests) if request_ids is None else [r for r in request_ids if r in requests]
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        return ids

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def shutdown(self) -> None:
        """Stop the model's worker processes, if it has any; the core cannot step after this."""
        self.structured_outputs.shutdown()
        self.executor.shutdown()

    # The loop ---------------------------------------------------------------------------------

    def step(self) -> list[CoreOutput]:
        """Run one scheduled batch; returns what each engine request it advanced got: new token
        ids and raw logprobs, no text (the front end's OutputProcessor makes it).

        With asynchronous scheduling the step is launched and the outputs returned are those of
        the step launched by the previous call, read while the device runs the new one."""
        self.num_batched_tokens = 0
        try:
            failed = self._take_compiled_grammars()
            if failed:
                return failed
            if self.async_scheduling and not self._steps_must_wait():
                return self._step_overlapped()
            previous = self._take_in_flight()
            if previous is not None:  # drain before a step that needs every token known
                return self._read(previous[0], previous[1].result())
            scheduler_output = self.scheduler.schedule()
            if not scheduler_output.chunks:
                if self.structured_outputs.has_compiling:  # rather than spin until a grammar is ready
                    self.structured_outputs.wait_for_compiles(_GRAMMAR_WAIT_S)
                return []
            return self._read(scheduler_output, self.executor.execute(self._masked(scheduler_output)))
        except BaseException:
            self._in_flight = None  # the device's state is unknown: nothing in flight is trusted
            raise

    def execute_dummy_batch(self) -> None:
        """Take part in a step of the data-parallel replicas that share this one's experts with no
        tokens of its own (engine/lockstep.py)."""
        self.executor.execute_dummy_batch()

    def _take_compiled_grammars(self) -> list[CoreOutput]:
        """Requests whose grammar is ready may run; those whose grammar failed end as aborted."""
        if not self.structured_outputs.has_compiling:
            return []
        failed = self.structured_outputs.take_compiled()
        self.scheduler.finish_requests([r.request_id for r in failed], RequestStatus.FINISHED_ABORTED)
        return [CoreOutput(r.request_id, [], finish_reason=r.status.finish_reason) for r in failed]

    def _masked(self, scheduler_output: SchedulerOutput) -> SchedulerOutput:
        """The step with its constrained rows' grammar masks."""
        scheduler_output.grammar_bitmask = self.structured_outputs.bitmask(scheduler_output.chunks)
        return scheduler_output

    def _steps_must_wait(self) -> bool:
        # Drafts are proposed from a request's known tokens: with the next step planned before
        # this one's tokens are read, every request would have a placeholder and get no drafts.
        if self.proposer is not None:
            return True
        if self._needs_known_tokens:
            self._needs_known_tokens.intersection_update(self.scheduler.requests)
        return bool(self._needs_known_tokens)

    def _step_overlapped(self) -> list[CoreOutput]:
        previous = self._take_in_flight()
        scheduler_output = self.scheduler.schedule()
        step = None
        if scheduler_output.chunks:
            # A constrained request's mask follows the tokens of the step still in flight: this
            # step's forward pass is queued now, and it samples once those are read (below) and
            # its grammars have taken them, so the host's grammar work overlaps the device's.
            if previous is not None and self.structured_outputs.has_matchers:
                step = self.executor.launch(scheduler_output, defer_sampling=True)
            else:
                step = self.executor.launch(self._masked(scheduler_output))
        outputs = [] if previous is None else self._read(previous[0], previous[1].result())
        if step is not None:
            if step.awaits_sampling:
                step.sample(self._masked(scheduler_output).grammar_bitmask)
            self._in_flight = (scheduler_output, step)
        return outputs

    def _take_in_flight(self) -> tuple[SchedulerOutput, LaunchedStep] | None:
        in_flight, self._in_flight = self._in_flight, None
        return in_flight

    def _read(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[CoreOutput]:
        """Apply a step's tokens to its requests."""
        self.num_batched_tokens = scheduler_output.num_batched_tokens
        # An embedding request ends with its prompt's step: its vector is its whole output.
        self.scheduler.finish_requests(runner_output.pooled, RequestStatus.FINISHED_STOPPED)
        updated = self.scheduler.update_from_output(scheduler_output, runner_output.sampled)
        self.structured_outputs.accept(updated)
        num_new = {req.request_id: n for req, n in updated}
        if self.proposer is not None:
            self._propose_drafts(runner_output.step_hidden)
        outputs = []
        for chunk in scheduler_output.chunks:
            req, rid = chunk.request, chunk.request.request_id
            scored = runner_output.prompt_logprobs.get(rid)
            pooled = runner_output.pooled.get(rid)
            n = num_new.get(rid, 0)
            if not n and scored is None and pooled is None:
                continue
            top = runner_output.top_logprobs.get(rid) if n else None
            outputs.append(CoreOutput(
                rid, req.output_token_ids[-n:] if n else [], None if top is None else top[:n], scored,
                req.status.finish_reason, req.stop_reason, req.num_cached_tokens, req.first_scheduled_time, pooled,
            ))
        return outputs

    def _propose_drafts(self, hidden: StepHiddenStates | None) -> None:
        """Drafts for the next step of every running request that is decoding, its tokens known;
        hidden: the step's, for a proposer from the target's hidden states (given every step:
        EAGLE keeps those of prompts still being prefilled)."""
        assert self.proposer is not None
        # A grammar's mask is for one position: constrained requests go without drafts.
        decoding = [
            req for req in self.scheduler.running
            if not req.num_output_placeholders and req.num_computed_tokens == req.num_tokens - 1
            and req.sampling_params.structured_outputs is None
        ]
        limit = self.proposer.num_speculative_tokens
        if isinstance(self.proposer, HiddenStatesProposer):
            proposed = {} if hidden is None else self.proposer.propose_from_hidden_states(decoding, hidden)
        elif decoding:
            proposed = self.proposer.propose(decoding)
        else:
            return
        for rid, drafts in proposed.items():
            self.scheduler.requests[rid].draft_token_ids = list(drafts[:limit])


def _reads_known_tokens(request: Request) -> bool:
    """Whether planning the request's next step needs its tokens so far on the host: penalties
    count them, bad words match their tail. (A grammar's mask follows them too, but only its
    step's sampling waits for them.)"""
    return request.sampling_params.reads_output_tokens
