"""The server resolves its engine configuration in a short-lived process (engine/resolve_apart.py):
the same ModelSpec, config and tokenizer as resolving in place, the same errors, and neither the
front end nor the engine cores import transformers' config classes, which bring ~1,000 modules
(torch.distributed.tensor, accelerate) that only reading the config needs."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from pagoda.config import EngineConfig
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


def test_resolving_apart_gives_what_resolving_here_gives(tiny):
    args = EngineConfig(model=str(tiny), device="cpu", max_model_len=256)
    here_model, here_tokenizer, here_config = apart.resolve_engine(args)
    model, tokenizer, config = apart.resolve_apart(args)
    assert (model, config) == (here_model, here_config)
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


class _Connection:
    """A pipe's sending end that refuses the first message, as pickling an unpicklable one would."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, message: object) -> None:
        if not self.sent:
            self.sent.append(None)
            raise TypeError("cannot pickle this")
        self.sent.append(message)


def test_what_does_not_pickle_comes_back_named_or_is_loaded_by_the_front_end(tiny, monkeypatch):
    args = EngineConfig(model=str(tiny), device="cpu", max_model_len=256)
    resolved = apart.resolve_engine(args)
    monkeypatch.setattr(apart, "resolve_engine", lambda _: resolved)
    sent = _Connection()
    apart._resolve_and_send(args, sent, 20, {})
    assert sent.sent[1] == (resolved[0], apart._NOT_SENT, resolved[2])  # the tokenizer: the front end's to load

    class Unpicklable(Exception):
        pass

    monkeypatch.setattr(apart, "resolve_engine", lambda _: (_ for _ in ()).throw(Unpicklable("a bad field")))
    sent = _Connection()
    apart._resolve_and_send(args, sent, 20, {})
    error = sent.sent[1]
    assert isinstance(error, RuntimeError) and str(error) == "Unpicklable: a bad field"
    assert pickle.loads(pickle.dumps(error)).args == error.args


def _imports_config_classes(code: str) -> bool:
    run = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print({CONFIG_CLASSES_CHAIN!r} in sys.modules)"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.split()[-1] == "True"


def test_the_cores_preloaded_modules_import_no_config_classes():
    assert not _imports_config_classes(f"import {', '.join(CORE_MODULES)}")


@pytest.mark.parametrize("apart_", [True, False])
def test_the_servers_front_end_imports_no_config_classes(tiny, apart_):
    # As `pagoda serve` starts: the server's imports, the core server forked, the engine. Resolved
    # in place (the offline LLM's way), the same start imports them: the check sees them.
    code = f"""
import pagoda.entrypoints.openai.server
from pagoda.config import EngineConfig
from pagoda.engine.core_launcher import start_core_server
from pagoda.engine.input_processor import InputProcessor
start_core_server(dummy_weights=False)
processor = InputProcessor(EngineConfig(model={str(tiny)!r}, device="cpu", max_model_len=256), apart={apart_})
processor.tokenizer.apply_chat_template([{{"role": "user", "content": "hi"}}], tokenize=False)
"""
    assert _imports_config_classes(code) is not apart_
