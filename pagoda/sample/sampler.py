"""Batched sampling over one step's logits.

Order: allowed_token_ids masking, logit_bias, min_tokens and bad_words masking, repetition penalty, frequency and presence penalties;
then greedy rows take the argmax and the others are divided by their temperature, filtered by
top-k, top-p and min-p, and sampled. Logprobs are of the model's logits as they came (vLLM's
default logprobs mode, raw_logprobs) or of the processed ones (processed_logprobs: after all of
the above, temperature and filters included), or those logits themselves (raw_logits,
processed_logits). On a GPU, a batch of greedy rows that ask for no top logprobs takes the argmax
and its logprob in one pass over the logits (pagoda/kernels/sampling.py). All of it is tensor work
over the batch; Python loops over rows only build index lists and seeds on the host.

Sampling is the exponential race, argmax(probs / Exp(1) noise), so each seeded row can draw its
own noise from a seed made of (seed, tokens generated so far): its tokens depend on nothing else
in the batch, and recomputation after preemption draws them again. The GPU draws every row's noise
in one kernel from per-row seeds. The CPU, where noise over the whole vocabulary is slow to draw,
inverts each row's cumulative distribution at one uniform number drawn the same way (a torch
generator per seeded row); rows that verify drafts with their distributions race on both devices.

`Sampler.sample` leaves its results on the device, so that the engine can queue the next step
before reading them; `PendingSamples` reads them back without waiting for later work."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from pagoda.host_to_device import to_device
from pagoda.sample.rejection import DraftDistributions, rejection_sample
from pagoda.sample.top_logprobs import TopLogprobs
from pagoda.sampling_params import SamplingParams

_MASK = float("-inf")
# How many of a row's best tokens top-k / top-p / min-p look among before sorting the whole row.
_CANDIDATES = 1024
_U64 = 2**64 - 1
_I63 = 2**63 - 1  # what an int64 seed tensor holds


class SamplingRequest(Protocol):
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int]


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    top_logprobs: list[TopLogprobs | None]  # None where params.logprobs is None


@dataclass
class DeviceSamples:
    """One step's samples on the logits' device; top logprobs, when asked for, already read."""

    token_ids: torch.Tensor  # [rows] int64
    top_logprobs: list[TopLogprobs | None]


class PendingSamples:
    """Samples on their way to the host: the copy is queued behind the step's kernels, and
    `result` waits for that copy alone, not for whatever the device was given after it."""

    def __init__(self, samples: DeviceSamples) -> None:
        self.top_logprobs = samples.top_logprobs
        tokens = samples.token_ids
        self._event: torch.cuda.Event | None = None
        if tokens.device.type == "cuda":
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tokens

    def result(self) -> SamplerOutput:
        if self._event is not None:
            self._event.synchronize()
        return SamplerOutput(self._host.tolist(), self.top_logprobs)


@dataclass
class _WarmUpRequest:
    sampling_params: SamplingParams
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    eos_token_ids: frozenset[int] = frozenset()


def warm_up_sampling(logits: torch.Tensor) -> None:
    """Sample a row of `logits` greedily and one at random, so that the device's sampling kernels
    are compiled (or loaded from Triton's cache) at start-up: in a run's first step they cost
    ~0.8 s of a fresh machine's GPU time (W1 on the H200). A sampler of its own: the engine's
    shared generator is left as it was."""
    sampler = Sampler()
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.9)):
        PendingSamples(sampler.sample(logits[:1], [_WarmUpRequest(params)])).result()


class Sampler:
    def __init__(self, seed: int = 0, logprobs_mode: str = "raw_logprobs") -> None:
        """logprobs_mode: what logprobs hold (--logprobs-mode, module docstring)."""
        self.seed = seed
        self.logprobs_mode = logprobs_mode
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, requests: Sequence[SamplingRequest]) -> SamplerOutput:
        """Sample and read the results; logits: [len(requests), vocab], any float dtype and device."""
        return PendingSamples(self.sample(logits, requests)).result()

    def sample(
        self, logits: torch.Tensor, requests: Sequence[SamplingRequest], num_generated: Sequence[int] | None = None,
        drafts: DraftDistributions | None = None,
    ) -> DeviceSamples:
        """Sample one token per row, leaving the results on the device; the caller's logits are not
        changed. num_generated: the output tokens each row has before this one (default: as many as
        its output_token_ids), for min_tokens and seeds while earlier samples are still in flight.
        drafts: the drafts the rows verify with their proposer's distributions, for rejection
        sampling (sample/rejection.py); None for drafts with none (one-hot), or no drafts."""
        if num_generated is None:
            num_generated = [len(r.output_token_ids) for r in requests]
        params = [r.sampling_params for r in requests]
        raw, logits = logits, process_logits(logits, requests, num_generated)
        greedy = [_samples_greedily(p) for p in params]
        if all(greedy) and logits.is_cuda and all(p.logprobs is None for p in params):
            from pagoda.kernels.sampling import greedy_sample

            return DeviceSamples(greedy_sample(logits), [None] * len(params))
        logits = logits.float()
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens, logits = self._sample(logits, requests, greedy, num_generated, drafts)
        source = raw if self.logprobs_mode.startswith("raw") else logits
        return _device_samples(source, tokens, params, self.logprobs_mode.endswith("logprobs"))

    def _sample(
        self, logits: torch.Tensor, requests: Sequence[SamplingRequest], greedy: list[bool],
        num_generated: Sequence[int], drafts: DraftDistributions | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples, and the logits they were drawn from (temperature and filters applied;
        greedy rows' temperature 1)."""
        params = [r.sampling_params for r in requests]
        device = logits.device
        temperature = to_device([1.0 if g else p.temperature for g, p in zip(greedy, params)], torch.float32, device)
        filtered = filter_top_k_top_p_min_p(logits / temperature[:, None], params)
        probs = torch.softmax(filtered, dim=-1)
        if device.type == "cpu" and drafts is None:
            sampled = self._inverse_cdf(probs, params, num_generated)
        else:
            sampled = rejection_sample(probs, self._exponential_noise(probs.shape, params, num_generated, device), drafts)
        return torch.where(to_device(greedy, torch.bool, device), logits.argmax(dim=-1), sampled), filtered

    def _inverse_cdf(self, probs: torch.Tensor, params: Sequence[SamplingParams], num_generated: Sequence[int]) -> torch.Tensor:
        """The CPU's draw: one uniform number a row against its cumulative probabilities. The race
        needs a row's noise over the whole vocabulary, which the CPU draws at ~1.2 ms a row (20 ms
        at 16 rows of a 49k vocabulary, a quarter of a step), where the cumulative sum takes 0.03.
        A seeded row's number comes from (seed, tokens generated so far), as its noise did."""
        uniform = torch.empty(len(params))
        if any(p.seed is None for p in params):
            uniform.uniform_(generator=self._shared_generator(probs.device))
        for row, (p, step) in enumerate(zip(params, num_generated)):
            if p.seed is not None:
                uniform[row] = torch.rand((), generator=torch.Generator().manual_seed(_step_seed(p.seed, step)))
        cdf = probs.cumsum(dim=-1)
        # The first token whose cumulative probability exceeds the draw: a token of probability
        # 0 (filtered out) leaves the sum flat, so it is never the first to exceed it.
        tokens = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
        return tokens.clamp_max(probs.shape[1] - 1)

    def _exponential_noise(
        self, shape: torch.Size, params: Sequence[SamplingParams], num_generated: Sequence[int],
        device: torch.device,
    ) -> torch.Tensor:
        if device.type == "cuda":
            return self._seeded_rows_noise(shape, params, num_generated, device)
        noise = torch.empty(shape, device=device)
        if any(p.seed is None for p in params):
            noise.exponential_(generator=self._shared_generator(device))
        for row, (p, step) in enumerate(zip(params, num_generated)):
            if p.seed is not None:
                generator = torch.Generator(device=device).manual_seed(_step_seed(p.seed, step))
                noise[row].exponential_(generator=generator)
        # exponential_ may return exactly 0, and 0 / 0 = NaN would win argmax for a masked token.
        return noise.clamp_min_(torch.finfo(torch.float32).tiny)

    def _seeded_rows_noise(
        self, shape: torch.Size, params: Sequence[SamplingParams], num_generated: Sequence[int],
        device: torch.device,
    ) -> torch.Tensor:
        """The GPU's noise: one kernel over the batch, each row from a seed of its own (a
        request's (seed, step) for seeded rows, a draw of the shared generator for the others)."""
        from pagoda.kernels.sampling import exponential_noise

        seeds = torch.randint(_I63, (shape[0],), generator=self._shared_generator(device), device=device)
        seeded = [(row, _step_seed(p.seed, step) & _I63) for row, (p, step) in enumerate(zip(params, num_generated))
                  if p.seed is not None]
        if seeded:
            rows, values = zip(*seeded)
            seeds.index_copy_(0, to_device(rows, torch.int64, device), to_device(values, torch.int64, device))
        return exponential_noise(seeds, shape[1])

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]


def takes_argmax_only(params: SamplingParams) -> bool:
    """Whether a row reads its logits' argmax alone: greedy, no logprobs of either kind, and
    nothing that changes logits before the argmax (allowed tokens, biases, penalties, min_tokens,
    a grammar)."""
    return (
        _samples_greedily(params) and params.logprobs is None and params.prompt_logprobs is None
        and not params.allowed_token_ids and not params.logit_bias and not params.has_penalties
        and params.min_tokens == 0 and params.structured_outputs is None and not params.bad_words_token_ids
    )


def _samples_greedily(params: SamplingParams) -> bool:
    # top_k=1 is greedy by definition; argmax also settles ties the way greedy rows do.
    return params.is_greedy or params.top_k == 1


def _step_seed(seed: int, num_output_tokens: int) -> int:
    """SplitMix64 of (seed, step): plain arithmetic, unlike hash() stable across Python versions,
    and every bit of the seed reaches the low 32 bits, all that the CPU generator (mt19937) uses.
    The golden-ratio step keeps seeds s and s + 1 (n > 1 children) from sharing streams."""
    z = (seed * 0x9E3779B97F4A7C15 + num_output_tokens) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def process_logits(
    logits: torch.Tensor, requests: Sequence[SamplingRequest], num_generated: Sequence[int]
) -> torch.Tensor:
    """allowed_token_ids, logit_bias, min_tokens and bad_words masking and penalties, in a float32
    copy; the logits themselves when none applies. Penalties and bad words read each row's
    output_token_ids: they must all be known."""
    vocab, device = logits.shape[1], logits.device
    allow_rows, allow_cols = _allowed_entries(requests, vocab)
    bias_rows, bias_cols, bias_values = _logit_bias_entries(requests, vocab)
    ban_rows, ban_cols = _banned_entries(requests, num_generated, vocab)
    penalised = [row for row, r in enumerate(requests) if r.sampling_params.has_penalties]
    if not (allow_rows or bias_rows or ban_rows or penalised):
        return logits
    logits = logits.to(torch.float32, copy=True)
    if allow_rows:
        rows = sorted(set(allow_rows))
        allowed = torch.zeros(logits.shape, dtype=torch.bool, device=device)
        allowed[to_device(allow_rows, torch.int64, device), to_device(allow_cols, torch.int64, device)] = True
        restricted = to_device(rows, torch.int64, device)
        logits[restricted] = logits[restricted].masked_fill(~allowed[restricted], _MASK)
    if bias_rows:
        index = to_device([bias_rows, bias_cols], torch.int64, device)
        logits[index[0], index[1]] += to_device(bias_values, torch.float32, device)
    if ban_rows:
        index = to_device([ban_rows, ban_cols], torch.int64, device)
        logits[index[0], index[1]] = _MASK
    if penalised:
        logits[penalised] = _penalise(logits[penalised], [requests[row] for row in penalised])
    return logits


def _allowed_entries(requests: Sequence[SamplingRequest], vocab: int) -> tuple[list[int], list[int]]:
    """(row, token) pairs that rows with allowed_token_ids may sample; their other tokens are masked."""
    rows: list[int] = []
    cols: list[int] = []
    for row, req in enumerate(requests):
        ids = [t for t in req.sampling_params.allowed_token_ids or () if t < vocab]
        rows.extend([row] * len(ids))
        cols.extend(ids)
    return rows, cols


def _logit_bias_entries(
    requests: Sequence[SamplingRequest], vocab: int
) -> tuple[list[int], list[int], list[float]]:
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for row, req in enumerate(requests):
        for token_id, bias in (req.sampling_params.logit_bias or {}).items():
            if token_id < vocab:  # the engine rejects others; never index out of range on the device
                rows.append(row)
                cols.append(token_id)
                values.append(bias)
    return rows, cols, values


def _banned_entries(
    requests: Sequence[SamplingRequest], num_generated: Sequence[int], vocab: int
) -> tuple[list[int], list[int]]:
    """(row, token) pairs that must not be sampled now: EOS and stop ids before min_tokens, and
    the last token of each bad word whose other tokens the output ends with."""
    rows: list[int] = []
    cols: list[int] = []
    for row, (req, generated) in enumerate(zip(requests, num_generated)):
        p = req.sampling_params
        banned = set()
        if generated < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else req.eos_token_ids)
        output = req.output_token_ids
        for word in p.bad_words_token_ids or ():
            if len(word) - 1 <= len(output) and output[len(output) - len(word) + 1 :] == word[:-1]:
                banned.add(word[-1])
        ids = [t for t in banned if t < vocab]
        rows.extend([row] * len(ids))
        cols.extend(ids)
    return rows, cols


def _penalise(logits: torch.Tensor, requests: Sequence[SamplingRequest]) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens (positive logits divided, negative
    multiplied, as HF and vLLM), then logit -= frequency * count + presence * (count > 0)
    over output tokens."""
    params = [r.sampling_params for r in requests]
    vocab, device = logits.shape[1], logits.device
    counts = _token_counts([r.output_token_ids for r in requests], vocab, device)
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = (counts > 0) | (_token_counts([r.prompt_token_ids for r in requests], vocab, device) > 0)
        penalty = _column([p.repetition_penalty for p in params], device)
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    frequency = _column([p.frequency_penalty for p in params], device)
    presence = _column([p.presence_penalty for p in params], device)
    return logits - frequency * counts - presence * (counts > 0)


def _token_counts(token_lists: Sequence[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] float32: how often each token occurs in each list."""
    width = max(map(len, token_lists), default=0)
    # Ragged lists are padded with the id `vocab`, which counts into a column that is dropped.
    ids = to_device([t + [vocab] * (width - len(t)) for t in token_lists], torch.int64, device)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))
    return counts[:, :vocab]


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.float32, device)[:, None]


def filter_top_k_top_p_min_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Mask to -inf every token outside each row's top-k, nucleus (top-p) and min-p sets.

    Top-p and min-p see the distribution already cut to the top-k; the most likely token always
    stays. On the CPU each row's best tokens are looked at first (a partial sort: sorting a 49k
    vocabulary takes 36 ms at 16 rows there, the best 1,024 5 ms); the whole rows are sorted only
    where a row keeps more than those."""
    vocab = logits.shape[1]
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    if min(top_k) >= vocab and min(top_p) >= 1.0 and max(min_p) <= 0.0:
        return logits
    candidates = max(_CANDIDATES, max((k for k in top_k if k < vocab), default=0))
    # Whether every row's cut falls among its best tokens is decided on the host: a sync that a
    # GPU's asynchronous steps must not take, so GPUs sort whole rows (fast there).
    if candidates < vocab and logits.device.type == "cpu":
        filtered = _filter_among_the_best(logits, candidates, top_k, top_p, min_p)
        if filtered is not None:
            return filtered
    filtered = _filter_among_the_best(logits, vocab, top_k, top_p, min_p)
    assert filtered is not None  # every row's cut falls among all its tokens
    return filtered


def _filter_among_the_best(
    logits: torch.Tensor, candidates: int, top_k: list[int], top_p: list[float], min_p: list[float]
) -> torch.Tensor | None:
    """filter_top_k_top_p_min_p from each row's `candidates` best tokens alone, where every row's
    cut falls among them: its top-k within them, or its last candidate already dropped (the mass
    above a token only grows down the ranking, and min-p drops all below a dropped token), or it
    filters nothing. None where a row keeps more. top_k: each row's, at most the vocabulary."""
    device = logits.device
    best, order = logits.topk(candidates, dim=-1)
    top_k_col = to_device(top_k, torch.int64, device)[:, None]
    drop = torch.arange(candidates, device=device)[None, :] >= top_k_col
    # Each row's normaliser: over its top-k (all among the candidates) or over the whole row.
    within = torch.logsumexp(best.masked_fill(drop, _MASK), dim=-1, keepdim=True)
    normaliser = torch.where(top_k_col < logits.shape[1], within, logits.logsumexp(dim=-1, keepdim=True))
    probs = torch.exp(best - normaliser).masked_fill(drop, 0.0)
    # Nucleus: a token goes once the mass ranked above it already reaches top_p.
    mass_above = probs.cumsum(dim=-1) - probs
    drop |= mass_above >= _column(top_p, device)
    drop |= probs < _column(min_p, device) * probs[:, :1]
    drop[:, 0] = False
    keeps_all = [k >= logits.shape[1] and p >= 1.0 and m <= 0.0 for k, p, m in zip(top_k, top_p, min_p)]
    keeps_all_col = to_device(keeps_all, torch.bool, device)[:, None]
    if candidates < logits.shape[1] and not bool(((top_k_col <= candidates) | drop[:, -1:] | keeps_all_col).all()):
        return None
    filtered = torch.full_like(logits, _MASK).scatter_(1, order, best.masked_fill(drop, _MASK))
    return torch.where(keeps_all_col, logits, filtered) if any(keeps_all) else filtered


def _device_samples(
    logits: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams], as_logprobs: bool
) -> DeviceSamples:
    """The samples with the logprobs their rows asked for (the logits in float32 and a [batch, vocab]
    log-softmax only then), or the logits' own values where not as_logprobs (the *_logits modes)."""
    k = max((p.logprobs for p in params if p.logprobs is not None), default=None)
    if k is None:
        return DeviceSamples(tokens, [None] * len(params))
    logits = logits.float()
    tops = gather_top_logprobs(torch.log_softmax(logits, dim=-1) if as_logprobs else logits, tokens, k)
    return DeviceSamples(tokens, [None if p.logprobs is None else _first(top, p.logprobs) for top, p in zip(tops, params)])


def gather_top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TopLogprobs]:
    """Per row of logprobs [N, vocab]: the chosen token's logprob and rank, then the k most likely
    tokens (ranks 1..k). Rank = 1 + the number of tokens strictly more likely."""
    chosen = chosen.to(device=logprobs.device, dtype=torch.int64)[:, None]
    chosen_logprobs = logprobs.gather(1, chosen)
    ranks = (logprobs > chosen_logprobs).sum(dim=-1) + 1
    top_logprobs, top_ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)
    ids = torch.cat([chosen, top_ids], dim=1).tolist()
    values = torch.cat([chosen_logprobs, top_logprobs], dim=1).tolist()
    top_ranks = list(range(1, top_ids.shape[1] + 1))
    return [TopLogprobs(i, v, [rank, *top_ranks]) for i, v, rank in zip(ids, values, ranks.tolist())]


def _first(top: TopLogprobs, k: int) -> TopLogprobs:
    """The chosen token and the first k of the top list."""
    return TopLogprobs(top.token_ids[: k + 1], top.logprobs[: k + 1], top.ranks[: k + 1])
