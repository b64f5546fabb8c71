"""What `pagoda serve` logs, with vLLM's switches: a line per request (--disable-log-requests, or
--enable-log-requests), a stats line while there is traffic (--disable-log-stats) and uvicorn's
line per HTTP request (--disable-uvicorn-access-log, --uvicorn-log-level)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.serving import API_KEY, MODEL, serving, tiny_model_args

FAST_STATS = {"PAGODA_LOG_STATS_INTERVAL": "0.2"}


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> list[str]:
    return tiny_model_args(tmp_path_factory.mktemp("logging-model"))


def served_log(model_args: list[str], flags: list[str], log) -> str:
    with serving(model_args + flags, log, FAST_STATS) as (_, base):
        for _ in range(3):
            response = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                                  headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
            assert response.status_code == 200
            time.sleep(0.3)  # a stats interval with traffic in it
    return log.read_text()


def test_each_kind_of_log_line_is_on_by_default(model_args, tmp_path):
    text = served_log(model_args, [], tmp_path / "server.log")
    assert "Received request" in text and "Avg prompt throughput" in text and '"POST /v1/completions' in text


def test_vllms_switches_turn_them_off(model_args, tmp_path):
    flags = ["--disable-log-stats", "--disable-uvicorn-access-log", "--disable-log-requests"]
    text = served_log(model_args, flags, tmp_path / "server.log")
    assert "Received request" not in text and "Avg prompt throughput" not in text
    assert '"POST /v1/completions' not in text
    assert "Received request" in served_log(model_args, ["--enable-log-requests"], tmp_path / "again.log")
