"""Write a 4-bit AWQ checkpoint (AutoAWQ's GEMM layout) of a model by round-to-nearest: each
linear projection's weight in groups of --group-size inputs, 16 levels per group between its
min and max. No calibration (that is what AWQ itself adds): a floor for 4-bit quality, and a way
to get an AWQ checkpoint of any shape for benchmarks.

    python scripts/quantize_awq_rtn.py --out /tmp/smollm-awq                    # the default model
    python scripts/quantize_awq_rtn.py --model DIR --out DIR [--group-size 128]
    python scripts/quantize_awq_rtn.py --model shared/models/llama-3.1-8b --random --out /tmp/l8b-awq
    python scripts/quantize_awq_rtn.py --model shared/models/llama-3.1-8b --config-only --out /tmp/l8b-awq

--random: the weights `--load-format dummy` gives the config's shapes (a config-only directory, as
shared/models/). --config-only: the config alone, for `--load-format dummy`, which rounds those very
weights at load (on the device it loads to: in seconds on a GPU, where writing 8B's takes minutes)."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from pagoda.config.resolve import model_spec
from pagoda.loader.default_model import default_model_dir
from pagoda.loader.model_loader import iter_dummy_weights
from pagoda.loader.weights import iter_checkpoint_weights
from pagoda.quantization.awq import quantize_rtn_awq

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARD_BYTES = 2 << 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Hugging Face model directory (default: the embedded model)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--random", action="store_true", help="random weights of the config's shapes")
    parser.add_argument("--config-only", action="store_true", help="no weights: a config for --load-format dummy")
    args = parser.parse_args()
    source = Path(args.model) if args.model else default_model_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    if not args.config_only:
        weights = _random_weights(config) if args.random else iter_checkpoint_weights(source)
        write_shards(out, _quantized(weights, args.group_size))
    config["quantization_config"] = {
        "quant_method": "awq", "bits": 4, "group_size": args.group_size, "zero_point": True, "version": "gemm",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in source.iterdir():
        if extra.suffix in (".json", ".jinja", ".model", ".txt") and not (out / extra.name).exists() \
                and extra.name != "pagoda-files.json":  # the default model cache's own manifest
            shutil.copy(extra, out / extra.name)
    what = "a config for --load-format dummy" if args.config_only else "4-bit weights"
    print(f"wrote {out} (AWQ, {what}, group size {args.group_size})")


def _quantized(weights: Iterator[tuple[str, torch.Tensor]], group_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        module, _, kind = name.rpartition(".")
        if kind == "weight" and module.rsplit(".", 1)[-1] in PROJECTIONS:
            for part, value in quantize_rtn_awq(tensor, group_size).items():
                yield f"{module}.{part}", value
        else:
            yield name, tensor.contiguous()


def _random_weights(config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """The very weights `--load-format dummy` gives the model (seed 0, bf16), so the quantized
    checkpoint's logits can be compared with the dummy bf16 model's."""
    from transformers import AutoConfig

    spec = model_spec(AutoConfig.for_model(**config))
    return iter_dummy_weights(spec, 0, torch.bfloat16, torch.device("cpu"))


def write_shards(out: Path, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    shard: dict[str, torch.Tensor] = {}
    size, index = 0, {}
    files = []
    for name, tensor in tensors:
        shard[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= SHARD_BYTES:
            files.append(_save(out, shard, len(files), index))
            shard, size = {}, 0
    if shard:
        files.append(_save(out, shard, len(files), index))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))


def _save(out: Path, shard: dict[str, torch.Tensor], number: int, index: dict[str, str]) -> str:
    name = f"model-{number + 1:05d}.safetensors"
    save_file(shard, str(out / name), metadata={"format": "pt"})
    index.update({tensor: name for tensor in shard})
    return name


if __name__ == "__main__":
    main()
