"""The `draft_model` method: a smaller model with the target's vocabulary proposes k tokens per
request by running k greedy steps of its own (vLLM's draft proposals are greedy too, so the
target verifies them as one-hot drafts: pagoda/sample/rejection.py).

The draft runs through Pagoda's own ModelRunner (its model code, paged attention, decode CUDA
graphs and sampler) in the engine's process with TP 1, whatever the target's, on the first rank's
device, over a KV pool of its own with as many blocks as the
target's (the engine core sizes both from one memory budget: `kv_bytes_per_block`). The k steps
are queued back to back, each taking its input from the step before's samples on the device, and
read once at the end; the first computes 1 + k tokens of each request (known ones again where
fewer are new) and the others one, so that all of them replay decode graphs. Per request
it remembers which tokens its cache holds; each proposal computes only the tokens past the
longest prefix of those that the request still has, so the positions of rejected drafts are
rolled back by being written over. A request missing from a proposal (finished, preempted) gives
its blocks back; it is recomputed if it comes back."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pagoda.config.groups import ParallelConfig, ResolvedConfig
from pagoda.core.request import Request
from pagoda.core.scheduler import ScheduledChunk, SchedulerOutput
from pagoda.sampling_params import SamplingParams
from pagoda.worker.model_runner import ModelRunner

logger = logging.getLogger("pagoda")

GREEDY_PARAMS = SamplingParams(temperature=0.0, ignore_eos=True)


@dataclass
class _DraftState:
    """What the draft's cache holds for one request."""

    # The pool holds keys and values of the request's first num_known tokens (a request's tokens
    # only grow), then of these drafts, which may since have been rejected.
    num_known: int = 0
    drafts: list[int] = field(default_factory=list)


class DraftBlocks:
    """A proposer's KV pool blocks, per request."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.block_ids: dict[str, list[int]] = {}
        self._free: list[int] = []

    def allocate(self, num_blocks: int) -> None:
        self._free = list(range(num_blocks - 1, -1, -1))

    def forget_all_but(self, request_ids: set[str]) -> None:
        for rid in [rid for rid in self.block_ids if rid not in request_ids]:
            self._free.extend(reversed(self.block_ids.pop(rid)))

    def reserve(self, request_id: str, num_positions: int) -> bool:
        """Blocks for the request's first num_positions positions; False (and none taken) if the pool has too few."""
        blocks = self.block_ids.setdefault(request_id, [])
        missing = -(-num_positions // self.block_size) - len(blocks)
        if missing > len(self._free):
            return False
        blocks.extend(self._free.pop() for _ in range(max(0, missing)))
        return True


class DraftModelProposer:
    """A TokenProposer (spec/proposer.py) for the `draft_model` method."""

    def __init__(self, config: ResolvedConfig) -> None:
        """config: the target's; config.speculative.draft is the draft model, resolved."""
        speculative = config.speculative
        assert speculative is not None and speculative.draft is not None
        self.num_speculative_tokens = speculative.num_speculative_tokens
        draft_config = dataclasses.replace(
            config, model=speculative.draft, speculative=None, parallel=ParallelConfig(1, 1, 1)
        )
        # A first step computes 1 + k tokens per request (below), the rest one: graphs for both.
        self.runner = ModelRunner(
            draft_config, config.rank_device(0), graph_query_lens=[1, 1 + self.num_speculative_tokens]
        )
        self.max_model_len = config.model.max_model_len
        self._states: dict[str, _DraftState] = {}
        self._blocks = DraftBlocks(config.cache.block_size)

    def kv_bytes_per_block(self) -> int:
        """Bytes of one block of the draft's pool (it holds as many blocks as the target's)."""
        return self.runner.kv_bytes_per_block()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)
        self._blocks.allocate(num_blocks)

    @torch.inference_mode()
    def propose(self, requests: Sequence[Request]) -> dict[str, list[int]]:
        ids = {r.request_id for r in requests}
        self._blocks.forget_all_but(ids)
        self._states = {rid: state for rid, state in self._states.items() if rid in ids}
        drafting = []
        for req in requests:
            num_drafts = min(self.num_speculative_tokens, self.max_model_len - req.num_tokens)
            if num_drafts > 0 and self._blocks.reserve(req.request_id, req.num_tokens + num_drafts - 1):
                drafting.append((req, num_drafts))
        # Step 1 computes each request's tokens past what the cache still holds; steps 2..k one
        # draft each, its input the step before's sample, still on the device: no read between steps.
        chunks = [self._first_chunk(req) for req, _ in drafting]
        steps = []
        for step in range(self.num_speculative_tokens):
            if not chunks:
                break
            steps.append(self.runner.launch(SchedulerOutput(chunks, sum(c.num_tokens for c in chunks))))
            chunks = [next_draft_chunk(c) for c, (_, num_drafts) in zip(chunks, drafting) if num_drafts > step + 1]
            drafting = [d for d in drafting if d[1] > step + 1]
        drafts: dict[str, list[int]] = {}
        for launched in steps:
            for rid, tokens in launched.result().sampled.items():
                drafts.setdefault(rid, []).append(tokens[0])
        for rid, proposed in drafts.items():
            self._states[rid].drafts = proposed[:-1]  # the last one was sampled, not computed
        return drafts

    def _first_chunk(self, req: Request) -> ScheduledChunk:
        state = self._states.setdefault(req.request_id, _DraftState())
        tokens = req.token_ids
        # The drafts that held are still valid in the pool; the first rejected one and those after it are written over.
        start = min(state.num_known + _common_prefix(state.drafts, tokens[state.num_known :]), len(tokens) - 1)
        # Recomputing known positions writes the same keys and values again: every request that
        # decodes computes exactly 1 + k tokens, so the step replays a decode graph.
        start = min(start, max(0, len(tokens) - 1 - self.num_speculative_tokens))
        state.num_known = len(tokens)
        draft_req = Request(req.request_id, list(tokens), GREEDY_PARAMS, frozenset(), self.max_model_len)
        blocks = self._blocks.block_ids[req.request_id]
        return ScheduledChunk(draft_req, start, len(tokens) - start, blocks, samples=True)


def next_draft_chunk(chunk: ScheduledChunk) -> ScheduledChunk:
    """The one-token step that computes the draft the chunk samples: past the request's known
    tokens, so the runner takes its input from the step before's samples on the device."""
    return ScheduledChunk(chunk.request, chunk.start + chunk.num_tokens, 1, chunk.block_ids, samples=True)


def _common_prefix(a_tokens: list[int], b_tokens: list[int]) -> int:
    """How many leading tokens the two lists share."""
    n = 0
    for a, b in zip(a_tokens, b_tokens):
        if a != b:
            break
        n += 1
    return n
