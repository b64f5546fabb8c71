"""`pagoda bench serve`: online serving benchmark against a running OpenAI-compatible server, as
`vllm bench serve` measures it: seeded random-token prompts sent at a request rate (Poisson) under
an optional concurrency cap, streamed; reports throughput, TTFT, TPOT and ITL. Several rates make
a sweep (the same requests at each rate in turn), which --plot draws.

The same prompts go to each kind of server (--backend, detected by default): as token ids to
Pagoda and vLLM (their /tokenize takes {"prompt"}) and to llama.cpp's llama-server (its /tokenize
takes {"content"}; /props tells it apart); llama-cpp-python's server takes text only, so there they
go as the text of the same ids (/extras/detokenize). Where a stream carries no usage, tokens are
counted as vLLM's benchmark does: the prompt's ids, and one output token per streamed chunk.

Each failed request is printed as it ends, with the HTTP status and body the server gave, or the
exception (and its causes) when there was no response; the summary counts them.

Requests go through aiohttp, as vLLM's benchmark sends them: a client streaming hundreds of
requests at once is busy in its own event loop, and aiohttp reads a streamed event for a third of
httpx's CPU time (W3 on an H200: 9,513-9,549 output tok/s measured through it, 8,684-8,842
through httpx, from the same server)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from pagoda.benchmarks.plot import plot_serve_sweep
from pagoda.benchmarks.datasets import (
    BenchRequest,
    ShareGPTSampler,
    add_dataset_arguments,
    make_requests,
    sharegpt_pairs,
)
from pagoda.entrypoints.openai.sse_client import aiter_events, server_error

# Seconds an idle connection is kept for reuse: well under the servers' keep-alive timeout
# (uvicorn's 5 s, in Pagoda and vLLM). At equal values a connection can be reused just as the
# server closes it, and the request fails with a reset.
_KEEPALIVE_EXPIRY_S = 1.0

# Text whose tokens make the pool random prompts are drawn from: any server's tokenizer gives
# valid ids for it, with no need to know its vocabulary. ASCII only: any sequence of its tokens
# is valid UTF-8, so it can be sent as text too.
_POOL_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "Sphinx of black quartz, judge my vow! 0123456789 How vexingly quick daft zebras jump; "
    "the five boxing wizards jump quickly."
)


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


# --backend: the kinds of server, by their tokenizer route, its text field and its switch for the
# special tokens (BOS). vllm: vLLM's and Pagoda's; llama.cpp: llama-server; llama-cpp-python: text
# prompts only.
_TOKENIZE = {
    "vllm": ("/tokenize", "prompt", "add_special_tokens"),
    "llama.cpp": ("/tokenize", "content", "add_special"),
    "llama-cpp-python": ("/extras/tokenize", "input", None),
}
BACKENDS = ("auto", *_TOKENIZE)


def _tokenize_body(backend: str, text: str, special_tokens: bool) -> tuple[str, dict[str, Any]]:
    path, field, switch = _TOKENIZE[backend]
    return path, {field: text} if switch is None else {field: text, switch: special_tokens}


async def _json(response: aiohttp.ClientResponse) -> Any:
    """A response's JSON body; an error status as a RuntimeError with the server's message."""
    text = await response.text()
    if not response.ok:
        raise server_error(response.status, text)
    return json.loads(text)


async def _status(client: aiohttp.ClientSession, method: str, path: str, **kwargs: Any) -> int:
    async with client.request(method, path, **kwargs) as response:
        await response.read()
        return response.status


async def detect_backend(client: aiohttp.ClientSession) -> str:
    """The kind of server: llama-server answers GET /props (its settings), llama-cpp-python's has
    no /tokenize, and vLLM's and Pagoda's answer {"prompt"} there."""
    if await _status(client, "GET", "/props") == 200:
        return "llama.cpp"
    path, body = _tokenize_body("vllm", _POOL_TEXT, False)
    return "llama-cpp-python" if await _status(client, "POST", path, json=body) == 404 else "vllm"


class _Tokenizer:
    """The server's tokenizer route: the pool of ids random prompts are drawn from, a dataset's
    texts as ids, and each prompt in the form the server takes (ids, or their text for
    llama-cpp-python)."""

    def __init__(self, client: aiohttp.ClientSession, backend: str) -> None:
        self.client = client
        self.backend = backend

    async def pool(self) -> list[int]:
        return sorted(set(await self.encode(_POOL_TEXT, special_tokens=False)))

    async def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """text's ids, with the special tokens (BOS) the server would add to it as a prompt."""
        if self.backend == "auto":
            self.backend = await detect_backend(self.client)
        path, body = _tokenize_body(self.backend, text, special_tokens)
        async with self.client.post(path, json=body) as response:
            answer = await _json(response)
        tokens = answer.get("tokens")
        if not tokens and text:  # llama-server answers {"tokens": []} to a body it does not read
            raise RuntimeError(
                f"the server's tokenizer gave no tokens for the prompt text (POST {path} {list(body)} answered "
                f"{json.dumps(answer)[:200]!r}): is it a {self.backend} server? Set --backend to its kind, one of "
                f"{', '.join(_TOKENIZE)}"
            )
        return tokens or []

    async def prompt(self, token_ids: list[int]) -> list[int] | str:
        if self.backend != "llama-cpp-python":
            return token_ids
        async with self.client.post("/extras/detokenize", json={"tokens": token_ids}) as response:
            return (await _json(response))["text"]


async def _first_model(client: aiohttp.ClientSession) -> str:
    async with client.get("/v1/models") as response:
        return (await _json(response))["data"][0]["id"]


async def _send(
    client: aiohttp.ClientSession, model: str, request: BenchRequest, prompt: list[int] | str, ignore_eos: bool
) -> RequestResult:
    body = {
        "model": model, "prompt": prompt, "max_tokens": request.output_len, "temperature": 0,
        "ignore_eos": ignore_eos, "stream": True, "stream_options": {"include_usage": True},
    }
    start = last = time.perf_counter()
    result = RequestResult(ok=False, prompt_tokens=len(request.prompt_token_ids))
    chunks = 0
    status = None
    try:
        async with client.post("/v1/completions", json=body) as response:
            status = response.status
            if not response.ok:
                result.error = f"HTTP {status}: {await response.text()}"
                return result
            async for event in aiter_events(response.content.iter_any()):
                now = time.perf_counter()
                if event.get("usage"):
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                    result.output_tokens = event["usage"]["completion_tokens"]
                if not event.get("choices"):
                    continue
                chunks += 1
                if result.ttft_s == 0.0:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
        result.latency_s = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        result.ok = True
    except Exception as error:  # a transport error, an error event, a malformed event: this request's failure
        result.error = ("no response: " if status is None else f"HTTP {status}, then ") + _exception_chain(error)
    return result


def _exception_chain(error: BaseException) -> str:
    """The exception and those causes that add something, as reprs: some (a dropped connection's)
    have no message, and only the type and the cause say what happened."""
    reprs, messages = [repr(error)], {str(error)}
    cause = error.__cause__ or error.__context__
    for _ in range(8):  # a bound: a chain can loop
        if cause is None:
            break
        if str(cause) not in messages:  # a wrapped error that repeats its cause's message adds nothing
            reprs.append(repr(cause))
            messages.add(str(cause))
        cause = cause.__cause__ or cause.__context__
    return " <- ".join(reprs)


async def _sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The same requests at each of --request-rate's rates in turn; a summary per rate."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30.0)
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or args.num_prompts, keepalive_timeout=_KEEPALIVE_EXPIRY_S)
    async with aiohttp.ClientSession(base_url=args.base_url, headers=headers, timeout=timeout, connector=connector) as client:
        model = args.model or await _first_model(client)
        tokenizer = _Tokenizer(client, args.backend)
        requests = await (_sharegpt_requests if args.dataset_name == "sharegpt" else _random_requests)(args, tokenizer)
        prompts = [await tokenizer.prompt(request.prompt_token_ids) for request in requests]
        return [await _run(client, model, requests, prompts, rate, args) for rate in args.request_rate]


async def _random_requests(args: argparse.Namespace, tokenizer: _Tokenizer) -> list[BenchRequest]:
    """Seeded random prompts of ids from the server's own tokenizer."""
    pool = await tokenizer.pool()
    requests = make_requests(
        args.num_prompts, args.random_input_len, args.random_output_len, len(pool), args.seed, args.random_range_ratio,
    )
    for request in requests:
        request.prompt_token_ids = [pool[i] for i in request.prompt_token_ids]
    return requests


async def _sharegpt_requests(args: argparse.Namespace, tokenizer: _Tokenizer) -> list[BenchRequest]:
    """--num-prompts requests from the ShareGPT file, tokenized by the server (as datasets.sharegpt_requests)."""
    sampler = ShareGPTSampler(args)
    for prompt, reply in sharegpt_pairs(args):
        if sampler.offer(await tokenizer.encode(prompt), await tokenizer.encode(reply)):
            break
    return sampler.requests()


async def _run(
    client: aiohttp.ClientSession, model: str, requests: list[BenchRequest], prompts: list[list[int] | str], rate: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    cap = asyncio.Semaphore(args.max_concurrency or len(requests))
    rng = random.Random(args.seed)

    async def limited(index: int, request: BenchRequest, prompt: list[int] | str) -> RequestResult:
        async with cap:
            result = await _send(client, model, request, prompt, args.ignore_eos)
        if not result.ok:
            print(f"request {index} failed: {result.error}", flush=True)
        return result

    started = time.perf_counter()
    tasks = []
    for index, (request, prompt) in enumerate(zip(requests, prompts)):
        tasks.append(asyncio.create_task(limited(index, request, prompt)))
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    # As vLLM's result file: a rate of inf is written "inf" (JSON has no infinity).
    run = {"request_rate": rate if rate != float("inf") else "inf", "max_concurrency": args.max_concurrency}
    return {**run, **_summary(model, results, time.perf_counter() - started)}


def _summary(model: str, results: list[RequestResult], duration: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    itl = [t for r in done for t in r.itl_s]
    summary: dict[str, Any] = {
        "model": model, "completed": len(done), "failed": len(results) - len(done),
        "errors": dict(Counter(r.error for r in results if not r.ok).most_common(5)), "duration_s": duration,
        "total_input_tokens": prompt_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration, "output_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
    }
    series = {"ttft": [r.ttft_s for r in done], "tpot": tpot, "itl": itl, "e2el": [r.latency_s for r in done]}
    for name, values in series.items():
        summary.update(_percentiles(name, values))
    return summary


def _percentiles(name: str, seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    ms = sorted(s * 1000 for s in seconds)
    return {
        f"mean_{name}_ms": statistics.fmean(ms), f"median_{name}_ms": statistics.median(ms),
        f"p99_{name}_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=None, help="the server (default: http://HOST:PORT)")
    parser.add_argument("--host", default="127.0.0.1", help="the server's host, without --base-url (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="the server's port, without --base-url (default: %(default)s)")
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="the kind of server: vllm (vLLM or Pagoda), llama.cpp (llama-server), llama-cpp-python "
                             "(text prompts); auto: detected from its routes (default: %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("PAGODA_API_KEY"),
                        help="the server's API key (default: $PAGODA_API_KEY)")
    add_dataset_arguments(parser)
    parser.add_argument("--num-prompts", type=int, default=100, help="requests (default: %(default)s)")
    parser.add_argument("--random-input-len", type=int, default=128, help="prompt tokens per request (default: %(default)s)")
    parser.add_argument("--random-output-len", type=int, default=128, help="output tokens per request (default: %(default)s)")
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="lengths drawn from [len x (1 - r), len x (1 + r)] (default: %(default)s)")
    parser.add_argument("--request-rate", type=_request_rates, default=[float("inf")],
                        help="requests/s (Poisson arrivals), inf: all at once; a comma-separated list (1,2,4,8,inf) "
                             "runs the same requests at each rate in turn (default: inf)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no cap)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the random prompts (default: %(default)s)")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="generate every request's --random-output-len tokens, past EOS (default: on, so that "
                             "servers compare on the same token counts)")
    parser.add_argument("--output-json", "--result-file", dest="result_file", default=None,
                        help="also write the summary here as JSON (a list of them, one per rate, for several rates)")
    parser.add_argument("--save-result", action="store_true",
                        help="as vLLM's: write the summary as JSON to --result-dir/--result-filename")
    parser.add_argument("--result-dir", default=".", help="with --save-result (default: the current directory)")
    parser.add_argument("--result-filename", default=None,
                        help="with --save-result (default: pagoda-RATEqps-MODEL-TIME.json)")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="draw TTFT, TPOT and output throughput against the request rate into this PNG "
                             "(matplotlib), with the data drawn beside it as FILE.json")


def _saved_result_path(args: argparse.Namespace, summaries: list[dict[str, Any]]) -> str | None:
    """--save-result's file, named as vLLM names it by default (rate, model, time)."""
    if not args.save_result:
        return None
    rate = "-".join(str(s["request_rate"]) for s in summaries)
    model = str(summaries[0]["model"]).replace("/", "-")
    name = args.result_filename or f"pagoda-{rate}qps-{model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    return os.path.join(args.result_dir, name)


def _request_rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers or inf") from None
    if any(not rate > 0 for rate in rates):  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: each request rate must be > 0")
    return rates


def main(args: argparse.Namespace) -> dict[str, Any] | list[dict[str, Any]]:
    """The summary, as written to --result-file: one for one rate, a list of them for several."""
    args.base_url = args.base_url or f"http://{args.host}:{args.port}"
    try:
        summaries = asyncio.run(_sweep(args))
    except aiohttp.ClientError as error:
        raise RuntimeError(f"cannot talk to the server at {args.base_url}: {error}") from None
    for summary in summaries:
        for key, value in summary.items():
            print(f"{key:>24}: {value:.2f}" if isinstance(value, float) else f"{key:>24}: {value}")
    result = summaries[0] if len(summaries) == 1 else summaries
    for path in filter(None, (args.result_file, _saved_result_path(args, summaries))):
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        plot_serve_sweep(summaries, args.plot)
    return result
