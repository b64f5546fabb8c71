"""Continuous batching under one token budget per step.

Each step gives every running request the tokens it has not computed yet (a decode is one
token, an unfinished prefill a chunk), then admits waiting requests while budget, sequence slots
and KV blocks last. When blocks run out, the newest running request is preempted: its blocks are
freed and it is recomputed later from its prompt and the tokens it already generated.

A step may be planned before the previous step's tokens are known (asynchronous scheduling): a
chunk that samples leaves a placeholder for its token, which the next step computes from the
device's copy of the sample, and `update_from_output` replaces it with the token.

Multi-token steps: a decoding request may carry proposed next tokens (`Request.draft_token_ids`,
set by a token proposer between steps). Its chunk then computes its last known token and the
drafts, and every one of those positions samples (`ScheduledChunk.num_samples`); the runner keeps
the drafts that match what was sampled, plus one sampled token. `update_from_output` appends that
list, stopping at the first stop condition, and rolls `num_computed_tokens` back over the
rejected drafts, whose K/V slots the next steps overwrite. Drafts count against the budget, the
KV blocks and the length limits like any token, but never preempt anyone: short of blocks, the
request is scheduled without them. Under asynchronous scheduling drafts go only with a last
token that is known (the proposer cannot have seen a placeholder's value), and a request whose
drafts are in flight is not planned again until they are read: how many will hold is unknown.

Requests wait first come, first served (a preempted one goes back to the front); with
`priority_scheduling` (vLLM's --scheduling-policy priority) they wait, are planned and are kept
by (priority, arrival time), lowest first: the lowest-priority running request is the one
preempted, and the highest-priority waiting one is admitted next.

A waiting request whose grammar is still compiling (structured outputs), or whose LoRA adapter
would make the running requests use more adapters than the device has slots (max_loras), is
passed over: the requests behind it are admitted meanwhile.

Prefill against the running decodes, with vLLM's knobs: the step's budget bounds the prefill
tokens that share a step with the decodes (which are planned first); `long_prefill_token_threshold`
caps one request's chunk; at most `max_num_partial_prefills` chunks a step leave a prompt
unfinished, of which at most `max_long_partial_prefills` belong to prompts longer than the
threshold. A long prompt with no slot left is passed over, so that shorter ones jump ahead of it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.request import Request, RequestStatus

if TYPE_CHECKING:
    from pagoda.structured_output.bitmask import GrammarBitmask


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool
    # Plan and launch step N+1 before step N's tokens are read (the engine core's loop does it).
    async_scheduling: bool
    # vLLM's chunked-prefill knobs: one request's chunk at most (0: no cap; a prompt longer than it
    # is "long"), and how many prompts (long ones) a step may leave partly prefilled.
    long_prefill_token_threshold: int = 0
    max_num_partial_prefills: int = 1
    max_long_partial_prefills: int = 1
    max_loras: int = 0  # LoRA adapters the running requests may use at once (the device slots); 0: no LoRA
    # An embedding engine (--runner pooling): a prompt runs once, whole, and nothing is generated
    # after it, so it may fill max_model_len.
    pooling: bool = False
    # vLLM's --scheduling-policy priority: requests ordered by (priority, arrival time), not arrival alone.
    priority_scheduling: bool = False


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # num_computed_tokens before this step
    num_tokens: int  # request.token_ids[start:start + num_tokens] are computed this step
    block_ids: list[int]  # the request's whole block table after allocation
    samples: bool  # the chunk reaches the request's last known token: a token is sampled
    # Proposed tokens computed after the last known one: the chunk's last len(draft_token_ids)
    # tokens. Each position from the last known token on samples.
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        """Positions sampled: 1 + the drafts when the chunk samples, else 0."""
        return 1 + len(self.draft_token_ids) if self.samples else 0


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # running requests first
    num_batched_tokens: int = 0
    preempted: list[str] = field(default_factory=list)
    # The masks of the constrained sample rows (structured outputs), set by the engine core.
    grammar_bitmask: GrammarBitmask | None = None


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    # Speculative decoding, as vLLM counts it: request steps that verified drafts, their drafts,
    # the drafts accepted, and per draft position (0: the first draft) the drafts accepted there.
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: tuple[int, ...] = ()


@dataclass
class _PrefillSlots:
    """One step's partial prefills (chunks that leave a prompt unfinished), against the limits."""

    config: SchedulerConfig
    partial: int = 0
    long: int = 0

    def is_long(self, req: Request) -> bool:
        return 0 < self.config.long_prefill_token_threshold < req.num_prompt_tokens

    def long_full(self, req: Request) -> bool:
        return self.is_long(req) and self.long >= self.config.max_long_partial_prefills

    def take(self, req: Request) -> bool:
        """Take a slot for a chunk that leaves `req` unfinished; False: none is left this step."""
        if self.partial >= self.config.max_num_partial_prefills or self.long_full(req):
            return False
        self.partial += 1
        self.long += self.is_long(req)
        return True


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        # A request longer than the whole KV pool could never be computed again: it ends as if
        # it had reached max_model_len instead of being preempted forever.
        self.max_request_len = min(config.max_model_len, kv_cache_manager.num_blocks * kv_cache_manager.block_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request, waiting or running
        self.num_preemptions = 0
        self.num_drafts = self.num_draft_tokens = 0
        self.num_accepted_tokens_per_pos: list[int] = []  # grows to the longest draft list verified

    # Admission -----------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request, or refuse it up front (ValueError) if it could never run."""
        self._validate(request)
        self.requests[request.request_id] = request
        self._enqueue(request)

    def _enqueue(self, req: Request, preempted: bool = False) -> None:
        """Into the waiting queue: at the back, or a preempted request at the front; with priority
        scheduling, after every request of a lower (priority, arrival time)."""
        if not self.config.priority_scheduling:
            self.waiting.appendleft(req) if preempted else self.waiting.append(req)
            return
        key = _priority_key(req)
        behind = next((i for i, other in enumerate(self.waiting) if _priority_key(other) > key), len(self.waiting))
        self.waiting.insert(behind, req)

    def _validate(self, request: Request) -> None:
        cfg, kv = self.config, self.kv_cache_manager
        n = request.num_prompt_tokens
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        generated = 0 if cfg.pooling else 1
        if n + generated > cfg.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens; the maximum model length is {cfg.max_model_len} "
                "(set by --max-model-len / max_model_len)"
                + ("" if cfg.pooling else "; at least one token must be left to generate")
            )
        if kv.blocks_needed(n + generated) > kv.num_blocks:
            what = "the prompt and one generated token need" if generated else "the prompt needs"
            raise ValueError(
                f"{what} {kv.blocks_needed(n + generated)} KV blocks of "
                f"{kv.block_size} tokens, but the whole KV cache has {kv.num_blocks}: raise "
                "gpu_memory_utilization, num_gpu_blocks_override or the CPU KV cache budget "
                "(kv_cache_memory_bytes / PAGODA_CPU_KVCACHE_SPACE), or lower max_model_len"
            )
        if not cfg.enable_chunked_prefill and n > cfg.max_num_batched_tokens:
            raise ValueError(
                f"the prompt has {n} tokens, more than max_num_batched_tokens={cfg.max_num_batched_tokens}, "
                "and chunked prefill is off: raise max_num_batched_tokens or set enable_chunked_prefill=True"
            )

    # One step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.config.priority_scheduling:  # planned highest first, and so preempted lowest first
            self.running.sort(key=_priority_key)
        slots = _PrefillSlots(self.config)
        budget = self._schedule_running(out, self.config.max_num_batched_tokens, slots)
        if not out.preempted:  # blocks just ran short: admitting more would only thrash
            self._schedule_waiting(out, budget, slots)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, slots: _PrefillSlots) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_drafts_in_flight or (
                req.num_output_placeholders and self._reaches_length_limit(req, req.num_output_placeholders)
            ):
                i += 1  # how many of its drafts hold is unknown yet, or its last token is in flight
                continue
            remaining = req.num_tokens_with_placeholders - req.num_computed_tokens
            n = self._num_tokens_to_schedule(remaining, budget)
            if 0 < n < remaining and not slots.take(req):
                i += 1  # older prompts hold this step's partial prefill slots
                continue
            drafts = self._take_drafts(req, n, budget)
            if drafts and self.kv_cache_manager.allocate_slots(req, n + len(drafts)):
                self._commit(req, n + len(drafts), out, drafts)
                budget -= n + len(drafts)
            elif n > 0 and self._allocate_or_preempt(req, n, out):  # drafts never preempt: none when short
                self._commit(req, n, out)
                budget -= n
            i += 1  # a preempted request was the last one, so this also ends the loop
        return budget

    def _take_drafts(self, req: Request, n: int, budget: int) -> list[int]:
        """The request's drafts that this step can verify, taken off the request: only after its
        last token, when that token is known, and only as many as leave room, within the budget and
        the length limits, for the token sampled after the last of them."""
        drafts, req.draft_token_ids = req.draft_token_ids, []
        if not drafts or n != 1 or req.num_output_placeholders:
            return []
        room = min(
            budget - 1,
            req.max_tokens - req.num_output_tokens - 1,
            self.max_request_len - req.num_tokens - 1,
        )
        return drafts[: max(0, room)]

    def _allocate_or_preempt(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """Allocate for `req`, preempting the last running requests (the newest; with priority
        scheduling the lowest priority) until it fits.

        False when `req` itself, the newest left, had to go."""
        while not self.kv_cache_manager.allocate_slots(req, n):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.kv_cache_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.draft_token_ids = []  # proposed for a computation that is gone
        self._enqueue(req, preempted=True)
        self.num_preemptions += 1
        out.preempted.append(req.request_id)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, slots: _PrefillSlots) -> None:
        kv = self.kv_cache_manager
        while budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self._next_admissible(slots)
            if req is None:
                break  # nobody waits, or only requests whose grammar is compiling
            if req.num_output_placeholders:
                break  # preempted with a token in flight: its prefix is not known yet
            blocks, num_cached = kv.get_computed_blocks(req)
            remaining = req.num_tokens - num_cached
            n = self._num_tokens_to_schedule(remaining, budget)
            if n == 0 or (n < remaining and not slots.take(req)):
                break
            if not kv.allocate_slots(req, n, blocks):
                break  # first come, first served: nobody overtakes the head of the queue
            self._admit(req, num_cached)
            self._commit(req, n, out)
            budget -= n

    def _next_admissible(self, slots: _PrefillSlots) -> Request | None:
        """The first waiting request that can run: requests whose grammar is still compiling, long
        prompts while the long partial prefill slots are taken, and requests whose LoRA adapter
        would be one more than the device slots hold, are passed over, not waited for."""
        loras = {r.lora_int_id for r in self.running if r.lora_int_id} if self.config.max_loras else set()
        for req in self.waiting:
            if req.waiting_for_grammar or slots.long_full(req):
                continue
            if req.lora_int_id and req.lora_int_id not in loras and len(loras) >= self.config.max_loras:
                continue
            return req
        return None

    def _admit(self, req: Request, num_cached: int) -> None:
        if self.waiting[0] is req:
            self.waiting.popleft()
        else:
            self.waiting.remove(req)
        if req.status == RequestStatus.WAITING:  # a preempted request keeps its first figures
            req.num_cached_tokens = num_cached
            req.first_scheduled_time = time.time()
        req.num_computed_tokens = num_cached
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _num_tokens_to_schedule(self, remaining: int, budget: int) -> int:
        # With chunking off a prefill waits until the budget holds it whole; only a recomputation
        # longer than the whole budget (a preempted request that grew) is split, or it never runs.
        cfg = self.config
        if not cfg.enable_chunked_prefill:
            return 0 if budget < remaining <= cfg.max_num_batched_tokens else min(remaining, budget)
        if 0 < cfg.long_prefill_token_threshold < remaining:
            remaining = cfg.long_prefill_token_threshold
        return min(remaining, budget)

    def _commit(self, req: Request, n: int, out: SchedulerOutput, drafts: list[int] | None = None) -> None:
        start = req.num_computed_tokens
        block_ids = self.kv_cache_manager.get_block_ids(req.request_id)
        if drafts:
            out.chunks.append(ScheduledChunk(req, start, n, block_ids, True, drafts))
            req.num_output_placeholders += 1 + len(drafts)
            req.num_drafts_in_flight += len(drafts)
        else:
            samples = start + n == req.num_tokens_with_placeholders
            out.chunks.append(ScheduledChunk(req, start, n, block_ids, samples))
            req.num_output_placeholders += samples
        out.num_batched_tokens += n
        req.num_computed_tokens += n

    # After the step -------------------------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, sampled: dict[str, list[int]]
    ) -> list[tuple[Request, int]]:
        """Append each request's new tokens (its accepted drafts, then one sampled token) up to the
        first stop condition, finishing the request there.

        Returns the requests that got tokens, finished or not, in chunk order, each with how many
        of its tokens were appended (fewer than sampled when it stopped early)."""
        updated = []
        for chunk in scheduler_output.chunks:
            req = chunk.request
            if not chunk.samples or req.status.is_finished():  # ended meanwhile
                continue
            tokens = sampled[req.request_id]
            req.num_output_placeholders -= chunk.num_samples
            if chunk.draft_token_ids:
                self._settle_drafts(req, len(chunk.draft_token_ids), len(tokens) - 1)
                self._count_drafts(len(chunk.draft_token_ids), len(tokens) - 1)
            updated.append((req, self._append_until_stop(req, tokens)))
        return updated

    def _settle_drafts(self, req: Request, num_drafts: int, num_accepted: int) -> None:
        req.num_drafts_in_flight -= num_drafts
        if req.status == RequestStatus.RUNNING:  # a preempted request computes everything again
            # The rejected drafts' K/V stays in their slots until those positions are computed
            # again; no prefix-cache block covers them, as blocks are hashed from known tokens.
            req.num_computed_tokens -= num_drafts - num_accepted

    def _count_drafts(self, num_drafts: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        per_pos = self.num_accepted_tokens_per_pos
        per_pos.extend([0] * (num_drafts - len(per_pos)))
        for pos in range(num_accepted):
            per_pos[pos] += 1

    def _append_until_stop(self, req: Request, tokens: list[int]) -> int:
        for i, token in enumerate(tokens):
            req.append_output_token(token)
            status = self._stop_status(req, token)
            if status is not None:
                self._finish(req, status)
                return i + 1
        return len(tokens)

    def _stop_status(self, req: Request, token: int) -> RequestStatus | None:
        params = req.sampling_params
        # The sampler masks EOS and stop ids before min_tokens; this keeps the rule exact anyway.
        past_min = req.num_output_tokens >= params.min_tokens
        if past_min and not params.ignore_eos and token in req.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if past_min and params.stop_token_ids and token in params.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if self._reaches_length_limit(req):
            return RequestStatus.FINISHED_LENGTH
        return None

    def _reaches_length_limit(self, req: Request, num_in_flight: int = 0) -> bool:
        """Whether its tokens, with `num_in_flight` more still unread, reach max_tokens or the length limit."""
        return (
            req.num_output_tokens + num_in_flight >= req.max_tokens
            or req.num_tokens + num_in_flight >= self.max_request_len
        )

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """End requests from outside (a stop string, an abort); unknown ids are ignored."""
        for request_id in request_ids:
            req = self.requests.get(request_id)
            if req is not None:
                self._finish(req, status)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.kv_cache_manager.free(req)
        req.status = status
        del self.requests[req.request_id]

    # Introspection --------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
            num_drafts=self.num_drafts,
            num_draft_tokens=self.num_draft_tokens,
            num_accepted_tokens=sum(self.num_accepted_tokens_per_pos),
            num_accepted_tokens_per_pos=tuple(self.num_accepted_tokens_per_pos),
        )


def _priority_key(req: Request) -> tuple[int, float]:
    return req.priority, req.arrival_time
