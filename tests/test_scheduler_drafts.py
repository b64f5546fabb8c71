"""Scheduler accounting of draft tokens (multi-token steps): budget, KV slots, length limits,
placeholders, rollback of rejected drafts, stops inside a list of new tokens, and the prefix cache
never holding a block with a rejected token."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kv_cache_manager import EOS
from test_scheduler import (
    Driver,
    add,
    check_all_free,
    check_invariants,
    check_output,
    configs,
    make_scheduler,
    requests,
    sampled_tokens,
)

from pagoda.core.request import Request, RequestStatus
from pagoda.core.scheduler import Scheduler


def _decoding(sched: Scheduler, rid: str = "a", prompt: list[int] | None = None, **params) -> Request:
    """A request past its prefill: its first token sampled (5), its last token not yet computed."""
    [req] = _all_decoding(sched, {rid: prompt or [1, 2, 3]}, **params)
    return req


def _all_decoding(sched: Scheduler, prompts: dict[str, list[int]], **params) -> list[Request]:
    """Requests prefilled in one step, each given 5 as its first token."""
    reqs = [add(sched, rid, prompt, **params) for rid, prompt in prompts.items()]
    out = sched.schedule()
    sched.update_from_output(out, {rid: [5] for rid in prompts})
    assert all(r.num_computed_tokens == r.num_tokens - 1 for r in reqs)
    return reqs


def test_a_decode_with_drafts_computes_its_last_token_and_the_drafts_and_samples_each():
    sched = make_scheduler()
    a = _decoding(sched)
    a.draft_token_ids = [6, 7, 8]
    out = sched.schedule()
    [chunk] = out.chunks
    assert (chunk.start, chunk.num_tokens, chunk.draft_token_ids, chunk.num_samples) == (3, 4, [6, 7, 8], 4)
    assert out.num_batched_tokens == 4 and a.draft_token_ids == []
    assert a.num_computed_tokens == 7 and a.num_output_placeholders == 4 and a.num_drafts_in_flight == 3
    assert sched.kv_cache_manager.get_block_ids("a") == chunk.block_ids and len(chunk.block_ids) == 2  # 7 slots


def test_rejected_drafts_roll_back_the_computed_tokens():
    sched = make_scheduler()
    a = _decoding(sched)
    a.draft_token_ids = [6, 7, 8]
    out = sched.schedule()
    # 6 held, 7 did not: the token sampled in its place (9) ends the list.
    assert sched.update_from_output(out, {"a": [6, 9]}) == [(a, 2)]
    assert a.output_token_ids == [5, 6, 9]
    assert a.num_computed_tokens == a.num_tokens - 1 == 5  # 9 itself is computed next step
    assert a.num_output_placeholders == 0 and a.num_drafts_in_flight == 0
    [chunk] = sched.schedule().chunks
    assert (chunk.start, chunk.num_tokens, chunk.num_samples) == (5, 1, 1)


def test_all_drafts_accepted_append_the_bonus_token():
    sched = make_scheduler()
    a = _decoding(sched)
    a.draft_token_ids = [6, 7]
    out = sched.schedule()
    sched.update_from_output(out, {"a": [6, 7, 11]})
    assert a.output_token_ids == [5, 6, 7, 11] and a.num_computed_tokens == a.num_tokens - 1


def test_drafts_leave_room_for_the_sampled_token_within_max_tokens_and_the_model_length():
    sched = make_scheduler(max_model_len=12)
    a = _decoding(sched, max_tokens=3)  # one token out: at most 2 more, one of them sampled
    a.draft_token_ids = [6, 7, 8]
    [chunk] = sched.schedule().chunks
    assert chunk.draft_token_ids == [6]


def test_drafts_stop_at_the_model_length():
    sched = make_scheduler(max_model_len=12)
    b = _decoding(sched, "b", [1] * 9, max_tokens=None)  # 10 tokens of 12: 2 more at most
    b.draft_token_ids = [6, 7, 8]
    assert [c.draft_token_ids for c in sched.schedule().chunks] == [[6]]


def test_drafts_are_cut_to_the_token_budget():
    sched = make_scheduler(max_num_batched_tokens=3)
    a = _decoding(sched)
    a.draft_token_ids = [6, 7, 8, 9]
    [chunk] = sched.schedule().chunks
    assert chunk.num_tokens == 3 and chunk.draft_token_ids == [6, 7]


def test_drafts_go_only_with_a_known_last_token():
    sched = make_scheduler()
    a = add(sched, "a", [1, 2, 3])
    a.draft_token_ids = [6]  # proposed before the prefill ran: not a decode
    first = sched.schedule()
    assert first.chunks[0].draft_token_ids == []
    a.draft_token_ids = [6]  # the first token is still a placeholder (asynchronous scheduling)
    second = sched.schedule()
    assert second.chunks[0].draft_token_ids == [] and a.draft_token_ids == []


def test_a_request_with_drafts_in_flight_is_not_planned_again_until_they_are_read():
    sched = make_scheduler()
    a, b = _all_decoding(sched, {"a": [1, 2, 3], "b": [1, 2, 3]})
    a.draft_token_ids = [6, 7]
    first = sched.schedule()
    second = sched.schedule()  # planned before the first step's tokens are read
    assert [c.request.request_id for c in second.chunks] == ["b"]
    sched.update_from_output(first, {"a": [6, 8], "b": [9]})
    sched.update_from_output(second, {"b": [10]})
    assert a.output_token_ids == [5, 6, 8] and b.output_token_ids == [5, 9, 10]
    [chunk_a, _] = sched.schedule().chunks
    assert (chunk_a.start, chunk_a.num_tokens) == (a.num_tokens - 1, 1)


def test_a_stop_inside_the_list_ends_it_there():
    sched = make_scheduler()
    a, b = _all_decoding(sched, {"a": [1, 2, 3], "b": [1, 2, 3]}, stop_token_ids=[7])
    a.draft_token_ids = [6, EOS, 8]
    b.draft_token_ids = [6, 7, 8]
    out = sched.schedule()
    updated = sched.update_from_output(out, {"a": [6, EOS, 8, 9], "b": [6, 7, 8, 9]})
    assert updated == [(a, 2), (b, 2)]
    assert a.output_token_ids == [5, 6, EOS] and a.status == RequestStatus.FINISHED_STOPPED
    assert b.output_token_ids == [5, 6, 7] and b.stop_reason == 7
    assert sched.kv_cache_manager.usage == 0.0 and not sched.requests


def test_min_tokens_hold_eos_back_inside_the_list_too():
    sched = make_scheduler()
    a = _decoding(sched, min_tokens=3)
    a.draft_token_ids = [EOS, 6]
    sched.update_from_output(sched.schedule(), {"a": [EOS, 6, EOS]})
    assert a.output_token_ids == [5, EOS, 6, EOS] and a.status == RequestStatus.FINISHED_STOPPED


def test_drafts_never_preempt_another_request():
    # 3 blocks of 4: "a" and "b" hold one each after their prefill; drafts for "a" would need 2 more.
    sched = make_scheduler(num_blocks=3, prefix=False)
    a, b = _all_decoding(sched, {"a": [1, 2, 3], "b": [4, 6, 8]})
    a.draft_token_ids = [6, 7, 8, 9, 10]
    out = sched.schedule()
    assert [(c.request.request_id, c.num_tokens, c.draft_token_ids) for c in out.chunks] == [
        ("a", 1, []), ("b", 1, [])
    ]
    assert out.preempted == [] and b.status == RequestStatus.RUNNING


def test_preemption_drops_the_drafts():
    sched = make_scheduler(num_blocks=2, prefix=False)
    _, b = _all_decoding(sched, {"a": [1, 2, 3, 4], "b": [4, 6, 8, 9]})  # a block each, both full
    b.draft_token_ids = [6]
    out = sched.schedule()  # "a" needs a second block: "b", the newest, goes
    assert out.preempted == ["b"]
    assert b.status == RequestStatus.PREEMPTED and b.draft_token_ids == []


def test_no_block_holding_a_rejected_draft_reaches_the_prefix_cache():
    sched = make_scheduler(block_size=4)
    a = _decoding(sched, "a", [1, 2, 3, 4, 5, 6])  # 7 tokens: block 0 full and cached
    pool = sched.kv_cache_manager.block_pool
    assert len(pool.cached) == 1
    a.draft_token_ids = [20, 21, 22, 23, 24]  # positions 7..11: blocks 1 and 2 get computed
    out = sched.schedule()
    assert len(pool.cached) == 1  # a block of drafts is not offered: its tokens are not known
    sched.update_from_output(out, {"a": [30]})  # the first draft is rejected
    assert len(pool.cached) == 1
    sched.schedule()  # computes position 7 (30): block 1 is full and known now
    assert len(pool.cached) == 2
    [cached_hash] = [h for h in pool.cached if pool.cached[h] == sched.kv_cache_manager.get_block_ids("a")[1]]
    hashes = sched.kv_cache_manager.block_hashes["a"]
    assert cached_hash == hashes[1] and a.token_ids[4:8] == [5, 6, 5, 30]


# Property tests: the random operations of test_scheduler.py, with drafts proposed between steps
# and accepted in part at random; the shadow KV cache checks that every position a request reads
# holds its own prefix, prefix-cache hits included, whatever rejected drafts wrote.

MAX_DRAFTS = 4
drafts = st.lists(st.sampled_from([1, 2, 3, EOS]), min_size=1, max_size=MAX_DRAFTS)


class DraftDriver(Driver):
    def __init__(self, config: dict, overlap: bool = False) -> None:
        super().__init__(config, overlap)
        self.proposed_after: dict[str, int] = {}  # request id -> its tokens when drafts were proposed

    def propose(self, tokens: list[int]) -> None:
        # To every running request, even mid-prefill or with a placeholder: the scheduler decides.
        for req in self.sched.running:
            req.draft_token_ids = list(tokens)
            self.proposed_after[req.request_id] = req.num_tokens

    def step(self, tokens: list[int]) -> None:
        out = self.sched.schedule()
        check_output(self.sched, out)
        for c in out.chunks:
            if c.draft_token_ids:  # right after the tokens the proposer saw, all of them known
                req = c.request
                assert c.start + c.num_tokens - len(c.draft_token_ids) == req.num_tokens
                assert self.proposed_after[req.request_id] == req.num_tokens == req.num_tokens_with_placeholders - c.num_samples
                # Room for every token the step may yield, within both limits.
                assert req.num_output_tokens + c.num_samples <= req.max_tokens
                assert req.num_tokens + c.num_samples <= self.sched.max_request_len
        if self.overlap:
            out, self.in_flight = self.in_flight, out
            if out is None:
                return
        self.shadow.run(out, self.sched.kv_cache_manager.block_size)
        sampled = {}
        for i, c in enumerate(c for c in out.chunks if c.samples):
            accepted = c.draft_token_ids[: tokens[i % len(tokens)] % (len(c.draft_token_ids) + 1)]
            sampled[c.request.request_id] = accepted + [tokens[(i + 1) % len(tokens)]]
        for req, n in self.sched.update_from_output(out, sampled):
            assert 1 <= n <= len(sampled[req.request_id])
            assert n == len(sampled[req.request_id]) or req.status.is_finished()


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlapped"])
@settings(max_examples=200, deadline=None)
@given(config=configs, reqs=st.lists(requests, min_size=1, max_size=6), tokens=sampled_tokens, proposals=drafts,
       finish_at=st.none() | st.integers(0, 30))
def test_requests_with_drafts_keep_blocks_budgets_and_caches_consistent_until_they_finish(
    overlap, config, reqs, tokens, proposals, finish_at
):
    driver = DraftDriver(config, overlap)
    for args in reqs:
        driver.add(args)
    for i in range(2000):
        if not driver.sched.has_unfinished_requests():
            break
        driver.propose(proposals)
        driver.step(tokens)
        if i == finish_at:
            driver.finish(i, RequestStatus.FINISHED_ABORTED)
        check_invariants(driver.sched, MAX_DRAFTS)
        for req in driver.added:
            assert req.num_output_tokens <= req.max_tokens and req.num_tokens <= driver.sched.max_request_len
    check_all_free(driver.sched)
    assert all(r.status.is_finished() for r in driver.added)
