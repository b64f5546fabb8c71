"""KVCacheManager: block tables, prefix-cache lookup by chained hashes, allocation and freeing.

Also home of the SamplingParams stand-in and `make_request`, shared with test_scheduler.py."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import pagoda.core.kv_cache_manager as kv_module
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.request import Request, RequestStatus

EOS = 0


@dataclass
class Params:
    """The SamplingParams fields the core reads, without depending on the real class."""

    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None


def make_request(rid: str, prompt: list[int], max_model_len: int = 64, **params) -> Request:
    return Request(rid, list(prompt), Params(**params), frozenset({EOS}), max_model_len, arrival_time=0.0)


def run_prefill(kv: KVCacheManager, req: Request) -> int:
    """Admit a request the way the scheduler does; returns the cached tokens it got."""
    blocks, num_cached = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_cached, blocks)
    req.num_computed_tokens = req.num_tokens
    return num_cached


# Request --------------------------------------------------------------------------------------


def test_max_tokens_is_resolved_within_the_model_length():
    assert make_request("a", [1] * 10, max_model_len=64, max_tokens=None).max_tokens == 54
    assert make_request("a", [1] * 10, max_model_len=64, max_tokens=100).max_tokens == 54
    assert make_request("a", [1] * 10, max_model_len=64, max_tokens=5).max_tokens == 5


def test_output_tokens_extend_the_token_ids():
    req = make_request("a", [1, 2])
    req.append_output_token(7)
    assert (req.token_ids, req.output_token_ids) == ([1, 2, 7], [7])
    assert (req.num_tokens, req.num_prompt_tokens, req.num_output_tokens) == (3, 2, 1)


def test_prompt_logprobs_turn_the_prefix_cache_off():
    assert make_request("a", [1]).use_prefix_cache
    assert not make_request("a", [1], prompt_logprobs=0).use_prefix_cache


def test_statuses_and_finish_reasons():
    assert [s.finish_reason for s in RequestStatus if s.is_finished()] == ["stop", "length", "abort"]
    assert all(s.finish_reason is None for s in RequestStatus if not s.is_finished())


# Allocation -----------------------------------------------------------------------------------


def test_allocation_grows_the_table_block_by_block():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    req = make_request("a", [1] * 6)
    assert kv.allocate_slots(req, 6)
    assert len(kv.get_block_ids("a")) == 2
    req.num_computed_tokens = 6
    req.append_output_token(1)
    req.append_output_token(1)
    assert kv.allocate_slots(req, 1) and len(kv.get_block_ids("a")) == 2  # token 7 fits in block 2
    req.num_computed_tokens = 7
    assert kv.allocate_slots(req, 1) and len(kv.get_block_ids("a")) == 2
    req.num_computed_tokens = 8
    req.append_output_token(1)
    assert kv.allocate_slots(req, 1) and len(kv.get_block_ids("a")) == 3
    assert kv.num_free_blocks == 5 and kv.usage == pytest.approx(3 / 8)


def test_a_short_pool_refuses_without_changing_anything():
    kv = KVCacheManager(num_blocks=2, block_size=4, enable_prefix_caching=False)
    assert not kv.allocate_slots(make_request("a", [1] * 9), 9)
    assert kv.get_block_ids("a") == [] and kv.num_free_blocks == 2


def test_free_returns_every_block_tail_first():
    kv = KVCacheManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    req = make_request("a", [1, 2, 3, 4, 5, 6])
    run_prefill(kv, req)
    table = kv.get_block_ids("a")
    kv.free(req)
    assert kv.get_block_ids("a") == [] and kv.usage == 0
    assert list(kv.block_pool.free_queue) == table[::-1]


# Prefix caching -------------------------------------------------------------------------------


def test_a_second_request_hits_the_shared_prefix_while_the_first_runs_and_after_it_ends():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    first = make_request("a", list(range(1, 13)))  # 3 full blocks
    assert run_prefill(kv, first) == 0
    second = make_request("b", list(range(1, 9)) + [99, 98, 97])  # shares the first 2 blocks
    assert run_prefill(kv, second) == 8
    assert kv.get_block_ids("b")[:2] == kv.get_block_ids("a")[:2]
    assert kv.block_pool.ref_counts[kv.get_block_ids("a")[0]] == 2
    kv.free(first)
    kv.free(second)
    third = make_request("c", list(range(1, 13)) + [5])
    assert run_prefill(kv, third) == 12
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (12 + 11 + 13, 0 + 8 + 12)


def test_a_chats_next_turn_continues_its_history_in_one_run():
    kv = KVCacheManager(num_blocks=32, block_size=4, enable_prefix_caching=True)
    first = make_request("turn-1", list(range(1, 11)))  # 2 full blocks and a half-full one
    run_prefill(kv, first)
    kv.free(first)
    second = make_request("turn-2", list(range(1, 11)) + [50, 51, 52, 53, 54, 55])
    assert run_prefill(kv, second) == 8  # the history's full blocks
    table = kv.get_block_ids("turn-2")
    assert table == list(range(table[0], table[0] + len(table)))

def test_the_last_token_is_never_taken_from_the_cache():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    run_prefill(kv, make_request("a", [1] * 8))
    assert kv.get_computed_blocks(make_request("b", [1] * 8))[1] == 4


def test_equal_blocks_after_different_prefixes_do_not_match():
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    run_prefill(kv, make_request("a", [1, 1, 5, 5, 6]))
    assert kv.get_computed_blocks(make_request("b", [2, 2, 5, 5, 6]))[1] == 0


def test_a_cache_salt_shares_the_prefix_only_with_the_same_salt():
    kv = KVCacheManager(num_blocks=16, block_size=2, enable_prefix_caching=True)
    prompt = [1, 2, 3, 4, 5]

    def salted(rid: str, salt: str | None) -> Request:
        return Request(rid, list(prompt), Params(), frozenset({EOS}), 64, arrival_time=0.0, cache_salt=salt)

    run_prefill(kv, salted("a", "alice"))
    assert kv.get_computed_blocks(salted("b", "alice"))[1] == 4
    assert kv.get_computed_blocks(salted("c", "bob"))[1] == 0
    assert kv.get_computed_blocks(salted("d", None))[1] == 0
    run_prefill(kv, salted("e", None))
    assert kv.get_computed_blocks(salted("f", None))[1] == 4


@pytest.mark.parametrize(
    "caching, params", [(False, {}), (True, {"prompt_logprobs": 1})], ids=["caching off", "prompt logprobs"]
)
def test_no_hits_without_the_prefix_cache(caching, params):
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=caching)
    run_prefill(kv, make_request("a", [1] * 8))
    assert kv.get_computed_blocks(make_request("b", [1] * 8, **params)) == ([], 0)


def test_free_hit_blocks_do_not_count_as_free_for_the_new_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    cached = make_request("a", list(range(8)))
    run_prefill(kv, cached)
    kv.free(cached)  # 2 cached blocks, now free
    run_prefill(kv, make_request("b", [50] * 4))  # holds one of the two never-used blocks
    assert kv.num_free_blocks == 3
    req = make_request("c", list(range(8)) + [9] * 5)  # 2 hits + 2 new blocks; only 1 truly free
    blocks, num_cached = kv.get_computed_blocks(req)
    assert num_cached == 8
    refs = list(kv.block_pool.ref_counts)
    assert not kv.allocate_slots(req, req.num_tokens - num_cached, blocks)
    assert kv.block_pool.ref_counts == refs and kv.num_free_blocks == 3 and kv.get_block_ids("c") == []


def test_each_full_block_is_hashed_once_while_decoding(monkeypatch):
    calls = []
    real = kv_module.hash_block_tokens
    monkeypatch.setattr(kv_module, "hash_block_tokens", lambda p, t, *lora: calls.append(tuple(t)) or real(p, t, *lora))
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    req = make_request("a", list(range(10)))
    run_prefill(kv, req)
    for token in range(20, 40):
        req.append_output_token(token)
        assert kv.allocate_slots(req, 1)
        req.num_computed_tokens += 1
    assert len(calls) == len(set(calls)) == req.num_tokens // 4
    assert len(kv.block_pool.cached) == req.num_tokens // 4  # every full block was offered
