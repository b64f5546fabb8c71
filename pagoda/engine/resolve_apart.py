"""The server's engine configuration, resolved in a short-lived process of its own.

Reading a model's Hugging Face config takes transformers' config classes, and with torch installed
they import ~1,000 modules more (torch.distributed.tensor, accelerate, sympy: ~70 MB), and torch
itself. Once the config is a ModelSpec, the engine cores need none of transformers' and the front
end neither those nor torch (it tokenizes, routes and detokenizes), yet an import stays for the
life of the process that made it. So `pagoda serve` resolves its configuration in a fork of
the core server (engine/core_launcher.py: torch and the engine imported, transformers' configs
not), which sends the ResolvedModel and the ResolvedConfig back, then the tokenizer, and exits
(the front end starts the engine cores with the first while it unpickles the second); the
front end holds the configuration's torch values by name (config/torch_values.py). The offline
LLM, and AsyncLLM used as a library, resolve in their own process (which has torch anyway).

`pagoda serve` starts that process first thing (`prepare_resolver`, before its argument parser):
it imports transformers' configuration and tokenizer classes while the front end imports, and
resolves once the arguments are parsed (`resolve_ahead`, a thread of the front end waiting for it).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import enum
import importlib
import importlib.metadata
import inspect
import logging
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from pagoda.config import EngineConfig
from pagoda.config.torch_values import dumps, loads_names
from pagoda.engine.core_launcher import core_process_context
from pagoda.logger import log_to_stderr

if TYPE_CHECKING:
    from pagoda.config.groups import ResolvedConfig
    from pagoda.loader.model_resolver import ResolvedModel

    # resolve_apart's: the model found, its tokenizer as it arrives (the call waits for it and raises
    # what loading it raised; None with skip_tokenizer_init) and the engine's configuration.
    Resolution = tuple[ResolvedModel, Callable[[], Any], ResolvedConfig]

logger = logging.getLogger(__name__)


class _Unsent(enum.Enum):
    """Sent in place of a tokenizer that does not pickle, which the front end then loads itself.
    A member unpickles as itself, so that `is` recognizes it (a string would come back a copy)."""

    TOKENIZER = "the tokenizer did not pickle"


_NOT_SENT = _Unsent.TOKENIZER
_UNPICKLABLE = (pickle.PicklingError, TypeError, AttributeError)


def resolve_engine(args: EngineConfig, server: bool = False) -> tuple[ResolvedModel, Any, ResolvedConfig]:
    """The model found, its tokenizer (None with skip_tokenizer_init) and the engine's
    configuration (server: with `pagoda serve`'s defaults). Where transformers is first imported
    here (the offline LLM's start), its package map is read fast."""
    from pagoda.config.resolve import resolve_config
    from pagoda.loader.model_resolver import resolve_engine_model

    with _package_names_read_fast():
        resolved = resolve_engine_model(args)
        tokenizer = None if args.skip_tokenizer_init else _load_tokenizer(resolved, args)
        return resolved, tokenizer, resolve_config(args, resolved, tokenizer, server=server)


class _Resolver:
    """A fork of the core server that resolves one configuration. Started before the arguments
    are known (`preimport`), it imports what resolving takes meanwhile, then waits for them."""

    def __init__(self, preimport: bool = False) -> None:
        context = core_process_context()
        requests, self._requests = context.Pipe(duplex=False)
        self._results, results = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_resolve_when_asked, name="pagoda-resolve", daemon=True,
            args=(requests, results, dict(os.environ), preimport),
        )
        self._started = time.time()
        self._process.start()  # the fork server forks once it has imported the core's modules
        requests.close()  # so that the child's ends alone hold the pipes open: EOF once it has gone
        results.close()

    def resolve(self, args: EngineConfig, server: bool) -> Resolution:
        asked = time.time()
        try:
            self._requests.send_bytes(pickle.dumps((args, server, logging.getLogger().getEffectiveLevel())))
            imports = None
            if not args.skip_tokenizer_init:
                imports = _InThread(_import_what_unpickling_takes, "pagoda-tokenizer-imports")
            ready = pickle.loads(self._results.recv_bytes())
            result = loads_names(self._results.recv_bytes())  # the model and configuration: no transformers
            sent_tokenizer = None if isinstance(result, BaseException) else self._results.recv_bytes()
        except (EOFError, BrokenPipeError):
            self._process.join()
            raise RuntimeError(
                f"the process resolving the engine's configuration exited with {self._process.exitcode}"
            ) from None
        finally:
            self._requests.close()
            self._results.close()
        self._process.join()
        logger.info("configuration resolved %.1f s after it was asked; its process was ready %.1f s after it started",
                    time.time() - asked, ready - self._started)
        if isinstance(result, BaseException):
            raise result
        resolved, config = result

        def tokenizer() -> Any:  # the classes its unpickling takes, imported since the ask
            if imports is not None:
                imports.result()
            loaded = pickle.loads(sent_tokenizer)
            logger.info("tokenizer unpickled %.1f s after the configuration was asked", time.time() - asked)
            return _load_tokenizer(resolved, args) if loaded is _NOT_SENT else loaded

        return resolved, _InThread(tokenizer, "pagoda-tokenizer").result, config


class _InThread:
    """fn() run in a thread from now; `result` waits for it and returns or raises what it did."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self._fn = fn
        self._outcome: tuple[Any, BaseException | None] = (None, None)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._outcome = (self._fn(), None)
        except BaseException as error:  # raised where the result is taken
            self._outcome = (None, error)

    def result(self) -> Any:
        self._thread.join()
        result, error = self._outcome
        if error is not None:
            raise error
        return result


_prepared: _InThread | None = None  # prepare_resolver's process (a _Resolver), not yet asked
_ahead: tuple[EngineConfig, bool, _InThread] | None = None  # resolve_ahead's resolution, not yet taken


def prepare_resolver() -> None:
    """Start the process that resolve_ahead will ask, now: it imports transformers' configuration
    and tokenizer classes (seconds) while this process builds its argument parser."""
    global _prepared
    _prepared = _InThread(lambda: _Resolver(preimport=True), "pagoda-resolver-start")


def resolve_ahead(args: EngineConfig, server: bool = True) -> None:
    """Begin resolve_apart(args, server) now, in a thread (in prepare_resolver's process, if it
    started one); the next resolve_apart of the same arguments takes its result."""
    global _ahead, _prepared
    prepared, _prepared = _prepared, None

    def resolve() -> Resolution:
        return (prepared.result() if prepared is not None else _Resolver()).resolve(args, server)

    _ahead = (args, server, _InThread(resolve, "pagoda-resolve-ahead"))


def resolve_apart(args: EngineConfig, server: bool = False) -> Resolution:
    """resolve_engine(args, server), run in a fork of the core server; the configuration's torch
    values come back by name where this process has no torch (config/torch_values.py), then the
    tokenizer pickled, which a thread here unpickles (loads, where it does not pickle: a model's own
    code) while the caller starts the engine with the configuration. What resolving raises is
    raised here (as a RuntimeError naming it where it does not pickle)."""
    global _ahead
    ahead, _ahead = _ahead, None
    if ahead is not None and ahead[:2] == (args, server):
        return ahead[2].result()
    return _Resolver().resolve(args, server)


def _import_what_unpickling_takes() -> None:
    """transformers' tokenizer classes, which the tokenizer sent back needs here (no config classes;
    transformers 5.17's import torch as well, for GGUF files): imported from the ask on, while the
    resolving process works. A failing import is left to the unpickling, which reports it."""
    with contextlib.suppress(Exception), _package_names_read_fast():
        import transformers

        transformers.PreTrainedTokenizerFast  # the lazy module imports it


def _load_tokenizer(resolved: ResolvedModel, args: EngineConfig) -> Any:
    from pagoda.loader.model_loader import load_tokenizer

    return load_tokenizer(resolved, args.tokenizer, args.tokenizer_mode)


def _resolve_when_asked(requests: Connection, send: Connection, env: dict[str, str], preimport: bool) -> None:
    # The front end's environment as of the start (the core server's is older): the cache and hub paths.
    os.environ.clear()
    os.environ.update(env)
    with contextlib.suppress(Exception), _package_names_read_fast():  # a transformers without these names
        _without_torch_only_imports()  # resolves as it is, only slower
    if preimport:
        with contextlib.suppress(Exception):  # an import that fails fails again in resolve_engine, which reports it
            _import_what_resolving_takes()
    send.send_bytes(pickle.dumps(time.time()))  # ready: the front end logs how long that took
    try:
        args, server, log_level = pickle.loads(requests.recv_bytes())
    except EOFError:  # the front end has gone without asking (its start failed first)
        return
    log_to_stderr(log_level)
    _resolve_and_send(args, server, send)


# transformers modules whose own import brings torch-only code that resolving never runs:
# auto_factory (transformers 5.17) GenerationMixin, for models (masking_utils -> torch._dynamo: 0.5 s
# on the device's GPU host; its assisted decoding imports scikit-learn where that is installed, as on
# the device: 2.2 s more with scipy and pandas); type_validators the activation functions, to check
# a config's hidden_act against (activations -> hub kernels -> torch.distributed.tensor: 0.4 s). The
# engine's model code refuses an activation it lacks (layers/activation.py).
_TORCH_ONLY_IMPORTS_SKIPPED = ("transformers.models.auto.auto_factory", "transformers.utils.type_validators")


def _without_torch_only_imports() -> None:
    """Import _TORCH_ONLY_IMPORTS_SKIPPED as where torch is not installed, in this process only: their
    own check of torch answers no (what they import sees torch), then each holds torch as usual."""
    import torch
    import transformers.utils
    from transformers.utils import import_utils

    installed = import_utils.is_torch_available

    def is_torch_available() -> bool:
        return sys._getframe(1).f_globals.get("__name__") not in _TORCH_ONLY_IMPORTS_SKIPPED and installed()

    transformers.utils.is_torch_available = import_utils.is_torch_available = is_torch_available
    try:
        for name in _TORCH_ONLY_IMPORTS_SKIPPED:
            if name not in sys.modules:
                vars(importlib.import_module(name)).update(is_torch_available=installed, torch=torch)
    finally:
        transformers.utils.is_torch_available = import_utils.is_torch_available = installed


@contextlib.contextmanager
def _package_names_read_fast() -> Iterator[None]:
    """importlib.metadata.packages_distributions as _packages_distributions computes it, while
    transformers is first imported: transformers 5.17 maps every installed distribution's import
    names as it is imported (5.25 only where a version lookup misses), through the standard
    library's, which makes a path object of each file a distribution lists and looks for it on disk
    (on the device's GPU host, 213 distributions: 0.98 s)."""
    standard = importlib.metadata.packages_distributions
    importlib.metadata.packages_distributions = _packages_distributions
    try:
        yield
    finally:
        importlib.metadata.packages_distributions = standard


def _packages_distributions() -> dict[str, list[str]]:
    """Each top-level import name -> the distributions providing it: those their top_level.txt
    names or, without one, the first part of each path their RECORD lists (a module's name for a
    file there), read as text; as Python 3.12's, but also where a listed file is missing, and with
    extension modules (3.11's counts .py files alone)."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    for dist in importlib.metadata.distributions():
        for name in (dist.read_text("top_level.txt") or "").split() or _top_level_names(dist):
            found[name].append(dist.metadata["Name"])
    return dict(found)


def _top_level_names(dist: importlib.metadata.Distribution) -> set[str]:
    record = dist.read_text("RECORD")
    if record is None:  # an egg's installed-files.txt or SOURCES.txt, through the standard parsing
        paths = [str(path) for path in dist.files or ()]
    else:
        paths = [row[0] for row in csv.reader(record.splitlines()) if row]
    names = set()
    for path in paths:
        top, nested, _ = path.partition("/")
        name = top if nested else inspect.getmodulename(top) or top
        if "." not in name:  # not a dist-info folder, a ../bin script or a data file
            names.add(name)
    return names


def _import_what_resolving_takes() -> None:
    """transformers' configuration and tokenizer classes, which any model's resolution imports,
    and the engine's resolution code; a model's own config class (Llama's here, the commonest)
    brings most of them. With torch installed they were ~1,000 modules (4-5 s on a GPU host) before
    _without_torch_only_imports: 0.2-0.4 s on this VM since (transformers 5.17 and 5.25)."""
    import transformers

    for module in ("pagoda.config.resolve", "pagoda.loader.model_loader"):
        importlib.import_module(module)
    for name in ("AutoConfig", "AutoTokenizer", "PreTrainedTokenizerFast", "LlamaConfig"):
        getattr(transformers, name)  # the lazy module imports it


def _resolve_and_send(args: EngineConfig, server: bool, send: Connection) -> None:
    """The model and configuration, then the tokenizer in a message of its own: the front end
    starts the engine cores with the first while it unpickles the second."""
    try:
        resolved, tokenizer, config = resolve_engine(args, server)
    except Exception as error:  # the front end raises it, as if it had resolved the config itself
        try:
            send.send_bytes(dumps(error))
        except _UNPICKLABLE:
            send.send_bytes(dumps(RuntimeError(f"{type(error).__name__}: {error}")))
        return
    send.send_bytes(dumps((resolved, config)))
    try:
        send.send_bytes(dumps(tokenizer))
    except _UNPICKLABLE:
        send.send_bytes(dumps(_NOT_SENT))
