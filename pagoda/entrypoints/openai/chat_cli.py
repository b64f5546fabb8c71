"""`pagoda chat`: talk to a running `pagoda serve` from the terminal, as `vllm chat` does."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import httpx

from .sse_client import iter_events, raise_for_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://localhost:8000/v1", help="the server's OpenAI base URL")
    parser.add_argument("--model-name", default=None, help="default: the server's first model")
    parser.add_argument("--api-key", default=os.environ.get("PAGODA_API_KEY"),
                        help="the server's API key (default: $PAGODA_API_KEY)")
    parser.add_argument("--system-prompt", default=None, help="a system message opening the conversation")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per reply at most (default: the rest of the context)")
    parser.add_argument("-q", "--quick", metavar="MESSAGE", default=None,
                        help="send one message, print the reply, exit")


def main(args: argparse.Namespace) -> None:
    try:
        _chat(args)
    except httpx.HTTPError as error:
        raise RuntimeError(f"cannot talk to the server at {args.url}: {error}") from None


def _chat(args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=httpx.Timeout(10.0, read=None)) as client:
        model = args.model_name or _first_model(client)
        messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        if args.quick is not None:
            _turn(client, model, messages, args.quick, args.max_tokens)
            return
        print(f"chatting with {model}; Ctrl-D or Ctrl-C ends", file=sys.stderr)
        while True:
            try:
                message = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return
            _turn(client, model, messages, message, args.max_tokens)


def _first_model(client: httpx.Client) -> str:
    response = client.get("/models")
    raise_for_error(response)
    return response.json()["data"][0]["id"]


def _turn(client: httpx.Client, model: str, messages: list[dict[str, str]], message: str, max_tokens: Any) -> None:
    """Send one user message, print the streamed reply, and keep both in the conversation."""
    messages.append({"role": "user", "content": message})
    body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens}
    reply = []
    with client.stream("POST", "/chat/completions", json=body) as response:
        raise_for_error(response)
        for event in iter_events(response.iter_lines()):
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                reply.append(piece)
                print(piece, end="", flush=True)
    print()
    messages.append({"role": "assistant", "content": "".join(reply)})
