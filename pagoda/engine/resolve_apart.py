"""The server's engine configuration, resolved in a short-lived process of its own.

Reading a model's Hugging Face config takes transformers' config classes, and with torch installed
they import ~1,000 modules more (torch.distributed.tensor, accelerate, sympy: ~70 MB), and torch
itself. Once the config is a ModelSpec, the engine cores need none of transformers' and the front
end neither those nor torch (it tokenizes, routes and detokenizes), yet an import stays for the
life of the process that made it. So `pagoda serve` resolves its configuration in a fork of
the core server (engine/core_launcher.py: torch and the engine imported, transformers' configs
not), which sends the ResolvedModel, the tokenizer and the ResolvedConfig back and exits; the
front end holds the configuration's torch values by name (config/torch_values.py). The offline
LLM, and AsyncLLM used as a library, resolve in their own process (which has torch anyway).

`pagoda serve` starts that resolution first thing (`resolve_ahead`), in a thread of the front end
that waits for the fork, so that it runs while the front end imports its web stack (~2 s).
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from pagoda.config import EngineConfig
from pagoda.config.torch_values import dumps
from pagoda.engine.core_launcher import core_process_context
from pagoda.logger import log_to_stderr

if TYPE_CHECKING:
    from pagoda.config.groups import ResolvedConfig
    from pagoda.loader.model_resolver import ResolvedModel

logger = logging.getLogger(__name__)

# A tokenizer that does not pickle is loaded by the front end instead.
_NOT_SENT = "pagoda: the tokenizer did not pickle"
_UNPICKLABLE = (pickle.PicklingError, TypeError, AttributeError)


def resolve_engine(args: EngineConfig, server: bool = False) -> tuple[ResolvedModel, Any, ResolvedConfig]:
    """The model found, its tokenizer (None with skip_tokenizer_init) and the engine's
    configuration (server: with `pagoda serve`'s defaults)."""
    from pagoda.config.resolve import resolve_config
    from pagoda.loader.model_resolver import resolve_engine_model

    resolved = resolve_engine_model(args)
    tokenizer = None if args.skip_tokenizer_init else _load_tokenizer(resolved, args)
    return resolved, tokenizer, resolve_config(args, resolved, tokenizer, server=server)


class _Ahead:
    """A resolve_apart begun in a thread; `result` waits for it and returns or raises what it did."""

    def __init__(self, args: EngineConfig, server: bool) -> None:
        self.args, self.server = args, server
        self._outcome: tuple[Any, BaseException | None] = (None, None)
        self._thread = threading.Thread(target=self._run, name="pagoda-resolve-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._outcome = (_resolve_in_fork(self.args, self.server), None)
        except BaseException as error:  # raised where the result is taken
            self._outcome = (None, error)

    def result(self) -> tuple[ResolvedModel, Any, ResolvedConfig]:
        self._thread.join()
        result, error = self._outcome
        if error is not None:
            raise error
        return result


_ahead: _Ahead | None = None


def resolve_ahead(args: EngineConfig, server: bool = True) -> None:
    """Begin resolve_apart(args, server) now, in a thread; the next resolve_apart of the same
    arguments takes its result."""
    global _ahead
    _ahead = _Ahead(args, server)


def resolve_apart(args: EngineConfig, server: bool = False) -> tuple[ResolvedModel, Any, ResolvedConfig]:
    """resolve_engine(args, server), run in a fork of the core server; the tokenizer comes back
    pickled (loaded here where it does not pickle: a model's own code), the configuration's torch
    values by name where this process has no torch (config/torch_values.py). What it raises is
    raised here (as a RuntimeError naming it where it does not pickle)."""
    global _ahead
    ahead, _ahead = _ahead, None
    if ahead is not None and (ahead.args, ahead.server) == (args, server):
        return ahead.result()
    return _resolve_in_fork(args, server)


def _resolve_in_fork(args: EngineConfig, server: bool) -> tuple[ResolvedModel, Any, ResolvedConfig]:
    context = core_process_context()
    receive, send = context.Pipe(duplex=False)
    process = context.Process(
        target=_resolve_and_send, name="pagoda-resolve", daemon=True,
        args=(args, server, send, logging.getLogger().getEffectiveLevel(), dict(os.environ)),
    )
    requested = time.time()
    process.start()  # the fork server forks once it has imported the core's modules
    send.close()  # so that the child's end alone holds the pipe open: EOF once it has gone
    try:
        began = pickle.loads(receive.recv_bytes())
        result = pickle.loads(receive.recv_bytes())
    except EOFError:
        process.join()
        raise RuntimeError(f"the process resolving the engine's configuration exited with {process.exitcode}") from None
    finally:
        receive.close()
    process.join()
    logger.info("configuration resolved in %.1f s, after %.1f s waiting for the core server's imports",
                time.time() - began, began - requested)
    if isinstance(result, BaseException):
        raise result
    resolved, tokenizer, config = result
    if tokenizer is _NOT_SENT:
        tokenizer = _load_tokenizer(resolved, args)
    return resolved, tokenizer, config


def _load_tokenizer(resolved: ResolvedModel, args: EngineConfig) -> Any:
    from pagoda.loader.model_loader import load_tokenizer

    return load_tokenizer(resolved, args.tokenizer, args.tokenizer_mode)


def _resolve_and_send(
    args: EngineConfig, server: bool, send: Connection, log_level: int, env: dict[str, str]
) -> None:
    send.send_bytes(pickle.dumps(time.time()))  # when the fork server got here: its imports' wait
    # The front end's environment as of now (the core server's is older): the cache and hub paths.
    os.environ.clear()
    os.environ.update(env)
    log_to_stderr(log_level)
    try:
        result: Any = resolve_engine(args, server)
    except Exception as error:  # the front end raises it, as if it had resolved the config itself
        result = error
    try:
        message = dumps(result)
    except _UNPICKLABLE:
        if isinstance(result, BaseException):
            message = dumps(RuntimeError(f"{type(result).__name__}: {result}"))
        else:
            message = dumps((result[0], _NOT_SENT, result[2]))
    send.send_bytes(message)
