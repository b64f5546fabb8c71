"""Where `pagoda serve` listens, with vLLM's flags: a Unix domain socket (--uds) instead of a TCP
port, and HTTPS (--ssl-certfile, --ssl-keyfile); the start-up 503s are answered there too."""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pagoda.entrypoints.openai.startup import StartingResponder, bind_listener, bind_unix_listener
from tests.serving import MODEL, free_port, tiny_model_args

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and its key."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> list[str]:
    return tiny_model_args(tmp_path_factory.mktemp("listener-model"))


def trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


@contextlib.contextmanager
def server(args: list[str], client: httpx.Client, log: Path):
    """`pagoda serve` with args, once client's GET /health is 200."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pagoda.entrypoints.cli", "serve", *args, "--device", "cpu"],
                                stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/health").status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise TimeoutError(log.read_text()[-3000:])
        yield
    finally:
        proc.kill()
        proc.wait(10)


def completion(client: httpx.Client) -> dict:
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_unix_socket_serves_the_api(model_args, tmp_path):
    path = str(tmp_path / "pagoda.sock")
    client = httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://pagoda", timeout=60)
    with server([*model_args, "--uds", path], client, tmp_path / "server.log"):
        assert completion(client)["usage"]["completion_tokens"] == 3
    assert f"serving ['{MODEL}'] on unix:{path}" in (tmp_path / "server.log").read_text()


def test_https_serves_the_api_and_plain_http_is_refused(model_args, certificate, tmp_path):
    cert, key = certificate
    port = free_port()
    client = httpx.Client(base_url=f"https://localhost:{port}", verify=trusting(cert), timeout=60)
    flags = ["--host", "127.0.0.1", "--port", str(port), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    with server([*model_args, *flags], client, tmp_path / "server.log"):
        assert completion(client)["usage"]["completion_tokens"] == 3
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)


@pytest.mark.parametrize("kind", ["uds", "tls"])
def test_the_start_up_503s_are_answered_where_the_app_will_be(kind, certificate, tmp_path):
    if kind == "uds":
        path = str(tmp_path / "s.sock")
        listener, tls = bind_unix_listener(path), None
        client = httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://pagoda", timeout=10)
    else:
        listener = bind_listener("127.0.0.1", 0)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(*certificate)
        client = httpx.Client(base_url=f"https://localhost:{listener.getsockname()[1]}", verify=trusting(certificate[0]),
                              timeout=10)
    starting = StartingResponder(listener, tls)
    try:
        response = client.get("/health")
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert client.post("/v1/completions", json={}).json()["error"]["code"] == 503
    finally:
        starting.hand_over().close()


def test_a_bad_listener_is_refused_naming_the_flag(model_args, certificate, tmp_path):
    def refusal(*flags: str) -> str:
        done = subprocess.run([sys.executable, "-m", "pagoda.entrypoints.cli", "serve", *model_args, "--device", "cpu",
                               "--port", str(free_port()), *flags], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0
        return done.stderr

    assert "--ssl-keyfile needs --ssl-certfile" in refusal("--ssl-keyfile", str(certificate[1]))
    assert "--ssl-certfile" in refusal("--ssl-certfile", str(tmp_path / "missing.pem"))
    assert "(--uds)" in refusal("--uds", str(tmp_path / "no-such-dir" / "s.sock"))
