"""Multi-token steps end to end on a tiny random model (fp32, CPU): a test-only proposer feeds the
engine drafts, and each step verifies them with the model's own samples. Right drafts (the model's
future greedy tokens, from a plain run first) give the same tokens in fewer steps; wrong ones give
the same tokens in as many steps; nothing a proposer says changes a greedy output, with stops,
length limits, logprobs, penalties, prefix caching and asynchronous scheduling."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from pagoda import SamplingParams
from pagoda.config import EngineConfig
from pagoda.core.request import Request
from pagoda.engine.llm_engine import LLMEngine
from pagoda.outputs import RequestOutput
from tests.tiny_models import ARCHITECTURES, save_tiny_model

K = 3  # drafts per step
GREEDY = {"temperature": 0.0, "ignore_eos": True}


class FutureProposer:
    """Proposes, for each request, tokens from a list of its expected outputs; `corrupt(i, token)`
    changes draft i (0-based within the step) to make it wrong."""

    num_speculative_tokens = K

    def __init__(self, futures: dict[str, list[int]], corrupt: Callable[[int, int], int] = lambda i, t: t) -> None:
        self.futures = futures
        self.corrupt = corrupt
        self.num_proposed = 0

    def propose(self, requests: Sequence[Request]) -> dict[str, list[int]]:
        drafts = {}
        for req in requests:
            if req.request_id not in self.futures:
                continue
            future = self.futures[req.request_id][req.num_output_tokens : req.num_output_tokens + K]
            drafts[req.request_id] = [self.corrupt(i, t) for i, t in enumerate(future)]
            self.num_proposed += len(future)
        return drafts


def wrong(i: int, token: int) -> int:
    return (token + 1) % 256


def first_right_then_wrong(i: int, token: int) -> int:
    return token if i == 0 else wrong(i, token)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny_model("llama3", tmp_path_factory.mktemp("multitoken")))


def _engine(model_dir: str, proposer=None, **overrides) -> LLMEngine:
    config = {"model": model_dir, "device": "cpu", "skip_tokenizer_init": True, "max_model_len": 64,
              "block_size": 4, "num_gpu_blocks_override": 64, "max_num_batched_tokens": 32}
    return LLMEngine(EngineConfig(**{**config, **overrides}), proposer)


def _generate(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list[RequestOutput], int]:
    """Every request's final output, and the engine steps it took."""
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p, final_only=True)
    done: dict[str, RequestOutput] = {}
    steps = 0
    while engine.has_unfinished_requests():
        done.update((out.request_id, out) for out in engine.step())
        steps += 1
        assert steps < 1000, "the engine stopped making progress"
    return [done[str(i)] for i in range(len(prompts))], steps


PROMPTS = [[5, 9, 13, 17, 21, 25, 29, 33, 37, 2], [40, 41], [7] * 13, [60, 61, 62, 63, 64]]


def _tokens(outputs: list[RequestOutput]) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


def _futures(outputs: list[RequestOutput]) -> dict[str, list[int]]:
    return {out.request_id: list(out.outputs[0].token_ids) for out in outputs}


@pytest.fixture(scope="module")
def plain(model_dir) -> tuple[list[RequestOutput], int]:
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (20, 17, 9, 14)]
    return _generate(_engine(model_dir), PROMPTS, params)


def _run_with(model_dir: str, proposer, max_tokens=(20, 17, 9, 14), **overrides):
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in max_tokens]
    return _generate(_engine(model_dir, proposer, **overrides), PROMPTS, params)


def test_right_drafts_give_the_same_tokens_in_fewer_steps(model_dir, plain):
    expected, plain_steps = plain
    proposer = FutureProposer(_futures(expected))
    outputs, steps = _run_with(model_dir, proposer)
    assert _tokens(outputs) == _tokens(expected)
    assert [o.outputs[0].finish_reason for o in outputs] == ["length"] * 4
    # 20 tokens: one from the prefill, then up to K + 1 a step (~6 steps, not 20).
    assert steps < plain_steps / 2
    assert proposer.num_proposed > 0


def test_wrong_drafts_give_the_same_tokens_in_as_many_steps(model_dir, plain):
    expected, plain_steps = plain
    outputs, steps = _run_with(model_dir, FutureProposer(_futures(expected), wrong))
    assert _tokens(outputs) == _tokens(expected)
    assert steps == plain_steps


def test_partly_right_drafts_give_the_same_tokens(model_dir, plain):
    expected, plain_steps = plain
    outputs, steps = _run_with(model_dir, FutureProposer(_futures(expected), first_right_then_wrong))
    assert _tokens(outputs) == _tokens(expected)
    assert plain_steps / 2 <= steps < plain_steps  # two tokens a step once decoding


def test_max_tokens_inside_a_list_of_right_drafts(model_dir, plain):
    expected, _ = plain
    # Shorter limits than the futures: the drafts are cut so that no step passes them.
    outputs, _ = _run_with(model_dir, FutureProposer(_futures(expected)), max_tokens=(3, 6, 4, 2))
    assert _tokens(outputs) == [t[:n] for t, n in zip(_tokens(expected), (3, 6, 4, 2))]
    assert [o.outputs[0].finish_reason for o in outputs] == ["length"] * 4


def test_stops_inside_a_list_of_right_drafts(model_dir, plain, tmp_path):
    expected, _ = plain
    future = _tokens(expected)[0]
    # Positions 2, 6, 10, ... sit inside a step's list: a step yields tokens 1..4, 5..8, ...
    m = next(i for i in range(2, len(future), 4) if future[i] not in future[:i])
    stop = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[future[m]])
    outputs, _ = _generate(_engine(model_dir, FutureProposer(_futures(expected))), PROMPTS[:1], [stop])
    assert outputs[0].outputs[0].token_ids == future[: m + 1]
    assert outputs[0].outputs[0].stop_reason == future[m]
    # The same with the token as the model's EOS (same weights, another eos_token_id).
    eos_model = str(save_tiny_model("llama3", tmp_path, eos_token_id=future[m]))
    eos = SamplingParams(max_tokens=20, temperature=0.0)
    outputs, _ = _generate(_engine(eos_model, FutureProposer(_futures(expected))), PROMPTS[:1], [eos])
    assert outputs[0].outputs[0].token_ids == future[: m + 1]
    assert outputs[0].outputs[0].finish_reason == "stop"


def test_logprobs_of_each_token_of_a_list(model_dir):
    params = [SamplingParams(max_tokens=12, logprobs=2, **GREEDY)] * 2
    expected, _ = _generate(_engine(model_dir), PROMPTS[:2], params)
    for corrupt in (lambda i, t: t, first_right_then_wrong):
        outputs, _ = _generate(_engine(model_dir, FutureProposer(_futures(expected), corrupt)), PROMPTS[:2], params)
        for out, ref in zip(outputs, expected):
            got, want = out.outputs[0], ref.outputs[0]
            assert got.token_ids == want.token_ids and len(got.logprobs) == len(want.token_ids)
            for position, ref_position in zip(got.logprobs, want.logprobs):
                assert position.keys() == ref_position.keys()
                for token, logprob in position.items():
                    assert logprob.logprob == pytest.approx(ref_position[token].logprob, abs=1e-4)
                    assert logprob.rank == ref_position[token].rank


def test_penalties_and_min_tokens_see_the_drafts_before_each_position(model_dir):
    params = [
        SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5,
                       presence_penalty=0.3, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0.0, min_tokens=6, stop_token_ids=[3, 4, 5, 6, 7, 8, 9]),
    ]
    expected, plain_steps = _generate(_engine(model_dir), PROMPTS[:2], params)
    outputs, steps = _generate(_engine(model_dir, FutureProposer(_futures(expected))), PROMPTS[:2], params)
    assert _tokens(outputs) == _tokens(expected) and steps < plain_steps


def test_seeded_sampling_does_not_depend_on_the_rest_of_the_batch(model_dir):
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    alone, _ = _generate(_engine(model_dir), PROMPTS[:1], [seeded])
    proposer = FutureProposer(_futures(alone) | {"1": [9] * 20, "2": [9] * 20})
    others = [SamplingParams(max_tokens=12, temperature=0.8, ignore_eos=True)] * 2
    batched, _ = _generate(_engine(model_dir, proposer), PROMPTS[:3], [seeded, *others])
    # Each position draws the noise of (seed, step), as one token at a time would.
    assert _tokens(batched)[0] == _tokens(alone)[0]


def test_prefix_cache_after_rejected_drafts_holds_no_wrong_block(model_dir):
    """Rejected drafts write K/V into slots past a request's known tokens; a later request sharing
    the prefix must hit only blocks of known, correctly computed tokens."""
    first = SamplingParams(max_tokens=20, **GREEDY)
    expected, _ = _generate(_engine(model_dir), PROMPTS[:1], [first])
    future = _tokens(expected)[0]
    engine = _engine(model_dir, FutureProposer(_futures(expected) | {"0": future}, first_right_then_wrong))
    _generate(engine, PROMPTS[:1], [first])
    follow_up = PROMPTS[0] + future[:15]  # 25 tokens: 6 full blocks of the first request's
    engine.add_request("again", follow_up, SamplingParams(max_tokens=10, **GREEDY), final_only=True)
    [cached] = _drain(engine)
    fresh, _ = _generate(_engine(model_dir, enable_prefix_caching=False), [follow_up],
                         [SamplingParams(max_tokens=10, **GREEDY)])
    assert cached.num_cached_tokens >= 20
    assert cached.outputs[0].token_ids == _tokens(fresh)[0]


def _drain(engine: LLMEngine) -> list[RequestOutput]:
    outputs = []
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            return outputs
        outputs.extend(engine.step())
    raise AssertionError("the engine stopped making progress")


def test_asynchronous_scheduling_with_a_proposer(model_dir, plain):
    expected, plain_steps = plain
    for corrupt in (lambda i, t: t, first_right_then_wrong):
        outputs, steps = _run_with(model_dir, FutureProposer(_futures(expected), corrupt), async_scheduling=True)
        assert _tokens(outputs) == _tokens(expected) and steps < plain_steps


def test_preemption_with_drafts_in_a_small_pool(model_dir, plain):
    expected, _ = plain
    # 14 blocks of 4 tokens for four requests of up to 30 tokens: requests are preempted and recomputed.
    outputs, _ = _run_with(model_dir, FutureProposer(_futures(expected), first_right_then_wrong),
                           num_gpu_blocks_override=14)
    assert _tokens(outputs) == _tokens(expected)


def test_worker_processes_receive_the_drafts(model_dir, plain):
    """With tensor parallelism each rank's mirror of a request gets the step's drafts too."""
    expected, _ = plain
    outputs, _ = _run_with(model_dir, FutureProposer(_futures(expected), first_right_then_wrong),
                           max_tokens=(8, 8, 8, 8), tensor_parallel_size=2)
    assert _tokens(outputs) == [t[:8] for t in _tokens(expected)]


def test_decode_graphs_replay_steps_whose_requests_all_have_a_captured_query_length():
    from pagoda.attention.torch_backend import TorchAttentionBackend
    from pagoda.worker.cuda_graphs import DecodeGraphs

    graphs = DecodeGraphs(lambda *args: None, TorchAttentionBackend(), sizes=[1, 2, 4], block_size=4,
                          max_blocks_per_seq=8, scratch_block=0, device=torch.device("cpu"), query_lens=[1, 4])
    assert graphs.captures([1, 1, 1], 3)
    assert graphs.captures([4, 4], 8)
    assert not graphs.captures([1, 1, 1, 1, 1], 5)  # more requests than the largest graph
    assert not graphs.captures([4, 3], 7) and not graphs.captures([2, 2], 4)  # uneven, or not captured
    assert not graphs.captures([1, 7], 8)  # as many tokens as 2 x 4, but not 4 each
    assert graphs.input_ids.shape[0] == 4 * 4  # buffers for the widest graph


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_gives_its_greedy_tokens_with_drafts(arch, tmp_path):
    path = str(save_tiny_model(arch, tmp_path))
    params = [SamplingParams(max_tokens=12, **GREEDY)] * 2
    expected, plain_steps = _generate(_engine(path), PROMPTS[:2], params)
    outputs, steps = _generate(_engine(path, FutureProposer(_futures(expected), first_right_then_wrong)),
                               PROMPTS[:2], params)
    assert _tokens(outputs) == _tokens(expected) and steps < plain_steps
