"""`pagoda chat`: talk to a running `pagoda serve` from the terminal, as `vllm chat` does.

Sampling flags left out are left out of the requests too, so that the server's defaults (the
model's generation_config.json, --generation-config) apply; only the reply length has a default
of its own, as the server's (the rest of the context) is far too long for a chat turn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import httpx

from .sse_client import iter_events, raise_for_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://localhost:8000/v1", help="the server's OpenAI base URL")
    parser.add_argument("--model", "--model-name", dest="model_name", default=None,
                        help="the served model to talk to (default: the server's first model)")
    parser.add_argument("--api-key", default=os.environ.get("PAGODA_API_KEY"),
                        help="the server's API key (default: $PAGODA_API_KEY)")
    parser.add_argument("--system-prompt", default=None, help="a system message opening the conversation")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens per reply at most (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature, 0 for greedy (default: the model's generation config, as the "
                             "server applies it)")
    parser.add_argument("-q", "--quick", metavar="MESSAGE", default=None,
                        help="send one message, print the reply, exit")


def main(args: argparse.Namespace) -> None:
    # httpx logs every request at INFO, which would interleave with the conversation.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        _chat(args)
    except httpx.HTTPError as error:
        raise RuntimeError(f"cannot talk to the server at {args.url}: {error}") from None


def _chat(args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=httpx.Timeout(10.0, read=None)) as client:
        model = args.model_name or _first_model(client)
        messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        sampling = _sampling(args)
        if args.quick is not None:
            _turn(client, model, messages, args.quick, sampling)
            return
        print(f"chatting with {model}; Ctrl-D or Ctrl-C ends", file=sys.stderr)
        while True:
            try:
                message = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return
            _turn(client, model, messages, message, sampling)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling fields the flags set (those not given are the server's to choose)."""
    given = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    return {name: value for name, value in given.items() if value is not None}


def _first_model(client: httpx.Client) -> str:
    response = client.get("/models")
    raise_for_error(response)
    return response.json()["data"][0]["id"]


def _turn(
    client: httpx.Client, model: str, messages: list[dict[str, str]], message: str, sampling: dict[str, Any]
) -> None:
    """Send one user message, print the streamed reply, and keep both in the conversation."""
    messages.append({"role": "user", "content": message})
    body = {"model": model, "messages": messages, "stream": True, **sampling}
    reply = []
    with client.stream("POST", "/chat/completions", json=body) as response:
        raise_for_error(response)
        for event in iter_events(response.iter_bytes()):
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                reply.append(piece)
                print(piece, end="", flush=True)
    print()
    messages.append({"role": "assistant", "content": "".join(reply)})
