"""GGUF's Q8_0 embeddings and LM heads kept in that form on the CPU (layers/q8_rows.py): the rows
come back bit for bit, a weight that is not Q8_0's is left as it is, the head's argmax is the
float32 head's and its other logits are the screen's, and a tiny GGUF model with a Q8_0 embedding
(tied to its head or not) gives its dequantized conversion's greedy tokens holding no float32 copy."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pagoda import LLM, SamplingParams
from pagoda.kernels import cpu_native
from pagoda.layers.linear import ParallelLMHead, VocabParallelEmbedding
from pagoda.layers.lm_head_screen import Q8ScreenedHead, ScreenedHead
from pagoda.layers.q8_rows import Q8Rows
from pagoda.loader.gguf_loader import convert_gguf_to_hf_dir
from tests.test_gguf import TinyModel, write_tiny_gguf

Q = gguf.GGMLQuantizationType
pytestmark = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines, reason="the LM head's screen: fbgemm (x86)"
)


@pytest.fixture(autouse=True)
def gguf_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path / "cache"))


def _q8_weight(rows: int = 1000, width: int = 256, seed: int = 0) -> torch.Tensor:
    """Float32 values as gguf's own Q8_0 quantizer and dequantizer give them; one row all zeros."""
    values = np.random.default_rng(seed).standard_normal((rows, width), dtype=np.float32) * 0.05
    values[7] = 0.0
    blocks = gguf.quants.quantize(values, Q.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(blocks, Q.Q8_0).copy())


def test_rows_come_back_bit_for_bit_in_a_quarter_of_the_bytes():
    weight = _q8_weight()
    q8 = Q8Rows.lossless(weight)
    assert q8 is not None and q8.blocks.dtype == torch.int8 and q8.shape == weight.shape
    assert torch.equal(q8[torch.arange(len(weight))], weight)
    assert torch.equal(q8[torch.tensor([7, 3, 3])], weight[[7, 3, 3]])
    assert q8.blocks.nbytes + q8.block_scales.nbytes < weight.nbytes / 3


def test_weights_that_are_not_q8_0_values_are_left_alone():
    assert Q8Rows.lossless(torch.randn(64, 256)) is None
    nudged = _q8_weight()
    nudged[3, 5] = torch.nextafter(nudged[3, 5], torch.tensor(1.0))
    assert Q8Rows.lossless(nudged) is None
    with_nan = _q8_weight()
    with_nan[1, 1] = float("nan")
    assert Q8Rows.lossless(with_nan) is None
    assert Q8Rows.lossless(_q8_weight(width=256)[:, :48]) is None  # not whole blocks of 32
    assert Q8Rows.lossless(_q8_weight().bfloat16()) is None


def test_a_tied_embedding_and_head_read_their_rows_from_it():
    weight = _q8_weight(rows=2048)
    embedding, head = VocabParallelEmbedding(*weight.shape), ParallelLMHead(*weight.shape)
    embedding.weight.data.copy_(weight)
    head.weight = embedding.weight
    ids = torch.tensor([0, 7, 2047, 5, 5])
    hidden = torch.randn(6, weight.shape[1], generator=torch.Generator().manual_seed(1)) * 3
    q8 = Q8Rows.lossless(weight)
    if cpu_native.int_matmuls_available():  # the head's screen reads the Q8_0 rows through the C matmul
        screened = Q8ScreenedHead(q8).logits(hidden, q8)
    else:
        screened = ScreenedHead(weight).logits(hidden, weight.clone())
    head.hold_q8(q8)
    embedding.hold_q8(q8)
    assert torch.equal(embedding(ids), F.embedding(ids, weight))
    for argmax_only in (True, False):  # every step through the screen, its candidates from the Q8_0 rows
        logits = head(hidden, argmax_only)
        assert torch.equal(logits, screened)
        assert torch.equal(logits.argmax(dim=1), (hidden @ weight.T).argmax(dim=1))
    assert embedding.weight.numel() == 0 and head.weight.numel() == 0  # no float32 copy left
    assert {name for name, _ in head.named_parameters()} >= {"q8.blocks", "q8.block_scales"}


def _engine_model(llm: LLM) -> torch.nn.Module:
    return llm.llm_engine.engine_core.engine_core.executor.worker.runner.model


def _greedy(llm: LLM, prompts: list[list[int]]) -> list:
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0] for o in outputs]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tiny_gguf_model_keeps_its_q8_0_embedding_and_gives_the_dequantized_tokens(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TinyModel(tied=tied), Q.Q8_0)
    prompts = [[5, 80, 13, 200, 7], [42, 42, 9]]
    args = dict(device="cpu", skip_tokenizer_init=True, max_model_len=128)
    kept = LLM(model=str(path), **args)
    try:
        model = _engine_model(kept)
        assert model.model.embed_tokens.q8 is not None and model.lm_head.q8 is not None
        assert (model.lm_head.q8 is model.model.embed_tokens.q8) == tied
        assert model.model.embed_tokens.weight.numel() == 0
        ours = _greedy(kept, prompts)
    finally:
        kept.shutdown()
    dense = LLM(model=str(convert_gguf_to_hf_dir(path, tmp_path / "hf")), **args)
    try:
        assert _engine_model(dense).model.embed_tokens.q8 is None
        reference = _greedy(dense, prompts)
    finally:
        dense.shutdown()
    for got, want in zip(ours, reference):
        assert got.token_ids == want.token_ids  # the argmax is exact: no near-tie may part them
        # The chosen token's logit is recomputed exactly; the others, and so the softmax's sum, are
        # within the screen's bound (tested above), which these unscaled random weights make large.
        for token, got_top, want_top in zip(got.token_ids, got.logprobs, want.logprobs):
            assert got_top[token].logprob == pytest.approx(want_top[token].logprob, rel=1e-2, abs=1e-2)
