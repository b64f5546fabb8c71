"""Speculative decoding with the `ngram` method (prompt lookup): the proposer on hand-made
histories; its configuration as vLLM spells it, and the errors; greedy outputs identical with it on
and off on a tiny random model whose outputs repeat (drafts proposed and accepted), with preemption
and chunked prefill in the same run; seeded sampling unchanged; the spec-decode counters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pagoda import SamplingParams
from pagoda.config import EngineConfig
from pagoda.config.groups import SpeculativeConfig
from pagoda.config.speculative import resolve_speculative
from pagoda.core.scheduler import SchedulerStats
from pagoda.engine.llm_engine import LLMEngine
from pagoda.entrypoints.cli import build_parser
from pagoda.entrypoints.engine_args import engine_kwargs
from pagoda.entrypoints.openai.metrics import EngineCollector
from pagoda.spec.ngram import lookup_drafts
from tests.tiny_models import save_tiny_model

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


# The proposer -----------------------------------------------------------------------------------


def test_the_longest_suffix_ngram_wins():
    # Suffix [1, 2, 3] occurred at 0 (followed by 9); its tail [2, 3] alone occurred later, at 5 (followed by 7).
    history = [1, 2, 3, 9, 8, 2, 3, 7, 6, 1, 2, 3]
    assert lookup_drafts(history, 1, 3, 2) == [9, 8]
    assert lookup_drafts(history, 1, 2, 2) == [9, 8]  # [2, 3] first occurred at 1 too
    assert lookup_drafts([5, 2, 3, 7, 4, 1, 2, 3], 1, 2, 2) == [7, 4]


def test_the_earliest_occurrence_gives_the_drafts():
    assert lookup_drafts([4, 5, 1, 4, 5, 2, 4, 5], 2, 2, 3) == [1, 4, 5]


def test_drafts_stop_at_k_and_at_the_end_of_the_history():
    assert lookup_drafts([1, 2, 3, 4, 5, 6, 1, 2], 2, 2, 3) == [3, 4, 5]
    assert lookup_drafts([7, 7], 1, 1, 4) == [7]  # only what follows the match: the suffix itself


def test_no_draft_without_an_earlier_match_of_at_least_min_tokens():
    assert lookup_drafts([1, 2, 3, 4], 1, 3, 4) == []
    assert lookup_drafts([1, 2, 9, 2], 2, 3, 4) == []  # [2] repeats, but min is 2
    assert lookup_drafts([3], 1, 3, 4) == []


# Configuration ----------------------------------------------------------------------------------


def test_vllm_spellings_resolve_to_one_config():
    expected = SpeculativeConfig(4, "ngram", 1, 3)
    assert resolve_speculative(NGRAM, None, None) == expected
    assert resolve_speculative(None, "[ngram]", 4) == SpeculativeConfig(4, "ngram", 5, 5)  # vLLM's default n
    assert resolve_speculative({"method": "ngram", "prompt_lookup_max": 3}, None, 4) == SpeculativeConfig(4, "ngram", 3, 3)
    assert resolve_speculative(None, None, None) is None
    args = build_parser().parse_args(["serve", "m", "--speculative-config", '{"method": "ngram", '
                                      '"num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}'])
    config = EngineConfig(**engine_kwargs(args))
    assert resolve_speculative(config.speculative_config, None, None) == expected


@pytest.mark.parametrize("settings, message", [
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens=0 is invalid"),
    ({"method": "ngram"}, "num_speculative_tokens=None is invalid"),
    ({"method": "lookahead", "num_speculative_tokens": 2},
     "method='lookahead' is not known: must be one of ['ngram', 'draft_model', 'eagle', 'eagle3', 'medusa']"),
    ({"method": "mtp", "num_speculative_tokens": 2}, "method='mtp' is not built yet"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model=None is invalid: method='draft_model' needs"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min=4 is larger than prompt_lookup_max=2"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 0}, "prompt_lookup_min=0 is invalid"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_tp": 1}, "unknown keys ['draft_tp']"),
])
def test_bad_settings_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        resolve_speculative(settings, None, None)


def test_a_bad_flag_value_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--speculative-config", "{ngram"])
    assert "--speculative-config: not valid JSON" in capsys.readouterr().err


# End to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    # A vocabulary of 12 makes greedy outputs fall into cycles, which prompt lookup then predicts.
    return str(save_tiny_model("llama3", tmp_path_factory.mktemp("ngram"), vocab_size=12))


PROMPTS = [[2, 3, 4, 5, 2, 3, 4, 5, 2, 3], [6, 7, 8, 9, 10, 11, 6, 7, 8, 9, 10, 11, 2, 4, 6, 8, 2, 4, 6, 8, 2],
           [3, 3], [11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 11, 10, 9]]


def _engine(model_dir: str, **overrides) -> LLMEngine:
    config = {"model": model_dir, "device": "cpu", "skip_tokenizer_init": True, "max_model_len": 96,
              "block_size": 4, "num_gpu_blocks_override": 64, "max_num_batched_tokens": 32}
    return LLMEngine(EngineConfig(**{**config, **overrides}))


def _generate(engine: LLMEngine, params: list[SamplingParams]) -> tuple[list[list[int]], int]:
    """Every request's tokens, and the engine steps they took."""
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        engine.add_request(str(i), prompt, p, final_only=True)
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        done.update((out.request_id, out.outputs[0].token_ids) for out in engine.step())
        steps += 1
        assert steps < 1000, "the engine stopped making progress"
    return [list(done[str(i)]) for i in range(len(PROMPTS))], steps


def _stats(engine: LLMEngine) -> SchedulerStats:
    return engine.engine_core.engine_core.scheduler.stats()


GREEDY = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (40, 33, 45, 38)]


@pytest.fixture(scope="module")
def plain(model_dir) -> tuple[list[list[int]], int]:
    return _generate(_engine(model_dir), GREEDY)


def test_greedy_outputs_are_the_same_with_ngram_drafts(model_dir, plain):
    expected, plain_steps = plain
    engine = _engine(model_dir, speculative_config=NGRAM)
    tokens, steps = _generate(engine, GREEDY)
    assert tokens == expected
    stats = _stats(engine)
    assert stats.num_accepted_tokens > 0 and stats.num_draft_tokens > stats.num_accepted_tokens
    assert steps < plain_steps
    assert stats.num_accepted_tokens == sum(stats.num_accepted_tokens_per_pos)
    per_pos = stats.num_accepted_tokens_per_pos
    assert len(per_pos) == 4 and list(per_pos) == sorted(per_pos, reverse=True)  # position i needs i - 1 accepted


def test_greedy_outputs_are_the_same_with_preemption_and_chunked_prefill(model_dir, plain):
    expected, _ = plain
    # 6-token prefill chunks, and 16 blocks of 4 tokens for four requests of up to ~60 tokens: preempted.
    engine = _engine(model_dir, speculative_config=NGRAM, num_gpu_blocks_override=16, max_num_batched_tokens=6)
    tokens, _ = _generate(engine, GREEDY)
    assert tokens == expected
    stats = _stats(engine)
    assert stats.num_preemptions > 0 and stats.num_accepted_tokens > 0


def test_seeded_sampling_is_the_same_with_ngram_drafts(model_dir):
    params = [SamplingParams(max_tokens=30, temperature=0.8, seed=s, ignore_eos=True) for s in range(4)]
    expected, _ = _generate(_engine(model_dir), params)
    engine = _engine(model_dir, speculative_config=NGRAM)
    tokens, _ = _generate(engine, params)
    assert tokens == expected and _stats(engine).num_drafts > 0
    assert _generate(_engine(model_dir, speculative_config=NGRAM), params)[0] == expected


def test_a_method_not_built_is_refused_at_start_up(model_dir):
    with pytest.raises(ValueError, match="method='mtp' is not built yet"):
        _engine(model_dir, speculative_config={"method": "mtp", "num_speculative_tokens": 2})


def test_metrics_show_the_spec_decode_counters():
    stats = SchedulerStats(1, 0, 0.1, 0, 0, 0, num_drafts=5, num_draft_tokens=20, num_accepted_tokens=9,
                           num_accepted_tokens_per_pos=(4, 3, 2, 0))
    engine = SimpleNamespace(stats=stats, counters=SimpleNamespace(prompt_tokens=0, generation_tokens=0, prompt_image_tokens=0),
                             requests_per_core=[1], config=SimpleNamespace(speculative=1))
    samples = {(s.name, s.labels.get("position")): s.value
               for metric in EngineCollector(engine, "m").collect() for s in metric.samples}
    assert samples[("pagoda:spec_decode_num_drafts_total", None)] == 5
    assert samples[("pagoda:spec_decode_num_draft_tokens_total", None)] == 20
    assert samples[("pagoda:spec_decode_num_accepted_tokens_total", None)] == 9
    assert [samples[("pagoda:spec_decode_num_accepted_tokens_per_pos_total", str(i))] for i in range(4)] == [4, 3, 2, 0]
    engine.config.speculative = None
    assert not any("spec_decode" in metric.name for metric in EngineCollector(engine, "m").collect())
