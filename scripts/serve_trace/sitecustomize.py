"""A timeline of `pagoda serve` under load, for finding where a served run loses time against the
engine's own (diagnosis only: loaded as sitecustomize when this folder is on PYTHONPATH, active
when PAGODA_STEP_TRACE names a folder). Each process writes one line per event, stamped with
time.perf_counter (the same clock in every process of a Linux machine):

    trace_PID.tsv  engine core: per step() call: start, end, tokens scheduled, chunks, running,
                   waiting, outputs returned
    fe_PID.tsv     front end: per step's outputs handled: start, end, outputs
    client.tsv     pagoda bench serve: per run: start, end

    PAGODA_STEP_TRACE=DIR PYTHONPATH=scripts/serve_trace:. pagoda serve MODEL ... &
    PAGODA_STEP_TRACE=DIR PYTHONPATH=scripts/serve_trace:. pagoda bench serve ...
    python scripts/serve_trace/report.py DIR
"""

import os
import time

_DIR = os.environ.get("PAGODA_STEP_TRACE")
_files: dict = {}


def _write(kind: str, line: str) -> None:
    key = (kind, os.getpid())  # a forked process writes its own file
    if key not in _files:
        _files[key] = open(os.path.join(_DIR, f"{kind}_{os.getpid()}.tsv"), "w", buffering=1)
    _files[key].write(line)


def _trace_core() -> None:
    from pagoda.core import scheduler
    from pagoda.engine import core

    last = {"s": (0, 0, 0, 0)}
    schedule = scheduler.Scheduler.schedule

    def traced_schedule(self):
        out = schedule(self)
        last["s"] = (out.num_batched_tokens, len(out.chunks), len(self.running), len(self.waiting))
        return out

    step = core.EngineCore.step

    def traced_step(self):
        last["s"] = (0, 0, 0, 0)
        start = time.perf_counter()
        outputs = step(self)
        fields = (start, time.perf_counter(), *last["s"], len(outputs))
        _write("trace", "%.6f\t%.6f\t%d\t%d\t%d\t%d\t%d\n" % fields)
        return outputs

    scheduler.Scheduler.schedule = traced_schedule
    core.EngineCore.step = traced_step


def _trace_front_end() -> None:
    from pagoda.engine import async_llm

    process = async_llm.AsyncLLM._process

    def traced_process(self, steps):
        start = time.perf_counter()
        process(self, steps)
        end = time.perf_counter()
        for step in steps:  # one line per step, as the core's
            _write("fe", "%.6f\t%.6f\t%d\n" % (start, end, len(step.outputs)))

    async_llm.AsyncLLM._process = traced_process


def _trace_client() -> None:
    from pagoda.benchmarks import serve

    run = serve._run

    async def traced_run(*args, **kwargs):
        start = time.perf_counter()
        result = await run(*args, **kwargs)
        with open(os.path.join(_DIR, "client.tsv"), "a") as f:
            f.write("%.6f\t%.6f\n" % (start, time.perf_counter()))
        return result

    serve._run = traced_run


if _DIR:
    _trace_core()
    _trace_front_end()
    _trace_client()
