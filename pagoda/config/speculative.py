"""Speculative decoding's settings, as vLLM spells them: `speculative_config` (a dict, or JSON on the
command line) and the older `speculative_model` / `num_speculative_tokens`, resolved into one
SpeculativeConfig, every error naming the key to change."""

from __future__ import annotations

from typing import Any

from pagoda.config.groups import SpeculativeConfig

BUILT_METHODS = ("ngram", "draft_model", "eagle", "eagle3", "medusa")
# Methods whose proposer reads the target's hidden states: the model runner keeps them.
HIDDEN_STATES_METHODS = ("eagle", "eagle3", "medusa")
# Methods whose proposer loads a model or heads from speculative_config's model.
MODEL_METHODS = ("draft_model", "eagle", "eagle3", "medusa")
# Methods whose model is an EAGLE head (spec/eagle.py).
EAGLE_METHODS = ("eagle", "eagle3")
# vLLM's methods that Pagoda does not have yet: refused by name rather than as unknown.
UNBUILT_METHODS = ("mtp",)
KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max")
NGRAM_MODEL_NAMES = ("[ngram]", "ngram")
# vLLM's defaults when neither bound is given.
DEFAULT_PROMPT_LOOKUP = 5


def resolve_speculative(
    speculative_config: dict[str, Any] | None, speculative_model: str | None, num_speculative_tokens: int | None
) -> SpeculativeConfig | None:
    """None when none of the three is set (no speculation)."""
    settings = dict(speculative_config or {})
    if speculative_model is not None:
        settings.setdefault("model", speculative_model)
    if num_speculative_tokens is not None:
        settings.setdefault("num_speculative_tokens", num_speculative_tokens)
    if not settings:
        return None
    unknown = sorted(set(settings) - set(KEYS))
    if unknown:
        raise ValueError(f"speculative_config has unknown keys {unknown}: the keys are {list(KEYS)}")
    method = _method(settings.get("method"), settings.get("model"))
    k = settings.get("num_speculative_tokens")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"speculative_config's num_speculative_tokens={k!r} is invalid: must be an integer >= 1 "
                         "(--num-speculative-tokens, or the key in --speculative-config)")
    low, high = _prompt_lookup(settings.get("prompt_lookup_min"), settings.get("prompt_lookup_max"))
    model = settings.get("model")
    if method in MODEL_METHODS and not isinstance(model, str):
        raise ValueError(f"speculative_config's model={model!r} is invalid: method={method!r} needs the draft "
                         "model's or heads' path or name (--speculative-model, or the key in --speculative-config)")
    return SpeculativeConfig(k, method, low, high, model if method in MODEL_METHODS else None)


def _method(method: str | None, model: str | None) -> str:
    if method is None:
        if model is None:
            raise ValueError(f"speculative_config needs a method: one of {list(BUILT_METHODS)}")
        # vLLM's older spelling: speculative_model="[ngram]" chose prompt lookup, any other a draft model.
        method = "ngram" if model in NGRAM_MODEL_NAMES else "draft_model"
    if method in UNBUILT_METHODS:
        raise ValueError(f"speculative_config's method={method!r} is not built yet in Pagoda: "
                         f"use one of {list(BUILT_METHODS)}")
    if method not in BUILT_METHODS:
        raise ValueError(f"speculative_config's method={method!r} is not known: must be one of {list(BUILT_METHODS)} "
                         f"(not built yet: {list(UNBUILT_METHODS)})")
    return method


def _prompt_lookup(low: int | None, high: int | None) -> tuple[int, int]:
    """vLLM's rule: a missing bound takes the other's value, both missing take 5."""
    if low is None and high is None:
        low = high = DEFAULT_PROMPT_LOOKUP
    low = high if low is None else low
    high = low if high is None else high
    for name, value in (("prompt_lookup_min", low), ("prompt_lookup_max", high)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"speculative_config's {name}={value!r} is invalid: must be an integer >= 1")
    if low > high:
        raise ValueError(f"speculative_config's prompt_lookup_min={low} is larger than prompt_lookup_max={high}")
    return low, high
