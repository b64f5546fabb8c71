"""End to end: a tiny random model quantized (round-to-nearest, 4-bit) and written as an AWQ, a
GPTQ (with act-order) and a compressed-tensors pack-quantized checkpoint gives the same greedy
tokens, in fp32 on the CPU, as the same model with those weights dequantized and saved unquantized:
exactly where its projections run the float32 reference (act-order, or groups of 16, below the
int4 kernel's smallest), and but for near-ties of the twin's logits where the CPU's int4 kernel
runs them in bfloat16 (groups of 32). (The checkpoint is written by the reference packers of
tests/test_quant_w4a16.py.)"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from pagoda import LLM, SamplingParams
from tests.test_int4pack import assert_same_greedy
from tests.test_quant_w4a16 import awq_tensors, ct_tensors, gptq_tensors, quantize
from tests.tiny_models import save_tiny_model


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
