from __future__ import annotations

import dataclasses
import re

import pytest

from pagoda.sampling_params import SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None and p.logprobs is None and p.prompt_logprobs is None and p.logit_bias is None
    assert p.stop == [] and p.stop_token_ids == []
    assert (p.max_tokens, p.min_tokens) == (16, 0)
    assert not p.include_stop_str_in_output and not p.ignore_eos
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    assert not p.is_greedy


@pytest.mark.parametrize(
    ("temperature", "greedy"), [(0, True), (0.0, True), (5e-6, True), (1e-5, False), (0.7, False)]
)
def test_is_greedy_below_1e_5(temperature: float, greedy: bool) -> None:
    assert SamplingParams(temperature=temperature).is_greedy is greedy


INVALID = [
    ("n", 0), ("n", -1), ("n", 1.5), ("n", True),
    ("temperature", -0.1), ("temperature", "hot"), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5),
    ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.01), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.01), ("presence_penalty", -2.5),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.01),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", "10"),
    ("min_tokens", -1), ("min_tokens", 17),  # 17 > the default max_tokens of 16
    ("logprobs", -2), ("logprobs", 1.0),
    ("prompt_logprobs", -2),
    ("allowed_token_ids", []), ("allowed_token_ids", [-1]), ("allowed_token_ids", 5),
    ("truncate_prompt_tokens", 0), ("truncate_prompt_tokens", -2), ("truncate_prompt_tokens", 1.5),
    ("seed", 1.5), ("seed", "42"),
    ("stop", ""), ("stop", ["ok", ""]), ("stop", 5), ("stop", ["a", 3]),
    ("stop_token_ids", [-1]), ("stop_token_ids", 5), ("stop_token_ids", ["1"]),
    ("logit_bias", {"x": 1.0}), ("logit_bias", {-1: 1.0}), ("logit_bias", {"-1": 1.0}),
    ("logit_bias", {1: "big"}), ("logit_bias", {1: float("nan")}), ("logit_bias", [1, 2]),
    ("ignore_eos", 1), ("detokenize", "yes"), ("skip_special_tokens", None),
]


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_value_raises_naming_parameter_and_value(name: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**{name: value})
    message = str(info.value)
    assert message.startswith(f"{name}=")
    assert "must be" in message


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("top_p", 0.0, "in (0, 1]"),
        ("presence_penalty", 2.5, "in [-2, 2]"),
        ("logprobs", -3, ">= 0, -1 (the whole vocabulary)"),
        ("min_p", 1.5, "in [0, 1]"),
        ("temperature", -1.0, ">= 0"),
    ],
)
def test_message_states_value_and_allowed_range(name: str, value: float, allowed: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}={value!r} is invalid: it must be .*{re.escape(allowed)}"):
        SamplingParams(**{name: value})


def test_min_tokens_bounded_by_max_tokens_only_when_set() -> None:
    with pytest.raises(ValueError, match=r"min_tokens=9 .*<= max_tokens \(8\)"):
        SamplingParams(max_tokens=8, min_tokens=9)
    assert SamplingParams(max_tokens=8, min_tokens=8).min_tokens == 8
    assert SamplingParams(max_tokens=None, min_tokens=1000).max_tokens is None


@pytest.mark.parametrize("top_k", [-1, 0, 1, 50])
def test_valid_edge_values(top_k: int) -> None:
    p = SamplingParams(
        top_k=top_k, top_p=1.0, min_p=1.0, temperature=0.0, presence_penalty=-2, frequency_penalty=2,
        logprobs=0, prompt_logprobs=-1, seed=-7,
    )
    assert p.top_k == top_k and p.presence_penalty == -2.0 and isinstance(p.presence_penalty, float)


def test_stop_normalised_to_list() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


def test_stop_strings_need_detokenize() -> None:
    with pytest.raises(ValueError, match=r"^stop=\['x'\] .*detokenize=False"):
        SamplingParams(stop="x", detokenize=False)
    assert SamplingParams(detokenize=False, stop_token_ids=[2]).stop == []


def test_logit_bias_string_keys_converted_and_values_clamped() -> None:
    p = SamplingParams(logit_bias={"50256": -1000, "7": 2.5, 3: 101, 4: -100})
    assert p.logit_bias == {50256: -100.0, 7: 2.5, 3: 100.0, 4: -100.0}
    assert all(type(k) is int and type(v) is float for k, v in p.logit_bias.items())


def test_normalised_params_survive_replace() -> None:
    # The engine fans n > 1 out with dataclasses.replace, which validates again.
    p = SamplingParams(n=3, stop="x", logit_bias={"1": 5}, seed=1)
    child = dataclasses.replace(p, n=1, seed=2)
    assert child.stop == ["x"] and child.logit_bias == {1: 5.0} and child.seed == 2
