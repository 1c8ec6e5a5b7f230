"""Tiny randomly initialised causal LMs (OPT and Llama architectures) built offline.

They carry a real byte-level tokenizer (any text round-trips), so every code path that a
7B model takes (templates, LoRA, generation, judges) runs on them in seconds. Weights are
seeded, so `tiny-opt` names the same model on every machine.
"""

from __future__ import annotations

import torch

SPECIAL_TOKENS = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}
TINY_ALIASES = ("tiny-opt", "tiny-llama")


def build_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte symbols plus three specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for tok in SPECIAL_TOKENS.values():
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS.values()))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        model_max_length=1024,
    )
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return tok


def build_model(alias: str, vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    ids = dict(bos_token_id=vocab_size - 3, eos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1)
    if alias == "tiny-opt":
        cfg = OPTConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=2 * hidden,
            num_attention_heads=4, max_position_embeddings=1024, word_embed_proj_dim=hidden,
            do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, **ids,
        )
        cls = OPTForCausalLM
    elif alias == "tiny-llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, tie_word_embeddings=False, **ids,
        )
        cls = LlamaForCausalLM
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(alias)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = cls(cfg)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.generation_config.eos_token_id = ids["eos_token_id"]
    return model


def build(alias: str, seed: int = 0):
    tok = build_tokenizer()
    return build_model(alias, len(tok), seed=seed), tok
