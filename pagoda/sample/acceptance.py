"""Which of a step's draft tokens hold: the tokens a multi-token step yields for one request.

A step that verifies k drafts samples k + 1 positions: the request's last known token and each
draft, every position from the target model's own (processed) distribution, each with the noise
that one-token-at-a-time sampling would draw there (a seeded row's noise depends on its seed and
step only). A draft is accepted while it equals the token sampled at the position before it; the
first mismatch contributes the sampled token and ends the list; if all k hold, the token sampled
after the last draft (the bonus token) is appended.

This is exact (lossless): every token emitted is the target's own sample at its position, drawn
with a prefix that equals the true one (the drafts before it were accepted, so they are the
tokens that position would have seen); drafts only decide how far one step gets. For
deterministic (one-hot) drafts, such as n-gram or greedy draft-model proposals, it also accepts
exactly as often as speculative rejection sampling (probability p(draft)) and, on rejection,
emits a token distributed as p without the draft, just as that rule does. For drafts given with
the distribution q they were drawn from, the rows' tokens come from rejection sampling against q
(pagoda/sample/rejection.py): a row's token is its draft where accepted, else a residual sample,
so the same rule below reads them."""

from __future__ import annotations


def accept_drafts(draft_token_ids: list[int], sampled: list[int]) -> list[int]:
    """sampled[i]: the token sampled at the position of draft i's predecessor (len(drafts) + 1 of
    them). Returns the accepted drafts, then one sampled token."""
    for i, draft in enumerate(draft_token_ids):
        if draft != sampled[i]:
            return sampled[: i + 1]
    return sampled
