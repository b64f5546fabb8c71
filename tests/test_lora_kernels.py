"""The batched LoRA kernels (tokens grouped by slot, split-K shrink + expand, pagoda/kernels/lora.py)
against the torch path (pagoda/lora/layers.py) on mixed batches: tokens of several adapter slots
and of none, uneven counts per slot, one slot alone, no adapter at all, ranks and widths that are
not multiples of the kernels' blocks, decode-sized and prompt-sized steps. The kernels run
natively on a GPU, or on the CPU under TRITON_INTERPRET=1; the reference always runs on CPU copies."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_device import DEVICE, ON_GPU, require_kernels

require_kernels()

from pagoda.kernels.lora import BLOCK_K, _k_per_split, add_lora_triton, block_m_for, group_tokens
from pagoda.lora.layers import LoRAContext, add_lora_torch



def _weights(num_tokens: int, k: int, n: int, rank: int, slots: int, seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, k, generator=g).to(dtype)
    out = torch.randn(num_tokens, n, generator=g).to(dtype)
    lora_a = (torch.randn(slots, rank, k, generator=g) * 0.1).to(dtype)
    lora_b = (torch.randn(slots, n, rank, generator=g) * 0.1).to(dtype)
    return out, x, lora_a, lora_b


def _mixed_indices(num_tokens: int, slots: int, seed: int) -> torch.Tensor:
    """Every slot and -1 (no adapter), in runs as a batch's requests give them and interleaved;
    slot 0 has many more tokens than the others."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(-1, slots, (num_tokens,), generator=g, dtype=torch.int32)
    indices[: num_tokens // 2] = torch.arange(num_tokens // 2, dtype=torch.int32) % (slots + 1) - 1
    indices[num_tokens // 2 : num_tokens // 2 + num_tokens // 4] = 0
    indices[-1] = slots - 1
    return indices


def _expand_terms(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """|x A^T| |B^T| per output element: the size of the terms the expand sums, which bounds the
    error of rounding the shrink's result to the operands' dtype (the kernel does, the torch path
    keeps it in float32) however much those terms cancel."""
    x, lora_a, lora_b = (t.cpu().float() for t in (x, lora_a, lora_b))
    terms = torch.zeros(x.shape[0], lora_b.shape[1])
    for slot in indices.unique().tolist():
        if slot >= 0:
            rows = (indices.cpu() == slot).nonzero().squeeze(1)
            terms[rows] = (x[rows] @ lora_a[slot].T).abs() @ lora_b[slot].abs().T
    return terms


def _assert_added_close(got, base, want, atol: float, terms: torch.Tensor) -> None:
    """got = base + delta within atol and a few roundings: of the sum (the reference rounds the
    delta before adding it, the kernel after) and of the expand's terms (see _expand_terms)."""
    eps = torch.finfo(base.dtype).eps
    got, base, want = (t.cpu().float() for t in (got, base, want))
    bound = atol + 2 * eps * (base.abs() + (want - base).abs() + terms)
    excess = ((got - want).abs() - bound).max().item()
    assert excess <= 0, f"off by {excess} beyond the bound"


def _check(out, x, lora_a, lora_b, indices, atol: float) -> None:
    want = out.clone()
    add_lora_torch(want, x, lora_a, lora_b, indices)
    got = out.to(DEVICE)
    groups = group_tokens(indices.to(DEVICE), lora_a.shape[0])
    add_lora_triton(got, x.to(DEVICE), lora_a.to(DEVICE), lora_b.to(DEVICE), groups)
    _assert_added_close(got, out, want, atol, _expand_terms(x, lora_a, lora_b, indices))
    untouched = indices == -1
    assert torch.equal(got.cpu()[untouched], out[untouched])  # tokens without an adapter keep the base output


@pytest.mark.parametrize(("num_tokens", "k", "n", "rank", "slots"), [
    (1, 64, 64, 8, 1),  # one decode token
    (9, 200, 130, 24, 3),  # a fused layer's three rank-8 parts; widths off the block sizes
    (33, 96, 48, 16, 4),
    (40, 1000, 72, 80, 3),  # K split over programs (the last split short); rank past one rank block
])
def test_kernels_match_torch(num_tokens, k, n, rank, slots):
    indices = _mixed_indices(num_tokens, slots, seed=num_tokens)
    _check(*_weights(num_tokens, k, n, rank, slots, seed=num_tokens, dtype=torch.float32), indices, atol=1e-4)


def test_the_split_case_splits_k():
    """test_kernels_match_torch's K=1000 case runs the shrink in several K ranges, the last shorter."""
    k_per_split = _k_per_split(1000, group_tokens(torch.zeros(40, dtype=torch.int32), 3).tiles.shape[1])
    assert k_per_split < 1000 and 1000 % k_per_split != 0 and k_per_split % BLOCK_K == 0


@pytest.mark.parametrize("case", ["one slot", "no adapter", "one token of one slot"])
def test_kernels_on_degenerate_batches(case):
    num_tokens, slots = 21, 4
    indices = {
        "one slot": torch.full((num_tokens,), 2, dtype=torch.int32),
        "no adapter": torch.full((num_tokens,), -1, dtype=torch.int32),
        "one token of one slot": torch.tensor([-1] * 10 + [3] + [-1] * 10, dtype=torch.int32),
    }[case]
    _check(*_weights(num_tokens, 136, 100, 16, slots, seed=5, dtype=torch.float32), indices, atol=1e-4)


@pytest.mark.parametrize("num_tokens", [37, 600])  # a decode-sized step, and one of the prompt-sized tiles
def test_group_tokens_tiles_each_slots_tokens_once(num_tokens):
    slots = 5
    indices = _mixed_indices(num_tokens, slots, seed=1)
    indices[indices == 3] = -1  # a slot without tokens
    groups = group_tokens(indices, slots)
    block_m = block_m_for(num_tokens)
    assert groups.block_m == block_m
    order = groups.order.tolist()
    assert sorted(order) == list(range(num_tokens))
    covered: dict[int, list[int]] = {s: [] for s in range(slots)}
    for slot, first, end in groups.tiles.T.tolist():
        assert 0 <= end - first <= block_m
        tokens = order[first:end]
        assert all(indices[t] == slot for t in tokens)  # a tile never mixes adapters
        covered[slot].extend(tokens)
    for slot, tokens in covered.items():
        assert tokens == (indices == slot).nonzero().squeeze(1).tolist()  # each once, in order


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if ON_GPU else []))
def test_kernels_match_torch_on_a_step_of_prompt_chunks(dtype):
    """Chunks as a step gives them, through LoRAContext: prompt chunks and decodes, with and
    without adapters, past the decode tile size."""
    chunk_slots, query_lens = [0, 0, -1, 2, 1, -1, 1, 2], [400, 3, 17, 70, 1, 5, 1, 109]
    num_tokens = sum(query_lens)
    context = LoRAContext(num_tokens + 8, 3, torch.device(DEVICE))
    context.set_batch(chunk_slots, query_lens)
    indices = context.indices[:num_tokens].cpu()
    out, x, lora_a, lora_b = _weights(num_tokens, 72, 40, 24, 3, seed=7, dtype=dtype)
    want = out.clone()
    add_lora_torch(want, x, lora_a, lora_b, indices)
    got = out.to(DEVICE)
    add_lora_triton(got, x.to(DEVICE), lora_a.to(DEVICE), lora_b.to(DEVICE), context.groups(num_tokens))
    _assert_added_close(got, out, want, 1e-4 if dtype == torch.float32 else 3e-2, _expand_terms(x, lora_a, lora_b, indices))
    untouched = indices == -1
    assert torch.equal(got.cpu()[untouched], out[untouched])


def test_context_groups_once_per_forward():
    """The layers of one forward pass share one grouping; a new batch, or a graph capture, makes
    a new one (a capture must compute its own inside the graph)."""
    context = LoRAContext(16, 2, torch.device("cpu"))
    context.set_batch([1, -1, 0], [3, 2, 4])
    first = context.groups(9)
    assert context.groups(9) is first
    context.set_batch([0, 1], [4, 5])
    second = context.groups(9)
    assert second is not first and second.order[4:].tolist() == [4, 5, 6, 7, 8]  # slot 1's tokens last
    seen = []
    context.always_on(lambda: seen.append(context.groups(9)))()
    assert seen[0] is not second and context.groups(9) is not seen[0]


@pytest.mark.skipif(ON_GPU, reason="on a GPU the engine runs the kernels itself (test_lora.py's gpu test)")
def test_engine_steps_through_the_kernels_match_transformers_peft(tmp_path, monkeypatch):
    """The engine's own batches (prompts and decodes of two adapters and of none in one step)
    through the kernels under the interpreter, where the CPU engine would take the torch path."""
    pytest.importorskip("peft")
    import pagoda.lora.layers as layers
    from pagoda import LLM, SamplingParams
    from pagoda.lora.request import LoRARequest
    from tests.lora_adapters import peft_greedy, save_peft_adapter
    from tests.tiny_models import save_tiny_model

    base = save_tiny_model("llama3", tmp_path)
    adapters = [save_peft_adapter(base, tmp_path, seed=1),
                save_peft_adapter(base, tmp_path, seed=3, rank=4, targets=("gate_proj", "up_proj", "down_proj"))]
    prompts, max_new = [[5, 9, 200], list(range(30, 47))], 4
    choices = [None, *adapters]
    want = [tokens for a in choices for tokens in peft_greedy(base, a, prompts, max_new)]
    steps = []

    def kernels(out, x, lora_a, lora_b, indices):
        steps.append(x.shape[0])
        add_lora_triton(out, x, lora_a, lora_b, group_tokens(indices, lora_a.shape[0]))

    monkeypatch.setattr(layers, "add_lora_torch", kernels)
    llm = LLM(model=str(base), device="cpu", skip_tokenizer_init=True, enable_lora=True, max_loras=2)
    loras = [None if a is None else LoRARequest(f"a{i}", i, str(a)) for i, a in enumerate(choices) for _ in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts * len(choices)], params, use_tqdm=False,
                           lora_request=loras)
    llm.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == want
    assert max(steps) == 3 * sum(map(len, prompts)) and min(steps) == 3 * len(prompts)  # prompts, then decodes


# On the device: the 8B model's four LoRA'd layers (the fused ones with a rank-16 part each) at a
# decode step and a prompt chunk over 8 adapters, and the kernels captured in a CUDA graph.
_LLAMA_8B_LAYERS = {  # name: (in, out, rank of the slot)
    "qkv_proj": (4096, 6144, 48), "o_proj": (4096, 4096, 16), "gate_up_proj": (4096, 28672, 32),
    "down_proj": (14336, 4096, 16),
}


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [256, 2048])
@pytest.mark.parametrize("layer", sorted(_LLAMA_8B_LAYERS))
def test_kernels_match_torch_natively_at_8b_shapes(layer, num_tokens, dtype):
    k, n, rank = _LLAMA_8B_LAYERS[layer]
    indices = torch.arange(num_tokens, dtype=torch.int32) % 9 - 1  # round-robin over 8 adapters and none
    _check(*_weights(num_tokens, k, n, rank, 8, seed=3, dtype=dtype), indices, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_grouping_and_kernels_replay_in_a_cuda_graph_with_new_indices():
    num_tokens, (k, n, rank) = 64, _LLAMA_8B_LAYERS["qkv_proj"]
    out, x, lora_a, lora_b = (t.cuda() for t in _weights(num_tokens, k, n, rank, 8, seed=4, dtype=torch.bfloat16))
    indices, base = torch.full((num_tokens,), -1, dtype=torch.int32, device="cuda"), out.clone()

    def step():
        out.copy_(base)
        add_lora_triton(out, x, lora_a, lora_b, group_tokens(indices, 8))

    step()  # compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (0, 1):
        indices.copy_(_mixed_indices(num_tokens, 8, seed).cuda())
        graph.replay()
        want = base.clone()
        add_lora_torch(want, x, lora_a, lora_b, indices)
        _assert_added_close(out, base, want, 3e-2, _expand_terms(x, lora_a, lora_b, indices))
