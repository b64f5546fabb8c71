"""The rejection sampler (pagoda/sample/rejection.py) on a small vocabulary, with a fixed seed:
the tokens a verification step emits are distributed as the target's own samples (chi-square
against p, with enough samples that a wrong residual fails the same test), drafts are accepted
as often as min(1, p/q) says, and the same noise gives the same tokens."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pagoda.sample import rejection
from pagoda.sample.rejection import DraftDistributions, rejection_sample

N = 200_000  # verification steps drawn
# Target and draft distributions that disagree a lot (total variation 0.45), per position.
P = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04],
                  [0.05, 0.10, 0.50, 0.05, 0.20, 0.10],
                  [0.30, 0.05, 0.05, 0.30, 0.20, 0.10]])
Q = torch.tensor([[0.05, 0.10, 0.15, 0.30, 0.20, 0.20],
                  [0.30, 0.30, 0.10, 0.10, 0.10, 0.10]])
K = Q.shape[0]  # drafts per step; row K is the bonus row
SIGNIFICANCE = 1e-3


def _verify(seed: int = 0, one_hot: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """N steps of K drafts drawn from Q (one per position): (drafts [N, K], row tokens [N, K + 1])."""
    gen = torch.Generator().manual_seed(seed)
    drafts = torch.stack([torch.multinomial(Q[i], N, replacement=True, generator=gen) for i in range(K)], dim=1)
    probs = P.repeat(N, 1)
    noise = torch.empty(probs.shape).exponential_(generator=gen)
    draft_ids = torch.cat([drafts, torch.full((N, 1), -1)], dim=1).reshape(-1)
    q = torch.cat([Q, torch.zeros(1, P.shape[1])]).repeat(N, 1)
    distributions = None if one_hot else DraftDistributions(draft_ids, q)
    return drafts, rejection_sample(probs, noise, distributions).reshape(N, K + 1)


def _emitted(drafts: torch.Tensor, rows: torch.Tensor) -> list[torch.Tensor]:
    """Per position i: the tokens emitted there in the steps that got that far (drafts 0..i-1 held)."""
    held = torch.cat([torch.ones(N, 1, dtype=torch.bool), (rows[:, :K] == drafts).cumprod(dim=1).bool()], dim=1)
    return [rows[held[:, i], i] for i in range(K + 1)]


def _p_value(tokens: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=len(p)).double()
    expected = p.double() * counts.sum()
    statistic = ((counts - expected) ** 2 / expected).sum()
    # The chi-square distribution's survival function with len(p) - 1 degrees of freedom.
    return float(torch.special.gammaincc(torch.tensor((len(p) - 1) / 2.0), statistic / 2))


def _every_position_follows_p(drafts: torch.Tensor, rows: torch.Tensor) -> list[float]:
    return [_p_value(tokens, P[i]) for i, tokens in enumerate(_emitted(drafts, rows))]


@pytest.mark.parametrize("one_hot", [False, True], ids=["draft-distributions", "one-hot-drafts"])
def test_emitted_tokens_follow_the_target_distribution_at_every_position(one_hot):
    p_values = _every_position_follows_p(*_verify(one_hot=one_hot))
    assert min(p_values) > SIGNIFICANCE, p_values


@pytest.mark.parametrize("wrong_residual", [
    lambda p, q: p,  # resample from p itself: the accepted mass is counted twice
    lambda p, q: (q - p).clamp_min(0.0),  # the residual the wrong way round
    lambda p, q: (p - q).abs(),
], ids=["p", "q-minus-p", "abs"])
def test_a_wrong_residual_fails_the_same_test(monkeypatch, wrong_residual: Callable):
    monkeypatch.setattr(rejection, "residual", wrong_residual)
    p_values = _every_position_follows_p(*_verify())
    assert min(p_values) < SIGNIFICANCE, p_values


def test_drafts_are_accepted_with_probability_min_of_one_and_p_over_q():
    drafts, rows = _verify(seed=1)
    accepted_first = (rows[:, 0] == drafts[:, 0]).double().mean()
    expected = torch.minimum(P[0], Q[0]).sum()  # E_q[min(1, p/q)]
    assert abs(float(accepted_first) - float(expected)) < 4 * (0.25 / N) ** 0.5


def test_one_hot_drafts_are_accepted_with_probability_p():
    drafts, rows = _verify(seed=2, one_hot=True)
    accepted_first = (rows[:, 0] == drafts[:, 0]).double().mean()
    expected = (Q[0] * P[0]).sum()  # the draft x ~ Q, accepted with p(x)
    assert abs(float(accepted_first) - float(expected)) < 4 * (0.25 / N) ** 0.5


def test_the_same_noise_gives_the_same_tokens():
    assert torch.equal(_verify(seed=3)[1], _verify(seed=3)[1])
    assert not torch.equal(_verify(seed=3)[1], _verify(seed=4)[1])


def test_the_sampler_verifies_rows_against_their_draft_distributions():
    """Through Sampler.sample: a draft x with p(x) >= q(x) is always accepted (the race alone
    would pick x only with probability p(x)); a row without a draft samples from p."""
    from types import SimpleNamespace

    from pagoda.sample.sampler import Sampler
    from pagoda.sampling_params import SamplingParams

    rows = 400
    requests = [SimpleNamespace(sampling_params=SamplingParams(temperature=1.0, seed=i), prompt_token_ids=[1],
                                output_token_ids=[], eos_token_ids=frozenset()) for i in range(rows)]
    logits = P[0].log().repeat(rows, 1)  # p(0) = 0.4
    q = torch.zeros(rows, P.shape[1])
    q[:, 0] = 0.3
    q[:, 1] = 0.7
    draft_ids = torch.where(torch.arange(rows) % 2 == 0, 0, -1)  # even rows verify draft 0, odd rows none
    tokens = Sampler().sample(logits, requests, drafts=DraftDistributions(draft_ids, q)).token_ids
    assert bool((tokens[0::2] == 0).all())
    assert 0.25 < float((tokens[1::2] == 0).double().mean()) < 0.55
