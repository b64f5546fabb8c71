"""Batched sampling over one step's logits: logit bias, min_tokens, penalties, then greedy or
temperature / top-k / top-p / min-p sampling, and logprobs from the same processed logits.

Everything is tensor work over the batch; the only host sync is reading the results. Sampling
uses the exponential race (argmax of probs / Exp(1) noise), so a seeded request can draw its
noise from its own generator, seeded from (seed, tokens generated so far): its tokens then
depend on nothing else in the batch, and recomputation after preemption draws the same."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from pagoda.sampling_params import SamplingParams

_MASK = float("-inf")


class SamplingRequest(Protocol):
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int]


@dataclass
class TopLogprobs:
    """One position: the chosen token first, then the top-k, with their 1-based vocabulary ranks."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[TopLogprobs | None]


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, requests: Sequence[SamplingRequest]) -> SamplerOutput:
        logits = process_logits(logits.float(), requests)
        logprobs = torch.log_softmax(logits, dim=-1)
        params = [r.sampling_params for r in requests]
        if all(p.is_greedy for p in params):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, requests)
        chosen_logprobs = logprobs.gather(1, tokens[:, None])[:, 0]
        k = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        tops = gather_top_logprobs(logprobs, tokens, k) if k is not None else None
        token_list = tokens.tolist()
        return SamplerOutput(
            token_ids=token_list,
            logprobs=chosen_logprobs.tolist(),
            top_logprobs=[
                _trim(tops[i], p.logprobs) if tops is not None and p.logprobs is not None else None
                for i, p in enumerate(params)
            ],
        )

    def _sample(self, logits: torch.Tensor, requests: Sequence[SamplingRequest]) -> torch.Tensor:
        params = [r.sampling_params for r in requests]
        device = logits.device
        greedy = torch.tensor([p.is_greedy for p in params], device=device)
        temperature = torch.tensor([1.0 if p.is_greedy else p.temperature for p in params], device=device)
        probs = torch.softmax(filter_top_k_top_p_min_p(logits / temperature[:, None], params), dim=-1)
        noise = self._exponential_noise(probs, requests)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    def _exponential_noise(self, probs: torch.Tensor, requests: Sequence[SamplingRequest]) -> torch.Tensor:
        device = probs.device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        noise = torch.empty_like(probs).exponential_(generator=self._generators[device])
        for row, req in enumerate(requests):
            seed = req.sampling_params.seed
            if seed is not None:
                step_seed = hash((seed, len(req.output_token_ids))) & 0x7FFF_FFFF_FFFF_FFFF
                generator = torch.Generator(device=device).manual_seed(step_seed)
                noise[row].exponential_(generator=generator)
        return noise


def process_logits(logits: torch.Tensor, requests: Sequence[SamplingRequest]) -> torch.Tensor:
    """Logit bias, min_tokens masking and penalties, in place on a float32 copy."""
    for row, req in enumerate(requests):
        p = req.sampling_params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            valid = ids < logits.shape[1]
            values = torch.tensor(list(p.logit_bias.values()), device=logits.device)
            logits[row, ids[valid]] += values[valid]
        if len(req.output_token_ids) < p.min_tokens:
            stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(req.eos_token_ids))
            if stop_ids:
                logits[row, torch.tensor(sorted(stop_ids), device=logits.device)] = _MASK
    _apply_penalties(logits, requests)
    return logits


def _apply_penalties(logits: torch.Tensor, requests: Sequence[SamplingRequest]) -> None:
    rows = [
        i for i, r in enumerate(requests)
        if r.sampling_params.repetition_penalty != 1.0
        or r.sampling_params.presence_penalty != 0.0
        or r.sampling_params.frequency_penalty != 0.0
    ]
    if not rows:
        return
    device, vocab = logits.device, logits.shape[1]
    for row in rows:
        req, p = requests[row], requests[row].sampling_params
        output = torch.tensor(req.output_token_ids, dtype=torch.int64, device=device)
        counts = torch.zeros(vocab, device=device).scatter_add_(0, output, torch.ones_like(output, dtype=torch.float32))
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            prompt = torch.tensor(req.prompt_token_ids, dtype=torch.int64, device=device)
            seen[prompt] = True
            penalised = torch.where(logits[row] > 0, logits[row] / p.repetition_penalty,
                                    logits[row] * p.repetition_penalty)
            logits[row] = torch.where(seen, penalised, logits[row])
        logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def filter_top_k_top_p_min_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Mask to -inf every token outside each row's top-k, nucleus (top-p) and min-p set."""
    vocab = logits.shape[1]
    top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    if min(top_k) >= vocab and min(top_p) >= 1.0 and max(min_p) <= 0.0:
        return logits
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    position = torch.arange(vocab, device=device)[None, :]
    drop = position >= torch.tensor(top_k, device=device)[:, None]
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, _MASK), dim=-1)
    # Nucleus: drop a token once the mass before it already reaches top_p (the top one always stays).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= mass_before >= torch.tensor(top_p, device=device)[:, None]
    drop |= sorted_probs < torch.tensor(min_p, device=device)[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False
    mask = torch.zeros_like(drop).scatter_(1, order, drop)
    return logits.masked_fill(mask, _MASK)


def gather_top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TopLogprobs]:
    """Per row: the chosen token's logprob and rank, then the k most likely tokens."""
    chosen = chosen.to(logprobs.device)
    chosen_lp = logprobs.gather(1, chosen[:, None])
    ranks = (logprobs > chosen_lp).sum(dim=-1) + 1
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], chosen[:, None][:, :0])
    rows = zip(chosen.tolist(), chosen_lp[:, 0].tolist(), ranks.tolist(), top_ids.tolist(), top_lp.tolist())
    return [
        TopLogprobs(
            token_ids=[c, *ids],
            logprobs=[lp, *lps],
            ranks=[rank, *range(1, len(ids) + 1)],
        )
        for c, lp, rank, ids, lps in rows
    ]


def _trim(top: TopLogprobs, k: int) -> TopLogprobs:
    return TopLogprobs(top.token_ids[: k + 1], top.logprobs[: k + 1], top.ranks[: k + 1])
