"""Running `pagoda serve` in tests: a byte-level tokenizer for tiny random models, a server
subprocess on a free loopback port, and the process tree it leaves."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING
from pathlib import Path

import httpx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tests.tiny_models import save_tiny_model

if TYPE_CHECKING:
    import openai

API_KEY = "test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 1024
# ChatML, as SmolLM2 uses; enough for system/user/assistant turns.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# For content given as parts (vLLM's "openai" content format): it loops over each message's content.
PARTS_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{% for part in m['content'] %}{{ part['text'] }}|{% endfor %}{% endfor %}"
)
SPECIALS = ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]  # ids 0 (BOS), 1 (EOS), 2


def save_tokenizer(path: Path, adds_bos: bool = False) -> int:
    """A byte-level tokenizer with no merges: one token per byte, plus ChatML's special tokens;
    adds_bos: encoding a text puts BOS (id 0) before it, as Llama's tokenizers do."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIALS + alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIALS)
    if adds_bos:
        bos = SPECIALS[0]
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=SPECIALS[0], eos_token=SPECIALS[1], chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(path)
    return len(vocab)


def openai_client(base: str) -> openai.OpenAI:
    """The official client for a server started by `serving` with API_KEY."""
    import openai  # here, not at the top: the GPU machine runs the conftest without the client

    return openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, timeout=60.0, max_retries=0)


def http_client(base: str, key: str = API_KEY) -> httpx.Client:
    """An httpx client for a server started by `serving` with `key` (use it as a context manager)."""
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60.0)


def sse_events(response: httpx.Response) -> list[dict]:
    """The data of a whole server-sent event stream that ends with [DONE]."""
    assert response.status_code == 200, response.read()
    lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def stream_events(http: httpx.Client, path: str, body: dict) -> list[dict]:
    """The chunks of `body` posted with stream true."""
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        return sse_events(response)


def python_path(*folders: str | Path) -> dict[str, str]:
    """PYTHONPATH for a child Python: these folders first, then the caller's own (where packages
    such as a GPU machine's carried wheels may be)."""
    return {"PYTHONPATH": os.pathsep.join([*map(str, folders), os.environ.get("PYTHONPATH", "")])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(args: list[str], log: Path, env: dict[str, str] | None = None):
    """A `pagoda serve` subprocess on a free loopback port, healthy; yields (process, base URL).
    A port another test's server took between its choice and the bind (test files run in
    parallel) is chosen again."""
    for attempt in range(3):
        port = free_port()
        with open(log, "w") as log_file:  # a file, not a pipe: a full pipe would block the server
            proc = subprocess.Popen(
                [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", *args, "--host", "127.0.0.1", "--port",
                 str(port), "--device", "cpu"],
                env={**os.environ, **(env or {})}, stdout=log_file, stderr=subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(proc, base, log)
            break
        except RuntimeError:
            _stop(proc)
            if attempt == 2 or f"cannot listen on 127.0.0.1:{port}" not in log.read_text():
                raise
        except BaseException:
            _stop(proc)
            raise
    try:
        yield proc, base
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@contextlib.contextmanager
def served(args: list[str], log: Path) -> Iterator[str]:
    """`serving` with API_KEY as the server's key; yields the base URL."""
    with serving(args, log, {"PAGODA_API_KEY": API_KEY}) as (_, base):
        yield base


def wait_healthy(proc: subprocess.Popen, base: str, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server did not become healthy")


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def engine_core_pid(server_pid: int) -> int:
    """The server's first engine core: the process named pagoda-core-0 among its descendants
    (a fork of its fork server)."""
    for pid in descendants(server_pid):
        if Path(f"/proc/{pid}/comm").read_text().strip() == "pagoda-core-0":
            return pid
    raise AssertionError("no engine core process found")


def maps_library(pid: int, fragment: str) -> bool:
    """Whether the process has a shared library whose path contains fragment mapped
    ("libtorch_cpu" for torch; "/tokenizers/" for the tokenizers library, which every
    transformers tokenizer and Pagoda's detokenizer import)."""
    return any(fragment in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def still_alive(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive once they have all exited or the timeout has passed."""
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if alive(pid)]


def tiny_model_args(directory: Path) -> list[str]:
    """A tiny random llama with the byte-level tokenizer saved under directory, as `pagoda serve`
    arguments (served as MODEL)."""
    vocab_size = save_tokenizer(directory / "llama3")
    path = save_tiny_model("llama3", directory, vocab_size=vocab_size, max_position_embeddings=MAX_MODEL_LEN)
    return [str(path), "--served-model-name", MODEL, "--max-num-seqs", "8", "--seed", "0"]


def openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    """The body of an OpenAI-shaped error response with this status (and param, when given)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error
