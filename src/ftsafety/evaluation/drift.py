"""How far a fine-tune moved a model: Vaccine's embedding drift and the weights' distance (issue #29).

Vaccine (arXiv 2402.01109, Sec. 3) explains harmful fine-tuning by *harmful embedding drift*: the hidden
embeddings of the alignment data move away from where alignment left them. Its code tracks the drift
of the attention outputs (where Vaccine adds its perturbation) on alignment data. Here, on `n`
alignment examples (harmful prompt -> refusal, the alignment set's own construction), both models run
the same batches and on every real token we take

  * `attn_drift`: the L2 norm, over all layers together, of the change of the attention outputs
    (sqrt of the sum over layers of ||a_l(after) - a_l(before)||^2, the global norm Vaccine's eps uses);
  * `final_drift`: the L2 norm of the change of the last hidden state (the LM head's input);

each averaged over tokens, and each also relative to the reference's own norm (`*_relative`). The
weights' distance is ||W(after) - W(before)||_F over every parameter of the two merged models, with its
share of ||W(before)||_F. A larger drift at the same harmful share p means the fine-tune moved the
alignment's representation more; Vaccine's claim is that its alignment makes that drift smaller.
"""

from __future__ import annotations

import math

import torch

from ftsafety import models
from ftsafety.errors import FtsafetyError


def _attention_outputs(model) -> list[torch.nn.Module]:
    from ftsafety.defenses._perturb import perturb_targets

    return perturb_targets(model, "attn")


def _hidden(model, batch: dict, sites: list[torch.nn.Module]) -> tuple[list[torch.Tensor], torch.Tensor]:
    got: dict[torch.nn.Module, torch.Tensor] = {}

    def hook(module, args, output):
        got[module] = (output[0] if isinstance(output, tuple) else output).detach().float()

    handles = [m.register_forward_hook(hook) for m in sites]
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                    use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [got[m] for m in sites], out.hidden_states[-1].detach().float()


def weight_distance(before, after) -> dict:
    """||W(after) - W(before)||_F over the parameters both models share by name, and ||W(before)||_F."""
    a = dict(before.named_parameters())
    diff_sq = ref_sq = 0.0
    n = 0
    for name, p in after.named_parameters():
        q = a.get(name)
        if q is None or q.shape != p.shape:
            continue
        diff_sq += float((p.detach().float() - q.detach().float()).pow(2).sum())
        ref_sq += float(q.detach().float().pow(2).sum())
        n += 1
    if not n:
        raise FtsafetyError("the two models share no parameter (different architectures?)")
    return {"weight_distance": math.sqrt(diff_sq), "weight_norm": math.sqrt(ref_sq),
            "weight_distance_relative": math.sqrt(diff_sq / ref_sq) if ref_sq else float("nan"), "parameters": n}


@torch.no_grad()
def embedding_drift(reference: str, model: str, data_cfg, n: int = 64, batch_size: int = 8, device: str = "auto",
                    seed: int = 42, trust_remote_code: bool = False) -> dict:
    """Vaccine's embedding drift of `model` against `reference` on `n` alignment examples (see the module doc),
    and the distance between their weights."""
    from ftsafety import data as D
    from ftsafety.utils import resolve_device

    if n < 1:
        raise FtsafetyError(f"n must be >= 1, got {n}")
    dev = resolve_device(device)
    before, tok, _ = models.load(reference, device=dev, dtype=torch.float32, trust_remote_code=trust_remote_code)
    after, tok_after, _ = models.load(model, device=dev, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if type(before) is not type(after) or before.config.hidden_size != after.config.hidden_size:
        raise FtsafetyError(f"{reference} ({type(before).__name__}) and {model} ({type(after).__name__}) are different "
                            "architectures: their hidden states do not compare")
    if tok.get_vocab() != tok_after.get_vocab():
        raise FtsafetyError(f"{reference} and {model} use different tokenizers: their hidden states do not compare")
    examples = D.alignment_examples(data_cfg, n, 0.0, seed)
    dataset = D.SFTDataset(examples, tok, data_cfg)
    collate = D.Collator(tok.pad_token_id)
    sites_b, sites_a = _attention_outputs(before), _attention_outputs(after)
    sums = {"attn": 0.0, "attn_ref": 0.0, "final": 0.0, "final_ref": 0.0}
    tokens = 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(dev) for k, v in batch.items()}
        mask = batch["attention_mask"].bool()
        attn_b, last_b = _hidden(before, batch, sites_b)
        attn_a, last_a = _hidden(after, batch, sites_a)
        d_attn = sum((x - y).pow(2).sum(-1) for x, y in zip(attn_a, attn_b)).sqrt()[mask]
        r_attn = sum(y.pow(2).sum(-1) for y in attn_b).sqrt()[mask]
        sums["attn"] += float(d_attn.sum())
        sums["attn_ref"] += float(r_attn.sum())
        sums["final"] += float((last_a - last_b).norm(dim=-1)[mask].sum())
        sums["final_ref"] += float(last_b.norm(dim=-1)[mask].sum())
        tokens += int(mask.sum())
    out = {"reference": reference, "model": model, "examples": len(dataset), "tokens": tokens,
           "attn_drift": sums["attn"] / tokens, "attn_drift_relative": sums["attn"] / sums["attn_ref"],
           "final_drift": sums["final"] / tokens, "final_drift_relative": sums["final"] / sums["final_ref"],
           "attention_sites": len(sites_b)}
    out.update(weight_distance(before, after))
    return out
