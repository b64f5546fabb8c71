"""PEFT LoRA adapters on the tiny random models (tests/tiny_models.py), and transformers + peft's
own greedy continuations with them: the reference Pagoda's adapters are held to."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def save_peft_adapter(
    base: Path, directory: Path, seed: int, rank: int = 8, alpha: int = 16,
    targets: tuple[str, ...] = ALL_TARGETS, **lora_config,
) -> Path:
    """An adapter of random A and B (PEFT starts B at zero: an adapter that changes nothing)."""
    import peft

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), **lora_config)
    peft_model = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    path = directory / f"adapter-{seed}"
    peft_model.save_pretrained(path)
    return path


def peft_greedy(base: Path, adapter: Path | None, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers + peft's greedy continuation of each prompt (None: the base model), EOS ignored."""
    import peft

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter).eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=0,
            )
            outputs.append(out[0, len(prompt):].tolist())
    return outputs
