"""The prefill a step holds beside the running decodes (vLLM's chunked-prefill knobs): every
running decode gets its token each step, a prompt's chunk is capped by
long_prefill_token_threshold, at most max_num_partial_prefills prompts (max_long_partial_prefills
long ones) are left partly prefilled by a step, short prompts jump ahead of long ones that have
no slot, long prompts still progress and every request finishes; `pagoda serve`'s smaller step
budget."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_kv_cache_manager import make_request

from pagoda import parallel_config
from pagoda.config import EngineConfig
from pagoda.config import resolve
from pagoda.config.resolve import _long_prefill_token_threshold, _max_num_batched_tokens
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.request import Request
from pagoda.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from pagoda.config.resolve import SERVER_MAX_NUM_BATCHED_TOKENS
from pagoda.entrypoints.cli import build_parser
from pagoda.entrypoints.openai.cli_args import server_engine_kwargs
from pagoda.parallel_config import GpuInventory


def make_scheduler(budget: int, threshold: int = 0, partial: int = 1, long: int = 1, max_num_seqs: int = 16) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs, budget, max_model_len=256, enable_chunked_prefill=True, async_scheduling=False,
        long_prefill_token_threshold=threshold, max_num_partial_prefills=partial, max_long_partial_prefills=long,
    )
    return Scheduler(config, KVCacheManager(num_blocks=512, block_size=4, enable_prefix_caching=False))


def add(sched: Scheduler, rid: str, prompt_len: int, max_tokens: int = 8) -> Request:
    # Distinct prompts: no prefix is shared.
    req = make_request(rid, [1000 * len(sched.requests) + i + 3 for i in range(prompt_len)], 256, max_tokens=max_tokens)
    sched.add_request(req)
    return req


def step(sched: Scheduler) -> SchedulerOutput:
    out = sched.schedule()
    sched.update_from_output(out, {c.request.request_id: [7] for c in out.chunks if c.samples})
    return out


def prefill_chunks(out: SchedulerOutput) -> list:
    """The chunks that compute prompt tokens (the rest are decodes: one known token that samples)."""
    return [c for c in out.chunks if not (c.num_tokens == 1 and c.start >= c.request.num_prompt_tokens)]


def partial_chunks(out: SchedulerOutput) -> list:
    return [c for c in out.chunks if not c.samples]


def start_decodes(sched: Scheduler, n: int) -> list[Request]:
    reqs = [add(sched, f"d{i}", 3, max_tokens=100) for i in range(n)]
    step(sched)
    assert all(r.num_output_tokens == 1 for r in reqs)
    return reqs


def test_threshold_caps_the_prefill_beside_running_decodes():
    sched = make_scheduler(budget=64, threshold=8)
    decodes = start_decodes(sched, 4)
    longs = [add(sched, "long1", 40), add(sched, "long2", 40)]
    for _ in range(9):
        out = step(sched)
        decoded = {c.request.request_id for c in out.chunks if c.request in decodes}
        assert decoded == {r.request_id for r in decodes}  # no decode is stalled
        assert all(c.num_tokens <= 8 for c in prefill_chunks(out))
        # One prompt left partly prefilled: the other waits for the slot (or starts as the first ends).
        assert len(partial_chunks(out)) <= 1
    assert all(r.num_output_tokens >= 1 for r in longs)  # 5 chunks each, the second from the 5th step


def test_without_a_threshold_the_budget_bounds_the_prefill():
    sched = make_scheduler(budget=32)
    decodes = start_decodes(sched, 5)
    add(sched, "long", 100)
    out = step(sched)
    assert sum(c.num_tokens for c in prefill_chunks(out)) == 32 - len(decodes)
    assert all(r.num_output_tokens == 2 for r in decodes)


def test_a_long_prompt_progresses_by_the_threshold_each_step_and_finishes():
    sched = make_scheduler(budget=64, threshold=8)
    start_decodes(sched, 3)
    long = add(sched, "long", 50)
    steps = 0
    while long.num_output_tokens == 0:
        before = long.num_computed_tokens
        step(sched)
        assert long.num_computed_tokens - before == min(8, 50 - before)
        # Short prompts keep arriving; the long one keeps its slot (running requests go first).
        add(sched, f"s{steps}", 4, max_tokens=2)
        steps += 1
    assert steps == math.ceil(50 / 8)


def test_short_prompts_jump_ahead_of_a_long_prompt_without_a_slot():
    sched = make_scheduler(budget=64, threshold=8, partial=2, long=1)
    long1 = add(sched, "long1", 40)
    long2 = add(sched, "long2", 40)
    short = add(sched, "short", 6)
    out = step(sched)
    scheduled = {c.request.request_id: c.num_tokens for c in out.chunks}
    assert scheduled == {"long1": 8, "short": 6}  # long2 waits: the one long slot is long1's
    assert short.num_output_tokens == 1 and long2.num_computed_tokens == 0
    for _ in range(40):
        if not sched.has_unfinished_requests():
            break
        out = step(sched)
        assert sum(1 for c in partial_chunks(out) if c.request in (long1, long2)) <= 1
    assert not sched.has_unfinished_requests()  # long2 had its turn once long1 was prefilled


def test_two_partial_slots_prefill_two_short_prompts_beside_one_long():
    sched = make_scheduler(budget=64, threshold=8, partial=2, long=1)
    add(sched, "long", 40)
    add(sched, "mid", 8)  # not long (not over the threshold): it completes in one chunk
    out = step(sched)
    assert [(c.request.request_id, c.num_tokens, c.samples) for c in out.chunks] == [
        ("long", 8, False), ("mid", 8, True)
    ]


@pytest.mark.parametrize("seed", range(4))
def test_random_traffic_keeps_the_bounds_and_finishes_everyone(seed):
    rng = random.Random(seed)
    budget, threshold, partial, long = 48, 8, 2, 1
    sched = make_scheduler(budget, threshold, partial, long, max_num_seqs=12)
    added = []
    for t in range(400):
        if t < 60 and rng.random() < 0.5:
            added.append(add(sched, f"r{t}", rng.choice([2, 5, 9, 30, 70]), max_tokens=rng.randint(1, 12)))
        if not sched.has_unfinished_requests() and t >= 60:
            break
        running_decodes = [r for r in sched.running if r.num_computed_tokens >= r.num_prompt_tokens]
        out = step(sched)
        decoded = {c.request.request_id for c in out.chunks}
        assert all(r.request_id in decoded for r in running_decodes)  # decodes are never left out
        assert out.num_batched_tokens <= budget
        assert all(c.num_tokens <= threshold for c in prefill_chunks(out))
        partials = partial_chunks(out)
        assert len(partials) <= partial
        assert sum(1 for c in partials if c.request.num_prompt_tokens > threshold) <= long
    assert not sched.has_unfinished_requests()
    assert all(r.num_output_tokens == r.max_tokens for r in added)


def test_engine_config_refuses_more_long_partial_prefills_than_partial_ones():
    with pytest.raises(ValueError, match="max_long_partial_prefills=3"):
        EngineConfig(max_num_partial_prefills=2, max_long_partial_prefills=3)
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        EngineConfig(long_prefill_token_threshold=-1)


def test_several_partial_prefills_default_the_threshold_to_4_percent_of_the_context():
    assert _long_prefill_token_threshold(EngineConfig(max_num_partial_prefills=2), 10000) == 400
    assert _long_prefill_token_threshold(EngineConfig(max_num_partial_prefills=2, long_prefill_token_threshold=64),
                                         10000) == 64
    assert _long_prefill_token_threshold(EngineConfig(), 10000) == 0


def serve_kwargs(*flags: str) -> dict:
    return server_engine_kwargs(build_parser().parse_args(["serve", *flags]))


def budget(device: str, server: bool, *flags: str, **config) -> int:
    """The step budget resolved for these `pagoda serve` flags (or this offline config)."""
    args = EngineConfig(**serve_kwargs(*flags)) if flags or server else EngineConfig(**config)
    return _max_num_batched_tokens(args, 1024, torch.device(device), server)


def test_serve_steps_hold_fewer_tokens_than_offline_by_default(monkeypatch):
    monkeypatch.setattr(resolve, "detect_gpus", lambda: GpuInventory(1, 24 * 2**30, (8, 9)))
    assert budget("cuda", True) == SERVER_MAX_NUM_BATCHED_TOKENS == 2048
    assert budget("cuda", False) == 8192  # offline LLM: the engine's default
    assert budget("cpu", True) == budget("cpu", False) == 2048
    assert budget("cuda", True, "--max-num-batched-tokens", "8192") == 8192
    # Whole prompts in one step: the budget must hold the longest, as the engine sizes it.
    assert serve_kwargs("--no-enable-chunked-prefill")["max_num_batched_tokens"] is None
    assert budget("cuda", True, "--no-enable-chunked-prefill") == 2048  # max(max_model_len, 2048)
    kwargs = serve_kwargs("--long-prefill-token-threshold", "512", "--max-num-partial-prefills", "4",
                          "--max-long-partial-prefills", "2")
    assert (kwargs["long_prefill_token_threshold"], kwargs["max_num_partial_prefills"],
            kwargs["max_long_partial_prefills"]) == (512, 4, 2)


@pytest.mark.parametrize(("gib", "capability", "served", "offline_budget"), [
    (141, (9, 0), 6144, 16384), (80, (9, 0), 6144, 16384), (80, (8, 0), 2048, 8192), (24, (8, 9), 2048, 8192),
    (48, (9, 0), 2048, 8192),
])
def test_steps_are_larger_on_large_gpus_from_hopper_on(monkeypatch, gib, capability, served, offline_budget):
    """vLLM's rule's shape: GPUs of 70 GiB or more get larger steps, served and offline (not the
    A100: 80 GB, compute capability 8.0); the measurements behind the numbers are in
    docs/benchmarks.md."""
    # first a machine that sees no GPU of its own (as a Ray head may be), then one with them
    for gpus, server, offline in ((GpuInventory(0, 0), SERVER_MAX_NUM_BATCHED_TOKENS, 8192),
                                  (GpuInventory(1, gib * 2**30, capability), served, offline_budget)):
        monkeypatch.setattr(parallel_config, "detect_gpus", lambda gpus=gpus: gpus)
        monkeypatch.setattr(resolve, "detect_gpus", lambda gpus=gpus: gpus)
        assert budget("cuda", True) == server
        assert budget("cuda", False) == offline
    assert budget("cpu", False) == 2048
    assert budget("cuda", False, max_num_batched_tokens=4096) == 4096
    assert budget("cuda", False, enable_chunked_prefill=False) == 2048  # whole prompts: max(max_model_len, 2048)
    assert budget("cpu", True) == SERVER_MAX_NUM_BATCHED_TOKENS


def test_capped_chunks_give_the_engine_s_greedy_tokens(tmp_path):
    """The knobs reach the engine's scheduler, and prompts prefilled in capped chunks, several at
    once, decode the same greedy tokens as prompts prefilled whole."""
    from pagoda import LLM, SamplingParams
    from tests.tiny_models import save_tiny_model

    path = str(save_tiny_model("llama3", tmp_path))
    prompts = [{"prompt_token_ids": [(7 * i + j) % 200 + 3 for j in range(n)]} for i, n in enumerate((37, 5, 50, 12))]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def greedy(**knobs) -> tuple[list[list[int]], object]:
        llm = LLM(model=path, device="cpu", skip_tokenizer_init=True, max_model_len=128, enable_prefix_caching=False,
                  **knobs)
        outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        return outputs, llm.llm_engine.engine_core.engine_core.scheduler.config

    whole, _ = greedy()
    capped, scheduler = greedy(long_prefill_token_threshold=8, max_num_partial_prefills=2, max_long_partial_prefills=1)
    assert (scheduler.long_prefill_token_threshold, scheduler.max_num_partial_prefills,
            scheduler.max_long_partial_prefills) == (8, 2, 1)
    assert capped == whole
