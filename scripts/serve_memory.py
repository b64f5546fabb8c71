"""Resident memory of `pagoda serve` on the default model after a few requests: start it from the
source tree TREE (PYTHONPATH), wait for /health, send 8 greedy chat requests of 64 tokens one at
a time, then 16 at once (the 16-stream benchmark's load), then print each process's RSS (front
end, engine core and its helper) as JSON, right after the last answer and IDLE_S seconds later,
and then their proportional set size in all (shared library pages counted once). With
ROUNDS=N in the environment, N-1 more rounds of 16 requests at once follow (new prompts each
round, as new users' would be), with the total at rest after each: how the KV pool's written part
grows with use.

    [ROUNDS=6] python scripts/serve_memory.py TREE PORT [pagoda serve flags...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil

IDLE_S = 3  # the engine core gives freed memory back after a second idle
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity in one sentence.",
           "List three colours."]


def post(port: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=600).read())


def chat(port: str, prompt: str) -> dict:
    return post(port, "/v1/chat/completions", {"model": "SmolLM2-135M-Instruct", "max_tokens": 64, "temperature": 0,
                                               "messages": [{"role": "user", "content": prompt}]})


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_rss_mb(pid: int) -> dict[str, int]:
    return {f"{p.pid} {' '.join(p.cmdline()[:3])[-40:]}": p.memory_info().rss >> 20 for p in process_tree(pid)}


def tree_pss_mb(pid: int) -> int:
    """The processes' proportional set size: pages they share (the same libraries mapped by the
    front end and the engine core) count once in all, where their RSS counts them in each."""
    return sum(p.memory_full_info().pss for p in process_tree(pid)) >> 20


def more_rounds(port: str, pid: int, round_: int) -> int:
    """One more round of 16 requests at once, prompts of this round's own; the total RSS at rest."""
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: chat(port, f"Round {round_}, user {i}: {PROMPTS[i % len(PROMPTS)]}"), range(16)))
    time.sleep(IDLE_S)
    return sum(tree_rss_mb(pid).values())


def wait_ready(port: str, server: subprocess.Popen) -> None:
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return
        except OSError:
            if server.poll() is not None:
                sys.exit("the server exited")
            time.sleep(2)


def main() -> None:
    tree, port, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    started = time.time()
    with open(f"/tmp/serve_memory_{port}.log", "w") as log:
        server = subprocess.Popen(["pagoda", "serve", "--port", port, *flags], env=dict(os.environ, PYTHONPATH=tree),
                                  cwd=tree, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, server)
        ready_s = time.time() - started
        for prompt in PROMPTS * 2:
            chat(port, prompt)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda prompt: chat(port, prompt), PROMPTS * 4))
        growth = [more_rounds(port, server.pid, round_) for round_ in range(1, int(os.environ.get("ROUNDS", "1")))]
        busy = tree_rss_mb(server.pid)
        time.sleep(IDLE_S)
        rest = tree_rss_mb(server.pid)
        pss = tree_pss_mb(server.pid)
        print(json.dumps({"tree": tree, "flags": flags, "ready_s": round(ready_s, 1), "rss_mb": busy,
                          "total_mb": sum(busy.values()), f"rss_mb_{IDLE_S}s_later": rest,
                          f"total_mb_{IDLE_S}s_later": sum(rest.values()),
                          f"pss_total_mb_{IDLE_S}s_later": pss, "rounds_at_rest_mb": growth}, indent=1))
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
