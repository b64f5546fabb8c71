"""The `medusa` method: Medusa heads over the target's last hidden state (after its final norm).
Head i is `num_layers` residual blocks x + SiLU(W x + b) then an LM head; it predicts the token
i + 2 places after the hidden state's position, so the heads' greedy tokens at the row that
sampled a request's last token are its next step's drafts. Batched over requests and heads on
the target's device: one read of the drafts per step.

Checkpoints as Medusa publishes them (`medusa_head.{i}.{j}.linear.{weight,bias}` for the blocks,
`medusa_head.{i}.{num_layers}.weight` for the LM head; config `medusa_num_heads`,
`medusa_num_layers`) or as vLLM stores them (`blocks.{i}.layers.{j}.linear.*`, `lm_heads.{i}.weight`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from pagoda.config.groups import ResolvedConfig
from pagoda.core.request import Request
from pagoda.loader.model_resolver import resolve_model
from pagoda.loader.weights import iter_checkpoint_weights
from pagoda.spec.proposer import StepHiddenStates

_BLOCK = re.compile(r"(?:medusa_head\.(\d+)\.(\d+)|blocks\.(\d+)\.layers\.(\d+))\.linear\.(weight|bias)$")
_LM_HEAD = re.compile(r"(?:medusa_head\.(\d+)\.(\d+)|lm_heads\.(\d+))\.weight$")


class MedusaProposer:
    """A HiddenStatesProposer (spec/proposer.py) for the `medusa` method."""

    def __init__(self, config: ResolvedConfig) -> None:
        speculative = config.speculative
        assert speculative is not None and speculative.model is not None
        self.num_speculative_tokens = speculative.num_speculative_tokens
        blocks, lm_heads = _read_heads(resolve_model(speculative.model).model_dir)
        _check_heads(blocks, lm_heads, config, speculative.model)
        device, dtype = config.rank_device(0), config.model.dtype
        heads = range(self.num_speculative_tokens)  # the first k heads: k drafts
        # [heads, layers, out, in] and [heads, layers, out]: every head's block j in one batched matmul.
        self.block_weights = torch.stack([torch.stack([blocks[h][j][0] for j in sorted(blocks[h])]) for h in heads])
        self.block_biases = torch.stack([torch.stack([blocks[h][j][1] for j in sorted(blocks[h])]) for h in heads])
        self.lm_heads = torch.stack([lm_heads[h] for h in heads])  # [heads, vocab, hidden]
        self.block_weights, self.block_biases, self.lm_heads = (
            t.to(device=device, dtype=dtype) for t in (self.block_weights, self.block_biases, self.lm_heads)
        )

    @torch.inference_mode()
    def propose_from_hidden_states(
        self, requests: Sequence[Request], hidden: StepHiddenStates
    ) -> dict[str, list[int]]:
        with_hidden = [r.request_id for r in requests if r.request_id in hidden.rows]
        if not with_hidden:
            return {}
        rows = torch.tensor([hidden.last_row(rid) for rid in with_hidden], device=hidden.states.device)
        x = hidden.states.index_select(0, rows).to(self.lm_heads.dtype)  # [requests, hidden]
        x = x.unsqueeze(0).expand(len(self.lm_heads), -1, -1)  # [heads, requests, hidden]
        for layer in range(self.block_weights.shape[1]):
            weights = self.block_weights[:, layer].transpose(1, 2)
            linear = torch.baddbmm(self.block_biases[:, layer, None, :], x, weights)
            x = x + torch.nn.functional.silu(linear)
        drafts = torch.bmm(x, self.lm_heads.transpose(1, 2)).argmax(dim=-1)  # [heads, requests]
        return dict(zip(with_hidden, drafts.T.tolist()))


def _read_heads(path: Path) -> tuple[dict[int, dict[int, list[torch.Tensor]]], dict[int, torch.Tensor]]:
    """head -> block -> [weight, bias], and head -> LM head weight, from either layout."""
    blocks: dict[int, dict[int, list[torch.Tensor]]] = {}
    lm_heads: dict[int, torch.Tensor] = {}
    for name, tensor in iter_checkpoint_weights(path):
        if block := _BLOCK.search(name):
            head, layer = (int(g) for g in (block[1] or block[3], block[2] or block[4]))
            slot = blocks.setdefault(head, {}).setdefault(layer, [torch.empty(0), torch.empty(0)])
            slot[block[5] == "bias"] = tensor
        elif lm := _LM_HEAD.search(name):
            lm_heads[int(lm[1] or lm[3])] = tensor
    return blocks, lm_heads


def _check_heads(
    blocks: dict[int, dict[int, list[torch.Tensor]]], lm_heads: dict[int, torch.Tensor], config: ResolvedConfig,
    source: str,
) -> None:
    k = config.num_speculative_tokens
    if len(lm_heads) < k:
        raise ValueError(f"speculative_config's num_speculative_tokens={k} is more than the {len(lm_heads)} Medusa "
                         f"heads of model={source!r}: a head proposes one token")
    target = config.model.spec
    vocab, hidden = lm_heads[0].shape
    if vocab != target.vocab_size or hidden != target.hidden_size:
        raise ValueError(f"speculative_config's model={source!r} has Medusa heads of vocabulary {vocab} and hidden "
                         f"size {hidden}, the target {target.vocab_size} and {target.hidden_size}: they must match")
    if len({len(blocks.get(h, {})) for h in range(k)}) != 1:
        raise ValueError(f"speculative_config's model={source!r}: its Medusa heads have different numbers of blocks")
