"""Structured outputs offline (LLM): every constrained output follows its grammar (JSON schemas,
choices, regexes), at temperature 1 and with n > 1, next to free requests in the same batch,
through preemption, asynchronous scheduling, prefix caching and stop strings; constrained
requests get no draft tokens; a grammar being compiled holds back its own request only; bad
constraints are refused by name."""

from __future__ import annotations

import json
import re
import sys
import threading

import jsonschema
import pytest
import torch

from pagoda import LLM, GuidedDecodingParams, SamplingParams, StructuredOutputsParams
from pagoda.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.executor.uniproc import UniprocExecutor
from pagoda.structured_output.grammar import GrammarCompiler
from tests.serving import save_tokenizer
from tests.tiny_models import save_tiny_model

# Nested objects, arrays, enums, required fields, numbers with bounds, string patterns. Strings
# are bounded so that a random model's output ends within max_tokens: by patterns, as xgrammar
# (0.2.9) lets maxLength strings hold raw control characters, which JSON forbids.
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                               "name": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
                "required": ["id", "name"],
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
    },
    "array": {
        "type": "array",
        "items": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}},
                  "required": ["x"]},
        "minItems": 1, "maxItems": 3,
    },
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "bounded_number": {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}},
                       "required": ["p"]},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
                "required": ["code"]},
}
PROMPT = {"prompt": "Answer in JSON:"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("structured")
    vocab_size = save_tokenizer(directory / "llama3")
    return save_tiny_model("llama3", directory, vocab_size=vocab_size)


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(model=str(model_dir), device="cpu", max_model_len=512, seed=0)


def _json(schema: dict, **params) -> SamplingParams:
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    return SamplingParams(structured_outputs=so, **{"max_tokens": 200, **params})


def _texts(llm: LLM, prompts, params) -> list[list[tuple[str, str]]]:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [[(c.text, c.finish_reason) for c in out.outputs] for out in outputs]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schemas_validate(llm, temperature):
    names = list(SCHEMAS)
    params = [_json(SCHEMAS[name], temperature=temperature, n=2 if temperature else 1, seed=7) for name in names]
    for name, outputs in zip(names, _texts(llm, [PROMPT] * len(names), params)):
        for text, finish_reason in outputs:
            assert finish_reason == "stop", (name, text)
            jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_json_object_and_any_whitespace(llm):
    # A random model writes keys forever: a bias on "}" closes the object wherever it may be closed.
    close = llm.llm_engine.tokenizer.convert_tokens_to_ids("}")
    params = [
        SamplingParams(max_tokens=50, temperature=0, logit_bias={close: 100},
                       structured_outputs=StructuredOutputsParams(json_object=True)),
        SamplingParams(max_tokens=200, temperature=0, structured_outputs=StructuredOutputsParams(json=SCHEMAS["enum"])),
    ]
    (obj,), (enum,) = _texts(llm, [PROMPT, PROMPT], params)
    assert obj[1] == "stop" and json.loads(obj[0]) == {}, obj
    jsonschema.validate(json.loads(enum[0]), SCHEMAS["enum"])


def test_max_tokens_cuts_the_json(llm):
    out = llm.generate(PROMPT, _json(SCHEMAS["nested"], max_tokens=4), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    assert out.text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_ignore_eos_goes_on_past_the_grammar(llm):
    """A complete grammar allows only EOS; ignored, the request goes on unconstrained."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(regex="ab"))
    out = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    eos = llm.llm_engine.tokenizer.eos_token_id
    assert out.finish_reason == "length" and len(out.token_ids) == 6 and out.token_ids[2] == eos
    assert out.text.startswith("ab")


def test_choice_and_regex(llm):
    choices = ["yes", "no", 'a "quoted" one']
    params = [
        SamplingParams(n=8, temperature=1.0, seed=1, max_tokens=20,
                       structured_outputs=StructuredOutputsParams(choice=choices)),
        SamplingParams(n=8, temperature=1.0, seed=2, max_tokens=20,
                       guided_decoding=GuidedDecodingParams(regex=r"[a-c]{2}-\d{1,3}")),
    ]
    picked, matched = _texts(llm, [PROMPT, PROMPT], params)
    assert all(fr == "stop" and text in choices for text, fr in picked), picked
    assert all(fr == "stop" and re.fullmatch(r"[a-c]{2}-\d{1,3}", text) for text, fr in matched), matched


def test_mixed_batch_leaves_free_requests_alone(llm):
    free = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPT, free, use_tqdm=False)[0].outputs[0].token_ids
    constrained = _json(SCHEMAS["pattern"], temperature=0)
    outs = llm.generate([PROMPT, PROMPT, PROMPT], [constrained, free, constrained], use_tqdm=False)
    assert outs[1].outputs[0].token_ids == alone
    for out in (outs[0], outs[2]):
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS["pattern"])


def test_stop_strings(llm):
    out = llm.generate(PROMPT, _json(SCHEMAS["nested"], temperature=0, stop=[","]), use_tqdm=False)[0].outputs[0]
    whole = llm.generate(PROMPT, _json(SCHEMAS["nested"], temperature=0), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == ","
    assert whole.text.startswith(out.text + ",")


@pytest.mark.parametrize("engine_args", [
    dict(num_gpu_blocks_override=24, block_size=4),  # room for one or two requests: preemption
    dict(async_scheduling=True),
    dict(enable_prefix_caching=True, block_size=4),
], ids=["preempting", "async", "prefix-cache"])
def test_engine_paths_keep_outputs(llm, model_dir, engine_args, monkeypatch):
    """Greedy constrained outputs are the same whatever the engine does around them."""
    prompts = [{"prompt": f"Answer {i} in JSON:"} for i in range(4)]
    params = [_json(SCHEMAS[name], temperature=0) for name in ("nested", "array", "nested", "pattern")]
    expected = _texts(llm, prompts, params)
    other = LLM(model=str(model_dir), device="cpu", max_model_len=512, seed=0, **engine_args)
    deferred = []
    launch = UniprocExecutor.launch
    monkeypatch.setattr(UniprocExecutor, "launch", lambda self, out, defer_sampling=False: (
        deferred.append(defer_sampling), launch(self, out, defer_sampling))[1])
    assert _texts(other, prompts, params) == expected
    # With async scheduling the constrained steps overlap: each samples once the step before it is read.
    assert any(deferred) == bool(engine_args.get("async_scheduling"))
    if "enable_prefix_caching" in engine_args:
        assert _texts(other, prompts, params) == expected  # from the prefix cache
    scheduler = other.llm_engine.engine_core.engine_core.scheduler
    if "num_gpu_blocks_override" in engine_args:
        assert scheduler.num_preemptions > 0
    if "enable_prefix_caching" in engine_args:
        assert scheduler.kv_cache_manager.prefix_cache_hits > 0


def test_compiling_grammar_holds_back_only_its_request(llm, monkeypatch):
    release = threading.Event()
    compile_grammar = GrammarCompiler.compile

    def slow_compile(self, params):
        assert release.wait(60)
        return compile_grammar(self, params)

    monkeypatch.setattr(GrammarCompiler, "compile", slow_compile)
    engine = llm.llm_engine
    prompt = engine.tokenizer.encode(PROMPT["prompt"])
    slow = StructuredOutputsParams(regex="slow[0-9]")
    engine.add_request("constrained", prompt, SamplingParams(max_tokens=8, structured_outputs=slow))
    engine.add_request("free", prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    finished = {}
    while "free" not in finished:
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert "constrained" not in finished  # still waiting for its grammar
    release.set()
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert re.fullmatch("slow[0-9]", finished["constrained"].outputs[0].text)


class RepeatProposer:
    """Drafts for every request it is shown: its last token, twice; remembers whom it saw."""

    num_speculative_tokens = 2

    def __init__(self) -> None:
        self.shown: set[str] = set()

    def propose(self, requests):
        self.shown.update(r.request_id for r in requests)
        return {r.request_id: [r.output_token_ids[-1]] * 2 for r in requests}


def test_constrained_requests_get_no_drafts(llm, model_dir):
    proposer = RepeatProposer()
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", max_model_len=512, seed=0), proposer)
    prompt = engine.tokenizer.encode(PROMPT["prompt"])
    engine.add_request("constrained", prompt, _json(SCHEMAS["pattern"], temperature=0), final_only=True)
    engine.add_request("free", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), final_only=True)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step()})
    assert proposer.shown == {"free"}
    expected = llm.generate(PROMPT, _json(SCHEMAS["pattern"], temperature=0), use_tqdm=False)[0].outputs[0].text
    assert finished["constrained"].outputs[0].text == expected


@pytest.mark.parametrize("constraint, field", [
    (dict(json={"type": "wat"}), "json"),
    (dict(json={"type": "array", "items": {"type": "integer"}, "uniqueItems": True}), "json"),
    (dict(json="{not json"), "json"),
    (dict(regex="[a-z"), "regex"),
    (dict(grammar="root ::= undefined_rule"), "grammar"),
])
def test_bad_constraints_are_refused_by_name(llm, constraint, field):
    params = SamplingParams(structured_outputs=StructuredOutputsParams(**constraint))
    with pytest.raises(ValueError, match=f"^{field}="):
        llm.generate(PROMPT, params, use_tqdm=False)
    assert llm.generate(PROMPT, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].text is not None


def test_params_are_checked_on_construction():
    with pytest.raises(ValueError, match="^structured_outputs=.*exactly one"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="^structured_outputs=.*exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="^guided_decoding="):
        SamplingParams(structured_outputs=StructuredOutputsParams(regex="a"),
                       guided_decoding=GuidedDecodingParams(regex="b"))
    moved = SamplingParams(guided_decoding=GuidedDecodingParams(choice=["a"]))
    assert moved.structured_outputs == StructuredOutputsParams(choice=["a"]) and moved.guided_decoding is None


def test_threaded_accepts_equal_one_at_a_time(llm):
    """A step's tokens taken on several threads leave every matcher where taking them one at a
    time does: the same masks after each of many steps of random allowed tokens."""
    import numpy as np

    compiler = GrammarCompiler(llm.llm_engine.processor.config.model.grammar_vocab, accept_threads=3)
    grammar = compiler.compile(StructuredOutputsParams(json=SCHEMAS["array"], disable_any_whitespace=True))
    threaded = [compiler.matcher(grammar) for _ in range(100)]
    serial = [compiler.matcher(grammar) for _ in range(100)]
    rng = np.random.default_rng(0)
    for _ in range(12):
        going = [i for i, m in enumerate(threaded) if not m.is_terminated()]
        assert [i for i, m in enumerate(serial) if not m.is_terminated()] == going
        masks = []
        for matchers in (threaded, serial):
            mask = compiler.allocate_bitmask(len(going))
            compiler.fill_bitmask([matchers[i] for i in going], mask)
            masks.append(mask)
        assert torch.equal(masks[0], masks[1])
        rows = masks[0].numpy().view(np.uint8)
        tokens = [int(rng.choice(np.flatnonzero(np.unpackbits(row, bitorder="little")))) for row in rows]
        assert all(compiler.accept_tokens([threaded[i] for i in going], tokens))
        assert all(serial[i].accept_token(t) for i, t in zip(going, tokens))
    assert len(going) > 50  # most were still inside the array: the masks above compared real states
    compiler.shutdown()


def test_compiled_grammars_kept_are_bounded_by_their_memory(llm, monkeypatch):
    """vLLM's VLLM_XGRAMMAR_CACHE_MB: past the budget the least recently used grammars go (the
    newest stays); within it each distinct constraint compiles once."""
    from pagoda.core.request import Request
    from pagoda.structured_output.manager import StructuredOutputManager

    def compiled_keys(budget_mb: str, count: int) -> list[tuple]:
        monkeypatch.setenv("VLLM_XGRAMMAR_CACHE_MB", budget_mb)
        manager = StructuredOutputManager(llm.llm_engine.processor.config.model.grammar_vocab)
        for i in range(count):
            params = SamplingParams(structured_outputs=StructuredOutputsParams(choice=[f"choice {i}", "other"]))
            manager.add_request(Request(f"r{i}", [1, 2], params, frozenset({0}), 64))
            while manager.has_compiling:
                manager.wait_for_compiles(10.0)
                manager.take_compiled()
        return list(manager._compiled)

    first = StructuredOutputsParams(choice=["choice 0", "other"]).key
    assert len(compiled_keys("512", 3)) == 3
    kept = compiled_keys("0.000001", 3)  # a byte: any grammar is past it
    assert len(kept) == 1 and kept[0] != first  # the newest only


def test_the_engines_structured_outputs_config_disables_any_whitespace(llm, model_dir):
    """--structured-outputs-config '{"disable_any_whitespace": true}': requests that leave any
    whitespace allowed get JSON with xgrammar's fixed separators all the same (vLLM's engine-wide
    setting): as json.dumps writes it."""
    params = SamplingParams(max_tokens=200, temperature=1.0, n=6, seed=3,
                            structured_outputs=StructuredOutputsParams(json=SCHEMAS["array"]))
    compact = LLM(model=str(model_dir), device="cpu", max_model_len=512, seed=0,
                  structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
    spaced_texts = [text for text, _ in _texts(llm, [PROMPT], params)[0]]
    compact_texts = [text for text, _ in _texts(compact, [PROMPT], params)[0]]
    assert any(text != json.dumps(json.loads(text)) for text in spaced_texts), spaced_texts  # any whitespace
    for text in compact_texts:
        jsonschema.validate(json.loads(text), SCHEMAS["array"])
        assert text == json.dumps(json.loads(text))


@pytest.mark.parametrize("config, message", [
    ({"structured_outputs_config": {"backend": "outlines"}}, "xgrammar alone"),
    ({"guided_decoding_backend": "lm-format-enforcer"}, "guided_decoding_backend='lm-format-enforcer'"),
    ({"structured_outputs_config": {"backend": "nope"}}, r"must be one of \('auto', 'xgrammar'\)"),
    ({"structured_outputs_config": {"whitespace": False}}, r"unknown keys \['whitespace'\]"),
    ({"structured_outputs_config": {"disable_any_whitespace": "yes"}}, "true or false"),
])
def test_a_structured_outputs_backend_other_than_xgrammar_is_refused_by_name(config, message):
    from pagoda.config import EngineConfig

    with pytest.raises(ValueError, match=message):
        EngineConfig(**config)


def test_without_xgrammar_the_engine_serves_unconstrained_requests(model_dir, monkeypatch):
    """xgrammar missing (a dependency, but an install may lack it): the engine starts without
    structured outputs, generates unconstrained, and refuses a constraint by its field, naming
    xgrammar; grammar_vocab says why it gives no vocabulary."""
    from pagoda.structured_output import grammar

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` raises ImportError
    warnings = []
    monkeypatch.setattr(grammar.logger, "warning", lambda *args: warnings.append(args[0] % args[1:]))
    llm = LLM(model=str(model_dir), device="cpu", max_model_len=512, seed=0)
    try:
        assert warnings == [f"no structured outputs: {grammar.NOT_INSTALLED}"]
        assert llm.generate(PROMPT, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].text is not None
        params = SamplingParams(structured_outputs=StructuredOutputsParams(regex="[0-9]{3}-without"))
        with pytest.raises(ValueError, match="^regex=.*xgrammar, which is not installed"):
            llm.generate(PROMPT, params, use_tqdm=False)
        assert llm.generate(PROMPT, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].text is not None
    finally:
        llm.shutdown()
