"""Plain user scripts and their processes: `LLM(..., tensor_parallel_size=2)` in a script with no
`if __name__ == "__main__":` guard, as quick-starts write it (workers are forked, safely even after
the script ran torch itself); how worker processes are started (PAGODA_WORKER_MULTIPROC_METHOD);
and a parallel `pagoda serve` that stops cleanly on SIGTERM and says what a CPU run costs."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys

import pytest
import torch

from pagoda.executor.multiproc import START_METHOD_ENV, worker_start_method
from tests.serving import descendants, serving, still_alive, tiny_model_args
from tests.tiny_models import save_tiny_model

# No main guard, on purpose. The one-process run goes first, so the script's process has run
# torch's OpenMP thread pool before the parallel engine forks its workers.
SCRIPT = """
import json, multiprocessing
from pagoda import LLM, SamplingParams

params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
prompts = [{{"prompt_token_ids": [5, 9, 33, 7]}}, {{"prompt_token_ids": [100, 3, 250, 17, 42]}}]
tokens = {{}}
for name, layout in [("one", {{}}), ("parallel", {layout!r})]:
    llm = LLM(model={model!r}, device="cpu", skip_tokenizer_init=True, max_model_len=64, **layout)
    tokens[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
workers = [p.pid for p in multiprocessing.active_children()]
print(json.dumps({{"tokens": tokens, "workers": workers}}))
"""


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
def test_script_without_main_guard_runs_parallel(layout, tmp_path, monkeypatch):
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    model = save_tiny_model("llama3", tmp_path)
    script = tmp_path / "quickstart.py"
    script.write_text(SCRIPT.format(layout=layout, model=str(model)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["workers"]) == 2  # the parallel engine's two ranks, still up when the script ended
    assert result["tokens"]["parallel"] == result["tokens"]["one"]
    assert all(len(t) == 6 for t in result["tokens"]["one"])
    assert not still_alive(result["workers"], 30)


def test_workers_are_forked_by_default(monkeypatch):
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    assert worker_start_method() == "fork"
    monkeypatch.setenv(START_METHOD_ENV, "spawn")
    assert worker_start_method() == "spawn"


def test_initialized_cuda_forces_spawn_and_names_the_main_guard(monkeypatch, caplog):
    monkeypatch.setenv(START_METHOD_ENV, "fork")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with caplog.at_level(logging.WARNING, logger="pagoda"):
        assert worker_start_method() == "spawn"
    assert 'if __name__ == "__main__":' in caplog.text and f"{START_METHOD_ENV}=spawn" in caplog.text


def test_unknown_start_method_is_refused(monkeypatch):
    monkeypatch.setenv(START_METHOD_ENV, "forkserver")
    with pytest.raises(ValueError, match=START_METHOD_ENV):
        worker_start_method()


def test_parallel_server_stops_cleanly_on_sigterm(tmp_path):
    log = tmp_path / "server.log"
    with serving(tiny_model_args(tmp_path) + ["--tensor-parallel-size", "2"], log) as (proc, _):
        processes = descendants(proc.pid)  # the engine core, its two ranks, multiprocessing's helper
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    text = log.read_text()
    assert not [line for line in text.splitlines() if "ERROR" in line], text[-3000:]
    assert "CPU run on 2 ranks: 2 worker processes x" in text
    assert "KV cache of" in text
    assert len(processes) >= 3
    assert not still_alive(processes, 30)
