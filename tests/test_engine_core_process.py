"""The engine core behind the front end: typed wire messages that cross the process boundary
intact, and a core process that loads no tokenizer (the server process detokenizes)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from pagoda.engine import messages
from pagoda.engine.input_processor import fan_out
from pagoda.sampling_params import SamplingParams
from tests.serving import MODEL, engine_core_pid, serving, tiny_model_args


def test_a_request_crosses_to_the_core_intact():
    params = SamplingParams(n=2, seed=7, stop="lo", stop_token_ids=[3], logit_bias={"5": -1.5}, max_tokens=None)
    request = messages.EngineCoreRequest("r", [1, 2, 3], fan_out("r", params))
    received = messages.decode_to_core(messages.encode(request))
    assert received == request
    assert [p.seed for _, p in received.children] == [7, 8] and received.children[0][1].logit_bias == {5: -1.5}
    for message in (messages.AbortRequests(None), messages.AbortRequests(["0_r"]), messages.Stop()):
        assert messages.decode_to_core(messages.encode(message)) == message


def test_an_integer_wider_than_64_bits_fails_at_encode_time():
    params = SamplingParams(seed=1)
    params.seed = 2**64  # past SamplingParams' own check
    with pytest.raises(OverflowError):
        messages.encode(messages.EngineCoreRequest("r", [1], [("r", params)]))


def _maps_tokenizers(pid: int) -> bool:
    """Whether the process has the `tokenizers` library loaded: every transformers tokenizer
    (and Pagoda's detokenizer) imports it."""
    return any("/tokenizers/" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def test_the_engine_core_process_loads_no_tokenizer(tmp_path):
    # A checkpoint's weights. Random ones (--load-format dummy) are named after transformers' own
    # model of the config, which the core builds, and whose modeling code imports tokenizers:
    # in the core rather than on the front end's path to the core's start (~3 s).
    log = tmp_path / "server.log"
    with serving(tiny_model_args(tmp_path), log) as (proc, base):
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0.0}
        response = httpx.post(f"{base}/v1/completions", json=body, timeout=30.0)
        assert response.status_code == 200 and response.json()["choices"][0]["text"]  # detokenized
        assert _maps_tokenizers(proc.pid)  # the front end's tokenizer: the check sees it
        assert not _maps_tokenizers(engine_core_pid(proc.pid)), log.read_text()[-2000:]
