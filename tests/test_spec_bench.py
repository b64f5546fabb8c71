"""scripts/bench_spec_decode.py end to end at a tiny scale: --step-times (issue 19's measure (a):
steps of 1..9 query tokens per request, each batch size) and --draft-model llama-1b-shape (the
draft synthesized from the target's config). On the CPU here; the GPU test runs --step-times in
recaptured CUDA graphs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.serving import python_path
from tests.tiny_models import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
CELL = re.compile(r"(\d+\.\d+) \((\d+\.\d+)x\)")


def _bench(*args: str) -> str:
    env = {**os.environ, **python_path(ROOT)}
    done = subprocess.run([sys.executable, "scripts/bench_spec_decode.py", "--tiny", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _step_table(stdout: str) -> dict[int, list[tuple[float, float]]]:
    """batch size -> (ms, ratio to q=1) for q = 1..9."""
    return {int(line.split()[0]): [(float(ms), float(x)) for ms, x in CELL.findall(line)]
            for line in stdout.splitlines() if re.match(r"\s*\d+\s+\d+\.\d+ \(", line)}


def _check_step_times(device: str) -> str:
    stdout = _bench("--step-times", "--device", device, "--batch", "1", "3", "--input-len", "12", "--steps", "3")
    table = _step_table(stdout)
    assert sorted(table) == [1, 3]
    for cells in table.values():  # every q from 1 to 9 had steps of that shape, timed
        assert len(cells) == 9 and all(ms > 0 for ms, _ in cells)
        assert cells[0][1] == 1.0
    return stdout


def test_step_times_time_every_query_length_at_every_batch_size():
    assert "eager steps" in _check_step_times("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_times_run_in_cuda_graphs_for_every_query_length():
    assert "CUDA graphs for q=1..9 at batch sizes [1, 3]" in _check_step_times("cuda")


def test_a_draft_of_llama_1b_shape_runs_beside_the_replay():
    stdout = _bench("--draft-model", "llama-1b-shape", "--batch", "2", "--input-len", "12", "--output-len", "12",
                    "--repeats", "1")
    assert "same tokens" in stdout and "DIFFERENT" not in stdout
    assert re.search(r"draft model: \d+\.\d+ ms per engine step \(\d+ steps, k=4", stdout)


def test_the_synthesized_draft_has_llama_1b_shape_and_the_targets_vocabulary_and_rope(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_spec_decode", ROOT / "scripts/bench_spec_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    target = save_tiny_model("llama3", tmp_path, vocab_size=300, rope_theta=123456.0)
    target_config = json.loads((target / "config.json").read_text())
    draft = json.loads((bench.save_draft_shape(target, bench.LLAMA_1B_SHAPE, tmp_path) / "config.json").read_text())
    assert {key: draft[key] for key in bench.LLAMA_1B_SHAPE} == {
        "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "intermediate_size": 8192, "tie_word_embeddings": True,
    }
    assert draft["vocab_size"] == 300 and target_config["rope_parameters"]["rope_theta"] == 123456.0
    for key in ("rope_theta", "rope_scaling", "rope_parameters"):
        assert draft.get(key) == target_config.get(key)
    assert draft["architectures"] == ["LlamaForCausalLM"]
