"""A tiny llama whose replies the test writes: each reply is a chain of tokens of a test tokenizer,
and the model maps every token to the next one of its chain (a bigram table in the weights), so
that greedy decoding after a prompt ending in a chain's first token writes exactly that chain.

Attention and MLP outputs are zero, so the last hidden state is the embedding of the current
token; embeddings are one-hot and lm_head holds the table. Every token appears in at most one
chain; tokens not in a chain lead to EOS."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from tests.serving import SPECIALS, save_tokenizer

EOS_ID = SPECIALS.index("<|im_end|>")


def save_scripted_model(
    directory: Path, replies: dict[str, list[str]], chat_template: str, special_tokens: list[str] = ()
) -> Path:
    """replies: trigger -> the reply's tokens (each an added token). A prompt whose last token is
    the trigger (e.g. a chat template ending with the last message's text) gets that reply,
    then EOS. special_tokens: added tokens to mark special (as models mark their tool markers)."""
    path = directory / "scripted"
    save_tokenizer(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    pieces = [piece for trigger, reply in replies.items() for piece in [trigger, *reply]]
    assert len(pieces) == len(set(pieces)), "a token in two chains would need two successors"
    tokenizer.add_tokens([p for p in pieces if p not in special_tokens])
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    successor = {}
    for trigger, reply in replies.items():
        chain = [tokenizer.convert_tokens_to_ids(p) for p in [trigger, *reply]]
        successor.update(zip(chain, chain[1:] + [EOS_ID]))
    _save_bigram_llama(path, len(tokenizer), successor)
    return path


def _save_bigram_llama(path: Path, vocab_size: int, successor: dict[int, int]) -> None:
    hidden = -(-vocab_size // 64) * 64  # one dimension per token
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=EOS_ID, architectures=["LlamaForCausalLM"],
    )
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in (model.model.norm, model.model.layers[0].input_layernorm,
                     model.model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        model.model.embed_tokens.weight[:, :vocab_size] = torch.eye(vocab_size)
        for token in range(vocab_size):
            model.lm_head.weight[successor.get(token, EOS_ID), token] = 1.0
    model.save_pretrained(path)
