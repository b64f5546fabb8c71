"""Per-step overhead of the Ray executor against the multiprocess one, on the CPU: a tiny random
llama at TP=2 (gloo) decoding 256 requests at once, both executors held in one process and run in
turn. A step's time is the engine's call to `executor.execute` (encode the step message, get it to
both ranks, run the model, read the sampling rank's answer); the model's share is the same under
both executors, so the difference of the medians is what Ray's messages cost over the pipes. Only
all-decode steps (256 requests, one token each) count. Prints each round's medians, their medians,
the step message's size and the load average.

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


def _time_decode_steps(llm: LLM, decodes: int) -> tuple[list[float], list[int]]:
    """Lists that fill, as the LLM runs, with the wall time of each all-decode step its engine hands
    the executor, and the pickled size of each step message."""
    executor = llm.llm_engine.engine_core.engine_core.executor
    execute, encode = executor.execute, executor._steps.encode
    times: list[float] = []
    sizes: list[int] = []

    def timed(scheduler_output):
        started = time.perf_counter()
        output = execute(scheduler_output)
        if len(scheduler_output.chunks) == decodes == scheduler_output.num_batched_tokens:
            times.append(time.perf_counter() - started)
        return output

    def measured(scheduler_output):
        message = encode(scheduler_output)
        sizes.append(len(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)))
        return message

    executor.execute, executor._steps.encode = timed, measured
    return times, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decodes", type=int, default=256, help="requests decoding in every step")
    parser.add_argument("--steps", type=int, default=32, help="tokens each request generates in a round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each executor, taken in turn")
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
        timings = {backend: _time_decode_steps(llm, args.decodes) for backend, llm in llms.items()}
        print(f"load average before: {_load()}")
        medians: dict[str, list[float]] = {backend: [] for backend in llms}
        for round_ in range(args.rounds):
            for backend, llm in llms.items():
                times, _ = timings[backend]
                times.clear()
                llm.generate(prompts, params, use_tqdm=False)
                medians[backend].append(statistics.median(times))
                print(f"round {round_} {backend}: median step {medians[backend][-1] * 1e3:.2f} ms "
                      f"over {len(times)} decode steps")
        for llm in llms.values():
            llm.shutdown()
    print(f"load average after: {_load()}")
    mp, ray = (statistics.median(medians[backend]) * 1e3 for backend in ("mp", "ray"))
    print(f"step message: median {statistics.median(timings['mp'][1])} bytes pickled")
    print(f"median of medians: mp {mp:.2f} ms, ray {ray:.2f} ms, ray - mp {ray - mp:+.2f} ms a step")


def _load() -> str:
    return f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min) on {os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
