"""The grammar library's side (xgrammar), and nothing else of the engine.

The front end, which has the tokenizer, turns its vocabulary into xgrammar's TokenizerInfo once
and ships it serialized (`grammar_vocab`), so the engine core compiles grammars without a
tokenizer. `check` parses a request's constraint without a vocabulary (cheap: no token masks),
so that bad input is refused, by name, before it reaches the core. `compile_grammar` builds the
token-level grammar for one vocabulary: the slow part, run off the step loop."""

from __future__ import annotations

import functools
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pagoda.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# JSON-schema keywords xgrammar accepts but does not enforce: a request with one is refused
# rather than given output that may break its schema.
_UNENFORCED_KEYWORDS = (
    "uniqueItems", "contains", "minContains", "maxContains", "not", "if", "then", "else",
    "dependentRequired", "dependentSchemas", "dependencies",
)
# Fewer matchers than this per thread cost more in hand-offs than the thread saves.
_MIN_ACCEPTS_PER_THREAD = 32
# Keywords whose value is one subschema, a list of them, or a name -> subschema map.
_SUBSCHEMA = ("items", "additionalProperties", "additionalItems", "unevaluatedProperties", "unevaluatedItems",
              "propertyNames")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")


NOT_INSTALLED = "structured outputs need xgrammar, which is not installed here (pip install xgrammar)"


def grammar_vocab(tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> str | None:
    """The tokenizer's vocabulary as xgrammar needs it, serialized: vocab_size is the model's
    (its logits' width, which may exceed the tokenizer's); EOS ends a grammar that is complete.
    None for a tokenizer xgrammar cannot read (a slow one in Python, such as ByT5's), or without
    xgrammar: the model still runs, without structured outputs."""
    try:
        import xgrammar
    except ImportError:  # a dependency, but an install without it still serves unconstrained requests
        logger.warning("no structured outputs: %s", NOT_INSTALLED)
        return None
    try:
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_token_ids)
        )
    except ValueError as error:  # xgrammar's "Unsupported tokenizer type"
        logger.warning("no structured outputs with this tokenizer: %s", error)
        return None
    return info.serialize_json()


def check(params: StructuredOutputsParams) -> None:
    """ValueError when the constraint does not parse or uses what xgrammar cannot enforce; the
    message starts with the offending field of StructuredOutputsParams (json=, regex=, ...)."""
    _check(params.key)


@functools.lru_cache(maxsize=256)
def _check(key: tuple) -> None:
    params = _from_key(key)
    name = next(n for n in ("json", "regex", "choice", "grammar", "json_object") if getattr(params, n) is not None)
    try:
        if params.json is not None:
            _check_schema_keywords(params.json)
        _grammar(params)
    except ImportError:
        raise ValueError(f"{name}={getattr(params, name)!r} cannot be enforced: {NOT_INSTALLED}") from None
    except RuntimeError as error:  # xgrammar's, and RecursionError for a schema nested too deeply
        raise ValueError(f"{name}={getattr(params, name)!r} is invalid: {_reason(error)}") from None


def _from_key(key: tuple) -> StructuredOutputsParams:
    json_text, regex, choice, grammar, json_object, compact = key
    return StructuredOutputsParams(
        json=json_text, regex=regex, choice=None if choice is None else list(choice), grammar=grammar,
        json_object=json_object, disable_any_whitespace=compact,
    )


def _check_schema_keywords(schema_text: str) -> None:
    try:
        schema = json.loads(schema_text)
    except ValueError as error:
        raise ValueError(f"json={schema_text!r} is invalid: not JSON ({error})") from None
    for keyword in _unenforced(schema):
        raise ValueError(
            f"json={schema_text!r} is invalid: the JSON-schema feature {keyword!r} is not supported "
            "for structured outputs"
        )


def _unenforced(schema: Any) -> list[str]:
    """Unenforceable keywords anywhere in a schema (subschemas walked by keyword, so that a
    property merely named "not" is not one)."""
    if not isinstance(schema, dict):
        return []
    found = [k for k in _UNENFORCED_KEYWORDS if k in schema]
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        found.append(f"$ref to {ref}")
    for keyword in _SUBSCHEMA:
        found += _unenforced(schema.get(keyword))
    for keyword in _SUBSCHEMA_LISTS:
        for sub in schema.get(keyword) or []:
            found += _unenforced(sub)
    for keyword in _SUBSCHEMA_MAPS:
        value = schema.get(keyword)
        for sub in value.values() if isinstance(value, dict) else []:
            found += _unenforced(sub)
    if isinstance(schema.get("items"), list):
        for sub in schema["items"]:
            found += _unenforced(sub)
    return found


def _reason(error: RuntimeError) -> str:
    """xgrammar's message without its C++ source location ('[time] file.cc:123: reason')."""
    text = str(error).strip()
    head, sep, tail = text.partition(".cc:")
    return tail.split(": ", 1)[-1] if sep else text


def _grammar(params: StructuredOutputsParams) -> Any:
    import xgrammar

    if params.json is not None:
        return xgrammar.Grammar.from_json_schema(params.json, any_whitespace=not params.disable_any_whitespace)
    if params.regex is not None:
        return xgrammar.Grammar.from_regex(params.regex)
    if params.choice is not None:
        return xgrammar.Grammar.from_ebnf(_choice_ebnf(params.choice))
    if params.grammar is not None:
        return xgrammar.Grammar.from_ebnf(params.grammar)
    return xgrammar.Grammar.builtin_json_grammar()


def _choice_ebnf(choices: list[str]) -> str:
    # JSON string literals are EBNF string literals: quotes, backslashes and controls escaped.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """Compiles constraints for one vocabulary (thread-safe: xgrammar's compiler is)."""

    def __init__(self, vocab: str, max_threads: int | None = None, accept_threads: int | None = None) -> None:
        import xgrammar

        self._xgrammar = xgrammar
        self.tokenizer_info = xgrammar.TokenizerInfo.deserialize_json(vocab)
        self.vocab_size: int = self.tokenizer_info.vocab_size
        # Half the host's cores: a large grammar compiles for seconds while the engine steps on.
        # No cache of xgrammar's own: the manager keeps compiled grammars, within its bounds.
        self._compiler = xgrammar.GrammarCompiler(
            self.tokenizer_info, max_threads=max_threads or max(1, (os.cpu_count() or 2) // 2), cache_enabled=False
        )
        # Fills a step's masks on several threads at once (half the host's cores, xgrammar's
        # default): one matcher after another costs ~0.2 ms a request at a 128k vocabulary.
        self._batch = xgrammar.BatchGrammarMatcher()
        # Takes a step's tokens on as many threads (xgrammar releases the GIL): one matcher after
        # another costs ~20 us a token, 5 ms a step of 256 requests, while the device waits.
        self._accept_threads = accept_threads or max(1, (os.cpu_count() or 2) // 2)
        self._accept_pool = ThreadPoolExecutor(self._accept_threads, thread_name_prefix="pagoda-grammar-accept")

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar (slow: token masks are precomputed); its matchers are cheap."""
        return self._compiler.compile_grammar(_grammar(params))

    def matcher(self, compiled: Any) -> Any:
        return self._xgrammar.GrammarMatcher(compiled)

    def allocate_bitmask(self, rows: int) -> Any:
        return self._xgrammar.allocate_token_bitmask(rows, self.vocab_size)

    def fill_bitmask(self, matchers: list[Any], bitmask: Any) -> None:
        """Row i of `bitmask`: the tokens matchers[i] allows next."""
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept_tokens(self, matchers: list[Any], tokens: list[int]) -> list[bool]:
        """matchers[i] takes tokens[i]; whether each did."""
        accept = self._xgrammar.BatchGrammarMatcher.batch_accept_token
        per_thread = max(_MIN_ACCEPTS_PER_THREAD, -(-len(matchers) // self._accept_threads))
        if per_thread >= len(matchers):
            return accept(matchers, tokens)
        slices = range(0, len(matchers), per_thread)
        results = self._accept_pool.map(lambda i: accept(matchers[i : i + per_thread], tokens[i : i + per_thread]), slices)
        return [ok for part in results for ok in part]

    def shutdown(self) -> None:
        self._accept_pool.shutdown(wait=False)
