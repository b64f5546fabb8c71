"""GGUF loading: tiny GGUF files written here (every storage type, llama / mistral / qwen2 / qwen3),
and the embedded default model end to end."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers.convert_slow_tokenizer import bytes_to_unicode

from pagoda.layers.rotary import rope_parameters
from pagoda.loader import gguf_loader
from pagoda.loader.default_model import default_gguf_path
from pagoda.loader.gguf_loader import convert_gguf_to_hf_dir, iter_gguf_weights, load_gguf_config

Q = gguf.GGMLQuantizationType

# Byte-level BPE vocabulary: the 256 byte symbols, two merges, two ChatML control tokens.
_MERGES = ["h e", "l l"]
_TOKENS = list(bytes_to_unicode().values()) + ["he", "ll", "<|im_start|>", "<|im_end|>"]
IM_START, IM_END = len(_TOKENS) - 2, len(_TOKENS) - 1
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyModel:
    """Shapes of a tiny model; rows of 256 values make every tensor fit K-quant blocks too."""

    arch: str = "llama"
    name: str = "tiny"
    hidden: int = 256
    intermediate: int = 512
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    layers: int = 2
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    extra_metadata: dict = field(default_factory=dict)
    extra_tensors: dict[str, np.ndarray] = field(default_factory=dict)  # GGUF name -> float32 values

    @property
    def vocab(self) -> int:
        return len(_TOKENS)

    def shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Hugging Face name -> (GGUF name, shape)."""
        shapes = {
            "model.embed_tokens.weight": ("token_embd.weight", (self.vocab, self.hidden)),
            "model.norm.weight": ("output_norm.weight", (self.hidden,)),
        }
        if not self.tied:
            shapes["lm_head.weight"] = ("output.weight", (self.vocab, self.hidden))
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i in range(self.layers):
            hf, blk = f"model.layers.{i}.", f"blk.{i}."
            layer = {
                "input_layernorm.weight": ("attn_norm.weight", (self.hidden,)),
                "self_attn.q_proj.weight": ("attn_q.weight", (q, self.hidden)),
                "self_attn.k_proj.weight": ("attn_k.weight", (kv, self.hidden)),
                "self_attn.v_proj.weight": ("attn_v.weight", (kv, self.hidden)),
                "self_attn.o_proj.weight": ("attn_output.weight", (self.hidden, q)),
                "post_attention_layernorm.weight": ("ffn_norm.weight", (self.hidden,)),
                "mlp.gate_proj.weight": ("ffn_gate.weight", (self.intermediate, self.hidden)),
                "mlp.up_proj.weight": ("ffn_up.weight", (self.intermediate, self.hidden)),
                "mlp.down_proj.weight": ("ffn_down.weight", (self.hidden, self.intermediate)),
            }
            if self.qkv_bias:
                sizes = {"q": q, "k": kv, "v": kv}
                layer |= {f"self_attn.{p}_proj.bias": (f"attn_{p}.bias", (n,)) for p, n in sizes.items()}
            if self.qk_norm:
                layer |= {f"self_attn.{p}_norm.weight": (f"attn_{p}_norm.weight", (self.head_dim,)) for p in "qk"}
            shapes |= {hf + k: (blk + g, s) for k, (g, s) in layer.items()}
        return shapes


def llama_cpp_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reorders Q and K rows of llama-arch models for its rotary layout."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


# Where a block's float16 scales sit: Q4_K starts with d and dmin, Q6_K ends with d.
_K_QUANT_SCALES = {Q.Q4_K: slice(0, 4), Q.Q6_K: slice(208, 210)}


def _stored(x: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """x as the file stores it in qtype. gguf cannot quantize K-quants, so those get random blocks
    with sane scales (and the tensor is then whatever those blocks dequantize to)."""
    if x.ndim == 1:  # llama.cpp keeps norms and biases in F32
        return x
    if qtype in _K_QUANT_SCALES:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, size=(x.shape[0], x.shape[1] // block_size, type_size), dtype=np.uint8)
        scales = _K_QUANT_SCALES[qtype]
        blocks[..., scales] = np.tile(np.array([1e-3], np.float16).view(np.uint8), (scales.stop - scales.start) // 2)
        return blocks.reshape(x.shape[0], -1)
    return gguf.quants.quantize(x, qtype)


def write_tiny_gguf(path: Path, model: TinyModel, qtype: Q = Q.F32, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a GGUF file of random weights; returns the float32 tensors a loader must give back."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), model.arch)
    _write_metadata(writer, model)
    expected = {}
    for hf_name, (gguf_name, shape) in model.shapes().items():
        stored = _stored(rng.standard_normal(shape, dtype=np.float32), qtype, rng)
        raw_dtype = qtype if stored.ndim == 2 and qtype != Q.F32 else None
        expected[hf_name] = gguf.quants.dequantize(stored, raw_dtype or Q.F32)
        if model.arch == "llama" and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            stored = llama_cpp_permute(stored, model.heads if "attn_q" in gguf_name else model.kv_heads)
        writer.add_tensor(gguf_name, stored, raw_dtype=raw_dtype)
    for gguf_name, values in model.extra_tensors.items():
        writer.add_tensor(gguf_name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _write_metadata(writer: gguf.GGUFWriter, model: TinyModel) -> None:
    writer.add_name(model.name)
    writer.add_block_count(model.layers)
    writer.add_context_length(512)
    writer.add_embedding_length(model.hidden)
    writer.add_feed_forward_length(model.intermediate)
    writer.add_head_count(model.heads)
    writer.add_head_count_kv(model.kv_heads)
    writer.add_key_length(model.head_dim)
    writer.add_value_length(model.head_dim)
    writer.add_rope_dimension_count(model.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(model.vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(_TOKENS)
    writer.add_token_types([gguf.TokenType.NORMAL] * (model.vocab - 2) + [gguf.TokenType.CONTROL] * 2)
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(IM_START)
    writer.add_eos_token_id(IM_END)
    writer.add_chat_template(CHAT_TEMPLATE)
    for key, value in model.extra_metadata.items():
        writer.add_uint32(key, value)


def _load(path: Path) -> dict[str, torch.Tensor]:
    return dict(iter_gguf_weights(path, load_gguf_config(path).to_dict()))


def _assert_weights(got: dict[str, torch.Tensor], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32, name
        torch.testing.assert_close(tensor, torch.from_numpy(expected[name]), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_llama_weights_every_type(tmp_path: Path, qtype: Q) -> None:
    """HF names and shapes, Q/K un-permuted; values exactly what gguf dequantizes from the stored blocks."""
    model = TinyModel()
    expected = write_tiny_gguf(tmp_path / "m.gguf", model, qtype)
    got = _load(tmp_path / "m.gguf")
    _assert_weights(got, expected)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantized_weights_stay_close_to_originals(tmp_path: Path, qtype: Q) -> None:
    originals = write_tiny_gguf(tmp_path / "f32.gguf", TinyModel(), Q.F32, seed=1)
    write_tiny_gguf(tmp_path / "q.gguf", TinyModel(), qtype, seed=1)
    # Largest error relative to the largest value: about half a step of each type's grid (Q4_0 clips
    # one end of its range by a whole step).
    bound = {Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1e-2, Q.Q4_0: 0.15, Q.Q4_1: 0.1}[qtype]
    for name, tensor in _load(tmp_path / "q.gguf").items():
        original = torch.from_numpy(originals[name])
        assert (tensor - original).abs().max() <= bound * original.abs().max(), name


@pytest.mark.parametrize(
    "model",
    [
        TinyModel(arch="llama", name="mistral"),  # llama.cpp files Mistral under "llama"
        TinyModel(arch="qwen2", kv_heads=1, qkv_bias=True),
        TinyModel(arch="qwen3", head_dim=32, qk_norm=True, tied=True),
    ],
    ids=["mistral", "qwen2", "qwen3"],
)
def test_other_architectures(tmp_path: Path, model: TinyModel) -> None:
    expected = write_tiny_gguf(tmp_path / "m.gguf", model, Q.Q8_0)
    config = load_gguf_config(tmp_path / "m.gguf")
    assert config.model_type == ("mistral" if model.name == "mistral" else model.arch)
    assert config.architectures == [{"llama": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                     "qwen3": "Qwen3ForCausalLM"}[model.arch]]
    assert (config.num_attention_heads, config.num_key_value_heads) == (model.heads, model.kv_heads)
    assert config.tie_word_embeddings == model.tied
    if model.arch == "qwen3":  # transformers' GGUF config leaves head_dim at Qwen3's default 128
        assert config.head_dim == 32
    _assert_weights(dict(iter_gguf_weights(tmp_path / "m.gguf", config.to_dict())), expected)


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", TinyModel(arch="gemma"), Q.F32)
    with pytest.raises(ValueError, match="architecture 'gemma'; Pagoda loads GGUF architectures"):
        load_gguf_config(tmp_path / "m.gguf")


def test_convert_to_hf_dir(tmp_path: Path) -> None:
    model = TinyModel(extra_metadata={gguf.Keys.Tokenizer.EOT_ID: IM_START - 1})
    expected = write_tiny_gguf(tmp_path / "m.gguf", model, Q.Q4_0)
    out = convert_gguf_to_hf_dir(tmp_path / "m.gguf", tmp_path / "hf")

    assert out == tmp_path / "hf"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial dir left
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == IM_START
    assert generation["eos_token_id"] == [IM_END, IM_START - 1]
    _assert_weights(load_file(out / "model.safetensors"), expected)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)  # from the directory alone: no GGUF parsing
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("hello")["input_ids"]) == "hello"


def llama_cpp_rope_divisors(head_dim: int, factor: float, low: float, high: float, context: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf stores for a Llama 3.1 rope_scaling: each rotary
    frequency's divisor (the tiny models' theta is 10000)."""
    wavelen = 2 * np.pi * 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (context / wavelen - low) / (high - low)
    ramp = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < context / high, 1.0, np.where(wavelen > context / low, factor, ramp)).astype(np.float32)


@pytest.mark.parametrize(
    "scaling",
    [
        {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        # Only the ratios show in the divisors: this one comes back as (1, 4, 64), the same rotation.
        {"factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 128},
    ],
    ids=["llama-3.1-like", "llama-3.2-like"],
)
def test_llama3_rope_scaling_comes_back_from_rope_freqs(
    tmp_path: Path, scaling: dict, caplog: pytest.LogCaptureFixture
) -> None:
    divisors = llama_cpp_rope_divisors(64, *scaling.values())
    assert 1 < divisors[divisors < divisors.max()].max()  # the test's frequencies do cross the ramp
    model = TinyModel(extra_tensors={"rope_freqs.weight": divisors})
    expected = write_tiny_gguf(tmp_path / "m.gguf", model, Q.F32)
    config = load_gguf_config(tmp_path / "m.gguf")
    params = rope_parameters(config)
    assert params["rope_type"] == "llama3" and params["factor"] == scaling["factor"]
    assert (params["low_freq_factor"], params["high_freq_factor"], params["original_max_position_embeddings"]) == (1.0, 4.0, 64)

    # The rotation Pagoda and transformers (from the converted directory) apply is llama.cpp's.
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from pagoda.layers.rotary import compute_inv_freq

    llama_cpp = (1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)) / torch.from_numpy(divisors)
    torch.testing.assert_close(compute_inv_freq(64, rope_parameters(config)).double(), llama_cpp, rtol=1e-5, atol=0)
    with caplog.at_level("WARNING"):
        hf_dir = convert_gguf_to_hf_dir(tmp_path / "m.gguf", tmp_path / "hf")
    assert "not loaded" not in caplog.text  # rope_freqs is in the config, not a lost weight
    _assert_weights(load_file(hf_dir / "model.safetensors"), expected)
    hf_rotary = LlamaRotaryEmbedding(AutoConfig.from_pretrained(hf_dir))
    torch.testing.assert_close(hf_rotary.inv_freq.double(), llama_cpp, rtol=1e-5, atol=0)


def test_rope_freqs_of_another_scaling_are_refused(tmp_path: Path) -> None:
    divisors = np.linspace(1, 3, 32, dtype=np.float32) ** 2  # no flat ends: not Llama 3.1's shape
    write_tiny_gguf(tmp_path / "m.gguf", TinyModel(extra_tensors={"rope_freqs.weight": divisors}), Q.F32)
    with pytest.raises(ValueError, match="rope_freqs.weight tensor .* does not follow Llama 3.1's rope scaling"):
        load_gguf_config(tmp_path / "m.gguf")


def test_convert_refuses_existing_dir(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_gguf_to_hf_dir(tmp_path / "m.gguf", tmp_path / "hf")


def test_interrupted_convert_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", TinyModel(), Q.F32)

    def interrupted(path: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_loader, "load_gguf_tokenizer", interrupted)  # the last step
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf_dir(tmp_path / "m.gguf", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# The embedded default model -----------------------------------------------------------------------


@pytest.mark.slow
def test_default_gguf_tensor_types() -> None:
    """What the shipped file holds: Q4_1 matrices, a Q8_0 embedding, F32 norms; no K-quants."""
    types = {t.tensor_type for t in gguf.GGUFReader(default_gguf_path()).tensors}
    assert types == {Q.Q4_1, Q.Q8_0, Q.F32}


@pytest.mark.slow
def test_default_model_says_paris(loader_default_model_dir: Path) -> None:
    """Names and the Q/K un-permutation are right only if the converted model answers correctly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(loader_default_model_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(loader_default_model_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out_ids = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out_ids[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
