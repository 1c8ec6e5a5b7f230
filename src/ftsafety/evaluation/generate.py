"""Greedy, batched generation: left padding, KV cache, batches sorted by prompt length."""

from __future__ import annotations

import torch


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 128,
    batch_size: int = 32,
    progress=None,
    description: str = "generating",
    max_prompt_tokens: int | None = None,
) -> list[str]:
    """Return one completion per prompt, in the prompts' order. batch_size=1 is the one-prompt-at-a-time
    way of the original repos' pred.py."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if max_prompt_tokens:
        encoded = [e[-max_prompt_tokens:] for e in encoded]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    out: list[str | None] = [None] * len(prompts)
    task = progress.add_task(description, total=len(prompts), info="") if progress is not None else None
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            e = encoded[i]
            ids[row, width - len(e) :] = torch.tensor(e)
            mask[row, width - len(e) :] = 1
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos, use_cache=True,
            temperature=None, top_p=None, top_k=None,
        )
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True).strip()
        if task is not None:
            progress.advance(task, len(idx))
    if was_training:
        model.train()
    return out  # type: ignore[return-value]
