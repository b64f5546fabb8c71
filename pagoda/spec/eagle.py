"""The `eagle` and `eagle3` methods: a head over the target's hidden states proposes k tokens per
request (greedy, as vLLM's). EAGLE-1's head (pagoda/models/eagle.py) reads the target's final
hidden states; EAGLE-3's (pagoda/models/eagle3.py) those of three of its layers, which the model
runner returns for it (config/resolve.py picks the layers), projected by the head's fc before its
first step (a head without fc, `eagle_config.use_aux_hidden_state: false`, reads the final ones), and it drafts over a reduced vocabulary whose ids its checkpoint's `d2t` maps to the
target's. The head's entry at position p reads the token at p + 1 and the target's hidden state
at p; its output there predicts the token at p + 2. Its first step computes the entries of every
position whose target hidden state is new since the last proposal (prompts included); each
further step feeds the draft just sampled with the head's own output hidden state, on the device
(no read between steps). Rejected drafts' entries are written over: the next proposal recomputes
from the first position the head has not seen a real hidden state for.

The head runs through a ModelRunner of its own (eager: its forward reads per-step hidden states)
in the engine's process, over a KV pool with as many blocks as the target's
(spec/draft_model.py's DraftBlocks). Its weights come from the head's checkpoint, the LM head
(EAGLE-1's) and the embedding from the target's where the head has none. The target's hidden
states arrive every step (the engine core hands the proposer each step's StepHiddenStates);
positions a request took from the prefix cache have none, so the head's entries there hold
whatever those slots held: drafts get poorer, outputs do not change."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pagoda.config.groups import DeviceConfig, ParallelConfig, ResolvedConfig
from pagoda.core.request import Request
from pagoda.core.scheduler import ScheduledChunk, SchedulerOutput
from pagoda.loader.weight_loader import load_weights
from pagoda.loader.weights import iter_checkpoint_weights, read_checkpoint_tensors
from pagoda.models.eagle import EagleLlamaForCausalLM
from pagoda.models.eagle3 import Eagle3LlamaForCausalLM
from pagoda.spec.draft_model import GREEDY_PARAMS, DraftBlocks, next_draft_chunk
from pagoda.spec.proposer import StepHiddenStates
from pagoda.worker.model_runner import ModelRunner

_EMBED = "model.embed_tokens.weight"
_LM_HEAD = "lm_head.weight"
# An EAGLE-3 head's maps between its draft vocabulary and the target's: d2t is read apart, t2d unused.
_D2T, _T2D = "d2t", "t2d"


@dataclass
class _Features:
    """The target's hidden states of one request, positions [start, start + len(states))."""

    start: int
    states: torch.Tensor

    def add(self, position: int, states: torch.Tensor) -> None:
        """States of positions from `position` on; those held from there on are replaced (recomputed)."""
        if position < self.start or position > self.start + len(self.states):
            self.start, self.states = position, states  # recomputed from earlier, or a gap (prefix cache)
        else:
            self.states = torch.cat([self.states[: position - self.start], states])


class EagleProposer:
    """A HiddenStatesProposer and ProposerWithKVCache (spec/proposer.py) for the `eagle` and `eagle3` methods."""

    def __init__(self, config: ResolvedConfig) -> None:
        """config: the target's; config.speculative.draft is the head, resolved (config/resolve.py)."""
        speculative = config.speculative
        assert speculative is not None and speculative.draft is not None and speculative.model is not None
        self.num_speculative_tokens = speculative.num_speculative_tokens
        device = config.rank_device(0)
        head_config = dataclasses.replace(
            config, model=speculative.draft, speculative=None, parallel=ParallelConfig(1, 1, 1),
            device=DeviceConfig(device, enforce_eager=True),
        )
        self.runner = ModelRunner(head_config, device)
        self.head = self.runner.model
        assert isinstance(self.head, (EagleLlamaForCausalLM, Eagle3LlamaForCausalLM))
        if config.model.load_format != "dummy":
            head_dir, target_dir = speculative.draft.resolved.model_dir, config.model.resolved.model_dir
            if isinstance(self.head, Eagle3LlamaForCausalLM):
                _load_draft_vocabulary(self.head, head_dir, speculative.model)
            load_weights(self.head, _head_weights(self.head, head_dir, target_dir))
        self.max_model_len = config.model.max_model_len
        self._blocks = DraftBlocks(config.cache.block_size)
        self._features: dict[str, _Features] = {}
        self._num_known: dict[str, int] = {}  # the head's entries of positions below this hold real states

    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)
        self._blocks.allocate(num_blocks)

    @torch.inference_mode()
    def propose_from_hidden_states(
        self, requests: Sequence[Request], hidden: StepHiddenStates
    ) -> dict[str, list[int]]:
        for rid, (first, position, count) in hidden.rows.items():
            states = hidden.states[first : first + count].clone()  # the target's buffers are reused
            if rid in self._features:
                self._features[rid].add(position, states)
            else:
                self._features[rid] = _Features(position, states)
        live = {r.request_id for r in requests} | set(hidden.rows)
        self._blocks.forget_all_but(live)
        self._features = {rid: f for rid, f in self._features.items() if rid in live}
        self._num_known = {rid: n for rid, n in self._num_known.items() if rid in live}
        firsts = [first for req in requests if (first := self._first_chunk(req)) is not None]
        return self._run(firsts)

    def _first_chunk(self, req: Request) -> tuple[ScheduledChunk, torch.Tensor, int] | None:
        """The chunk of the head's entries to compute for req, their target hidden states, and the
        drafts it gets; None when it gets none."""
        rid, n = req.request_id, req.num_tokens - 1  # the head's sequence: tokens[1:], n entries
        features = self._features.get(rid)
        num_drafts = min(self.num_speculative_tokens, self.max_model_len - req.num_tokens)
        if features is None or num_drafts < 1:
            return None
        start = max(min(self._num_known.get(rid, 0), n - 1), features.start)
        if start >= n or features.start + len(features.states) < n:
            return None
        if not self._blocks.reserve(rid, n + num_drafts - 1):
            return None
        self._num_known[rid] = n
        states = features.states[start - features.start : n - features.start]
        # Only the last entry is recomputed next time if no new state arrives: keep it, drop older ones.
        features.states, features.start = features.states[n - 1 - features.start :], n - 1
        head_req = Request(rid, req.token_ids[1:], GREEDY_PARAMS, frozenset(), self.max_model_len)
        return ScheduledChunk(head_req, start, n - start, self._blocks.block_ids[rid], samples=True), states, num_drafts

    def _run(self, firsts: list[tuple[ScheduledChunk, torch.Tensor, int]]) -> dict[str, list[int]]:
        """k steps queued back to back, then read once."""
        if not firsts:
            return {}
        chunks = [chunk for chunk, _, _ in firsts]
        self.head.target_hidden = self.head.combine_hidden_states(torch.cat([states for _, states, _ in firsts]))
        budgets = [num_drafts for _, _, num_drafts in firsts]
        steps = []
        for step in range(self.num_speculative_tokens):
            steps.append(self.runner.launch(SchedulerOutput(chunks, sum(c.num_tokens for c in chunks))))
            # Each continuing request's next input state: the head's output at its chunk's last row.
            ends = torch.tensor([c.num_tokens for c in chunks]).cumsum(0) - 1
            going = [i for i, budget in enumerate(budgets) if budget > step + 1]
            if not going:
                break
            assert self.head.last_hidden is not None
            last = self.head.last_hidden
            self.head.target_hidden = last.index_select(0, ends[going].to(last.device))
            chunks = [next_draft_chunk(chunks[i]) for i in going]
            budgets = [budgets[i] for i in going]
        drafts: dict[str, list[int]] = {}
        for launched in steps:
            for rid, tokens in launched.result().sampled.items():
                drafts.setdefault(rid, []).append(tokens[0])
        return drafts


def _head_weights(
    head: EagleLlamaForCausalLM | Eagle3LlamaForCausalLM, head_dir: Path, target_dir: Path
) -> Iterator[tuple[str, torch.Tensor]]:
    """The head's checkpoint (the head maps its names: `checkpoint_name`), then the target's LM
    head and embedding where the head has none (EAGLE-1 heads have no LM head)."""
    held = set()
    for name, tensor in iter_checkpoint_weights(head_dir):
        if name not in (_D2T, _T2D):
            held.add(head.checkpoint_name(name))
            yield name, tensor
    target = read_checkpoint_tensors(target_dir, {_EMBED, _LM_HEAD})
    if _LM_HEAD not in held:
        yield _LM_HEAD, target.get(_LM_HEAD, target[_EMBED])  # a tied target's LM head is its embedding
    if _EMBED not in held:
        yield _EMBED, target[_EMBED]


def _load_draft_vocabulary(head: Eagle3LlamaForCausalLM, head_dir: Path, source: str) -> None:
    """The head's d2t (draft id -> target id - draft id), which a head over fewer tokens than the
    target's vocabulary must have."""
    draft_vocab, vocab = len(head.target_token_ids), head.config.vocab_size
    d2t = read_checkpoint_tensors(head_dir, {_D2T}).get(_D2T)
    if d2t is None:
        if draft_vocab < vocab:
            raise ValueError(f"speculative_config's model={source!r} is an EAGLE-3 head over a draft vocabulary of "
                             f"{draft_vocab} tokens (draft_vocab_size), the target's has {vocab}: its checkpoint must "
                             "hold d2t, which maps draft token ids to the target's, and has none")
        return
    target_ids = torch.arange(len(d2t)) + d2t.long()
    if d2t.shape != (draft_vocab,) or target_ids.min() < 0 or target_ids.max() >= vocab:
        raise ValueError(f"speculative_config's model={source!r}: its d2t (shape {tuple(d2t.shape)}) must map each "
                         f"of the {draft_vocab} draft token ids (draft_vocab_size) to a target id below {vocab}")
    head.target_token_ids.copy_(target_ids)
