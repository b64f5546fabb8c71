"""Per-step time of the multiprocess and Ray executors, one step at a time and overlapped, on the
CPU: a tiny random llama at TP=2 (gloo) decoding 256 requests at once, both executors held in one
process, each run with the engine's asynchronous scheduling off and on, in turn. A step's time is
its period: from the engine's sending of one all-decode step to the ranks to its sending of the
next (the host's scheduling, the step message, the ranks' work, the read of the tokens;
overlapped, the host's share runs while the ranks compute the step before). Only all-decode steps (256 requests, one
token each) count. Prints each round's medians, their medians, the step message's size and the
load average.

    PYTHONPATH=. python scripts/bench_executor_step.py [--decodes 256] [--steps 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import tempfile
import time
from pathlib import Path

from pagoda import LLM, SamplingParams
from tests.tiny_models import save_tiny_model

VOCAB = 251
MODES = {"one at a time": False, "overlapped": True}


class StepClock:
    """Fills, as an LLM runs, with the period of each all-decode step its engine sends to the
    ranks, and the pickled size of each step message."""

    def __init__(self, llm: LLM, decodes: int) -> None:
        self.engine = llm.llm_engine.engine_core.engine_core
        executor = self.engine.executor
        self.periods: list[float] = []
        self.sizes: list[int] = []
        self._decodes = decodes
        self._last_sent: float | None = None  # the all-decode step before
        encode = executor._steps.encode

        def measured(scheduler_output):
            now = time.perf_counter()
            decode = len(scheduler_output.chunks) == self._decodes == scheduler_output.num_batched_tokens
            if decode and self._last_sent is not None:
                self.periods.append(now - self._last_sent)
            self._last_sent = now if decode else None
            message = encode(scheduler_output)
            self.sizes.append(len(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)))
            return message

        executor._steps.encode = measured

    def start_round(self, overlapped: bool) -> None:
        # The engine reads the flag every step: a run may switch it between generations.
        self.engine.async_scheduling = overlapped
        self.periods.clear()
        self._last_sent = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decodes", type=int, default=256, help="requests decoding in every step")
    parser.add_argument("--steps", type=int, default=32, help="tokens each request generates in a round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each executor and mode, taken in turn")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        model = save_tiny_model("llama3", Path(directory), vocab_size=VOCAB)
        llms = {
            backend: LLM(model=str(model), device="cpu", skip_tokenizer_init=True, tensor_parallel_size=2,
                         distributed_executor_backend=backend, max_num_seqs=args.decodes,
                         max_num_batched_tokens=4 * args.decodes)
            for backend in ("mp", "ray")
        }
        prompts = [{"prompt_token_ids": [2 + (i * 7 + j) % (VOCAB - 2) for j in range(4)]} for i in range(args.decodes)]
        params = SamplingParams(temperature=0.0, max_tokens=args.steps, ignore_eos=True)
        clocks = {backend: StepClock(llm, args.decodes) for backend, llm in llms.items()}
        print(f"load average before: {_load()}")
        medians: dict[tuple[str, str], list[float]] = {(b, m): [] for b in llms for m in MODES}
        for round_ in range(args.rounds):
            for (backend, mode), runs in medians.items():
                clock = clocks[backend]
                clock.start_round(MODES[mode])
                llms[backend].generate(prompts, params, use_tqdm=False)
                runs.append(statistics.median(clock.periods))
                print(f"round {round_} {backend} {mode}: median step {runs[-1] * 1e3:.2f} ms "
                      f"over {len(clock.periods)} decode steps")
        for llm in llms.values():
            llm.shutdown()
    print(f"load average after: {_load()}")
    print(f"step message: median {statistics.median(clocks['mp'].sizes)} bytes pickled")
    for (backend, mode), runs in medians.items():
        print(f"median of medians: {backend} {mode} {statistics.median(runs) * 1e3:.2f} ms a step")


def _load() -> str:
    return f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min) on {os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
