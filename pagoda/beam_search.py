"""Beam search, run as vLLM runs it: above the engine. Each step, every live beam is an engine
request for one token with 2 * beam_width logprobs (its prompt and the beam's tokens so far are
cached blocks the prefix cache shares across beams and steps); the best beam_width continuations by
cumulative logprob live on. The ranking follows transformers' generate(num_beams=...) where vLLM's
differs: an EOS continuation ends a beam only if it is among the step's beam_width best (so width 1
is greedy decoding), and beams are finally ranked by cum_logprob / generated_len**length_penalty
(the ending EOS counted, the prompt not).

This module holds the search's state and rules; the offline LLM and the server drive it
(entrypoints/llm.py, entrypoints/openai/serving_engine.py for the completion and chat routes).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from pagoda.config import EngineConfig
from pagoda.outputs import CompletionOutput, PositionLogprobs
from pagoda.sampling_params import (
    SamplingParams,
    _as_bool,
    _as_float,
    _as_int,
    _require,
)

# Each step asks for 2 * beam_width logprobs: enough candidates to fill the beams again even if
# every beam's best continuation is EOS.
MAX_BEAM_WIDTH = EngineConfig.max_logprobs // 2  # within --max-logprobs' default


@dataclass
class BeamSearchParams:
    """vLLM's BeamSearchParams, validated on construction (a bad value raises ValueError naming it)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        self.beam_width = _as_int("beam_width", self.beam_width)
        self.max_tokens = _as_int("max_tokens", self.max_tokens)
        self.ignore_eos = _as_bool("ignore_eos", self.ignore_eos)
        self.temperature = _as_float("temperature", self.temperature)
        self.length_penalty = _as_float("length_penalty", self.length_penalty)
        _require(1 <= self.beam_width <= MAX_BEAM_WIDTH, "beam_width", self.beam_width, f"in [1, {MAX_BEAM_WIDTH}]")
        _require(self.max_tokens >= 1, "max_tokens", self.max_tokens, ">= 1")
        _require(self.temperature >= 0, "temperature", self.temperature, ">= 0 (0 means greedy)")

    def step_params(self) -> SamplingParams:
        """The engine request of one beam for one step."""
        return SamplingParams(
            max_tokens=1, temperature=self.temperature, logprobs=2 * self.beam_width, ignore_eos=True,
        )


@dataclass
class BeamSearchSequence:
    """One beam: `tokens` are the prompt's then the generated ones (as in vLLM); `logprobs` holds
    each generated position's candidates; `text` is filled in once the search is over."""

    tokens: list[int]
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    stop_reason: int | None = None  # the EOS token that ended it


@dataclass
class BeamSearchOutput:
    """The best beam_width beams of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_score(beam: BeamSearchSequence, prompt_len: int, length_penalty: float) -> float:
    """The ranking score of a beam: its cumulative logprob over its generated length (an ending
    EOS included) to the power length_penalty, as transformers scores finished beams."""
    return beam.cum_logprob / ((len(beam.tokens) - prompt_len) ** length_penalty)


class BeamSearch:
    """The search of one prompt: `live` are the beams to extend this step, `advance` extends them
    with their step's candidates, `best` ranks the result once `done`."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: Collection[int]) -> None:
        self.params = params
        self.prompt_len = len(prompt_token_ids)
        # ignore_eos: EOS is a token like any other, never the end of a beam.
        self.eos_token_ids = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self.live = [BeamSearchSequence(list(prompt_token_ids))]
        self.finished: list[BeamSearchSequence] = []
        self.steps = 0

    @property
    def done(self) -> bool:
        return not self.live or self.steps >= self.params.max_tokens

    def advance(self, candidates: list[PositionLogprobs | None]) -> None:
        """candidates[i]: the logprobs of live beam i's next token (None: its request ended
        without one, and the beam is dropped, as vLLM drops it)."""
        extended = sorted(
            (
                BeamSearchSequence(beam.tokens + [token_id], beam.logprobs + [position], beam.cum_logprob + lp.logprob)
                for beam, position in zip(self.live, candidates)
                for token_id, lp in (position or {}).items()
            ),
            key=lambda child: child.cum_logprob, reverse=True,
        )
        width = self.params.beam_width
        # An EOS continuation ends a beam only if it is among the beam_width best of the step (as
        # transformers has it: beam_width=1 is then greedy decoding); the rest are dropped.
        for child in extended[:width]:
            if child.tokens[-1] in self.eos_token_ids:
                child.finish_reason, child.stop_reason = "stop", child.tokens[-1]
                self.finished.append(child)
        self.live = [child for child in extended if child.tokens[-1] not in self.eos_token_ids][:width]
        self.steps += 1

    def best(self) -> list[BeamSearchSequence]:
        """The best beam_width of the finished and the live beams, best first."""
        for beam in self.live:
            beam.finish_reason = "length"
        beams = sorted(
            self.finished + self.live, key=lambda b: beam_score(b, self.prompt_len, self.params.length_penalty),
            reverse=True,
        )
        return beams[: self.params.beam_width]

    def generated(self, beam: BeamSearchSequence, strip_eos: bool) -> list[int]:
        """The tokens a beam added to the prompt; less its final EOS with strip_eos."""
        end = len(beam.tokens) - (strip_eos and beam.finish_reason == "stop")
        return beam.tokens[self.prompt_len : end]


def completion_outputs(search: BeamSearch, beams: list[BeamSearchSequence], tokenizer: object) -> list[CompletionOutput]:
    """The beams as the CompletionOutputs of one request (the server's choices): the generated
    tokens, the text without a final EOS (as vLLM writes it), all of it new (a stream's one delta)."""
    outputs = []
    for index, beam in enumerate(beams):
        text = "" if tokenizer is None else tokenizer.decode(search.generated(beam, strip_eos=True), skip_special_tokens=True)
        outputs.append(CompletionOutput(
            index=index, text=text, token_ids=search.generated(beam, strip_eos=False),
            cumulative_logprob=beam.cum_logprob, logprobs=beam.logprobs, finish_reason=beam.finish_reason,
            stop_reason=beam.stop_reason, text_delta=text,
        ))
    return outputs
