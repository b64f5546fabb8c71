"""The benches' requests, by vLLM's --dataset-name: `random` (seeded random-token prompts of the
lengths asked for) or `sharegpt` (the first turn and reply of each conversation in a ShareGPT JSON
file, --dataset-path: the reply's length is the output's, unless --sharegpt-output-len sets one),
chosen and filtered as vLLM's benchmark does, so that figures compare with vLLM's on one file."""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("random", "sharegpt")

# vLLM's bounds on a ShareGPT sample: shorter prompts or replies, longer prompts or pairs are skipped.
_MIN_TOKENS, _MAX_PROMPT_TOKENS, _MAX_TOTAL_TOKENS = 4, 1024, 2048


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset-name", default="random", choices=DATASETS,
                        help="the requests: random token prompts of the lengths asked for, or sharegpt: the "
                             "conversations of a ShareGPT JSON file (--dataset-path) (default: %(default)s)")
    parser.add_argument("--dataset-path", default=None, help="the dataset's file (sharegpt: its JSON)")
    parser.add_argument("--sharegpt-output-len", type=int, default=None,
                        help="output tokens of every sharegpt request (default: as many as the reply in the file)")


def make_requests(
    num_prompts: int, input_len: int, output_len: int, vocab_size: int, seed: int, range_ratio: float = 0.0
) -> list[BenchRequest]:
    """Seeded random token prompts; lengths uniform in [len * (1 - r), len * (1 + r)]."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        n = _length(input_len, range_ratio, rng)
        ids = [rng.randrange(vocab_size) for _ in range(n)]
        requests.append(BenchRequest(ids, _length(output_len, range_ratio, rng)))
    return requests


def _length(mean: int, ratio: float, rng: random.Random) -> int:
    low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(low, high)


def sharegpt_pairs(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """The (first turn, its reply) of each conversation of --dataset-path that has both, in an order
    shuffled by --seed."""
    if not args.dataset_path:
        raise ValueError("--dataset-name sharegpt needs --dataset-path: a ShareGPT JSON file")
    try:
        conversations = json.loads(Path(args.dataset_path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--dataset-path {args.dataset_path}: {error}") from None
    pairs = [
        (turns[0]["value"], turns[1]["value"])
        for turns in (c.get("conversations") or [] for c in conversations) if len(turns) >= 2
    ]
    random.Random(args.seed).shuffle(pairs)
    return iter(pairs)


class ShareGPTSampler:
    """Takes tokenized samples in the file's shuffled order until --num-prompts are kept, skipping
    those vLLM's benchmark skips (too short or too long); `requests` then fills up to the count."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.kept: list[BenchRequest] = []

    def offer(self, prompt_ids: list[int], reply_ids: list[int]) -> bool:
        """Keep the sample if it qualifies; whether enough are kept."""
        output_len = len(reply_ids) if self.args.sharegpt_output_len is None else self.args.sharegpt_output_len
        too_short = len(prompt_ids) < _MIN_TOKENS or output_len < _MIN_TOKENS
        too_long = len(prompt_ids) > _MAX_PROMPT_TOKENS or len(prompt_ids) + output_len > _MAX_TOTAL_TOKENS
        if not (too_short or too_long):
            self.kept.append(BenchRequest(prompt_ids, output_len))
        return len(self.kept) == self.args.num_prompts

    def requests(self) -> list[BenchRequest]:
        """--num-prompts requests: where the file gave fewer, the others drawn again from them, as
        vLLM's benchmark oversamples."""
        args, kept = self.args, self.kept
        if not kept:
            raise ValueError(f"--dataset-path {args.dataset_path}: no conversation has a usable first turn and reply")
        if len(kept) < args.num_prompts:
            print(f"the dataset has {len(kept)} usable conversations: drawing the other "
                  f"{args.num_prompts - len(kept)} requests again from them")
            kept = kept + random.Random(args.seed).choices(kept, k=args.num_prompts - len(kept))
        return kept


def sharegpt_requests(args: argparse.Namespace, encode: Callable[[str], list[int]]) -> list[BenchRequest]:
    """--num-prompts requests from the file, each text tokenized by `encode`."""
    sampler = ShareGPTSampler(args)
    for prompt, reply in sharegpt_pairs(args):
        if sampler.offer(encode(prompt), encode(reply)):
            break
    return sampler.requests()
