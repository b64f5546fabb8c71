"""The engine core behind the front end: typed wire messages that cross the process boundary
intact, and a core process that loads no tokenizer (the front end detokenizes)."""

from __future__ import annotations

import os

import pytest

from pagoda.config import EngineConfig
from pagoda.engine import messages
from pagoda.engine.async_llm import AsyncLLM
from pagoda.engine.input_processor import fan_out
from pagoda.sampling_params import SamplingParams
from tests.serving import maps_library, tiny_model_args


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


def test_a_library_engines_core_process_loads_no_tokenizer(tmp_path):
    # AsyncLLM used as a library starts its core from multiprocessing's own fork server, a fresh
    # interpreter that imports the core's modules only: never the tokenizers library, since the
    # front end detokenizes. A checkpoint's weights: random ones (--load-format dummy) are named
    # after transformers' own model of the config, whose modeling code imports tokenizers.
    engine = AsyncLLM(EngineConfig(model=tiny_model_args(tmp_path)[0], device="cpu", max_model_len=256))
    try:
        assert maps_library(os.getpid(), "/tokenizers/")  # this process's tokenizer: the check sees it
        assert not maps_library(engine.engine_core.cores.cores[0].process.pid, "/tokenizers/")
    finally:
        engine.shutdown()
