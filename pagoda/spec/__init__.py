"""Token proposers: where drafts for multi-token steps come from."""

from __future__ import annotations

from pagoda.config.groups import ResolvedConfig
from pagoda.config.speculative import EAGLE_METHODS
from pagoda.spec.ngram import NgramProposer
from pagoda.spec.proposer import HiddenStatesProposer, TokenProposer


def build_proposer(config: ResolvedConfig) -> TokenProposer | HiddenStatesProposer:
    """The proposer of config.speculative's method (config/speculative.py refuses those not built)."""
    speculative = config.speculative
    assert speculative is not None
    if speculative.method == "ngram":
        return NgramProposer(speculative)
    if speculative.method == "draft_model":
        from pagoda.spec.draft_model import (
            DraftModelProposer,  # builds a model: only when asked for
        )

        return DraftModelProposer(config)
    if speculative.method in EAGLE_METHODS:
        from pagoda.spec.eagle import EagleProposer

        return EagleProposer(config)
    if speculative.method == "medusa":
        from pagoda.spec.medusa import MedusaProposer

        return MedusaProposer(config)
    raise ValueError(f"no proposer for speculative method {speculative.method!r}")
