"""Lossless acceptance of deterministic drafts (n-gram): the tokens a verifying step emits follow the
target distribution exactly, as strict rejection sampling's do (accept draft t with probability
p(t), else a token of p without t, renormalized). Each position is sampled as one-token-at-a-time
sampling would sample it (sample/sampler.py, one batch over every position of every request) and
the drafts are kept while they equal those samples (sample/acceptance.py). A statistical test on a
vocabulary of 5 with fixed seeds: enough samples to catch a wrong residual."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import torch

from pagoda.sample.acceptance import accept_drafts
from pagoda.sample.sampler import Sampler
from pagoda.sampling_params import SamplingParams

# Target distributions at the three positions a step with two drafts samples (they do not depend on
# the prefix here, as the test fixes the logits), and the drafts: the likeliest token, then a rare one.
TARGET = torch.tensor([[0.40, 0.25, 0.15, 0.12, 0.08], [0.05, 0.10, 0.50, 0.20, 0.15], [0.2] * 5])
DRAFTS = [0, 1]
NUM_SAMPLES = 20_000
# The chi-square statistic's 0.999 quantiles with 4 degrees of freedom (5 tokens) and 3 (the residual's 4).
CHI2_CRITICAL, CHI2_CRITICAL_3 = 18.47, 16.27


def _verify(num_samples: int, temperature: float = 1.0) -> list[list[int]]:
    """Each sample: one step verifying DRAFTS, as the model runner batches it (a row per position,
    a seeded request's position i sampled as its output token i)."""
    logits = (TARGET.log() * temperature).repeat(num_samples, 1)
    positions = len(DRAFTS) + 1
    rows = [SimpleNamespace(sampling_params=SamplingParams(temperature=temperature, seed=s), prompt_token_ids=[0],
                            output_token_ids=[], eos_token_ids=frozenset())
            for s in range(num_samples) for _ in range(positions)]
    sampled = Sampler().sample(logits, rows, [i % positions for i in range(len(rows))]).token_ids.tolist()
    return [accept_drafts(DRAFTS, sampled[i : i + positions]) for i in range(0, len(sampled), positions)]


def _chi2(tokens: list[int], target: torch.Tensor) -> float:
    """Pearson's statistic of the tokens' counts against the target (tokens of probability 0 must not occur)."""
    counts = Counter(tokens)
    assert all(target[t] > 0 for t in counts)
    expected = (target * len(tokens)).tolist()
    return sum((counts[t] - e) ** 2 / e for t, e in enumerate(expected) if e > 0)


def test_emitted_tokens_follow_the_target_distribution_at_each_position():
    emitted = _verify(NUM_SAMPLES)
    first = [tokens[0] for tokens in emitted]
    assert _chi2(first, TARGET[0]) < CHI2_CRITICAL
    # Given the first draft held, the second token is the target's at position 1, whether the
    # second draft held or the residual gave it; given both held, the bonus token is position 2's.
    second = [tokens[1] for tokens in emitted if tokens[0] == DRAFTS[0]]
    assert _chi2(second, TARGET[1]) < CHI2_CRITICAL
    bonus = [tokens[2] for tokens in emitted if tokens[:2] == DRAFTS]
    assert len(bonus) > 300 and _chi2(bonus, TARGET[2]) < CHI2_CRITICAL


def test_drafts_are_accepted_with_the_target_probability_of_the_draft():
    emitted = _verify(NUM_SAMPLES)
    accepted_first = sum(tokens[0] == DRAFTS[0] for tokens in emitted) / NUM_SAMPLES
    # Binomial standard error at 20k samples: ~0.0035.
    assert abs(accepted_first - TARGET[0, DRAFTS[0]].item()) < 0.015
    rejected = [tokens[0] for tokens in emitted if tokens[0] != DRAFTS[0]]
    # The residual: p without the draft, renormalized.
    residual = TARGET[0].clone()
    residual[DRAFTS[0]] = 0
    assert _chi2(rejected, residual / residual.sum()) < CHI2_CRITICAL_3


def test_seeded_verification_is_reproducible():
    assert _verify(200) == _verify(200)


def test_temperature_is_applied_before_acceptance():
    # logits = log(p) * T, sampled at temperature T: the same target again.
    first = [tokens[0] for tokens in _verify(NUM_SAMPLES, temperature=0.5)]
    assert _chi2(first, TARGET[0]) < CHI2_CRITICAL
