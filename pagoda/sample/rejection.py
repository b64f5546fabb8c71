"""Speculative rejection sampling over a step's sample rows, batched on the device (vLLM's strict
rule): a draft x drawn from the proposer's distribution q is accepted with probability
min(1, p(x) / q(x)) under the target's distribution p at its position; at the first rejection
the token is drawn from the residual normalize(max(0, p - q)); a row with no draft to verify
(after the last draft: the bonus token) samples from p. The emitted tokens are then distributed
exactly as the target's own samples, whatever q is.

Every draw comes from the row's Exp(1) noise (the sampler's, seeded per (seed, step)): the
acceptance uniform is 1 - exp(-noise[x]) and the residual is sampled by the exponential race
argmax(residual / noise). They are independent where it matters: a rejection needs p(x) < q(x),
which leaves residual[x] = 0, so the race never reads noise[x].

A proposer with no distribution (n-gram, greedy drafts) has a one-hot q: accept with probability
p(x), resample from p without x. The race argmax(p / noise) alone does exactly that (it equals x
with probability p(x), and is otherwise distributed as p less x), so those rows sample as if
there were no draft at all: a seeded request gives the same tokens with speculation on and off.
Which drafts hold, given the rows' tokens, is pagoda/sample/acceptance.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftDistributions:
    """The drafts that a step's sample rows verify, with the distributions they were drawn from."""

    token_ids: torch.Tensor  # [rows] int64: the draft row r verifies, -1 where none (bonus rows)
    probs: torch.Tensor  # [rows, vocab] float32: q at each row (any values where token_ids is -1)


def rejection_sample(
    probs: torch.Tensor, noise: torch.Tensor, drafts: DraftDistributions | None = None
) -> torch.Tensor:
    """[rows] int64: per sample row, its draft where accepted, else a token from the residual (from
    probs where the row verifies no draft). probs: the target's [rows, vocab] distribution; noise:
    [rows, vocab] Exp(1), positive; drafts None: one-hot q (or no drafts)."""
    race = (probs / noise).argmax(dim=-1)
    if drafts is None:
        return race
    has_draft = drafts.token_ids >= 0
    x = drafts.token_ids.clamp_min(0)[:, None]
    p_x = probs.gather(1, x)[:, 0]
    q_x = drafts.probs.gather(1, x)[:, 0]
    uniform = -torch.expm1(-noise.gather(1, x)[:, 0])
    accepted = has_draft & (uniform * q_x < p_x)
    recovered = (residual(probs, drafts.probs).scatter(1, x, 0.0) / noise).argmax(dim=-1)
    return torch.where(accepted, x[:, 0], torch.where(has_draft, recovered, race))


def residual(probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """max(0, p - q), unnormalised: the race samples it as its normalised distribution."""
    return (probs - draft_probs).clamp_min(0.0)
