"""What the front end resolves about the model once and ships to every engine core."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagoda.loader.model_resolver import ResolvedModel


@dataclass(frozen=True)
class CoreModel:
    """The model as the front end resolved it, once: what every engine core is built from, in
    its own process too, without finding or reading the model again."""

    resolved: ResolvedModel  # where its files are
    hf_config: Any  # on transformers' base config class (loader/plain_config.py)
    eos_token_ids: frozenset[int]  # what ends a request unless it ignores EOS
    # The tokenizer's vocabulary for compiling grammars (structured outputs), serialized by
    # structured_output/grammar.py; None without a tokenizer.
    grammar_vocab: str | None = None
