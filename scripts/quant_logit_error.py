"""How far each quantization method moves a model's next-token distribution from the unquantized
model's (issue 15's logit error): 16 prompts of random tokens, the whole vocabulary's logprobs at
each prompt's last position (`logprobs=-1`), against bf16's (or the --dtype's). Logprobs are the
logits less their row's log-sum-exp, so the logits' error is the logprobs' less its row mean: both
are reported, with how often the top token stays the same.

    PYTHONPATH=. python3 scripts/quant_logit_error.py                    # the default model, a GPU
    PYTHONPATH=. python3 scripts/quant_logit_error.py --model DIR --device cpu --dtype float32
    PYTHONPATH=. python3 scripts/quant_logit_error.py --model shared/models/qwen3-0.6b --random

A checkpoint's weights (the embedded default model's by default), or with --random weights drawn
at a trained model's scale for a config's shapes (normal with a deviation of 0.02, norms of ones,
biases of zeros) and written to a checkpoint first: `--load-format dummy`'s (within +-1e-3) give
every token a logit within ~1e-5 of the others, the same whatever the method. fp8 quantizes the
checkpoint as it loads; AWQ runs a 4-bit round-to-nearest copy of it (scripts/quantize_awq_rtn.py,
groups of --group-size). Each method runs in a process of its own."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from quantize_awq_rtn import write_shards  # this script's directory is on sys.path

# Each method's engine arguments ("awq" runs an AWQ config of the model instead).
METHODS = {
    "fp8": {"quantization": "fp8"},
    "fp8 + fp8 KV": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
    "fp8 KV": {"kv_cache_dtype": "fp8"},
    "awq": {},
}
PROMPTS, PROMPT_LEN = 16, 128


def prompts(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(2, vocab_size, (PROMPTS, PROMPT_LEN), generator=generator).tolist()


def next_token_logprobs(model: str, device: str, dtype: str, engine_args: dict) -> torch.Tensor:
    """[PROMPTS, vocab] float32: each prompt's next-token logprobs over the whole vocabulary."""
    from pagoda import LLM, SamplingParams

    vocab_size = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    # The checkpoint's float weights, whatever GGUF file a directory may hold beside them.
    llm = LLM(model=model, device=device, dtype=dtype, load_format="safetensors", skip_tokenizer_init=True,
              max_model_len=PROMPT_LEN + 8, max_logprobs=-1, enforce_eager=True, **engine_args)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts(vocab_size)],
                        SamplingParams(temperature=0.0, max_tokens=1, logprobs=-1), use_tqdm=False)
    table = torch.full((PROMPTS, vocab_size), float("nan"))
    for row, out in enumerate(outs):
        entries = out.outputs[0].logprobs[0]
        table[row, list(entries)] = torch.tensor([entry.logprob for entry in entries.values()])
    return table


def write_random_checkpoint(config_dir: Path, out: Path, device: str) -> None:
    """Random weights at a trained model's scale for config_dir's shapes, as a bf16 checkpoint in `out`."""
    from transformers import AutoConfig

    from pagoda.loader.weights import hf_checkpoint_shapes

    config = json.loads((config_dir / "config.json").read_text())
    generator = torch.Generator(device=device).manual_seed(0)

    def tensors():
        for name, shape in hf_checkpoint_shapes(AutoConfig.for_model(**config).to_dict()):
            if len(shape) > 1:
                tensor = torch.randn(shape, generator=generator, device=device) * 0.02
            else:
                tensor = torch.zeros(shape) if name.endswith("bias") else torch.ones(shape)
            yield name, tensor.to(torch.bfloat16).cpu()

    out.mkdir(parents=True)
    write_shards(out, tensors())
    (out / "config.json").write_text(json.dumps(config, indent=2))


def errors(ours: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    diff = ours - reference
    centered = diff - diff.mean(dim=1, keepdim=True)  # the logits' difference, less its row's mean
    return {"max |logprob diff|": diff.abs().max().item(), "mean |logprob diff|": diff.abs().mean().item(),
            "max |logit diff|": centered.abs().max().item(), "mean |logit diff|": centered.abs().mean().item(),
            "same top token": (ours.argmax(1) == reference.argmax(1)).float().mean().item()}


def top_gap(reference: torch.Tensor) -> float:
    """The median over prompts of the reference's lead of its top token over the next: a change of
    the logits smaller than it keeps the top token."""
    top2 = reference.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]).median().item()


def run_one(args: argparse.Namespace, method: str | None, out: Path) -> None:
    """`method`'s logprobs (None: the unquantized reference), in a process of its own, saved to `out`."""
    command = [sys.executable, __file__, "--one", method or "", "--model", args.model, "--device", args.device,
               "--dtype", args.dtype, "--group-size", str(args.group_size), "--save", str(out)]
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a checkpoint directory (default: the embedded default model)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--group-size", type=int, default=64, help="AWQ's groups (the default model's widths take 64)")
    parser.add_argument("--random", action="store_true", help="--model is a config: draw weights at a trained scale")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from pagoda.loader.default_model import default_model_dir

        args.model = str(default_model_dir())
    if args.one is not None:  # a child: one method's logprobs
        model = args.model
        if args.one == "awq":
            model = str(Path(args.save).with_suffix(".awq"))
            script = Path(__file__).with_name("quantize_awq_rtn.py")
            subprocess.run([sys.executable, str(script), "--model", args.model, "--group-size", str(args.group_size),
                            "--out", model], check=True, stdout=subprocess.DEVNULL)
        torch.save(next_token_logprobs(model, args.device, args.dtype, METHODS.get(args.one, {})), args.save)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.random:
            write_random_checkpoint(Path(args.model), Path(tmp) / "random", args.device)
            args.model = str(Path(tmp) / "random")
        run_one(args, None, Path(tmp) / "reference.pt")
        reference = torch.load(Path(tmp) / "reference.pt")
        print(f"{PROMPTS} prompts of {PROMPT_LEN} random tokens, the next token's logprobs against {args.dtype}'s "
              f"(its top token's median lead over the next: {top_gap(reference):.4g})")
        for number, method in enumerate(args.methods):
            run_one(args, method, Path(tmp) / f"{number}.pt")
            result = errors(torch.load(Path(tmp) / f"{number}.pt"), reference)
            print(f"{method:<14} " + "  ".join(f"{name} {value:.4g}" for name, value in result.items()), flush=True)


if __name__ == "__main__":
    main()
