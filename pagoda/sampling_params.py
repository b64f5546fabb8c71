"""SamplingParams: how to pick each next token and when to stop, named as vLLM names them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

MAX_LOGPROBS = 20
_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
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
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True

    def __post_init__(self) -> None:
        self._check_types()
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            # JSON object keys arrive as strings; OpenAI clamps biases to [-100, 100].
            self.logit_bias = {int(k): max(-100.0, min(100.0, float(v))) for k, v in self.logit_bias.items()}
        self._check_ranges()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def _check_types(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            expected = _TYPES[f.name]
            if value is None and f.name in _OPTIONAL:
                continue
            if isinstance(value, bool) and bool not in expected:
                _fail(f.name, value, f"of type {' or '.join(t.__name__ for t in expected)}")
            if not isinstance(value, expected):
                _fail(f.name, value, f"of type {' or '.join(t.__name__ for t in expected)}")

    def _check_ranges(self) -> None:
        _require(self.n >= 1, "n", self.n, ">= 1")
        _require(self.temperature >= 0, "temperature", self.temperature, ">= 0")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _require(self.top_k == -1 or self.top_k >= 0, "top_k", self.top_k, "-1, 0 (no limit) or >= 1")
        _require(0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _require(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "> 0")
        _require(-2 <= self.presence_penalty <= 2, "presence_penalty", self.presence_penalty, "in [-2, 2]")
        _require(-2 <= self.frequency_penalty <= 2, "frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        _require(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", self.max_tokens, ">= 1")
        _require(self.min_tokens >= 0, "min_tokens", self.min_tokens, ">= 0")
        if self.max_tokens is not None:
            _require(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                     f"<= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(value is None or 0 <= value <= MAX_LOGPROBS, name, value, f"in [0, {MAX_LOGPROBS}]")
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "non-empty strings")
        _require(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                 "stop_token_ids", self.stop_token_ids, "non-negative token ids")


_OPTIONAL = {"seed", "stop", "stop_token_ids", "max_tokens", "logprobs", "prompt_logprobs", "logit_bias"}
_NUMBER = (int, float)
_TYPES: dict[str, tuple[type, ...]] = {
    "n": (int,), "temperature": _NUMBER, "top_p": _NUMBER, "top_k": (int,), "min_p": _NUMBER,
    "repetition_penalty": _NUMBER, "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER,
    "seed": (int,), "stop": (str, list, tuple), "stop_token_ids": (list, tuple),
    "include_stop_str_in_output": (bool,), "ignore_eos": (bool,), "max_tokens": (int,), "min_tokens": (int,),
    "logprobs": (int,), "prompt_logprobs": (int,), "logit_bias": (dict,), "skip_special_tokens": (bool,),
    "spaces_between_special_tokens": (bool,), "detokenize": (bool,),
}


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        _fail(name, value, allowed)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: it must be {allowed}")
