"""The engine core's structured outputs: each distinct constraint compiled once, in a thread (a
request waits for its grammar; the step loop and every other request go on), a matcher per
constrained request advanced with the tokens it accepts, and each step's masks.

A matcher's state is the request's output so far: preemption (which recomputes the same tokens)
and prefix caching leave it as it is. A mask needs every token of its request known: with
asynchronous scheduling the engine queues a step's forward pass before the previous step's tokens
are read, and its sampling after them, with the masks made from them. Constrained requests get no
draft tokens (a mask is for one position)."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from pagoda.core.request import Request
from pagoda.core.scheduler import ScheduledChunk
from pagoda.sampling_params import StructuredOutputsParams
from pagoda.structured_output.bitmask import GrammarBitmask
from pagoda.structured_output.grammar import GrammarCompiler

logger = logging.getLogger("pagoda")

_MAX_CACHED_GRAMMARS = 1024
# The compiled grammars kept for later requests are also bounded by their memory (one of 20,000
# choices holds ~116 MB at a 49k vocabulary): vLLM's VLLM_XGRAMMAR_CACHE_MB, 512 by default.
_CACHE_MB_ENV = ("PAGODA_XGRAMMAR_CACHE_MB", "VLLM_XGRAMMAR_CACHE_MB")
_DEFAULT_CACHE_MB = 512


def cache_limit_bytes() -> int:
    value = next((os.environ[name] for name in _CACHE_MB_ENV if os.environ.get(name)), _DEFAULT_CACHE_MB)
    return int(float(value) * 2**20)


class StructuredOutputManager:
    def __init__(self, grammar_vocab: str | None) -> None:
        """grammar_vocab: the tokenizer's vocabulary as grammar.grammar_vocab serialized it (None:
        no tokenizer, one xgrammar cannot read, or no xgrammar: so no structured outputs)."""
        self._vocab = grammar_vocab
        self._compiler: GrammarCompiler | None = None  # built at the first constrained request
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pagoda-grammar")
        self._compiled: OrderedDict[tuple, Future] = OrderedDict()  # constraint key -> compiled grammar, LRU first
        self._cache_limit = cache_limit_bytes()
        self._compiling: dict[str, tuple[Request, Future]] = {}  # requests waiting for their grammar
        self._matchers: dict[str, tuple[Request, Any]] = {}  # request id -> (request, its matcher)
        self._off_grammar: set[str] = set()  # requests warned about a token their grammar refused

    def add_request(self, request: Request) -> None:
        """Start compiling the request's grammar (or find it compiled); it waits until then."""
        params = request.sampling_params.structured_outputs
        if params is None:
            return
        if self._vocab is None:
            raise ValueError("structured_outputs need the tokenizer's vocabulary: the engine was started "
                             "without a tokenizer (skip_tokenizer_init), with one xgrammar cannot read, or "
                             "without xgrammar installed")
        request.waiting_for_grammar = True
        self._compiling[request.request_id] = (request, self._grammar(params))

    def _grammar(self, params: StructuredOutputsParams) -> Future:
        key = params.key
        future = self._compiled.get(key)
        if future is None:
            if self._compiler is None:
                self._compiler = GrammarCompiler(self._vocab)
            future = self._compiled[key] = self._pool.submit(self._compiler.compile, params)
            self._evict()
        self._compiled.move_to_end(key)
        return future

    def _evict(self) -> None:
        """Drop the least recently used grammars past the cache's count and memory bounds (a
        running request keeps its own matcher's grammar alive; the newest is always kept)."""
        sizes = {key: _memory(future) for key, future in self._compiled.items()}
        total = sum(sizes.values())
        while len(self._compiled) > 1 and (len(self._compiled) > _MAX_CACHED_GRAMMARS or total > self._cache_limit):
            key, _ = self._compiled.popitem(last=False)
            total -= sizes[key]

    @property
    def has_matchers(self) -> bool:
        """Whether a request with a ready grammar is unfinished (its steps need masks)."""
        return bool(self._matchers)

    @property
    def has_compiling(self) -> bool:
        return bool(self._compiling)

    def take_compiled(self) -> list[Request]:
        """Let requests whose grammar is ready be scheduled; returns those whose compile failed
        (the caller ends them)."""
        failed = []
        ready = [(rid, entry) for rid, entry in self._compiling.items() if entry[1].done()]
        for rid, (req, future) in ready:
            del self._compiling[rid]
            if req.status.is_finished():
                continue
            error = future.exception()
            if error is not None:
                logger.error("grammar of request %s failed to compile: %s", rid, error)
                failed.append(req)
                continue
            self._matchers[rid] = (req, self._compiler.matcher(future.result()))
            req.waiting_for_grammar = False
        if ready:
            self._evict()  # the grammars just compiled count now
        return failed

    def wait_for_compiles(self, timeout: float) -> None:
        """Block until a grammar is compiled or timeout seconds pass (nothing else can run)."""
        wait([future for _, future in self._compiling.values()], timeout, return_when=FIRST_COMPLETED)

    def bitmask(self, chunks: Iterable[ScheduledChunk]) -> GrammarBitmask | None:
        """The masks of a step's constrained sample rows (rows counted as the runner samples
        them: the sampling chunks in order, 1 + drafts rows each). A grammar that has ended (its
        EOS accepted, the request going on with ignore_eos) constrains nothing more, as in vLLM."""
        if not self._matchers:  # most steps: nothing in the batch is constrained
            return None
        rows, matchers = [], []
        row = 0
        for chunk in chunks:
            entry = self._matchers.get(chunk.request.request_id) if chunk.samples else None
            if entry is not None and not entry[1].is_terminated():
                rows.append(row)
                matchers.append(entry[1])
            row += chunk.num_samples
        if not rows:
            return None
        assert self._compiler is not None
        bitmask = self._compiler.allocate_bitmask(len(rows))
        self._compiler.fill_bitmask(matchers, bitmask)
        return GrammarBitmask(rows, bitmask)

    def accept(self, updated: Iterable[tuple[Request, int]]) -> None:
        """Advance the matchers of requests that got tokens; drop those of finished requests."""
        if not self._matchers:
            return
        # Most steps give each request one token: those are taken in one batch, on several threads.
        one: list[tuple[Request, Any]] = []
        for req, n in updated:
            entry = self._matchers.get(req.request_id)
            if entry is None:
                continue
            if n == 1 and not entry[1].is_terminated():
                one.append(entry)
            elif not _accept(entry[1], req.output_token_ids[-n:] if n else []):
                self._warn_off_grammar(req)
        if one:
            assert self._compiler is not None
            taken = self._compiler.accept_tokens([m for _, m in one], [req.output_token_ids[-1] for req, _ in one])
            for (req, _), ok in zip(one, taken):
                if not ok:
                    self._warn_off_grammar(req)
        for rid in [rid for rid, (req, _) in self._matchers.items() if req.status.is_finished()]:
            del self._matchers[rid]
            self._off_grammar.discard(rid)

    def _warn_off_grammar(self, req: Request) -> None:
        # Only a conflict of the request's own parameters gets here: min_tokens masks the EOS that
        # a complete grammar allows alone. The matcher stays where it was.
        if req.request_id not in self._off_grammar:
            logger.warning("request %s: a token outside its grammar (min_tokens past the grammar's end?)",
                           req.request_id)
            self._off_grammar.add(req.request_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._compiler is not None:
            self._compiler.shutdown()


def _accept(matcher: Any, tokens: list[int]) -> bool:
    """Whether the matcher took every token (none after its grammar ended: EOS ignored)."""
    for token in tokens:
        if matcher.is_terminated():
            return True
        if not matcher.accept_token(token):
            return False
    return True


def _memory(future: Future) -> int:
    """A compiled grammar's bytes; 0 while it compiles, or if it failed."""
    if not future.done() or future.exception() is not None:
        return 0
    return future.result().memory_size_bytes
