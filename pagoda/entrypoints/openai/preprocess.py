"""Preparing prompts off the event loop, so that one large or slow request never stalls the other
clients (or /health): tokenization runs on one tokenizer thread and refuses prompts far beyond the
context after tokenizing only a prefix of them; chat templates render on a thread of their own that
is stopped at a deadline."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pagoda.scoring import encode_pair

from .protocol import PromptInput
from .serving_engine import OpenAIError

# A prompt: its text (None when given as token ids) and its token ids.
Prompt = tuple[str | None, list[int]]

T = TypeVar("T")

# One thread, as vLLM has: a Hugging Face fast tokenizer is not safe to call from several threads
# at once ("Already borrowed"). The Rust tokenizer lets go of the GIL, so the event loop runs on.
_TOKENIZER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagoda-tokenizer")

# A prompt longer than this many characters per token of the context is first counted on a
# prefix of that length: real text averages 3-5 characters per token, so a prompt far beyond the
# context is refused after tokenizing max_model_len * 8 characters, not all of it.
_PREFIX_CHARS_PER_TOKEN = 8


async def _tokenize(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """The token ids of text, encoded on the tokenizer thread."""
    encode = functools.partial(tokenizer.encode, text, add_special_tokens=add_special_tokens)
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZER_THREAD, encode)


async def tokenize_prompt(
    tokenizer: Any, text: str, add_special_tokens: bool, max_model_len: int | None, param: str
) -> list[int]:
    """The token ids of a prompt, encoded on the tokenizer thread; a 400 naming param, before
    tokenizing all of it, when a prefix alone already has more tokens than the context holds
    (max_model_len None: no such check, for a prompt that truncate_prompt_tokens will cut)."""
    prefix_chars = None if max_model_len is None else max_model_len * _PREFIX_CHARS_PER_TOKEN
    if prefix_chars is not None and len(text) > prefix_chars:
        counted = len(await _tokenize(tokenizer, text[:prefix_chars], add_special_tokens))
        # The whole prompt has at least as many tokens as its prefix (give or take the word the
        # cut splits), so it could never run.
        if counted > max_model_len:
            raise OpenAIError(
                f"This model's maximum context length is {max_model_len} tokens. However, the prompt has more "
                f"than {counted} tokens (counted in its first {prefix_chars} characters alone). "
                "Please reduce the length of the prompt.",
                param=param, code="context_length_exceeded",
            )
    return await _tokenize(tokenizer, text, add_special_tokens)


async def tokenize_pair(
    tokenizer: Any, text_1: str, text_2: str, max_length: int | None
) -> tuple[list[int], list[int] | None]:
    """A cross-encoder's text pair as its tokenizer encodes pairs (scoring.encode_pair), on the
    tokenizer thread: its token ids and token types."""
    encode = functools.partial(encode_pair, tokenizer, text_1, text_2, max_length)
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZER_THREAD, encode)


async def prompt_inputs(
    prompt: PromptInput, param: str, tokenizer: Callable[[], Any], max_model_len: int | None,
    add_special_tokens: bool = True,
) -> list[Prompt]:
    """OpenAI's prompt forms (a string, strings, token ids, lists of token ids) as (text, ids) each;
    a 400 naming param for an empty list or a text far past the context. tokenizer: called for
    text prompts only (it raises when there is none)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise OpenAIError(f"{param} must not be empty", param=param)
    if all(isinstance(p, int) for p in prompt):
        return [(None, list(prompt))]  # type: ignore[arg-type]
    if all(isinstance(p, list) for p in prompt):
        return [(None, list(p)) for p in prompt]  # type: ignore[arg-type]
    loaded = tokenizer()
    return [
        (p, await tokenize_prompt(loaded, p, add_special_tokens, max_model_len, param))  # type: ignore[arg-type]
        for p in prompt
    ]


class DeadlineExceeded(Exception):
    """The work ran past its deadline and was stopped."""


class _Stop(BaseException):
    """Raised inside a thread whose work ran past its deadline. A BaseException, so that the
    work's own `except Exception` clauses (Jinja's, transformers') do not swallow it."""


async def run_with_deadline(work: Callable[[], T], seconds: float, name: str) -> T:
    """work() on a thread of its own; past `seconds`, DeadlineExceeded, and the thread is stopped
    at its next Python instruction (pure-Python work such as a Jinja template; a long C call ends
    first). A thread, not a process: the work needs this process's tokenizer."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[T] = loop.create_future()
    guard = threading.Lock()  # the thread is stopped only while work() runs
    running = True

    def settle(result: Any, error: BaseException | None) -> None:
        if outcome.done():
            return
        if error is not None:
            outcome.set_exception(error)
        else:
            outcome.set_result(result)

    def stop() -> None:
        outcome.cancel()  # nobody waits for it now: what the thread still reports is dropped
        with guard:
            if running:
                _raise_in_thread(thread, _Stop)

    def run() -> None:
        nonlocal running
        try:
            result, error = None, None
            try:
                result = work()
            except Exception as raised:
                error = raised
            finally:
                with guard:
                    running = False
            loop.call_soon_threadsafe(settle, result, error)
        except _Stop:
            pass  # the caller has already answered

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        return await asyncio.wait_for(asyncio.shield(outcome), seconds)
    except asyncio.TimeoutError:
        stop()
        raise DeadlineExceeded(f"{name} ran past its {seconds:g} s deadline") from None
    except asyncio.CancelledError:  # the client left: its work is no longer wanted
        stop()
        raise


def _raise_in_thread(thread: threading.Thread, error: type[BaseException]) -> None:
    # CPython's only way to stop another thread; the thread sees the error at its next bytecode.
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(error))
