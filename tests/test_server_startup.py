"""`pagoda serve`'s start: the port is bound before the model loads (a port in use fails before
the engine starts, naming the address), every request gets a 503 while the engine starts
(`/health` too, then 200), and each phase's seconds are logged."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.serving import free_port, openai_error, tiny_model_args


@pytest.fixture(scope="module")
def model_args(tmp_path_factory):
    return tiny_model_args(tmp_path_factory.mktemp("startup"))


def start(model_args: list[str], port: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", *model_args, "--host", "127.0.0.1",
             "--port", str(port), "--device", "cpu"],
            stdout=log_file, stderr=subprocess.STDOUT,
        )


def test_a_port_in_use_fails_before_the_engine_starts(model_args, tmp_path):
    log = tmp_path / "server.log"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = start(model_args, port, log)
        try:
            assert proc.wait(120) == 2
        finally:
            proc.kill()
    text = log.read_text()
    assert f"cannot listen on 127.0.0.1:{port}" in text and "--port" in text, text
    # Nothing of the engine ran: neither the tokenizer nor the weights were loaded.
    assert "configuration loaded" not in text and "model built" not in text, text


def test_health_answers_503_while_the_engine_starts_then_200(model_args, tmp_path):
    log = tmp_path / "server.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(model_args, port, log)
    health, starting_completion = [], None
    try:
        deadline = time.monotonic() + 180
        with httpx.Client(base_url=base, timeout=10.0) as client:
            while time.monotonic() < deadline and 200 not in health:
                assert proc.poll() is None, log.read_text()
                try:
                    health.append(client.get("/health").status_code)
                    if starting_completion is None and health[-1] == 503:
                        starting_completion = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
                except httpx.TransportError:
                    time.sleep(0.02)  # not listening yet: the interpreter is still importing
            assert health and health[-1] == 200, health
            assert health[0] == 503, health  # the port answered long before the engine was ready
            assert set(health) == {503, 200}
            error = openai_error(starting_completion, 503)
            assert "starting" in error["message"] and starting_completion.headers["retry-after"] == "1"
            # Once ready, the same port serves the app.
            completion = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
            assert completion.status_code == 200, completion.text
    finally:
        proc.kill()
        proc.wait(10)
    text = log.read_text()
    for phase in ("imports took", "front end took", "its process was ready",
                  "configuration loaded in", "tokenizer unpickled",
                  "engine core process up in", "model built in", "engine start took", "app took", "ready in"):
        assert phase in text, (phase, text)


def test_a_client_that_hung_up_leaves_no_traceback(capsys):
    from pagoda.entrypoints.openai.startup import StartingResponder, bind_listener

    responder = StartingResponder(bind_listener("127.0.0.1", 0))
    try:
        for error in (BrokenPipeError(), ConnectionResetError()):  # a probe gone before its 503
            try:
                raise error
            except ConnectionError:
                responder._server.handle_error(None, ("127.0.0.1", 1))
        assert capsys.readouterr().err == ""
        try:
            raise ValueError("a real fault")
        except ValueError:
            responder._server.handle_error(None, ("127.0.0.1", 1))
        assert "ValueError: a real fault" in capsys.readouterr().err
    finally:
        responder.hand_over().close()



def _refused_at_start(args: list[str], log: Path) -> str:
    """The log of a server that exits with status 2 (an argument refused)."""
    proc = start(args, free_port(), log)
    try:
        assert proc.wait(120) == 2, log.read_text()
    finally:
        proc.kill()
    return log.read_text()


def test_a_missing_chat_template_fails_before_the_engine_starts(model_args, tmp_path):
    text = _refused_at_start([*model_args, "--chat-template", str(tmp_path / "missing.jinja")], tmp_path / "server.log")
    assert f"chat template file '{tmp_path / 'missing.jinja'}' does not exist" in text, text
    assert "model built" not in text, text


def test_a_failure_once_the_engine_runs_stops_it_in_order(model_args, tmp_path):
    """--lora-modules without --enable-lora is found wanting once the engine runs (it asks the
    engine): the server exits 2 naming the flag, its engine stopped, not reported dead of a kill."""
    text = _refused_at_start([*model_args, "--lora-modules", f"a={tmp_path}"], tmp_path / "server.log")
    assert "--lora-modules needs --enable-lora" in text, text
    assert "model built" in text and "engine has died" not in text, text


def test_a_generation_config_folder_without_the_file_fails_before_the_model_loads(model_args, tmp_path):
    text = _refused_at_start([*model_args, "--generation-config", str(tmp_path)], tmp_path / "server.log")
    assert f"generation_config={str(tmp_path)!r}: no generation_config.json in that folder" in text, text
    assert "model built" not in text, text
