"""vLLM's --dataset-name sharegpt for `pagoda bench throughput` and `bench serve`: each
conversation's first turn and reply from a ShareGPT JSON file, shuffled by the seed, skipped where
vLLM's benchmark skips them, and drawn again where the file has too few."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pagoda.benchmarks.datasets import sharegpt_requests
from pagoda.entrypoints.cli import build_parser, main
from tests.serving import save_tokenizer
from tests.test_bench_serve_backends import fake_llama_server
from tests.tiny_models import save_tiny_model

USABLE = [("What is a pagoda?", "A tiered tower."), ("Name three colors.", "Red, green and blue."),
          ("Count to five, please.", "One, two, three, four, five."), ("Say hello.", "Hello there!")]
SKIPPED = [
    ("Hi", "A reply long enough."),  # a prompt under 4 tokens
    ("A long enough prompt.", "No"),  # a reply under 4 tokens (unless --sharegpt-output-len)
    ("x" * 1025, "A reply long enough."),  # a prompt over 1,024 tokens
    ("y" * 1000, "z" * 1100),  # over 2,048 tokens together
]


def sharegpt_file(directory: Path) -> Path:
    conversations = [{"id": str(i), "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": r}]}
                     for i, (p, r) in enumerate(USABLE + SKIPPED)]
    conversations.append({"id": "lone", "conversations": [{"from": "human", "value": "Nobody answered this one."}]})
    path = directory / "sharegpt.json"
    path.write_text(json.dumps(conversations))
    return path


def args(path: Path, num_prompts: int, seed: int = 0, output_len: int | None = None) -> argparse.Namespace:
    return argparse.Namespace(dataset_path=str(path), num_prompts=num_prompts, seed=seed, sharegpt_output_len=output_len)


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_sharegpt_requests_are_chosen_as_vllms_benchmark_chooses(tmp_path):
    path = sharegpt_file(tmp_path)
    requests = sharegpt_requests(args(path, 4), chars)
    chosen = {("".join(map(chr, r.prompt_token_ids)), r.output_len) for r in requests}
    assert chosen == {(p, len(r)) for p, r in USABLE}
    orders = {tuple(tuple(r.prompt_token_ids) for r in sharegpt_requests(args(path, 4, seed), chars)) for seed in range(4)}
    assert len(orders) > 1  # the seed shuffles them
    # A set output length counts instead of the reply's (a short reply, a long pair now pass);
    # too few usable ones are drawn again.
    fixed = sharegpt_requests(args(path, 12, output_len=7), chars)
    assert len(fixed) == 12 and {r.output_len for r in fixed} == {7}
    admitted = {p for p, _ in USABLE} | {"A long enough prompt.", "y" * 1000}
    assert {"".join(map(chr, r.prompt_token_ids)) for r in fixed} == admitted
    with pytest.raises(ValueError, match="needs --dataset-path"):
        sharegpt_requests(argparse.Namespace(dataset_path=None, num_prompts=1, seed=0), chars)


def test_bench_serve_sends_the_sharegpt_prompts_and_their_reply_lengths(tmp_path):
    path = sharegpt_file(tmp_path)
    with fake_llama_server() as (base, handler):
        parsed = build_parser().parse_args([
            "bench", "serve", "--base-url", base, "--dataset-name", "sharegpt", "--dataset-path", str(path),
            "--num-prompts", "4",
        ])
        summary = parsed.func(parsed)
    assert summary["completed"] == 4
    sent = sorted(("".join(map(chr, body["prompt"])), body["max_tokens"]) for body in handler.bodies)
    assert sent == sorted((p, len(r)) for p, r in USABLE)


def test_bench_throughput_runs_the_sharegpt_requests(tmp_path):
    save_tokenizer(tmp_path / "llama3")
    model = save_tiny_model("llama3", tmp_path, vocab_size=save_tokenizer(tmp_path / "llama3"))
    out = tmp_path / "result.json"
    main(["bench", "throughput", "--model", str(model), "--dataset-name", "sharegpt", "--dataset-path",
          str(sharegpt_file(tmp_path)), "--num-prompts", "4", "--disable-tqdm", "--output-json", str(out)])
    result = json.loads(out.read_text())
    assert result["prompt_tokens"] == sum(len(p.encode()) for p, _ in USABLE)  # one token a byte
    assert result["output_tokens"] == sum(len(r.encode()) for _, r in USABLE)
