"""A step's grammar masks, from the engine core to the model runner, and their one application.

The core fills one row of 32-bit words per constrained sample row (bit j of a row: token j is
allowed); the runner applies all of them to the batch's logits on the device at once, every
other row untouched."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.host_to_device import to_device


@dataclass
class GrammarBitmask:
    rows: list[int]  # the sample rows (in the step's sampled-logits order) that are constrained
    bitmask: torch.Tensor  # [len(rows), ceil(vocab_size / 32)] int32, on the host


def apply_grammar_bitmask(logits: torch.Tensor, grammar: GrammarBitmask) -> None:
    """Set to -inf, in place, each constrained row's logits of the tokens its grammar forbids."""
    import xgrammar

    words = grammar.bitmask.shape[1]
    full = torch.full((logits.shape[0], words), -1, dtype=torch.int32, device=logits.device)  # -1: all allowed
    rows = to_device(grammar.rows, torch.int64, logits.device)
    full.index_copy_(0, rows, to_device(grammar.bitmask.numpy(), torch.int32, logits.device))
    xgrammar.apply_token_bitmask_inplace(logits, full, vocab_size=logits.shape[1], indices=grammar.rows)
