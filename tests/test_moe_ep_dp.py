"""Expert parallelism across data-parallel replicas (--data-parallel-size with
--enable-expert-parallel): the experts of each MoE layer spread over every replica's ranks, whose
token rows meet in each layer (gloo, on the CPU); a replica with no rows (a dummy step) still
takes part. Served with DP=2 (and DP=2 x TP=2): the engine cores step in lockstep, one replica
idle for many steps, and the greedy texts equal one process's. The layer's exchange over NCCL
runs where two GPUs are visible (marked gpu). SIGTERM stops the cores together; a core that dies
takes the server and its peer down. A dense model's replicas stay independent, as vLLM's; a GPU
needs room for its replica's share of the experts only."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
import signal
import tempfile
from pathlib import Path

import openai
import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.config import EngineConfig
from pagoda.config.groups import ParallelConfig
from pagoda.config.resolve import model_spec, resolve_config
from pagoda.distributed.parallel_state import destroy_parallel, init_parallel
from pagoda.layers.moe import SparseMoeBlock
from pagoda.loader.model_resolver import resolve_model
from pagoda.parallel_config import GpuInventory, check_parallel_layout
from tests.serving import descendants, engine_core_pid, save_tokenizer, serving, still_alive
from tests.test_moe import MIXTRAL_8X7B
from tests.tiny_models import save_tiny_model

EXPERTS, HIDDEN, INTER = 8, 16, 12
# Rows each replica brings to three successive steps: uneven, and each replica idle in one.
ROWS = [(5, 0, 2), (3, 4, 0)]


def _block() -> SparseMoeBlock:
    """Built under the current process groups, loaded with the weights every process draws alike."""
    g = torch.Generator().manual_seed(0)
    block = SparseMoeBlock(EXPERTS, 3, HIDDEN, INTER, "silu", renormalize=True)
    block.gate.weight.data = torch.randn(EXPERTS, HIDDEN, generator=g)
    block.experts.load_weight("gate_up_proj", torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g))
    block.experts.load_weight("down_proj", torch.randn(EXPERTS, HIDDEN, INTER, generator=g))
    return block


def _replica_rank(
    rank: int, tp: int, dp_rank: int, init_method: str, device: str, results: multiprocessing.Queue
) -> None:
    whole = _block()  # before joining: one process holds every expert
    backend = "gloo"
    if device == "cuda":
        torch.cuda.set_device(dp_rank * tp + rank)
        backend = "nccl"
    init_parallel(rank, tp, 1, init_method, backend, enable_expert_parallel=True, dp_size=2, dp_rank=dp_rank)
    try:
        shard = _block().to(device)
        errors = []
        for step, rows in enumerate(ROWS[dp_rank]):
            x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(10 * step + dp_rank))
            got = shard(x.to(device)).cpu()
            if got.shape != x.shape or not torch.allclose(got, whole(x), rtol=1e-5, atol=1e-5):
                errors.append(f"step {step}: {got.shape} differs from the whole layer's")
        results.put((dp_rank * tp + rank, tuple(shard.experts.w13.shape), errors))
    finally:
        destroy_parallel()


@pytest.mark.parametrize("tp,device", [
    (1, "cpu"), (2, "cpu"),
    pytest.param(1, "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                                        reason="needs 2 CUDA GPUs")]),
], ids=["dp2", "dp2xtp2", "dp2-nccl"])
def test_experts_spread_over_the_replicas_and_their_rows_meet(tp, device):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as store:
        init_method = (Path(store) / "ranks").as_uri()
        procs = [context.Process(target=_replica_rank, args=(rank, tp, dp_rank, init_method, device, results))
                 for dp_rank in range(2) for rank in range(tp)]
        for p in procs:
            p.start()
        got = sorted(results.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(30)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    ranks = 2 * tp
    # Whole experts: EXPERTS / (DP x TP) of them on each rank, none of them sliced.
    assert [(r, held) for r, held, _ in got] == [(r, (EXPERTS // ranks, 2 * INTER, HIDDEN)) for r in range(ranks)]
    assert [errors for _, _, errors in got] == [[]] * ranks


def _resolved(path: Path, **args):
    return resolve_config(EngineConfig(model=str(path), device="cpu", skip_tokenizer_init=True, **args),
                          resolve_model(str(path)))


def test_only_an_moe_model_spreads_its_experts_over_the_replicas(tmp_path):
    moe = save_tiny_model("qwen2-moe", tmp_path)  # 6 experts
    spans = _resolved(moe, data_parallel_size=2, enable_expert_parallel=True).parallel
    assert spans.experts_span_replicas
    assert not _resolved(moe, data_parallel_size=2).parallel.experts_span_replicas
    # vLLM's rule: a dense model's replicas stay independent, the flag meaning nothing to them.
    dense = save_tiny_model("llama3", tmp_path)
    assert not _resolved(dense, data_parallel_size=2, enable_expert_parallel=True).parallel.experts_span_replicas
    with pytest.raises(ValueError, match=r"tensor_parallel_size=1 x data_parallel_size=4 = 4 with "
                                         r"enable_expert_parallel must divide the model's 6 experts"):
        _resolved(moe, data_parallel_size=4, enable_expert_parallel=True)
    with pytest.raises(ValueError, match=r"async_scheduling=True with data_parallel_size > 1"):
        _resolved(moe, data_parallel_size=2, enable_expert_parallel=True, async_scheduling=True)


def test_a_replica_needs_room_for_its_share_of_the_experts_only():
    config_cls, fields, _ = MIXTRAL_8X7B  # 87 GiB in bf16, of which 84 GiB of routed experts
    spec = model_spec(config_cls(**fields))
    gpus = GpuInventory(count=2, memory_bytes=80 << 30)

    def check(expert_parallel: bool) -> None:
        parallel = ParallelConfig(1, 1, 2, expert_parallel, experts_span_replicas=expert_parallel)
        check_parallel_layout(parallel, spec, torch.bfloat16, 0.9, gpus)

    check(expert_parallel=True)  # 3 + 84 / 2 GiB a GPU
    with pytest.raises(ValueError, match=r"one copy of the model take 87.0 GiB"):
        check(expert_parallel=False)


PROMPTS = ["a", "experts over replicas", "lockstep", "the longest prompt of the batch, by some way"]
MAX_TOKENS = [20, 2, 5, 1]  # whichever replica gets the 20 runs steps while the other idles


@pytest.mark.parametrize("arch,tp", [("qwen3-moe", 1), ("mixtral", 1), ("qwen3-moe", 2)],
                         ids=["qwen3-moe", "mixtral", "qwen3-moe-tp2"])
def test_data_parallel_replicas_sharing_experts_serve_one_process_greedy_texts(arch, tp, tmp_path):
    vocab_size = save_tokenizer(tmp_path / arch)
    path = save_tiny_model(arch, tmp_path, vocab_size=vocab_size)
    llm = LLM(model=str(path), device="cpu", seed=0)
    expected = [o.outputs[0].text for o in llm.generate(
        PROMPTS, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS], use_tqdm=False)]
    llm.shutdown()
    args = [str(path), "--served-model-name", "m", "--seed", "0", "--data-parallel-size", "2",
            "--enable-expert-parallel", "--tensor-parallel-size", str(tp)]
    with serving(args, tmp_path / "server.log") as (proc, base):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=120.0, max_retries=0)

        def complete(i: int) -> str:
            return client.completions.create(model="m", prompt=PROMPTS[i], max_tokens=MAX_TOKENS[i], temperature=0.0,
                                             extra_body={"ignore_eos": True}).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            assert list(pool.map(complete, range(len(PROMPTS)))) == expected
        # Once every replica is idle again: a request wakes them all.
        assert complete(0) == expected[0]
        tree = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)  # the cores stop together, told by the front end
        assert proc.wait(30) == 0
    assert not still_alive(tree, 10)
    log = (tmp_path / "server.log").read_text()
    assert sorted(re.findall(rf"replica (\d) of 2: MoE experts over the {2 * tp} ranks", log)) == ["0", "1"]


def test_a_replica_core_that_dies_takes_the_server_and_the_other_core_down(tmp_path):
    vocab_size = save_tokenizer(tmp_path / "qwen3-moe")
    path = save_tiny_model("qwen3-moe", tmp_path, vocab_size=vocab_size)
    args = [str(path), "--served-model-name", "m", "--data-parallel-size", "2", "--enable-expert-parallel"]
    with serving(args, tmp_path / "server.log") as (proc, _):
        tree = descendants(proc.pid)
        os.kill(engine_core_pid(proc.pid), signal.SIGKILL)
        # The other core, its lockstep peer gone, waits for the front end, which exits as with
        # any dead core (an abort of the front end would be -6).
        assert proc.wait(30) == 1
    assert not still_alive(tree, 10)
