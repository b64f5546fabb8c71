"""The screened float32 LM head (layers/lm_head_screen.py): its argmax is the float32 head's, near
ties included, the logits it did not recompute are within its bound, and only steps that read
nothing but the argmax take it. The same for the screen of Q8_0 rows through the C matmul."""

from __future__ import annotations

import pytest
import torch

from pagoda.kernels import cpu_native
from pagoda.layers.lm_head_screen import Q8ScreenedHead, ScreenedHead
from pagoda.layers.q8_rows import Q8Rows
from pagoda.sample.sampler import takes_argmax_only
from pagoda.sampling_params import SamplingParams, StructuredOutputsParams

pytestmark = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines, reason="fbgemm's float16 GEMM (x86)"
)


def _head(vocab: int = 4096, hidden: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, hidden, generator=g) * 0.05


def test_argmax_is_the_float32_heads_through_near_ties():
    weight = _head()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(8, 256, generator=g) * 3
    exact = hidden @ weight.T
    # Rows whose top two tokens differ by less than float16's rounding: the runner-up's weight
    # row is the winner's with one entry moved by 2e-6, a fifteenth of float16's spacing there
    # (its logit higher by ~1e-5: dozens of float32 ulps, below float16's resolution).
    top = exact.argmax(dim=1)
    runner_up = (top + 1) % weight.shape[0]
    weight[runner_up] = weight[top]
    k = hidden.abs().argmax(dim=1)
    weight[runner_up, k] += 2e-6 * torch.sign(hidden[range(8), k])
    exact = hidden @ weight.T
    screened = ScreenedHead(weight).logits(hidden, weight)
    assert torch.equal(screened.argmax(dim=1), exact.argmax(dim=1))
    assert torch.equal(screened.argmax(dim=1), runner_up)  # the nudged row wins, by ~1e-8
    # Each near-tie was recomputed in float32, not left at its float16 value.
    torch.testing.assert_close(screened[range(8), top], exact[range(8), top], rtol=1e-6, atol=1e-6)


def test_other_logits_are_within_the_bound():
    weight = _head(seed=2)
    hidden = torch.randn(4, 256, generator=torch.Generator().manual_seed(3)) * 3
    screen = ScreenedHead(weight)
    screened, exact = screen.logits(hidden, weight), hidden @ weight.T
    bound = hidden.norm(dim=1, keepdim=True) * 2.0**-9 * screen.max_row_norm
    assert bool(((screened - exact).abs() <= bound).all())
    assert bool((screened != exact).any())  # most logits are the float16 copy's


def _q8_values(vocab: int = 4096, hidden: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-127, 128, (vocab, hidden), generator=g, dtype=torch.int8)
    return values, torch.rand(vocab, hidden // 32, generator=g) * 4e-4 + 1e-4


def _dense(rows: Q8Rows) -> torch.Tensor:
    return rows[torch.arange(rows.shape[0])]


needs_int_matmuls = pytest.mark.skipif(
    not cpu_native.int_matmuls_available(), reason="the C Q8_0 matmul needs AVX512-VNNI or AVX2"
)


@needs_int_matmuls
def test_q8_screen_argmax_is_the_float32_heads_through_near_ties():
    values, scales = _q8_values()
    hidden = torch.randn(8, 256, generator=torch.Generator().manual_seed(1)) * 3
    exact = hidden @ _dense(Q8Rows(values, scales)).T
    # Each row's runner-up: the winner's values with one block's scale moved so that its logit is
    # higher by 2e-5 (~80 float32 ulps there), far below the screen's bound.
    top, runner_up = exact.argmax(dim=1), (exact.argmax(dim=1) + 1) % 4096
    for row, (t, r) in enumerate(zip(top.tolist(), runner_up.tolist())):
        values[r], scales[r] = values[t], scales[t]
        blocks = (values[t].float() * hidden[row]).unflatten(0, (-1, 32)).sum(dim=1) * scales[t]
        g = int(blocks.abs().argmax())
        scales[r, g] *= 1 + 2e-5 / float(blocks[g])
    head = Q8Rows(values, scales)
    exact = hidden @ _dense(head).T
    screened = Q8ScreenedHead(head).logits(hidden, head)
    assert torch.equal(screened.argmax(dim=1), exact.argmax(dim=1))
    assert torch.equal(screened.argmax(dim=1), runner_up)
    torch.testing.assert_close(screened[range(8), top], exact[range(8), top], rtol=1e-6, atol=1e-6)


def test_q8_screen_other_logits_are_within_the_bound():
    head = Q8Rows(*_q8_values(vocab=4090, seed=2))  # the last block of 16 rows padded
    hidden = torch.randn(5, 256, generator=torch.Generator().manual_seed(3)) * 3
    hidden[1] = 0  # a row of zeros: no step
    screen = Q8ScreenedHead(head)
    screened, exact = screen.logits(hidden, head), hidden @ _dense(head).T
    assert screen.max_row_l1 == pytest.approx(float(_dense(head).abs().sum(dim=1).max()), rel=1e-5)
    bound = hidden.abs().amax(dim=1, keepdim=True) * 2.0**-15 * screen.max_row_l1
    assert bool(((screened - exact).abs() <= bound).all())
    assert bool((screened != exact).any())  # most logits are the int16 product's
    assert bool((screened[1] == 0).all())


def test_serves_float32_cpu_weights_within_float16_range():
    weight = _head()
    assert ScreenedHead.serves(weight)
    assert not ScreenedHead.serves(weight.bfloat16())
    weight[0, 0] = 1e5  # beyond float16's range
    assert not ScreenedHead.serves(weight)


@pytest.mark.parametrize(
    "params, argmax_only",
    [
        (SamplingParams(temperature=0.0), True),
        (SamplingParams(temperature=0.7, top_k=1), True),
        (SamplingParams(temperature=0.7), False),
        (SamplingParams(temperature=0.0, logprobs=1), False),
        (SamplingParams(temperature=0.0, prompt_logprobs=1), False),
        (SamplingParams(temperature=0.0, logit_bias={5: 3.0}), False),
        (SamplingParams(temperature=0.0, allowed_token_ids=[1, 2]), False),
        (SamplingParams(temperature=0.0, repetition_penalty=1.2), False),
        (SamplingParams(temperature=0.0, min_tokens=4), False),
        (SamplingParams(temperature=0.0, structured_outputs=StructuredOutputsParams(regex="a+")), False),
    ],
)
def test_only_rows_that_read_the_argmax_alone_are_screened(params, argmax_only):
    assert takes_argmax_only(params) == argmax_only


def test_the_engine_screens_greedy_steps_only(tmp_path, monkeypatch):
    """A float32 model on the CPU: greedy requests take the screened head (same tokens as with
    the float32 head); a step with a request asking for logprobs reads the float32 head."""
    from pagoda import LLM
    from tests.tiny_models import save_tiny_model

    llm = LLM(model=str(save_tiny_model("llama3", tmp_path)), device="cpu", skip_tokenizer_init=True, max_model_len=64)
    head = llm.llm_engine.engine_core.engine_core.executor.worker.runner.model.lm_head
    calls = []
    real = ScreenedHead.logits
    monkeypatch.setattr(ScreenedHead, "logits", lambda self, hidden, weight: calls.append(len(hidden)) or real(self, hidden, weight))
    prompt = {"prompt_token_ids": [5, 9, 33, 7]}
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    screened = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert len(calls) == 6 and isinstance(head._screened[0], ScreenedHead)
    calls.clear()
    with_logprobs = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    exact = llm.generate(prompt, with_logprobs, use_tqdm=False)[0].outputs[0].token_ids
    assert calls == [] and screened == exact
