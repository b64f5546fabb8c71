"""GGUF files in Hugging Face form: config, tokenizer, weights under Hugging Face names (float32,
or a linear layer's quantized blocks unpacked where the GGUF quantization method keeps them), and
conversion into a self-contained Hugging Face model directory."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from pagoda.layers.rotary import compute_inv_freq, rope_parameters
from pagoda.loader.atomic_dir import write_directory_atomically
from pagoda.loader.gguf_blocks import unpack_blocks
from pagoda.loader.weights import hf_meta_model

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# GGUF architectures Pagoda loads ("llama" covers Mistral too: llama.cpp files it so).
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

# llama.cpp's form of Llama 3.1's rope scaling: one divisor per rotary frequency. It goes into the
# config (_llama3_rope_scaling), not into the weights.
_ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"

# Tokens that end a turn. Llama 3 style files name end-of-turn and end-of-message apart from EOS.
_EOS_KEYS = (gguf.Keys.Tokenizer.EOS_ID, gguf.Keys.Tokenizer.EOT_ID, gguf.Keys.Tokenizer.EOM_ID)


def load_gguf_config(path: str | Path) -> PretrainedConfig:
    """The model config transformers reads from the GGUF metadata, completed with what it leaves out."""
    return _config(Path(path), open_gguf(path))


def load_gguf_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer stored in the GGUF file, chat template included."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception:
        open_gguf(path)  # a file that does not read says so, by name, instead of the parser's error
        raise


def iter_gguf_weights(
    path: str | Path, config: dict[str, Any], kept_modules: Collection[str] = (), names: dict[str, str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the file under its Hugging Face parameter name: dequantized to float32, but
    for the weight of a module in `kept_modules`, whose unpacked blocks come as `<module>.qweight`,
    `.scales` and `.zeros` instead (pagoda/loader/gguf_blocks.py). names: GGUF tensor name ->
    Hugging Face name, where already known (gguf_quantization_config's "tensor_names").

    Tensors are read one at a time from the memory-mapped file, so only one is unpacked at once.
    """
    reader = open_gguf(path)
    return _weights(reader, config, frozenset(kept_modules), names or _hf_names(reader, config))


def gguf_quantization_config(path: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """The file's quantization as a checkpoint's quantization_config: the GGUF type of every
    module's weight by Hugging Face module name (what GGUFConfig reads), and the tensor names'
    map, so that loading need not build it again."""
    reader = open_gguf(path)
    names = _hf_names(reader, config)
    types = {
        names[t.name].removesuffix(".weight"): t.tensor_type.name
        for t in reader.tensors if names.get(t.name, "").endswith(".weight")
    }
    return {"quant_method": "gguf", "tensor_types": types, "tensor_names": names}


def convert_gguf_to_hf_dir(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the GGUF model as a Hugging Face directory (config, generation config, float32
    model.safetensors, tokenizer) that loads without any GGUF parsing.

    The directory is written whole or not at all (atomic_dir): an interrupted conversion never
    leaves a partial `out_dir`, and atomic_dir.directory_problem(out_dir) checks it later.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    with write_directory_atomically(out_dir) as partial:
        _write_hf_dir(gguf_path, partial)
    return out_dir


def _write_hf_dir(gguf_path: Path, directory: Path) -> None:
    from transformers import GenerationConfig

    reader = open_gguf(gguf_path)
    config = _config(gguf_path, reader)
    config.save_pretrained(directory)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=_eos_token_ids(reader), pad_token_id=config.pad_token_id
    ).save_pretrained(directory)
    # safetensors writes a file from a whole dict: the float32 weights are all in memory here.
    hf_config = config.to_dict()
    weights = _weights(reader, hf_config, frozenset(), _hf_names(reader, hf_config))
    save_file(dict(weights), directory / "model.safetensors", metadata={"format": "pt"})
    load_gguf_tokenizer(gguf_path).save_pretrained(directory)


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """The file's reader; a file that is not a whole GGUF file (cut short, another format) raises a
    ValueError naming it, instead of the parser's struct or numpy error."""
    try:
        return gguf.GGUFReader(path)
    except FileNotFoundError:
        raise
    except Exception as error:  # the parser fails in many ways on a bad file; none is a bug here
        raise ValueError(f"{path} {_gguf_damage(Path(path))}: {type(error).__name__}: {error}") from error


def _gguf_damage(path: Path) -> str:
    with open(path, "rb") as f:
        magic = f.read(4)
    size = f"{path.stat().st_size:,} bytes"
    if magic != b"GGUF":
        return f"is not a GGUF file ({size}; it does not start with b'GGUF')"
    return f"is a GGUF file cut short or damaged ({size})"


def _config(path: Path, reader: gguf.GGUFReader) -> PretrainedConfig:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architecture = _architecture(reader)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path} holds a model of GGUF architecture {architecture!r}; "
            f"Pagoda loads GGUF architectures {SUPPORTED_ARCHITECTURES}"
        )
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    # transformers' GGUF configs name no architecture class, and take no head_dim for qwen3 (its
    # default, 128, fits the released models but not every file); a saved directory needs both right.
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    key_length = _field(reader, gguf.Keys.Attention.KEY_LENGTH.format(arch=architecture))
    if key_length is not None:
        config.head_dim = key_length
    scaling = _llama3_rope_scaling(path, reader, config)
    if scaling is not None:
        if hasattr(config, "rope_parameters"):  # transformers >= 5
            config.rope_parameters = {**config.rope_parameters, **scaling}
        else:
            config.rope_scaling = scaling
    return config


def _llama3_rope_scaling(path: Path, reader: gguf.GGUFReader, config: PretrainedConfig) -> dict[str, Any] | None:
    """Llama 3.1's rope scaling, as its Hugging Face config states it, from the divisors llama.cpp
    stores instead (a rope_freqs tensor), which transformers' GGUF reader drops."""
    tensor = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    if tensor is None:
        return None
    divisors = torch.tensor(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=torch.float64).flatten()
    params = rope_parameters(config)
    inv_freq = compute_inv_freq(2 * len(divisors), params).double()
    scaling = _fit_llama3_scaling(divisors, inv_freq)
    if scaling is None or not torch.allclose(
        compute_inv_freq(2 * len(divisors), {**params, **scaling}).double(), inv_freq / divisors, rtol=1e-3
    ):
        raise ValueError(
            f"{path}: its {_ROPE_FREQS} tensor (rotary frequency divisors) does not follow Llama 3.1's rope "
            "scaling, the only form of it Pagoda reads from GGUF files"
        )
    return scaling


def _fit_llama3_scaling(divisors: torch.Tensor, inv_freq: torch.Tensor) -> dict[str, Any] | None:
    """Llama 3.1 divides short wavelengths by 1, long ones by `factor`, and ramps between: there
    1 / divisor = (1 - smooth) / factor + smooth, with smooth = (original_context / wavelength - 1)
    / (high_freq_factor - 1) taking low_freq_factor as 1 (the divisors fix only the ratios). smooth
    is linear in 1 / wavelength, so the ramp's points give the parameters back."""
    factor = divisors.max().item()
    ramp = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if ramp.sum() < 2:
        return None
    smooth = (1 / divisors[ramp] - 1 / factor) / (1 - 1 / factor)
    inv_wavelen = inv_freq[ramp] / (2 * torch.pi)
    slope, intercept = torch.linalg.lstsq(
        torch.stack([inv_wavelen, torch.ones_like(smooth)], dim=1), smooth[:, None]
    ).solution.flatten().tolist()
    if not slope > 0 > intercept:
        return None
    return {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
        "high_freq_factor": round(1 - 1 / intercept, 4),
        "original_max_position_embeddings": round(-slope / intercept),
    }


def _tensor_processor(reader: gguf.GGUFReader, config: dict[str, Any]) -> Any:
    # transformers' tensor processors undo llama.cpp's rotary permutation of Q and K in llama-arch
    # files (a permutation of rows, so it applies to unpacked blocks' rows as to weights).
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
    )

    return TENSOR_PROCESSORS.get(_architecture(reader), TensorProcessor)(config=config)


class _TopLevel:
    """A model as get_gguf_hf_weights_map sees it, without its submodules: that function builds
    gguf's whole name table again for each of the ~300 submodules it recurses into (tens of
    seconds), a search needed only by models converted from a base class (Bloom), none of
    SUPPORTED_ARCHITECTURES."""

    def __init__(self, model: Any) -> None:
        self.config = model.config
        self.state_dict = model.state_dict

    def named_children(self) -> list[tuple[str, Any]]:
        return []


def _hf_names(reader: gguf.GGUFReader, config: dict[str, Any]) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face parameter name (transformers' own map)."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    processor = _tensor_processor(reader, config)
    return get_gguf_hf_weights_map(_TopLevel(hf_meta_model(config)), processor, model_type=_architecture(reader))


def _weights(
    reader: gguf.GGUFReader, config: dict[str, Any], kept_modules: frozenset[str], names: dict[str, str]
) -> Iterator[tuple[str, torch.Tensor]]:
    processor = _tensor_processor(reader, config)
    unmapped = []
    for tensor in reader.tensors:
        if tensor.name not in names:
            if tensor.name != _ROPE_FREQS:  # already in the config
                unmapped.append(tensor.name)
            continue
        name = names[tensor.name]
        module = name.removesuffix(".weight")
        if module in kept_modules:
            for part, values in unpack_blocks(tensor.data, tensor.tensor_type.name).items():
                values = processor.process(weights=values.numpy(), name=tensor.name).weights
                yield f"{module}.{part}", torch.from_numpy(np.ascontiguousarray(values))
            continue
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        values = processor.process(weights=values, name=tensor.name).weights
        # A copy: the dequantized array may be a read-only view of the memory-mapped file.
        yield name, torch.tensor(values, dtype=torch.float32)
    if unmapped:
        logger.warning("GGUF tensors with no Hugging Face parameter, not loaded: %s", unmapped)


def load_gguf_eos_token_ids(path: str | Path) -> set[int]:
    """Every id that ends a turn: EOS, end-of-turn and end-of-message (Llama 3 names all three)."""
    ids = _eos_token_ids(open_gguf(path))
    return set() if ids is None else {ids} if isinstance(ids, int) else set(ids)


def _eos_token_ids(reader: gguf.GGUFReader) -> int | list[int] | None:
    """In generation_config.json's form: one id, a list of several, or None."""
    ids = list(dict.fromkeys(i for i in (_field(reader, key) for key in _EOS_KEYS) if i is not None))
    return ids[0] if len(ids) == 1 else ids or None


def _architecture(reader: gguf.GGUFReader) -> str:
    architecture = _field(reader, gguf.Keys.General.ARCHITECTURE)
    if architecture is None:
        raise ValueError(f"{reader.data.filename} has no {gguf.Keys.General.ARCHITECTURE} in its metadata")
    return architecture


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()
