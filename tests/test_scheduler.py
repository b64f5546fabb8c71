"""Scheduler: token budget, chunked prefill, prefix reuse, preemption, finishing, refusals.

The property tests drive it with random operations and check, after every step, the block
accounting and a shadow of the KV cache: every position a request has computed must sit in its
block table holding that request's own prefix, whoever computed it."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kv_cache_manager import EOS, make_request

from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.request import Request, RequestStatus
from pagoda.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 32,
    max_model_len: int = 64,
    chunked: bool = True,
    prefix: bool = True,
    priority: bool = False,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs, max_num_batched_tokens, max_model_len, chunked, async_scheduling=False,
        priority_scheduling=priority,
    )
    return Scheduler(config, KVCacheManager(num_blocks, block_size, prefix))


def add(sched: Scheduler, rid: str, prompt: list[int], **params) -> Request:
    req = make_request(rid, prompt, sched.config.max_model_len, **params)
    sched.add_request(req)
    return req


def step(sched: Scheduler, token: int = 7) -> SchedulerOutput:
    out = sched.schedule()
    sched.update_from_output(out, {c.request.request_id: [token] for c in out.chunks if c.samples})
    return out


def summary(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(c.request.request_id, c.start, c.num_tokens, c.samples) for c in out.chunks]


def step_until(
    sched: Scheduler, done: Callable[[SchedulerOutput], object], tokens: Iterable[int] = itertools.repeat(7)
) -> SchedulerOutput:
    for _, token in zip(range(100), tokens):
        out = step(sched, token)
        if done(out):
            return out
    raise AssertionError("the condition was never reached")


def run_until_done(sched: Scheduler, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return
        step(sched)
    raise AssertionError("requests did not finish")


# Budgets, chunks, admission -------------------------------------------------------------------


def test_chunked_prefill_splits_a_long_prompt_across_steps():
    sched = make_scheduler(max_num_batched_tokens=8)
    req = add(sched, "a", list(range(1, 21)))
    assert summary(step(sched)) == [("a", 0, 8, False)]
    assert summary(step(sched)) == [("a", 8, 8, False)]
    assert req.num_output_tokens == 0
    assert summary(step(sched)) == [("a", 16, 4, True)]
    assert req.output_token_ids == [7] and req.num_computed_tokens == 20


def test_a_prefill_and_decodes_share_one_step_running_first():
    sched = make_scheduler(max_num_batched_tokens=8)
    add(sched, "a", [1, 2, 3, 4])
    add(sched, "b", [5, 6, 7])
    step(sched)
    add(sched, "c", list(range(10, 20)))
    out = step(sched)
    assert summary(out) == [("a", 4, 1, True), ("b", 3, 1, True), ("c", 0, 6, False)]
    assert out.num_batched_tokens == 8


def test_without_chunking_a_prefill_waits_until_it_fits_whole():
    sched = make_scheduler(max_num_batched_tokens=8, chunked=False)
    add(sched, "a", [1, 2], max_tokens=3)
    add(sched, "b", list(range(10, 18)))
    assert summary(step(sched)) == [("a", 0, 2, True)]
    assert summary(step(sched)) == [("a", 2, 1, True)]
    assert summary(step(sched)) == [("a", 3, 1, True)]  # a finishes here
    assert summary(step(sched)) == [("b", 0, 8, True)]


def test_waiting_requests_are_admitted_in_order_without_overtaking():
    sched = make_scheduler(num_blocks=4, block_size=4)
    add(sched, "a", list(range(12)))  # 3 blocks
    add(sched, "b", [50] * 8)  # 2 blocks: does not fit next to a
    add(sched, "c", [1])  # would fit, but b came first
    assert summary(step(sched)) == [("a", 0, 12, True)]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]


def test_at_most_max_num_seqs_run():
    sched = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        add(sched, rid, [1, 2])
    step(sched)
    assert (sched.num_running, sched.num_waiting) == (2, 1)


# Prefix cache ---------------------------------------------------------------------------------


def test_requests_reuse_a_shared_prefix_while_it_runs_and_after_it_finished():
    sched = make_scheduler(block_size=4)
    shared = list(range(1, 9))
    add(sched, "a", shared + [20, 21, 22, 23, 24], max_tokens=2)
    step(sched)
    b = add(sched, "b", shared + [30], max_tokens=2)
    assert ("b", 8, 1, True) in summary(step(sched))
    run_until_done(sched)
    c = add(sched, "c", shared + [20, 21, 22, 23, 24, 40])
    assert summary(step(sched)) == [("c", 12, 2, True)]
    assert (b.num_cached_tokens, c.num_cached_tokens) == (8, 12)
    stats = sched.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (13 + 9 + 14, 0 + 8 + 12)
    assert (stats.num_running, stats.num_waiting) == (1, 0) and stats.kv_cache_usage > 0


# Preemption -----------------------------------------------------------------------------------


def test_preemption_picks_the_newest_request_which_later_recomputes_its_output():
    # 6 blocks of 4: three requests fit until each needs its third block; d waits for a slot.
    sched = make_scheduler(num_blocks=6, block_size=4, prefix=False, max_num_seqs=3)
    add(sched, "a", [1] * 4, max_tokens=8)
    add(sched, "b", [2] * 4, max_tokens=8)
    c = add(sched, "c", [3] * 4, max_tokens=8)
    d = add(sched, "d", [4] * 4, max_tokens=8)
    out = step_until(sched, lambda out: out.preempted, itertools.count(10))
    assert out.preempted == ["c"] and [ch.request.request_id for ch in out.chunks] == ["a", "b"]
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert sched.kv_cache_manager.get_block_ids("c") == [] and list(sched.waiting) == [c, d]
    assert sched.num_preemptions == 1
    generated = list(c.output_token_ids)
    assert generated  # kept through preemption
    out = step_until(sched, lambda out: c.status == RequestStatus.RUNNING)
    assert ("c", 0, c.num_prompt_tokens + len(generated), True) in summary(out)
    run_until_done(sched)
    assert c.output_token_ids[: len(generated)] == generated and c.num_output_tokens == 8
    assert d.num_output_tokens == 8


def test_the_newest_request_preempts_itself_and_the_older_keep_their_blocks():
    sched = make_scheduler(num_blocks=5, block_size=4)
    a = add(sched, "a", [1] * 4, max_tokens=10)
    b = add(sched, "b", [2] * 4, max_tokens=10)
    out = step_until(sched, lambda out: out.preempted)
    assert out.preempted == ["b"] and summary(out) == [("a", 8, 1, True)]
    assert len(sched.kv_cache_manager.get_block_ids("a")) == 3 == a.num_computed_tokens // 4 + 1
    out = step_until(sched, lambda out: b.status == RequestStatus.RUNNING)
    # a took b's freed tail block, so only b's head is still cached when b recomputes after a.
    assert a.status.is_finished() and summary(out) == [("b", 4, 5, True)]
    assert b.num_cached_tokens == 0  # the figure of its first schedule


def add_with_priority(sched: Scheduler, rid: str, priority: int, prompt: list[int], **params) -> Request:
    """A request of this priority (which only a priority-scheduling scheduler reads)."""
    req = make_request(rid, prompt, sched.config.max_model_len, **params)
    req.priority = priority
    sched.add_request(req)
    return req


def test_priority_scheduling_admits_the_lowest_priority_value_first_then_by_arrival():
    sched = make_scheduler(max_num_seqs=1, priority=True)
    for rid, priority in [("a", 2), ("b", 0), ("c", 1), ("d", 0)]:
        add_with_priority(sched, rid, priority, [1, 2, 3], max_tokens=2)
    assert [r.request_id for r in sched.waiting] == ["b", "d", "c", "a"]
    order = []
    for _ in range(20):
        out = step(sched)
        order += [c.request.request_id for c in out.chunks if c.request.request_id not in order]
    assert order == ["b", "d", "c", "a"]


def test_first_come_first_served_ignores_priority():
    sched = make_scheduler(max_num_seqs=1)
    for rid, priority in [("a", 2), ("b", 0)]:
        add_with_priority(sched, rid, priority, [1, 2, 3], max_tokens=2)
    assert [r.request_id for r in sched.waiting] == ["a", "b"]


def test_priority_scheduling_preempts_the_lowest_priority_request_not_the_newest():
    # As the FCFS test above: three running requests fit until each needs its third block. The
    # oldest has the lowest priority (the highest value): it goes, and waits behind d, which came
    # later with a higher priority.
    sched = make_scheduler(num_blocks=6, block_size=4, prefix=False, max_num_seqs=3, priority=True)
    a = add_with_priority(sched, "a", 5, [1] * 4, max_tokens=8)
    add_with_priority(sched, "b", 0, [2] * 4, max_tokens=8)
    add_with_priority(sched, "c", 0, [3] * 4, max_tokens=8)
    step(sched)
    d = add_with_priority(sched, "d", 1, [4] * 4, max_tokens=8)
    out = step_until(sched, lambda out: out.preempted, itertools.count(10))
    assert out.preempted == ["a"] and [ch.request.request_id for ch in out.chunks] == ["b", "c"]
    assert a.status == RequestStatus.PREEMPTED and list(sched.waiting) == [d, a]
    run_until_done(sched)
    assert a.num_output_tokens == 8 and d.num_output_tokens == 8


def test_without_chunking_a_recomputation_longer_than_the_budget_is_split():
    sched = make_scheduler(num_blocks=5, block_size=4, max_num_batched_tokens=8, chunked=False, prefix=False)
    add(sched, "a", [1] * 4, max_tokens=6)
    b = add(sched, "b", [2] * 4, max_tokens=10)
    out = step_until(sched, lambda out: out.preempted)
    assert out.preempted == ["b"] and b.num_tokens == 9
    out = step_until(sched, lambda out: b.status == RequestStatus.RUNNING)
    assert summary(out) == [("b", 0, 8, False)]
    run_until_done(sched)
    assert b.status == RequestStatus.FINISHED_LENGTH and b.num_output_tokens == 10


def test_a_request_outgrowing_the_whole_pool_ends_by_length():
    sched = make_scheduler(num_blocks=2, block_size=4, max_model_len=64)
    req = add(sched, "a", [1, 2, 3], max_tokens=None)
    run_until_done(sched)
    assert req.status == RequestStatus.FINISHED_LENGTH and req.num_tokens == 8
    assert sched.num_preemptions == 0


# Finishing ------------------------------------------------------------------------------------


def generate(tokens: list[int], **params) -> Request:
    """Feed `tokens` one per step to a single request until it finishes or they run out."""
    sched = make_scheduler(max_model_len=64)
    req = add(sched, "a", [1, 2, 3, 4], **params)
    for token in tokens:
        step(sched, token)
        if req.status.is_finished():
            assert not sched.has_unfinished_requests() and sched.kv_cache_manager.usage == 0
            break
    return req


@pytest.mark.parametrize(
    "tokens, params, status, num_output, stop_reason",
    [
        ([5, EOS, 5], {}, RequestStatus.FINISHED_STOPPED, 2, None),
        ([5, EOS, 5], {"ignore_eos": True}, None, 3, None),
        ([EOS, EOS, EOS, 5], {"min_tokens": 3}, RequestStatus.FINISHED_STOPPED, 3, None),
        ([5, 9, 5], {"stop_token_ids": [9]}, RequestStatus.FINISHED_STOPPED, 2, 9),
        ([9, 9, 5], {"stop_token_ids": [9], "min_tokens": 2}, RequestStatus.FINISHED_STOPPED, 2, 9),
        ([5] * 5, {"max_tokens": 3}, RequestStatus.FINISHED_LENGTH, 3, None),
        ([5, 5, EOS], {"max_tokens": 3}, RequestStatus.FINISHED_STOPPED, 3, None),
        ([5] * 60, {"max_tokens": None}, RequestStatus.FINISHED_LENGTH, 60, None),
    ],
    ids=["eos", "ignore_eos", "min_tokens", "stop id", "stop id after min_tokens", "max_tokens",
         "eos beats length", "max_model_len"],
)
def test_finishing_rules(tokens, params, status, num_output, stop_reason):
    req = generate(tokens, **params)
    assert req.num_output_tokens == num_output and req.stop_reason == stop_reason
    assert req.status == (status or RequestStatus.RUNNING)


def test_update_returns_the_requests_that_got_a_token_in_chunk_order():
    sched = make_scheduler(max_num_batched_tokens=8)
    a = add(sched, "a", [1, 2], max_tokens=1)
    b = add(sched, "b", [3, 4])
    add(sched, "d", [5])
    add(sched, "c", list(range(10, 30)))  # a chunk that does not sample
    out = sched.schedule()
    assert [ch.request.request_id for ch in out.chunks] == ["a", "b", "d", "c"]
    sched.finish_requests(["d"], RequestStatus.FINISHED_ABORTED)  # ended during the step
    assert sched.update_from_output(out, {"a": [5], "b": [6], "d": [7]}) == [(a, 1), (b, 1)]
    assert a.status == RequestStatus.FINISHED_LENGTH and sched.num_running == 2


def test_finish_requests_ends_waiting_and_running_requests_and_frees_everything():
    sched = make_scheduler(max_num_seqs=1)
    a, b = add(sched, "a", [1, 2, 3, 4, 5]), add(sched, "b", [1, 2])
    step(sched)
    assert (a.status, b.status) == (RequestStatus.RUNNING, RequestStatus.WAITING)
    sched.finish_requests(["a", "b", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert a.status.finish_reason == b.status.finish_reason == "abort"
    assert not sched.has_unfinished_requests() and (sched.num_running, sched.num_waiting) == (0, 0)
    assert sched.kv_cache_manager.num_free_blocks == sched.kv_cache_manager.num_blocks
    c = add(sched, "a", [1, 2])  # the id is free again
    step(sched)
    sched.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    assert c.status.finish_reason == "stop" and sched.kv_cache_manager.usage == 0
    assert step(sched).chunks == []


# Refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, prompt_len, message",
    [
        ({"max_model_len": 16}, 16, "maximum model length is 16"),
        ({"num_blocks": 4, "block_size": 4}, 16, "need 5 KV blocks of 4 tokens, but the whole KV cache has 4"),
        ({"max_num_batched_tokens": 8, "chunked": False}, 9, "enable_chunked_prefill"),
    ],
    ids=["max_model_len", "kv pool", "no chunking"],
)
def test_impossible_requests_are_refused_up_front(config, prompt_len, message):
    sched = make_scheduler(**config)
    with pytest.raises(ValueError, match=message):
        add(sched, "big", [1] * prompt_len)
    assert not sched.has_unfinished_requests() and sched.num_waiting == 0
    ok = add(sched, "big", [1] * 3, max_tokens=2)
    run_until_done(sched)
    assert ok.status == RequestStatus.FINISHED_LENGTH


def test_a_duplicate_request_id_is_refused():
    sched = make_scheduler()
    first = add(sched, "a", [1, 2], max_tokens=1)
    with pytest.raises(ValueError, match="already in use"):
        add(sched, "a", [3, 4])
    assert list(sched.waiting) == [first]
    run_until_done(sched)
    assert first.num_output_tokens == 1


# Property tests -------------------------------------------------------------------------------


class ShadowKV:
    """What each KV slot would hold: the whole prefix whose last token was computed there."""

    def __init__(self) -> None:
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}

    def run(self, out: SchedulerOutput, block_size: int) -> None:
        # Like attention: write every chunk's K/V first, then read each request's context.
        # A chunk's tokens: the request's known ones, then its drafts (rejected ones too).
        tokens = {id(c): c.request.token_ids[: c.start + c.num_tokens - len(c.draft_token_ids)] + c.draft_token_ids
                  for c in out.chunks}
        for c in out.chunks:
            for p in range(c.start, c.start + c.num_tokens):
                self.slots[c.block_ids[p // block_size], p % block_size] = tuple(tokens[id(c)][: p + 1])
        for c in out.chunks:
            for p in range(c.start + c.num_tokens):
                slot = (c.block_ids[p // block_size], p % block_size)
                assert self.slots.get(slot) == tuple(tokens[id(c)][: p + 1]), (c.request, p)


def check_invariants(sched: Scheduler, max_drafts: int = 0) -> None:
    """max_drafts: blocks allocated for rejected drafts stay with their request, for its next tokens."""
    kv, pool = sched.kv_cache_manager, sched.kv_cache_manager.block_pool
    running_ids = [r.request_id for r in sched.running]
    assert sorted(running_ids + [r.request_id for r in sched.waiting]) == sorted(sched.requests)
    assert len(sched.running) <= sched.config.max_num_seqs
    refs: Counter[int] = Counter()
    for req in sched.running:
        table = kv.block_tables[req.request_id]
        assert req.status == RequestStatus.RUNNING and len(set(table)) == len(table)
        # Covers them, no more (but for the slots of rejected drafts).
        assert kv.blocks_needed(req.num_computed_tokens) <= len(table)
        assert len(table) <= kv.blocks_needed(req.num_computed_tokens + max_drafts)
        refs.update(table)
    for req in sched.waiting:
        assert req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) and req.num_computed_tokens == 0
    if sched.config.priority_scheduling:
        keys = [(r.priority, r.arrival_time) for r in sched.waiting]
        assert keys == sorted(keys)
    assert sorted(kv.block_tables) == sorted(running_ids)
    assert pool.ref_counts == [refs[b] for b in range(pool.num_blocks)]
    free = {*pool.free_queue, *range(pool.num_used, pool.num_blocks)}
    assert free == {b for b, ref in enumerate(pool.ref_counts) if ref == 0}


def check_output(sched: Scheduler, out: SchedulerOutput) -> None:
    cfg, bs = sched.config, sched.kv_cache_manager.block_size
    assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks) <= cfg.max_num_batched_tokens
    assert len({c.request.request_id for c in out.chunks}) == len(out.chunks)
    for c in out.chunks:
        assert c.num_tokens >= 1 and c.request in sched.running
        assert len(c.block_ids) * bs >= c.start + c.num_tokens
        planned = c.request.num_tokens_with_placeholders - c.num_samples  # before its own placeholders
        assert c.samples == (c.start + c.num_tokens - len(c.draft_token_ids) == planned)
        if not cfg.enable_chunked_prefill:  # whole, unless a recomputation longer than the budget
            assert c.samples or planned - c.start > cfg.max_num_batched_tokens


def check_all_free(sched: Scheduler) -> None:
    kv = sched.kv_cache_manager
    assert not sched.has_unfinished_requests()
    assert kv.num_free_blocks == kv.num_blocks and kv.usage == 0
    assert not kv.block_tables and not kv.block_hashes and not kv.num_offered_blocks


configs = st.fixed_dictionaries(
    {
        "num_blocks": st.integers(2, 16),
        "block_size": st.sampled_from([2, 4, 1]),
        "max_num_seqs": st.integers(1, 5),
        "max_num_batched_tokens": st.integers(1, 16),
        "max_model_len": st.integers(8, 32),
        "chunked": st.booleans(),
        "prefix": st.booleans(),
        "priority": st.booleans(),
    }
)
# Prompts are a piece of one shared sequence plus a short tail, so cached prefixes get reused.
SHARED = [1, 2, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1]
prompts = st.builds(
    lambda n, tail: SHARED[:n] + tail, st.integers(0, len(SHARED)), st.lists(st.sampled_from([1, 2]), max_size=4)
).filter(bool)
requests = st.fixed_dictionaries(
    {
        "prompt": prompts,
        "max_tokens": st.none() | st.integers(1, 8),
        "min_tokens": st.integers(0, 2),
        "ignore_eos": st.booleans(),
        "stop_token_ids": st.none() | st.just([3]),
        "prompt_logprobs": st.none() | st.just(1),
        "priority": st.integers(-2, 2),
    }
)
sampled_tokens = st.lists(st.sampled_from([1, 2, 3, EOS]), min_size=1, max_size=8)  # 3: a stop id


class Driver:
    """Random operations on a scheduler; with `overlap`, as under asynchronous scheduling: each
    step's tokens arrive after the next step is planned, and its K/V is written in step order."""

    def __init__(self, config: dict, overlap: bool = False) -> None:
        self.sched = make_scheduler(**config)
        self.shadow = ShadowKV()
        self.added: list[Request] = []
        self.overlap = overlap
        self.in_flight: SchedulerOutput | None = None

    def add(self, args: dict) -> None:
        args = dict(args)
        if args["max_tokens"] is not None:
            args["min_tokens"] = min(args["min_tokens"], args["max_tokens"])
        before = (self.sched.num_waiting, self.sched.num_running)
        try:
            self.added.append(add_with_priority(self.sched, f"r{len(self.added)}", **args))
        except ValueError:
            assert (self.sched.num_waiting, self.sched.num_running) == before

    def step(self, tokens: list[int]) -> None:
        out = self.sched.schedule()
        check_output(self.sched, out)
        if self.overlap:
            out, self.in_flight = self.in_flight, out
            if out is None:
                return
        # Each position's token is known by now, a placeholder's too.
        self.shadow.run(out, self.sched.kv_cache_manager.block_size)
        sampling = [c.request.request_id for c in out.chunks if c.samples]
        sampled = {rid: [tokens[i % len(tokens)]] for i, rid in enumerate(sampling)}
        updated = [r.request_id for r, _ in self.sched.update_from_output(out, sampled)]
        finished_meanwhile = {c.request.request_id for c in out.chunks if c.request.status.is_finished()}
        assert set(updated) <= set(sampling) and set(sampling) - set(updated) <= finished_meanwhile

    def finish(self, index: int, status: RequestStatus) -> None:
        live = sorted(self.sched.requests)
        if live:
            self.sched.finish_requests([live[index % len(live)]], status)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), requests),
        st.tuples(st.just("step"), sampled_tokens),
        st.tuples(st.just("finish"), st.integers(0, 10), st.sampled_from([RequestStatus.FINISHED_ABORTED,
                                                                           RequestStatus.FINISHED_STOPPED])),
    ),
    max_size=50,
)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlapped"])
@settings(max_examples=150, deadline=None)
@given(config=configs, ops=operations)
def test_random_operations_keep_blocks_and_budgets_consistent(overlap, config, ops):
    driver = Driver(config, overlap)
    for op in ops:
        getattr(driver, op[0])(*op[1:])
        check_invariants(driver.sched)
    driver.sched.finish_requests(list(driver.sched.requests), RequestStatus.FINISHED_ABORTED)
    check_invariants(driver.sched)
    check_all_free(driver.sched)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlapped"])
@settings(max_examples=150, deadline=None)
@given(config=configs, reqs=st.lists(requests, min_size=1, max_size=8), tokens=sampled_tokens)
def test_every_request_eventually_finishes(overlap, config, reqs, tokens):
    # Any pool, even one smaller than a max-length request: a request longer than the whole
    # pool ends by length rather than being preempted forever.
    driver = Driver(config, overlap)
    for args in reqs:
        driver.add(args)
    for _ in range(2000):
        if not driver.sched.has_unfinished_requests():
            break
        driver.step(tokens)
        check_invariants(driver.sched)
    check_all_free(driver.sched)
    assert all(r.status.is_finished() and r.num_output_tokens >= 1 for r in driver.added)


def test_a_blocked_head_of_the_queue_counts_its_prefix_lookup_once():
    sched = make_scheduler(num_blocks=6, block_size=4)
    add(sched, "a", list(range(1, 17)), max_tokens=6)  # 4 blocks, growing to 6
    step(sched)
    add(sched, "b", list(range(100, 109)))  # needs 3 blocks: waits until "a" ends
    waited = 0
    while "b" not in [c.request.request_id for c in step(sched).chunks]:
        waited += 1
    assert waited >= 2  # it was retried, and refused, on several steps
    stats = sched.stats()
    assert stats.prefix_cache_queries == 16 + 9  # each request's lookup once


def test_a_step_planned_before_the_last_one_is_read_decodes_its_placeholder():
    sched = make_scheduler()
    a = add(sched, "a", [1, 2, 3], max_tokens=3)
    first = sched.schedule()
    assert summary(first) == [("a", 0, 3, True)] and a.num_output_placeholders == 1
    second = sched.schedule()  # before the first step's token is known
    assert summary(second) == [("a", 3, 1, True)] and a.num_output_placeholders == 2
    sched.update_from_output(first, {"a": [8]})
    assert a.output_token_ids == [8] and a.num_output_placeholders == 1
    third = sched.schedule()
    assert summary(third) == [("a", 4, 1, True)]
    # Three tokens are now on their way, max_tokens: nothing more is planned for "a".
    assert sched.schedule().chunks == []
    for out, token in ((second, 9), (third, 10)):
        sched.update_from_output(out, {"a": [token]})
    assert a.output_token_ids == [8, 9, 10] and a.status == RequestStatus.FINISHED_LENGTH


def test_a_placeholders_block_reaches_the_prefix_cache_once_its_token_is_known():
    sched = make_scheduler(block_size=4)
    add(sched, "a", [1, 2, 3], max_tokens=6, ignore_eos=True)
    first = sched.schedule()
    sched.schedule()  # computes the placeholder at position 3, which fills block 0
    assert not sched.kv_cache_manager.block_pool.cached
    sched.update_from_output(first, {"a": [4]})
    sched.schedule()  # the next allocation offers the now-known block
    assert len(sched.kv_cache_manager.block_pool.cached) == 1
