"""SamplingParams: how to pick each next token and when to stop, named and validated as vLLM does;
StructuredOutputsParams (vLLM's older name: GuidedDecodingParams): the grammar its tokens must follow."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# vLLM's default VLLM_MAX_N_SEQUENCES: n fans out into n engine requests.
MAX_N_SEQUENCES = 16384
# Every integer crosses the engine-core boundary (msgpack) and lands in int64 tensors: wider
# ones are refused here, by name, rather than failing there.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Below this temperature, dividing logits by it overflows float32: treat it as greedy.
_GREEDY_EPS = 1e-5
_LOGIT_BIAS_LIMIT = 100.0  # OpenAI clamps biases to [-100, 100]

_INTS = ("n", "top_k", "max_tokens", "min_tokens", "seed", "logprobs", "prompt_logprobs", "truncate_prompt_tokens")
_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_BOOLS = (
    "include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "detokenize",
)
_OPTIONAL = ("max_tokens", "seed", "logprobs", "prompt_logprobs", "truncate_prompt_tokens")
# Set while params that another process made, and checked, are decoded: they are rebuilt as they are.
_REBUILDING = contextvars.ContextVar("pagoda_rebuilding_sampling_params", default=False)


@contextlib.contextmanager
def rebuilding_checked_params() -> Iterator[None]:
    """SamplingParams made in this block skip their checks: for a decoder rebuilding params that
    were checked where they were made (the engine core's, engine/messages.py)."""
    token = _REBUILDING.set(True)
    try:
        yield
    finally:
        _REBUILDING.reset(token)


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """Exactly one constraint, as vLLM names them: a JSON schema (a dict, its JSON text, or a
    pydantic model class), a regular expression, a list of choices, an EBNF grammar, or any JSON
    object. Normalised on construction: `json` becomes the schema's JSON text."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # JSON without whitespace between its tokens

    def __post_init__(self) -> None:
        if self.json_object is False:
            self.json_object = None
        named = [name for name in _CONSTRAINTS if getattr(self, name) is not None]
        if len(named) != 1:
            _fail("structured_outputs", self, f"exactly one of {', '.join(_CONSTRAINTS)} (got {named or 'none'})")
        self.json = _schema_text(self.json)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                _fail(f"structured_outputs.{name}", value, "a string")
        if self.choice is not None:
            choices_ok = isinstance(self.choice, (list, tuple)) and all(isinstance(c, str) for c in self.choice)
            if not choices_ok or not self.choice:
                _fail("structured_outputs.choice", self.choice, "a non-empty list of strings")
            self.choice = list(self.choice)
        _require(isinstance(self.disable_any_whitespace, bool), "structured_outputs.disable_any_whitespace",
                 self.disable_any_whitespace, "a bool")

    @property
    def key(self) -> tuple:
        """What identifies the grammar: equal keys compile to the same grammar."""
        return (self.json, self.regex, None if self.choice is None else tuple(self.choice), self.grammar,
                self.json_object, self.disable_any_whitespace)


GuidedDecodingParams = StructuredOutputsParams  # vLLM's name before StructuredOutputsParams


def _schema_text(schema: Any) -> str | None:
    if schema is None or isinstance(schema, str):
        return schema
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # a pydantic model class
        schema = schema.model_json_schema()
    if not isinstance(schema, (dict, bool)):
        _fail("structured_outputs.json", schema, "a JSON schema: a dict, its JSON text, or a pydantic model class")
    try:
        return json.dumps(schema)
    except RecursionError:
        raise ValueError("structured_outputs.json is invalid: the schema nests deeper than Python can encode") from None


@dataclass
class SamplingParams:
    """Validated on construction: a bad value raises ValueError naming the parameter and its range.
    Integers (token ids included) must fit 64 bits, and n is capped as vLLM caps it.

    logprobs and prompt_logprobs of -1 mean the whole vocabulary; how many the engine returns at
    most is its max_logprobs (EngineConfig), checked when the request is added, as vLLM does.

    Integers and numbers are normalised to int and float, `stop` to a list of strings,
    `stop_token_ids` and `allowed_token_ids` to lists and `logit_bias` keys to int (JSON gives strings)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the model's max length
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    # Only these tokens may be sampled (checked against the vocabulary when the request is added).
    allowed_token_ids: list[int] | None = None
    # Keep only the prompt's last k tokens; -1: the last max_model_len.
    truncate_prompt_tokens: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None  # vLLM's older name: moved to structured_outputs
    # Words never to generate: each word's last token is masked while the output ends with the
    # tokens before it (as vLLM: the output only, not the prompt).
    bad_words: list[str] | None = None
    # Their token sequences, which the engine derives from bad_words with its tokenizer
    # (`bad_words_token_ids`): the word as it starts a text, and after a space where that is
    # another first token of the same length.
    bad_words_token_ids: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if _REBUILDING.get():
            return
        self._normalise_scalars()
        self._normalise_structured_outputs()
        self.stop = _normalise_stop(self.stop)
        self.stop_token_ids = _normalise_token_ids("stop_token_ids", self.stop_token_ids) or []
        self.allowed_token_ids = _normalise_token_ids("allowed_token_ids", self.allowed_token_ids)
        self.logit_bias = _normalise_logit_bias(self.logit_bias)
        self.bad_words = _normalise_bad_words(self.bad_words)
        self._check_ranges()

    def for_child(self, index: int) -> SamplingParams:
        """The params of engine request `index` of the n this request fans out into: n=1 and the
        seed offset by the index (checked to fit when these were made), nothing checked again."""
        child = copy.copy(self)
        child.n = 1
        child.seed = None if self.seed is None else self.seed + index
        return child

    @property
    def reads_output_tokens(self) -> bool:
        """Whether the logits of a step depend on the tokens generated before it: penalties, and
        bad words of more than one token."""
        return self.has_penalties or any(len(ids) > 1 for ids in self.bad_words_token_ids or ())

    @property
    def has_penalties(self) -> bool:
        """Whether sampling reads the tokens generated so far (repetition, presence, frequency)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def _normalise_structured_outputs(self) -> None:
        if self.guided_decoding is not None:
            _require(self.structured_outputs is None, "guided_decoding", self.guided_decoding,
                     "unset when structured_outputs is set (they are the same, under two names)")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        _require(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
                 "structured_outputs", self.structured_outputs, "a StructuredOutputsParams")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def _normalise_scalars(self) -> None:
        for name, convert in _CONVERTERS.items():
            value = getattr(self, name)
            if value is not None or name not in _OPTIONAL:
                setattr(self, name, convert(name, value))

    def _check_ranges(self) -> None:
        _require(1 <= self.n <= MAX_N_SEQUENCES, "n", self.n, f"in [1, {MAX_N_SEQUENCES}]")
        # Child i of n samples with seed + i (fan_out): every one of them must fit too.
        _require(self.seed is None or self.seed + self.n - 1 <= INT64_MAX, "seed", self.seed,
                 f"at most 2**63 - n ({INT64_MAX - self.n + 1}) with n={self.n}")
        _require(self.temperature >= 0, "temperature", self.temperature, ">= 0 (0 means greedy)")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _require(self.top_k >= -1, "top_k", self.top_k, "-1 or 0 (no limit), or >= 1")
        _require(0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _require(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "> 0")
        _require(-2 <= self.presence_penalty <= 2, "presence_penalty", self.presence_penalty, "in [-2, 2]")
        _require(-2 <= self.frequency_penalty <= 2, "frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        _require(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", self.max_tokens, ">= 1 or None")
        _require(self.min_tokens >= 0, "min_tokens", self.min_tokens, ">= 0")
        if self.max_tokens is not None:
            _require(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                     f"<= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(value is None or value >= -1, name, value, ">= 0, -1 (the whole vocabulary) or None")
        _require(self.allowed_token_ids is None or len(self.allowed_token_ids) > 0, "allowed_token_ids",
                 self.allowed_token_ids, "a non-empty list of token ids or None")
        truncate = self.truncate_prompt_tokens
        _require(truncate is None or truncate == -1 or truncate >= 1, "truncate_prompt_tokens", truncate,
                 ">= 1, -1 (the last max_model_len tokens) or None")
        # Stop strings are matched on the text: without text they could never fire.
        _require(self.detokenize or not self.stop, "stop", self.stop, "empty when detokenize=False")


def _normalise_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        _fail("stop", stop, "a non-empty string or a list of non-empty strings")
    return list(stops)


def _normalise_bad_words(words: Any) -> list[str] | None:
    if words is None:
        return None
    listed = [words] if isinstance(words, str) else words
    if not isinstance(listed, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in listed):
        _fail("bad_words", words, "a list of words that are not empty or all spaces")
    return list(listed) or None


def bad_words_token_ids(words: list[str], encode: Any) -> list[list[int]]:
    """The token sequences to mask for each word (encode: text -> token ids, no special tokens):
    the word as it starts a text, and after a space where that starts with another token and is
    as long (a word inside a sentence), as vLLM tokenizes them."""
    sequences: list[list[int]] = []
    for word in words:
        plain = encode(word.lstrip())
        if not plain:  # a word the tokenizer writes as nothing cannot be generated
            continue
        sequences.append(plain)
        spaced = encode(" " + word.lstrip())
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    return sequences


def _normalise_token_ids(name: str, ids: Any) -> list[int] | None:
    if ids is None:
        return None
    if not isinstance(ids, (list, tuple)) or not all(_is_token_id(t) for t in ids):
        _fail(name, ids, "a list of token ids (integers in [0, 2**63))")
    return [int(t) for t in ids]


def _normalise_logit_bias(bias: Any) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, dict):
        _fail("logit_bias", bias, "a dict of token id -> bias")
    out: dict[int, float] = {}
    for key, value in bias.items():
        token_id = _token_id_key(key)
        if not _is_token_id(token_id):
            _fail("logit_bias", bias, f"keyed by token ids (integers in [0, 2**63)), not {key!r}")
        if not _is_number(value):
            _fail("logit_bias", bias, f"valued by finite numbers, not {value!r}")
        out[token_id] = min(_LOGIT_BIAS_LIMIT, max(-_LOGIT_BIAS_LIMIT, float(value)))
    return out


def _token_id_key(key: Any) -> int | None:
    if _is_int(key):
        return int(key)
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_token_id(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= INT64_MAX


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _as_int(name: str, value: Any) -> int:
    if not _is_int(value) or not INT64_MIN <= value <= INT64_MAX:
        _fail(name, value, "a 64-bit integer (in [-2**63, 2**63))")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if not _is_number(value):
        _fail(name, value, "a finite number")
    return float(value)


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(name, value, "a bool")
    return value


_CONVERTERS = {
    **{name: _as_int for name in _INTS},
    **{name: _as_float for name in _FLOATS},
    **{name: _as_bool for name in _BOOLS},
}


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        _fail(name, value, allowed)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: it must be {allowed}")
