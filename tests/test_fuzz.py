"""A bounded schema fuzz run: schemathesis reads the server's own /openapi.json and sends generated
bodies, valid and invalid by the schema, to every POST route, on a server with --api-key (sending
the key) and on one without; no answer may be a 5xx, none may hang, and each must be one the schema
declares (an error in OpenAI's shape). Deterministic (hypothesis derandomized) and small; a larger
run against a running server, from the shell:

    st run http://127.0.0.1:8000/openapi.json --include-method POST --checks not_a_server_error \\
        --max-examples 500 --seed 0 --request-timeout 30 -H "Authorization: Bearer $PAGODA_API_KEY"
"""

from __future__ import annotations

import collections

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.serving import API_KEY, MODEL, serving, tiny_model_args

EXAMPLES = 20  # per POST route and generation mode: 7 routes x 2 modes x 20 = 280 requests a server
REQUEST_TIMEOUT_S = 30.0  # an answer slower than this counts as a hang
# A short context and room for every choice at once keep the largest valid request (n=128, the
# whole context) to seconds on a CPU.
SERVER_ARGS = ["--max-model-len", "64", "--max-num-seqs", "128"]


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> list[str]:
    return tiny_model_args(tmp_path_factory.mktemp("fuzz-model")) + SERVER_ARGS


def fuzz(base: str, headers: dict[str, str]) -> collections.Counter:
    """Outcomes of the run by status ("hang" for none within the timeout), the failing cases (a
    5xx, a hang, or an answer the schema does not declare) as "what route body", "routes": the
    POST routes fuzzed, and "no_invalid_input": the negative runs of routes with nothing to violate."""
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    outcomes: collections.Counter = collections.Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() == "POST":
            outcomes["routes"] += 1
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _run(operation, mode, base, headers, outcomes)
    return outcomes


def _run(operation, mode: GenerationMode, base: str, headers: dict[str, str], outcomes: collections.Counter) -> None:
    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(case=operation.as_strategy(mode))
    def send(case) -> None:
        try:
            response = case.call(base_url=base, headers=headers, timeout=REQUEST_TIMEOUT_S)
        except requests.Timeout:
            outcomes["hang"] += 1
            outcomes[f"hang {operation.path} {case.body!r:.300}"] += 1
            return
        outcomes[response.status_code] += 1
        failure = _failure(response, operation.definition.raw["responses"])
        if failure:
            outcomes[f"{failure} {operation.path} {case.body!r:.300}"] += 1

    try:
        send()
    except Unsatisfiable:
        # A route whose only input is a path string (POST /v1/responses/{id}/cancel) has nothing
        # the schema forbids: no invalid request to make of it.
        if mode is not GenerationMode.NEGATIVE:
            raise
        outcomes["no_invalid_input"] += 1


def _failure(response, declared: dict) -> str | None:
    """What is wrong with an answer: a 5xx, a status the schema does not declare, or an error
    that is not OpenAI's {"error": {"message", "type", "param", "code"}}."""
    status = response.status_code
    if status >= 500:
        return f"{status}:"
    if str(status) not in declared and "default" not in declared:
        return f"{status} (undeclared):"
    if status >= 400 and set(response.json().get("error", {})) != {"message", "type", "param", "code"}:
        return f"{status} (not OpenAI's error shape):"
    return None


@pytest.mark.parametrize("api_key", [None, API_KEY], ids=["no-key", "api-key"])
def test_schema_fuzz_finds_no_5xx_and_no_hang(model_args, tmp_path, api_key):
    args = model_args + (["--api-key", api_key] if api_key else [])
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with serving(args, tmp_path / "server.log", {"PAGODA_API_KEY": ""}) as (_, base):
        outcomes = fuzz(base, headers)
        requests_sent = sum(count for status, count in outcomes.items() if isinstance(status, int) or status == "hang")
        failures = [key for key in outcomes if isinstance(key, str) and " " in key]  # "what route body"
        server_errors = sum(count for status, count in outcomes.items() if isinstance(status, int) and status >= 500)
        print(f"schemathesis ({'with' if api_key else 'without'} --api-key): {requests_sent} requests, "
              f"{server_errors} 5xx, {outcomes['hang']} hangs; statuses {dict(outcomes)}")
        runs = outcomes["routes"] * 2 - outcomes["no_invalid_input"]
        assert outcomes["routes"] >= 7 and outcomes["no_invalid_input"] <= 1 and requests_sent == runs * EXAMPLES
        assert not failures, failures
        # The key went with every request, and some generated requests were served, not all refused.
        assert outcomes[401] == 0 and outcomes[200] > 0
        ok = httpx.post(f"{base}/v1/completions", headers=headers, timeout=30.0,
                        json={"model": MODEL, "prompt": "still here", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
