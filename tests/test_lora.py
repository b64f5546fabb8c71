"""LoRA adapters made with peft on tiny random models: Pagoda's greedy tokens equal transformers +
peft's (fp32, CPU), alone and in mixed batches (several adapters and the base model in one step,
with fewer device slots than adapters), the prefix cache keeps adapters apart, and adapters this
engine cannot apply are refused with a message naming why."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("peft")

from pagoda import LLM, SamplingParams
from pagoda.lora.request import LoRARequest
from tests.lora_adapters import peft_greedy, save_peft_adapter
from tests.tiny_models import save_tiny_model

MAX_NEW = 8


@pytest.fixture(scope="module", params=["llama3", "qwen2-mqa"])
def family(request, tmp_path_factory):
    """A base model, three adapters (all targets; q/v only with rsLoRA; MLP only at rank 4) and
    each one's reference continuations of the prompts (None: the base model's)."""
    directory = tmp_path_factory.mktemp(request.param)
    base = save_tiny_model(request.param, directory)
    adapters = [
        save_peft_adapter(base, directory, seed=1),
        save_peft_adapter(base, directory, seed=2, targets=("q_proj", "v_proj"), use_rslora=True, alpha=8),
        save_peft_adapter(base, directory, seed=3, rank=4, targets=("gate_proj", "up_proj", "down_proj")),
    ]
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 256) for _ in range(n)] for n in (3, 17, 40)]
    expected = {a: peft_greedy(base, a, prompts, MAX_NEW) for a in [None, *adapters]}
    return base, adapters, prompts, expected


def _llm(path, **kwargs) -> LLM:
    return LLM(model=str(path), device="cpu", skip_tokenizer_init=True, enable_lora=True, **kwargs)


def _greedy(llm: LLM, prompts, lora_request=None) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                           lora_request=lora_request)
    return [o.outputs[0].token_ids for o in outputs]


def _request(adapter, i: int) -> LoRARequest:
    return LoRARequest(f"adapter{i}", i, str(adapter))


def test_each_adapter_matches_transformers_peft(family):
    base, adapters, prompts, expected = family
    llm = _llm(base, max_loras=3)
    for i, adapter in enumerate(adapters, 1):
        assert expected[adapter] != expected[None]  # the adapter changes the continuation
        assert _greedy(llm, prompts, _request(adapter, i)) == expected[adapter]
    assert _greedy(llm, prompts) == expected[None]


@pytest.mark.parametrize("max_loras", [3, 1])
def test_mixed_batch_gives_each_request_what_it_gets_alone(family, max_loras):
    """Every prompt with each of three adapters and with none, in one call: with three slots they
    share steps; with one, the scheduler runs one adapter at a time and slots are evicted (LRU)."""
    base, adapters, prompts, expected = family
    llm = _llm(base, max_loras=max_loras, max_cpu_loras=max_loras)
    choices = [None, *adapters]
    loras = [None if a is None else _request(a, choices.index(a)) for a in choices for _ in prompts]
    got = _greedy(llm, prompts * len(choices), loras)
    assert got == [tokens for a in choices for tokens in expected[a]]


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
def test_parallel_ranks_shard_the_adapters_as_their_layers(family, layout):
    """Two CPU ranks: with TP each holds its shard of A (row-parallel) or B (column-parallel) and
    the tokens equal transformers + peft's; with PP each stage holds its own layers' adapters."""
    base, adapters, prompts, expected = family
    llm = _llm(base, max_loras=2, **layout)
    choices = [None, adapters[0], adapters[1]]
    loras = [None if a is None else _request(a, choices.index(a)) for a in choices for _ in prompts]
    assert _greedy(llm, prompts * len(choices), loras) == [tokens for a in choices for tokens in expected[a]]
    llm.shutdown()


def test_device_slots_evict_the_least_recently_used_adapter(family, monkeypatch):
    """Two slots, three adapters: the one used least recently gives up its slot, the others keep
    theirs; the CPU cache (two adapters) reads from disk only what it no longer holds."""
    import pagoda.lora.manager as manager_module

    base, adapters, prompts, _ = family
    reads = []
    real_load = manager_module.load_peft_adapter
    monkeypatch.setattr(manager_module, "load_peft_adapter", lambda path, rank: reads.append(path) or real_load(path, rank))
    llm = _llm(base, max_loras=2, max_cpu_loras=2)
    manager = llm.llm_engine.engine_core.engine_core.executor.worker.runner.lora
    a, b, c = (_request(adapter, i) for i, adapter in enumerate(adapters, 1))
    for lora in (a, b, a, c):  # c evicts b (a was used after it)
        _greedy(llm, prompts[:1], lora)
    assert dict(manager.slots) == {1: 0, 3: 1}
    assert list(manager.cpu_cache) == [1, 3]
    _greedy(llm, prompts[:1], b)  # b again: from disk, into a's slot (c was used after a)
    assert dict(manager.slots) == {3: 1, 2: 0}
    assert list(manager.cpu_cache) == [3, 2]
    assert reads == [str(adapters[0]), str(adapters[1]), str(adapters[2]), str(adapters[1])]


def test_prefix_cache_keeps_adapters_apart(family):
    base, adapters, prompts, expected = family
    llm = _llm(base, max_loras=2, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    prompt = {"prompt_token_ids": prompts[2]}  # 40 tokens: 9 full blocks are cached
    runs = [None, _request(adapters[0], 1), _request(adapters[1], 2), _request(adapters[0], 1), None]
    outputs = [llm.generate(prompt, params, use_tqdm=False, lora_request=lora)[0] for lora in runs]
    assert [o.num_cached_tokens for o in outputs] == [0, 0, 0, 36, 36]
    assert [o.outputs[0].token_ids for o in outputs] == [
        expected[None][2], expected[adapters[0]][2], expected[adapters[1]][2], expected[adapters[0]][2],
        expected[None][2],
    ]


# Refusals --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("refusals")
    base = save_tiny_model("llama3", directory)
    return base, directory, _llm(base, max_lora_rank=8)


def _refusal(llm: LLM, adapter, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _greedy(llm, [[5, 6, 7]], LoRARequest("bad", 99, str(adapter)))
    assert len(_greedy(llm, [[5, 6, 7]])) == 1  # the engine goes on


def test_missing_files_are_refused(llama, tmp_path):
    base, _, llm = llama
    _refusal(llm, tmp_path / "nowhere", "has no adapter_config.json")
    adapter = save_peft_adapter(base, tmp_path, seed=4)
    (adapter / "adapter_model.safetensors").unlink()
    _refusal(llm, adapter, "has no adapter_model.safetensors")


def test_pickled_weights_of_older_peft_releases_are_read(llama, tmp_path):
    from safetensors.torch import load_file

    base, _, llm = llama
    adapter = save_peft_adapter(base, tmp_path, seed=11)
    want = _greedy(llm, [[5, 6, 7]], LoRARequest("safetensors", 11, str(adapter)))
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    assert _greedy(llm, [[5, 6, 7]], LoRARequest("bin", 12, str(adapter))) == want


def test_rank_above_max_lora_rank_is_refused(llama, tmp_path):
    base, _, llm = llama
    _refusal(llm, save_peft_adapter(base, tmp_path, seed=5, rank=16), r"rank 16, above max_lora_rank=8")


def test_modules_to_save_is_refused(llama, tmp_path):
    base, _, llm = llama
    adapter = save_peft_adapter(base, tmp_path, seed=6)
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["modules_to_save"] = ["lm_head"]
    config_file.write_text(json.dumps(config))
    _refusal(llm, adapter, "modules_to_save")


def test_targets_the_model_lacks_are_refused(llama, tmp_path):
    base, _, llm = llama
    _refusal(llm, save_peft_adapter(base, tmp_path, seed=7, targets=("lm_head",)), "cannot apply LoRA to")
    deeper = save_tiny_model("llama3", tmp_path / "deeper", num_hidden_layers=3)
    _refusal(llm, save_peft_adapter(deeper, tmp_path, seed=8), "layer 2's .* is not in the model")


def test_an_adapter_of_another_shape_is_refused(llama, tmp_path):
    _, _, llm = llama
    wider = save_tiny_model("llama3", tmp_path / "wider", intermediate_size=96)
    _refusal(llm, save_peft_adapter(wider, tmp_path, seed=9), "maps 96 -> 64 features, but the base model.s maps 128 -> 64")


def test_lora_request_needs_enable_lora(llama):
    base, directory, _ = llama
    llm = LLM(model=str(base), device="cpu", skip_tokenizer_init=True)
    adapter = save_peft_adapter(base, directory, seed=10)
    with pytest.raises(ValueError, match="enable_lora"):
        _greedy(llm, [[5, 6, 7]], LoRARequest("a", 1, str(adapter)))


def test_lora_request_list_must_match_the_prompts(llama):
    _, _, llm = llama
    with pytest.raises(ValueError, match="lora_request has 2 entries for 1 prompts"):
        _greedy(llm, [[5, 6, 7]], [None, None])


def test_engine_flags_are_checked():
    with pytest.raises(ValueError, match="max_cpu_loras"):
        LLM(model="unused", enable_lora=True, max_loras=4, max_cpu_loras=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_eager_with_mixed_adapters(family):
    """Decode graphs read the adapter index as an input: a mixed batch's tokens under graphs
    equal the eager ones (and transformers + peft's, in fp32)."""
    base, adapters, prompts, expected = family
    choices = [None, *adapters]
    loras = [None if a is None else _request(a, choices.index(a)) for a in choices for _ in prompts]
    want = [tokens for a in choices for tokens in expected[a]]
    for eager in (False, True):
        llm = LLM(model=str(base), device="cuda", dtype="float32", skip_tokenizer_init=True, enable_lora=True,
                  max_loras=3, enforce_eager=eager, gpu_memory_utilization=0.3)
        assert _greedy(llm, prompts * len(choices), loras) == want
        llm.shutdown()


def test_bench_throughput_with_random_adapters(tmp_path):
    """`pagoda bench throughput --num-loras 3`: the base model's run, then the adapters' (written
    in PEFT's format, read and checked like any adapter) on the same engine."""
    from pagoda.entrypoints.cli import main

    base = save_tiny_model("qwen2-mqa", tmp_path)
    out = tmp_path / "result.json"
    main(["bench", "throughput", "--model", str(base), "--num-prompts", "5", "--input-len", "8", "--output-len", "6",
          "--num-loras", "3", "--lora-rank", "4", "--device", "cpu", "--disable-tqdm", "--output-json", str(out)])
    results = json.loads(out.read_text())
    assert [r["backend"] for r in results] == ["pagoda", "pagoda+3 LoRAs r=4"]
    assert all(r["num_requests"] == 5 and r["output_tokens"] == 30 for r in results)
