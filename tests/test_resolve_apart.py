"""The server resolves its engine configuration in a short-lived process (engine/resolve_apart.py):
the same ModelSpec, config and tokenizer as resolving in place, the same errors; neither the
front end nor the engine cores import transformers' config classes, which bring ~1,000 modules
(torch.distributed.tensor, accelerate) that only reading the config needs, and the front end
imports no torch: it holds the configuration's torch values by name (config/torch_values.py)."""

from __future__ import annotations

import importlib.metadata
import os
import pickle
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from pagoda.config import EngineConfig, torch_values
from pagoda.engine import resolve_apart as apart
from pagoda.engine.core_launcher import CORE_MODULES
from tests.serving import save_tokenizer
from tests.tiny_models import save_tiny_model

# The module transformers' config classes import, with torch installed, that pulls the rest in.
CONFIG_CLASSES_CHAIN = "transformers.utils.type_validators"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    vocab_size = save_tokenizer(directory / "llama3")
    return save_tiny_model("llama3", directory, vocab_size=vocab_size)


def _torchs(config):
    """The front end's configuration (its torch values by name), as it reaches a process with torch."""
    return pickle.loads(pickle.dumps(config))


def test_resolving_apart_gives_what_resolving_here_gives(tiny):
    args = EngineConfig(model=str(tiny), device="cpu", max_model_len=256)
    here_model, here_tokenizer, here_config = apart.resolve_engine(args)
    model, tokenizer, config = apart.resolve_apart(args)
    tokenizer = tokenizer()  # unpickled in a thread of its own
    assert model == here_model and config.model.dtype == torch_values.TorchName("dtype", "float32")
    assert _torchs(config) == here_config
    assert type(tokenizer) is type(here_tokenizer)
    text = "Hello, world: the tokenizer came back whole."
    assert tokenizer.encode(text) == here_tokenizer.encode(text) and len(tokenizer.encode(text)) > 5
    messages = [{"role": "user", "content": text}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == here_tokenizer.apply_chat_template(
        messages, tokenize=False
    )


def test_a_config_that_does_not_resolve_raises_the_same_error(tiny):
    args = EngineConfig(model=str(tiny), device="cpu", max_model_len=10**9)
    with pytest.raises(ValueError) as here:
        apart.resolve_engine(args)
    with pytest.raises(ValueError) as there:
        apart.resolve_apart(args)
    assert str(there.value) == str(here.value) and "max_model_len" in str(there.value)


def test_a_resolution_begun_ahead_is_the_one_taken(tiny, monkeypatch):
    """`pagoda serve` starts the resolving process before its parser (it imports transformers'
    classes meanwhile) and asks it once the arguments are parsed, while its front end imports;
    the engine then takes that resolution (one process, not two), its errors included; other
    arguments resolve anew."""
    made = []

    class Counted(apart._Resolver):
        def __init__(self, preimport: bool = False) -> None:
            made.append(preimport)
            super().__init__(preimport)

    monkeypatch.setattr(apart, "_Resolver", Counted)
    args = EngineConfig(model=str(tiny), device="cpu", max_model_len=256)
    apart.prepare_resolver()
    apart.resolve_ahead(args, server=True)
    model, _, config = apart.resolve_apart(args, server=True)
    assert made == [True]
    assert (model, _torchs(config)) == apart.resolve_engine(args, server=True)[::2]
    apart.resolve_apart(args, server=True)  # taken once: a second call resolves again
    assert made == [True, False]

    bad = EngineConfig(model=str(tiny), device="cpu", max_model_len=10**9)
    apart.resolve_ahead(bad, server=True)
    with pytest.raises(ValueError, match="max_model_len"):
        apart.resolve_apart(bad, server=True)
    apart.resolve_ahead(bad, server=True)
    assert apart.resolve_apart(args, server=True)[2] == config  # not the one begun ahead
    assert made == [True, False, False, False, False]


def test_a_resolving_process_never_asked_ends_with_the_front_end():
    # A server whose start fails after the resolving process started (a bad flag): EOF, and it ends.
    resolver = apart._Resolver(preimport=False)
    resolver._requests.close()
    resolver._process.join(60)
    assert resolver._process.exitcode == 0


class _Connection:
    """A pipe's sending end that keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def send_bytes(self, message: bytes) -> None:
        self.sent.append(pickle.loads(message))

    def close(self) -> None:
        pass


class _Requests:
    """A pipe's receiving end holding the messages given, then at EOF."""

    def __init__(self, *messages: object) -> None:
        self.messages = [pickle.dumps(message) for message in messages]

    def recv_bytes(self) -> bytes:
        if not self.messages:
            raise EOFError
        return self.messages.pop(0)

    def close(self) -> None:
        pass


def test_the_imports_ahead_failing_leave_the_error_to_the_resolution(tiny, monkeypatch):
    # What fails to import ahead fails again while resolving, which sends it back named.
    def broken() -> None:
        raise ImportError("a broken install")

    monkeypatch.setattr(apart, "_import_what_resolving_takes", broken)
    monkeypatch.setattr(apart, "resolve_engine", lambda *_: broken())
    monkeypatch.setattr(apart, "log_to_stderr", lambda level: None)  # this process's logging stays as it is
    sent = _Connection()
    args = EngineConfig(model=str(tiny), device="cpu", max_model_len=256)
    apart._resolve_when_asked(_Requests((args, True, 20)), sent, dict(os.environ), preimport=True)
    ready, error = sent.sent
    assert isinstance(ready, float) and isinstance(error, ImportError) and str(error) == "a broken install"
    # Never asked (the server's start failed before its arguments were parsed): only "ready", then it returns.
    sent = _Connection()
    apart._resolve_when_asked(_Requests(), sent, dict(os.environ), preimport=False)
    assert len(sent.sent) == 1


def test_what_does_not_pickle_comes_back_named_or_is_loaded_by_the_front_end(tiny, monkeypatch):
    args = EngineConfig(model=str(tiny), device="cpu", max_model_len=256)
    resolved, _, config = apart.resolve_engine(args)
    monkeypatch.setattr(apart, "resolve_engine", lambda *_: (resolved, threading.Lock(), config))
    sent = _Connection()
    apart._resolve_and_send(args, False, sent)
    assert sent.sent == [(resolved, config), apart._NOT_SENT]  # the tokenizer: the front end's to load

    class Unpicklable(Exception):  # a local class: pickled by a name that does not import
        pass

    monkeypatch.setattr(apart, "resolve_engine", lambda *_: (_ for _ in ()).throw(Unpicklable("a bad field")))
    sent = _Connection()
    apart._resolve_and_send(args, False, sent)
    [error] = sent.sent
    assert isinstance(error, RuntimeError) and str(error) == "Unpicklable: a bad field"


def test_a_tokenizer_that_did_not_pickle_is_loaded_by_the_front_end(tiny):
    args = EngineConfig(model=str(tiny), device="cpu", max_model_len=256)
    resolved, here_tokenizer, config = apart.resolve_engine(args)
    resolver = object.__new__(apart._Resolver)  # its process stood in for by the messages it sends
    resolver._requests, resolver._results = _Connection(), _Requests(time.time(), (resolved, config), apart._NOT_SENT)
    resolver._process, resolver._started = SimpleNamespace(join=lambda: None), time.time()
    model, tokenizer, _ = resolver.resolve(args, server=False)
    assert model == resolved and tokenizer().encode("hello, world") == here_tokenizer.encode("hello, world")


def test_torch_values_cross_by_name_into_a_process_without_torch():
    config = apart.resolve_engine(EngineConfig(device="cpu", skip_tokenizer_init=True))[2]
    assert pickle.loads(torch_values.dumps(config)) == config  # where torch is: torch's own values
    code = f"""
import pickle, sys
config = pickle.loads({torch_values.dumps(config)!r})
assert "torch" not in sys.modules
dtype, device = config.model.dtype, config.device.device
assert (str(dtype), dtype.kind, device.type) == ("torch.float32", "dtype", "cpu"), (dtype, device)
sys.stdout.buffer.write(pickle.dumps(config))  # as the front end sends it to a core
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    assert pickle.loads(run.stdout) == config  # torch's values again where torch is


def _imported(code: str, module: str) -> bool:
    """Whether running `code` in a new interpreter imports `module`."""
    run = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print({module!r} in sys.modules)"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.split()[-1] == "True"


def test_the_cores_preloaded_modules_import_no_config_classes():
    assert not _imported(f"import {', '.join(CORE_MODULES)}", CONFIG_CLASSES_CHAIN)


def test_the_servers_argument_parser_imports_no_transformers():
    # `pagoda serve` asks for its configuration once its arguments are parsed: transformers' import
    # (1.4 s on the device's host, 5.17) would come first, with the resolving process ready and waiting.
    assert not _imported("from pagoda.entrypoints.cli import build_parser\nbuild_parser()", "transformers")


@pytest.mark.parametrize("server", [True, False])
@pytest.mark.parametrize("module", [CONFIG_CLASSES_CHAIN, "torch"])
def test_the_servers_front_end_imports_neither_config_classes_nor_torch(tiny, server, module):
    # As `pagoda serve` starts: the core server, the server's imports, the engine's configuration.
    # Resolved in place (the offline LLM's and a library AsyncLLM's way), the same start imports
    # them: the check sees them.
    code = f"""
from pagoda.engine.core_launcher import start_core_server
start_core_server()
import pagoda.entrypoints.openai.server
from pagoda.config import EngineConfig, torch_values
from pagoda.engine.input_processor import InputProcessor
processor = InputProcessor(EngineConfig(model={str(tiny)!r}, device="cpu", max_model_len=256), server={server})
processor.tokenizer.apply_chat_template([{{"role": "user", "content": "hi"}}], tokenize=False)
assert str(processor.config.model.dtype) == "torch.float32" and processor.config.device.device.type == "cpu"
"""
    assert _imported(code, module) is not server


@pytest.mark.parametrize("skipped", [True, False])
def test_the_resolving_process_imports_no_torch_only_transformers_code(tiny, tmp_path, skipped):
    """transformers 5.17's auto classes import GenerationMixin (torch._dynamo; its assisted decoding
    imports scikit-learn where installed: 2.2 s on the device), and the config fields' validators
    the activation functions (torch.distributed.tensor): seconds of a GPU host's cold start that
    resolving never runs. Without the skip, this transformers imports one of them."""
    (tmp_path / "sklearn").mkdir()  # a stand-in scikit-learn
    (tmp_path / "sklearn" / "__init__.py").write_text("")
    (tmp_path / "sklearn" / "metrics.py").write_text("def roc_curve(*args): pass\n")
    code = f"""
import torch, transformers
from pagoda.config import EngineConfig
from pagoda.engine import resolve_apart
{"resolve_apart._without_torch_only_imports()" if skipped else ""}
resolve_apart._import_what_resolving_takes()
resolve_apart.resolve_engine(EngineConfig(model={str(tiny)!r}, device="cpu", max_model_len=256))
from transformers.utils import type_validators
assert transformers.utils.is_torch_available() and type_validators.is_torch_available()
assert type_validators.device_validator(torch.device("cpu")) is None  # as where torch is imported
print([name for name in ("torch._dynamo", "torch.distributed.tensor", "sklearn") if name in sys.modules])
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", "import sys\n" + code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (run.stdout.split("\n")[-2] == "[]") is skipped


def test_the_configuration_comes_back_before_the_tokenizer_is_unpickled(tiny, monkeypatch):
    """The engine cores start with the configuration while the front end unpickles the tokenizer
    (the classes that takes: 1.3 s with transformers 5.17, torch among them)."""
    imports_may_finish, imports_waited = threading.Event(), []
    monkeypatch.setattr(apart, "_import_what_unpickling_takes",
                        lambda: imports_waited.append(imports_may_finish.wait(30)))
    args = EngineConfig(model=str(tiny), device="cpu", max_model_len=256)
    model, tokenizer, config = apart.resolve_apart(args, server=True)
    assert config.model.spec.vocab_size > 0 and imports_waited == []  # the imports still held
    imports_may_finish.set()
    assert tokenizer().encode("hello") == apart.resolve_engine(args)[1].encode("hello")


def test_a_tokenizer_that_fails_after_the_cores_started_stops_them(tiny, monkeypatch):
    from pagoda.engine import async_llm

    clients = []

    class Recorded(async_llm.MPClient):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            clients.append(self)

    def broken() -> None:
        raise ImportError("a broken tokenizer install")

    monkeypatch.setattr(async_llm, "MPClient", Recorded)
    monkeypatch.setattr(apart, "_import_what_unpickling_takes", broken)
    with pytest.raises(ImportError, match="a broken tokenizer install"):
        async_llm.AsyncLLM(EngineConfig(model=str(tiny), device="cpu", max_model_len=256), server=True)
    [client] = clients
    assert not any(core.process.is_alive() for core in client.cores.cores)


@pytest.mark.parametrize("skip_tokenizer_init", [False, True])
def test_the_front_end_imports_ahead_while_the_resolving_process_works(tiny, monkeypatch, skip_tokenizer_init):
    """Once it has sent the arguments, before it unpickles the tokenizer: no tokenizer, nothing to import."""
    calls = []
    monkeypatch.setattr(apart, "_import_what_unpickling_takes", lambda: calls.append("imported"))
    args = EngineConfig(model=str(tiny), device="cpu", max_model_len=256, skip_tokenizer_init=skip_tokenizer_init)
    apart.resolve_apart(args)[1]()
    assert calls == ([] if skip_tokenizer_init else ["imported"])


@pytest.mark.parametrize("module,imported", [
    ("transformers.tokenization_utils_base", True), ("torch", False), (CONFIG_CLASSES_CHAIN, False),
])
def test_the_front_end_imports_the_tokenizers_classes_while_it_waits(module, imported):
    # What unpickling the tokenizer sent back imports, ahead of it: not torch, not the config classes.
    code = "from pagoda.engine.resolve_apart import _import_what_unpickling_takes\n_import_what_unpickling_takes()"
    assert _imported(code, module) is imported


def test_package_names_read_fast_include_every_one_the_standard_library_maps():
    """transformers 5.17 maps every installed distribution's import names as it is imported: the
    resolving process and the front end compute that map from each RECORD's text (on a host with
    213 distributions the standard library's took 0.98 s); no distribution is missed for a name."""
    standard, fast = importlib.metadata.packages_distributions(), apart._packages_distributions()
    assert standard and all(set(dists) <= set(fast.get(name, ())) for name, dists in standard.items())
    assert {"torch", "transformers"} <= fast.keys() and fast["_pytest"] == ["pytest"]


def test_resolving_in_place_reads_the_package_map_fast(tiny, monkeypatch):
    # The offline LLM resolves in its own process, where transformers is first imported then.
    from pagoda.loader import model_resolver

    seen = []
    resolve_model = model_resolver.resolve_engine_model

    def resolve_engine_model(args):
        seen.append(importlib.metadata.packages_distributions)
        return resolve_model(args)

    monkeypatch.setattr(model_resolver, "resolve_engine_model", resolve_engine_model)
    apart.resolve_engine(EngineConfig(model=str(tiny), device="cpu", max_model_len=256))
    assert seen == [apart._packages_distributions]


def test_the_fast_package_names_serve_only_while_transformers_is_imported():
    standard = importlib.metadata.packages_distributions
    with apart._package_names_read_fast():
        assert importlib.metadata.packages_distributions is apart._packages_distributions
    assert importlib.metadata.packages_distributions is standard
