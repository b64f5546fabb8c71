"""Token proposers: where drafts for multi-token steps come from."""

from __future__ import annotations

from pagoda.config.groups import SpeculativeConfig
from pagoda.spec.ngram import NgramProposer
from pagoda.spec.proposer import TokenProposer


def build_proposer(config: SpeculativeConfig) -> TokenProposer:
    """The proposer of a resolved method (config/speculative.py refuses those not built)."""
    if config.method == "ngram":
        return NgramProposer(config)
    raise ValueError(f"no proposer for speculative method {config.method!r}")
