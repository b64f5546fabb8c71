"""End to end: a tiny random model quantized (round-to-nearest, 4-bit) and written as an AWQ, a
GPTQ (with act-order) and a compressed-tensors pack-quantized checkpoint gives the same greedy
tokens, in fp32 on the CPU, as the same model with those weights dequantized and saved unquantized:
exactly where its projections run the float32 reference (act-order, or groups of 16, below the
int4 kernel's smallest), and but for near-ties of the twin's logits where the CPU's int4 kernel
runs them in bfloat16 (groups of 32). (The checkpoint is written by the reference packers of
tests/test_quant_w4a16.py.) And random weights: `--load-format dummy` on an AWQ config holds what
scripts/quantize_awq_rtn.py --random writes; a format it cannot round to is refused."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagoda import LLM, SamplingParams
from tests.serving import python_path
from tests.test_int4pack import assert_same_greedy
from tests.test_quant_w4a16 import awq_tensors, ct_tensors, gptq_tensors, quantize
from tests.tiny_models import save_tiny_model

REPO = Path(__file__).resolve().parent.parent
MAX_NEW = 12
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# format -> (checkpoint tensors of a Quantized, quantization_config for a group size, symmetric, act-order)
FORMATS = {
    "awq": (awq_tensors, lambda group: {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                        "version": "gemm"},
            False, False),
    "gptq": (gptq_tensors, lambda group: {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True,
                                          "sym": False},
             False, True),
    "compressed-tensors": (
        lambda qz: ct_tensors(qz, sym=True),
        lambda group: {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
            "targets": ["Linear"], "input_activations": None, "format": "pack-quantized",
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}}},
         "ignore": ["lm_head"]},
        True, False,
    ),
}
KERNEL_GROUP, REFERENCE_GROUP = 32, 16


def write_quantized(src: Path, dst: Path, fmt: str, group: int) -> Path:
    """Quantize src's projections into `dst` (format fmt, groups of `group` inputs); src is
    overwritten with the dequantized weights, the unquantized twin the engine must agree with."""
    tensors_of, quantization_config, sym, act_order = FORMATS[fmt]
    state = load_file(src / "model.safetensors")
    quantized = {}
    for name in list(state):
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or module.rpartition(".")[2] not in PROJECTIONS:
            continue
        # Layers reading one input share GPTQ's act-order permutation (it sorts that input's Hessian).
        seed = 0 if module.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) else 1
        qz = quantize(state[name].float(), group, sym, act_order, seed=seed)
        state[name] = qz.dequantized()
        quantized.update({f"{module}.{key}": t.contiguous() for key, t in tensors_of(qz).items()})
    save_file(state, src / "model.safetensors")
    dst.mkdir()
    kept = {k: v for k, v in state.items() if not (k.endswith(".weight") and k.rsplit(".", 2)[-2] in PROJECTIONS)}
    save_file({**kept, **quantized}, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config(group)}))
    return dst


def _greedy(path: Path, prompts: list[list[int]], **kwargs) -> list:
    llm = LLM(model=str(path), device="cpu", dtype="float32", skip_tokenizer_init=True, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0] for o in outputs]


@pytest.mark.parametrize("group", [KERNEL_GROUP, REFERENCE_GROUP])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantized_checkpoint_greedy_equals_its_dequantized_twin(fmt, group, tmp_path):
    twin = save_tiny_model("llama3", tmp_path)
    quantized = write_quantized(twin, tmp_path / f"{fmt}-model", fmt, group)
    rng = random.Random(2)
    prompts = [[rng.randrange(2, 256) for _ in range(n)] for n in (3, 17, 40)]
    reference = _greedy(twin, prompts)
    exact = FORMATS[fmt][3] or group == REFERENCE_GROUP
    for kwargs in ({"quantization": fmt}, {}):  # the method named, and read from quantization_config
        for ours, theirs in zip(_greedy(quantized, prompts, **kwargs), reference):
            if exact:
                assert ours.token_ids == theirs.token_ids
            else:
                assert_same_greedy(ours, theirs)


def test_dummy_weights_of_an_awq_config_are_the_random_checkpoint_the_script_writes(tmp_path):
    """`--load-format dummy` on a config whose quantization_config is AWQ's rounds the dummy weights
    as scripts/quantize_awq_rtn.py --random does (bfloat16 draws, the same seeds): the model holds
    the very tensors that checkpoint gives it, without the checkpoint being written."""
    source = save_tiny_model("llama3", tmp_path)
    checkpoint, config_only = tmp_path / "awq-random", tmp_path / "awq-config"
    for flag, out in (("--random", checkpoint), ("--config-only", config_only)):
        subprocess.run([sys.executable, str(REPO / "scripts" / "quantize_awq_rtn.py"), "--model", str(source), flag,
                        "--group-size", "32", "--out", str(out)], env={**os.environ, **python_path(REPO)},
                       check=True, capture_output=True, timeout=300)
    assert not list(config_only.glob("*.safetensors"))
    written = _model_state(LLM(model=str(checkpoint), device="cpu", dtype="bfloat16", skip_tokenizer_init=True))
    dummy_llm = LLM(model=str(config_only), device="cpu", dtype="bfloat16", skip_tokenizer_init=True,
                    load_format="dummy")
    dummy = _model_state(dummy_llm)
    assert not any(name.endswith("qkv_proj.weight") for name in dummy)  # held quantized, not as bf16 weights
    assert dummy.keys() == written.keys()
    assert all(torch.equal(dummy[name], written[name]) for name in dummy)
    out = dummy_llm.generate([{"prompt_token_ids": [5, 9, 200]}], SamplingParams(max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def _model_state(llm: LLM) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the model an in-process CPU engine runs."""
    return llm.llm_engine.engine_core.engine_core.executor.worker.runner.model.state_dict()


def test_dummy_weights_refuse_a_format_they_cannot_round_to(tmp_path):
    model = save_tiny_model("llama3", tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = FORMATS["gptq"][1](32)
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--load-format dummy cannot give a gptq model random weights"):
        LLM(model=str(model), device="cpu", dtype="float32", skip_tokenizer_init=True, load_format="dummy")
