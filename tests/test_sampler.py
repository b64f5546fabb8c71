from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from pagoda import LLM
from pagoda.config import EngineConfig
from pagoda.entrypoints.cli import build_parser
from pagoda.entrypoints.engine_args import engine_kwargs
from pagoda.entrypoints.openai.protocol import CompletionLogprobs, TokenLogprob, TopLogprob
from pagoda.sample.sampler import Sampler, filter_top_k_top_p_min_p, gather_top_logprobs, process_logits
from pagoda.sample.top_logprobs import TopLogprobs
from pagoda.sampling_params import SamplingParams
from tests.tiny_models import save_tiny_model


@dataclass
class Req:
    sampling_params: SamplingParams
    prompt_token_ids: list[int] = field(default_factory=lambda: [0])
    output_token_ids: list[int] = field(default_factory=list)
    eos_token_ids: frozenset[int] = frozenset()


def reqs(n: int, **params: object) -> list[Req]:
    p = SamplingParams(**params)
    return [Req(p) for _ in range(n)]


def processed(logits: torch.Tensor, requests: list[Req]) -> torch.Tensor:
    return process_logits(logits, requests, [len(r.output_token_ids) for r in requests])


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# Greedy -------------------------------------------------------------------------------------


def test_greedy_is_argmax_and_leaves_input_untouched() -> None:
    logits = random_logits(16, 100)
    before = logits.clone()
    out = Sampler()(logits, reqs(16, temperature=0.0))
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.top_logprobs == [None] * 16
    assert torch.equal(logits, before)


def test_greedy_accepts_half_precision() -> None:
    logits = random_logits(4, 50).to(torch.bfloat16)
    assert Sampler()(logits, reqs(4, temperature=0.0)).token_ids == logits.float().argmax(dim=-1).tolist()


def test_top_k_1_equals_greedy() -> None:
    logits = random_logits(64, 200, seed=1)
    out = Sampler(seed=5)(logits, reqs(64, temperature=1.5, top_k=1))
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_greedy_rows_stay_greedy_in_a_mixed_batch() -> None:
    logits = random_logits(32, 50, seed=2)
    requests = [Req(SamplingParams(temperature=0.0 if i % 2 else 1.0)) for i in range(32)]
    out = Sampler()(logits, requests)
    assert out.token_ids[1::2] == logits.argmax(dim=-1)[1::2].tolist()


# Filtering: tokens outside the allowed set are never drawn ---------------------------------


def draw(row: torch.Tensor, draws: int, seed: int = 0, **params: object) -> torch.Tensor:
    """`draws` independent samples from one row of logits (one batch of identical rows)."""
    tokens = Sampler(seed)(row.expand(draws, -1), reqs(draws, **params)).token_ids
    return torch.tensor(tokens)


def scaled_probs(row: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(row / temperature, dim=-1)


def nucleus(row: torch.Tensor, temperature: float, top_p: float) -> set[int]:
    """The tokens top-p keeps: each whose more likely tokens hold less than top_p."""
    probs = scaled_probs(row, temperature)
    order = probs.argsort(descending=True)
    mass_above = probs[order].cumsum(0) - probs[order]
    return set(order[mass_above < top_p].tolist())


def test_top_k_never_leaves_the_k_best() -> None:
    row = random_logits(1, 30, seed=3, scale=1.0)[0]
    tokens = draw(row, 4000, temperature=0.9, top_k=4)
    assert set(tokens.tolist()) == set(row.topk(4).indices.tolist())


def test_top_p_keeps_exactly_the_nucleus() -> None:
    row = random_logits(1, 30, seed=4, scale=1.5)[0]
    temperature, top_p = 0.8, 0.7
    kept = nucleus(row, temperature, top_p)
    assert 1 < len(kept) < 30
    tokens = draw(row, 6000, temperature=temperature, top_p=top_p)
    assert set(tokens.tolist()) == kept


def test_min_p_drops_tokens_below_the_threshold() -> None:
    row = random_logits(1, 30, seed=5, scale=1.5)[0]
    temperature, min_p = 1.2, 0.2
    probs = scaled_probs(row, temperature)
    allowed = set(torch.nonzero(probs >= min_p * probs.max())[:, 0].tolist())
    assert 1 < len(allowed) < 30
    tokens = draw(row, 6000, temperature=temperature, min_p=min_p)
    assert set(tokens.tolist()) == allowed


def test_top_k_then_top_p_renormalises_over_the_k() -> None:
    # After top_k=2 the two tokens hold 0.5 / 0.5: top_p=0.5 keeps only the first.
    row = torch.tensor([2.0, 2.0 - 1e-3, 1.9, 1.8])
    tokens = draw(row, 500, top_k=2, top_p=0.5)
    assert set(tokens.tolist()) == {0}


# Distribution --------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_follow_softmax_over_temperature(temperature: float) -> None:
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.2, -2.0])
    draws = 20000
    counts = torch.bincount(draw(row, draws, seed=11, temperature=temperature), minlength=8).double()
    expected = scaled_probs(row, temperature).double() * draws
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 24.3  # the 99.9% quantile for 7 degrees of freedom


# Seeds ---------------------------------------------------------------------------------------


def seeded_run(sampler: Sampler, row: torch.Tensor, seed: int, steps: int, batch_with: int = 0) -> list[int]:
    """A seeded request's tokens over `steps` steps, optionally in a batch with other rows."""
    req = Req(SamplingParams(seed=seed, temperature=1.0))
    others = random_logits(batch_with, row.shape[0], seed=99)
    other_reqs = [Req(SamplingParams(seed=1000 + i if i % 2 else None)) for i in range(batch_with)]
    for _ in range(steps):
        position = len(req.output_token_ids) % (batch_with + 1)  # move around the batch
        logits = torch.cat([others[:position], row[None], others[position:]])
        out = sampler(logits, [*other_reqs[:position], req, *other_reqs[position:]])
        req.output_token_ids.append(out.token_ids[position])
    return req.output_token_ids


def test_seeded_row_is_independent_of_batch_and_sampler() -> None:
    row = torch.zeros(1000)  # uniform: every draw is all noise
    alone = seeded_run(Sampler(seed=0), row, seed=42, steps=25)
    assert seeded_run(Sampler(seed=0), row, seed=42, steps=25, batch_with=5) == alone
    assert seeded_run(Sampler(seed=123), row, seed=42, steps=25, batch_with=2) == alone
    assert len(set(alone)) > 20


def test_different_seeds_differ() -> None:
    row = torch.zeros(1000)
    runs = {tuple(seeded_run(Sampler(), row, seed=s, steps=10)) for s in (0, 1, 2, -1, 2**40)}
    assert len(runs) == 5


def test_seeded_draw_depends_on_the_step_only() -> None:
    # Recomputing a preempted request redraws the same token for the same number of outputs.
    logits = torch.zeros(1, 1000)
    first = Req(SamplingParams(seed=7), output_token_ids=[1, 2, 3])
    again = Req(SamplingParams(seed=7), output_token_ids=[9, 9, 9])
    later = Req(SamplingParams(seed=7), output_token_ids=[1, 2, 3, 4])
    sampler = Sampler()
    assert sampler(logits, [first]).token_ids == sampler(logits, [again]).token_ids
    assert sampler(logits, [first]).token_ids != sampler(logits, [later]).token_ids


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    logits = torch.zeros(50, 1000)
    assert Sampler(seed=3)(logits, reqs(50)).token_ids == Sampler(seed=3)(logits, reqs(50)).token_ids
    assert Sampler(seed=3)(logits, reqs(50)).token_ids != Sampler(seed=4)(logits, reqs(50)).token_ids


# Logit processing ----------------------------------------------------------------------------

LOGITS = [1.0, -1.0, 2.0, -0.5, 0.3, 0.0]


def test_penalties_and_bias_match_hand_computed_reference() -> None:
    params = SamplingParams(
        repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, logit_bias={0: 1.0, "4": -0.3}
    )
    req = Req(params, prompt_token_ids=[0, 1], output_token_ids=[1, 2, 2])
    plain = Req(SamplingParams())
    logits = torch.tensor([LOGITS, LOGITS])
    out = processed(logits, [req, plain])
    # bias first: token 0 -> 2.0, token 4 -> 0.0; then repetition over prompt + output {0, 1, 2}:
    # 2.0 / 2, -1.0 * 2, 2.0 / 2; then token 1 (once) -= 0.5 + 0.25, token 2 (twice) -= 1.0 + 0.25.
    expected = [1.0, -2.75, -0.25, -0.5, 0.0, 0.0]
    assert out[0].tolist() == pytest.approx(expected)
    assert out[1].tolist() == pytest.approx(LOGITS)
    assert logits[0].tolist() == pytest.approx(LOGITS)  # the caller's tensor is unchanged


def test_frequency_and_presence_ignore_prompt_tokens() -> None:
    req = Req(SamplingParams(frequency_penalty=1.0, presence_penalty=1.0), prompt_token_ids=[0, 2, 3])
    assert processed(torch.tensor([LOGITS]), [req])[0].tolist() == pytest.approx(LOGITS)


def test_negative_penalties_reward_repeats() -> None:
    req = Req(SamplingParams(frequency_penalty=-1.0, presence_penalty=-0.5), output_token_ids=[3, 3])
    expected = list(LOGITS)
    expected[3] += 2 * 1.0 + 0.5
    assert processed(torch.tensor([LOGITS]), [req])[0].tolist() == pytest.approx(expected)


def test_logit_bias_steers_greedy_choice() -> None:
    logits = torch.tensor([LOGITS])
    assert Sampler()(logits, [Req(SamplingParams(temperature=0, logit_bias={5: 100}))]).token_ids == [5]


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0, 3.0]])  # 2 = EOS and 3 = stop id lead
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3])
    eos = frozenset({2})
    sample = Sampler()
    assert sample(logits, [Req(params, output_token_ids=[1], eos_token_ids=eos)]).token_ids == [4]
    assert sample(logits, [Req(params, output_token_ids=[1, 1], eos_token_ids=eos)]).token_ids == [2]
    ignore = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3], ignore_eos=True)
    assert sample(logits, [Req(ignore, output_token_ids=[1], eos_token_ids=eos)]).token_ids == [2]


def test_num_generated_counts_tokens_still_in_flight() -> None:
    """With a step in flight a request's output_token_ids lag: min_tokens and seeds go by the count
    the engine passes, and match a request whose tokens are all known."""
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0, 3.0]])
    eos_first = Req(SamplingParams(temperature=0.0, min_tokens=2), output_token_ids=[1], eos_token_ids=frozenset({2}))
    sampler = Sampler()
    assert sampler.sample(logits, [eos_first], num_generated=[1]).token_ids.tolist() == [3]
    assert sampler.sample(logits, [eos_first], num_generated=[2]).token_ids.tolist() == [2]
    row = random_logits(1, 1000, seed=4, scale=0.1)
    lagging = Req(SamplingParams(seed=11, temperature=1.0), output_token_ids=[7])
    known = Req(SamplingParams(seed=11, temperature=1.0), output_token_ids=[7, 8, 9])
    assert sampler.sample(row, [lagging], num_generated=[3]).token_ids.tolist() == sampler(row, [known]).token_ids
    assert sampler.sample(row, [lagging]).token_ids.tolist() != sampler(row, [known]).token_ids


def test_min_tokens_masked_tokens_are_never_sampled() -> None:
    logits = torch.tensor([[3.0, 3.0, 0.0]]).expand(2000, -1)
    requests = [Req(SamplingParams(min_tokens=1), eos_token_ids=frozenset({0})) for _ in range(2000)]
    assert set(Sampler()(logits, requests).token_ids) == {1, 2}


# Logprobs ------------------------------------------------------------------------------------


def _processed_with_temperature(logits: torch.Tensor, requests: list[Req]) -> torch.Tensor:
    """What rows sample from: processed, divided by temperature (1 for greedy rows), filtered."""
    params = [r.sampling_params for r in requests]
    temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params])
    return filter_top_k_top_p_min_p(processed(logits, requests) / temperature[:, None], params)


@pytest.mark.parametrize("mode, reference", [
    ("raw_logprobs", lambda logits, requests: torch.log_softmax(logits, dim=-1)),  # vLLM's default
    ("raw_logits", lambda logits, requests: logits),
    ("processed_logprobs", lambda logits, requests: torch.log_softmax(_processed_with_temperature(logits, requests), -1)),
    ("processed_logits", _processed_with_temperature),
])
def test_logprobs_follow_the_logprobs_mode(mode, reference) -> None:
    logits = random_logits(6, 40, seed=7)
    requests = [
        Req(SamplingParams(temperature=0.5, logprobs=3, presence_penalty=1.0), output_token_ids=[1, 2]),
        Req(SamplingParams(temperature=0.0, logprobs=0)),
        Req(SamplingParams(temperature=2.0, top_k=5, logprobs=5, logit_bias={7: 3.0})),
        Req(SamplingParams(temperature=1.0)),
        Req(SamplingParams(temperature=0.0)),
        Req(SamplingParams(temperature=1.0, logprobs=20, seed=3)),
    ]
    out = Sampler(logprobs_mode=mode)(logits, requests)
    reference = reference(logits, requests)
    for row, (token, top, req) in enumerate(zip(out.token_ids, out.top_logprobs, requests)):
        k = req.sampling_params.logprobs
        if k is None:
            assert top is None
            continue
        assert top.token_ids[0] == token and len(top.token_ids) == len(top.logprobs) == len(top.ranks) == k + 1
        assert top.logprobs[0] == pytest.approx(reference[row, token].item(), abs=1e-5)
        assert top.token_ids[1:] == reference[row].topk(k).indices.tolist()
        assert top.logprobs == pytest.approx(reference[row, top.token_ids].tolist(), abs=1e-5)
        assert top.ranks[0] == int((reference[row] > reference[row, token]).sum()) + 1
        assert top.ranks[1:] == list(range(1, k + 1))
    if mode.startswith("processed"):
        assert out.top_logprobs[1].ranks == [1]  # greedy: the chosen token is the most likely


def test_gather_top_logprobs_hand_example() -> None:
    logprobs = torch.log_softmax(torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]]), dim=-1)
    rows = gather_top_logprobs(logprobs, torch.tensor([2, 0]), k=2)
    assert [r.token_ids for r in rows] == [[2, 1, 2], [0, 2, 3]]
    assert [r.ranks for r in rows] == [[2, 1, 2], [3, 1, 2]]
    assert rows[0].logprobs == pytest.approx(logprobs[0, [2, 1, 2]].tolist())
    only_chosen = gather_top_logprobs(logprobs, torch.tensor([3, 3]), k=0)
    assert only_chosen == [
        TopLogprobs([3], [logprobs[0, 3].item()], [4]),
        TopLogprobs([3], [logprobs[1, 3].item()], [2]),
    ]


# The partial sort --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row_params, partial",
    [
        ([dict(top_k=5)] * 4, True),
        ([dict(top_p=0.3)] * 4, True),
        ([dict(min_p=0.5)] * 4, True),
        ([dict(top_k=40, top_p=0.2), dict(top_p=0.25, min_p=0.1), {}, dict(top_k=3)], True),  # one row filters nothing
        ([dict(top_p=0.3), dict(top_p=0.999)], False),  # a nucleus beyond the candidates: the whole sort
        ([dict(top_k=40)] * 2, True),  # a top-k beyond the candidates widens them
        ([dict(top_k=100_000, top_p=0.3), dict(top_k=100_000)], True),  # a top-k beyond the vocabulary: all of it
        ([dict(top_k=100_000, top_p=0.999)], False),
    ],
)
def test_the_best_candidates_filter_as_sorting_the_whole_row_does(monkeypatch, row_params, partial) -> None:
    import pagoda.sample.sampler as sampler_module
    from pagoda.sample.sampler import filter_top_k_top_p_min_p

    logits = random_logits(len(row_params), 300, seed=8, scale=2.5)
    params = [SamplingParams(temperature=1.0, **p) for p in row_params]
    whole_sort = sorted_filter(logits, params)
    among_the_best = sampler_module._filter_among_the_best
    taken = []
    monkeypatch.setattr(sampler_module, "_filter_among_the_best", lambda *args: taken.append(among_the_best(*args)) or taken[-1])
    monkeypatch.setattr(sampler_module, "_CANDIDATES", 16)
    assert torch.equal(filter_top_k_top_p_min_p(logits, params), whole_sort)
    assert (taken[0] is not None) == partial
    assert bool(torch.isinf(whole_sort).any())


def sorted_filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-k, then top-p and min-p over the distribution cut to it, from whole sorted rows."""
    out = logits.clone()
    for row, p in zip(out, params):
        ranked, order = row.sort(descending=True)
        top_k = p.top_k if p.top_k > 0 else len(row)
        probs = torch.softmax(ranked[:top_k], dim=-1)
        mass_above = probs.cumsum(0) - probs
        keep = (mass_above < p.top_p) & (probs >= p.min_p * probs[0])
        keep[0] = True
        row[order[top_k:]] = float("-inf")
        row[order[:top_k][~keep]] = float("-inf")
    return out


def test_sampling_among_the_best_keeps_exactly_the_nucleus(monkeypatch) -> None:
    import pagoda.sample.sampler as sampler_module

    monkeypatch.setattr(sampler_module, "_CANDIDATES", 8)
    row = random_logits(1, 300, seed=4, scale=2.5)[0]
    temperature, top_p = 0.8, 0.6
    kept = nucleus(row, temperature, top_p)
    assert 1 < len(kept) <= 8
    tokens = draw(row, 4000, temperature=temperature, top_p=top_p)
    assert set(tokens.tolist()) == kept


def test_the_logprobs_mode_is_vllms_flag_and_reaches_the_sampler(tmp_path) -> None:
    args = build_parser().parse_args(["serve", "m", "--logprobs-mode", "processed_logits"])
    assert EngineConfig(**engine_kwargs(args)).logprobs_mode == "processed_logits"
    assert EngineConfig().logprobs_mode == "raw_logprobs"  # vLLM's default
    with pytest.raises(ValueError, match="logprobs_mode='logits' is invalid"):
        EngineConfig(logprobs_mode="logits")
    llm = LLM(model=str(save_tiny_model("llama3", tmp_path)), device="cpu", skip_tokenizer_init=True,
              max_model_len=64, logprobs_mode="raw_logits")
    assert llm.llm_engine.engine_core.engine_core.executor.worker.runner.sampler.logprobs_mode == "raw_logits"


def test_a_masked_tokens_logprob_is_written_as_vllms_floor() -> None:
    """-inf (a token filtered out) is no JSON number: the responses carry -9999.0, as vLLM's."""
    logprobs = CompletionLogprobs()
    logprobs.token_logprobs.extend([float("-inf"), None, -1.5])
    logprobs.top_logprobs.append({"a": float("-inf")})
    assert '"token_logprobs":[-9999.0,null,-1.5]' in logprobs.model_dump_json()
    assert '{"a":-9999.0}' in logprobs.model_dump_json()
    chat = TokenLogprob(token="x", logprob=float("-inf"), top_logprobs=[TopLogprob(token="y", logprob=float("-inf"))])
    assert chat.model_dump_json().count("-9999.0") == 2
