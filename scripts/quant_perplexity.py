"""Perplexity of the embedded default model on a fixed English text, unquantized and quantized
(issue 15's real-model check): fp8 weights and fp8 KV cache, and 4-bit round-to-nearest weights
in AWQ's layout (scripts/quantize_awq_rtn.py writes them). On the CPU, in fp32.

    python scripts/quant_perplexity.py [--awq DIR]

Prints each variant's perplexity and its ratio to the unquantized model's."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from pagoda import LLM, SamplingParams

# Plain English prose (written for this check), long enough for a stable figure (~400 tokens).
TEXT = (
    "The river runs through the middle of the old town, under seven stone bridges that were built "
    "over three centuries. In the morning, fishermen set out from the lower harbour before the sun "
    "has cleared the hills, and by noon the market along the eastern bank is crowded with people "
    "buying bread, cheese, fruit and the morning's catch. Most of the houses near the water are "
    "narrow and tall, painted in pale yellow, green or blue, with wooden shutters that are closed "
    "against the heat of the afternoon. The town hall stands at the top of the main square. Its "
    "clock tower was rebuilt after a fire in the nineteenth century, and the bell still rings every "
    "hour, although it is a few minutes late on most days. Children walk to the school on the hill "
    "in small groups, and the teachers say that the walk is the best part of the lesson. In winter "
    "the river rises and sometimes floods the lowest streets, so the shopkeepers keep sandbags by "
    "their doors and move their goods to the upper floors when the rain does not stop. Visitors "
    "come in the summer to see the bridges, to eat in the small restaurants by the water and to "
    "take boat trips down to the sea, which is about an hour away. Many of them say that they will "
    "come back, and a surprising number of them do. The town has changed slowly: there is a new "
    "library, a railway station with trains to the capital twice a day, and a museum that tells "
    "the story of the river, the bridges and the families who built them. Yet the rhythm of the "
    "day is much as it was a hundred years ago, set by the tides, the bells and the market."
)


def perplexity(llm: LLM, text: str = TEXT) -> float:
    """exp of the mean negative log-likelihood of the text's tokens after the first."""
    out = llm.generate([text], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    logprobs = [entry[token].logprob for token, entry in zip(out.prompt_token_ids, out.prompt_logprobs) if entry]
    return math.exp(-sum(logprobs) / len(logprobs))


def unquantized() -> LLM:
    """The default model's float32 weights (by default it runs its GGUF file's 4-bit ones)."""
    return LLM(device="cpu", dtype="float32", load_format="safetensors")


def write_awq(out: Path, group_size: int = 64) -> Path:
    """The default model in AWQ's layout, 4-bit round-to-nearest (its widths, 576 and 1536, take
    groups of 64, not 128)."""
    script = Path(__file__).with_name("quantize_awq_rtn.py")
    subprocess.run([sys.executable, str(script), "--out", str(out), "--group-size", str(group_size)], check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--awq", default=None, help="the default model's AWQ checkpoint (default: written to a temp dir)")
    args = parser.parse_args()
    base = perplexity(unquantized())
    fp8 = perplexity(LLM(device="cpu", dtype="float32", quantization="fp8", kv_cache_dtype="fp8"))
    with tempfile.TemporaryDirectory() as tmp:
        awq_dir = Path(args.awq) if args.awq else write_awq(Path(tmp) / "awq")
        awq = perplexity(LLM(model=str(awq_dir), device="cpu", dtype="float32"))
    print(f"{'variant':<28} {'perplexity':>10} {'ratio':>7}")
    for name, value in (("unquantized (fp32)", base), ("fp8 weights + fp8 KV", fp8), ("AWQ 4-bit RTN (group 64)", awq)):
        print(f"{name:<28} {value:>10.3f} {value / base:>7.3f}")


if __name__ == "__main__":
    main()
