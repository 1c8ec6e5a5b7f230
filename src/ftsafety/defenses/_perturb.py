"""Hidden-state perturbation and gradient helpers shared by Vaccine and Booster.

Vaccine (Huang, Hu, Liu, "Vaccine: Perturbation-aware Alignment for Large Language Models against
Harmful Fine-tuning", NeurIPS 2024, arXiv 2402.01109, Eq. 2) adds to chosen hidden states the
worst-case perturbation of one normalised gradient step, eps_l = rho * g_l / ||g||, where g_l is the
gradient of the loss w.r.t. the hidden state e_l and ||g|| the *global* L2 norm over all perturbed
states (the norm of the stack of per-state norms). Booster (arXiv 2409.01586) reuses this in its
`perturb_aware` mode, and needs the global norm of a parameter gradient and exact weight restore.

Differences from the original code (git-disl/Vaccine and git-disl/Booster `trainer.py`):
  * The perturbed modules are found from the model's structure (the decoder-layer ModuleList and
    the attention child of each layer), not from a list of Llama/OPT/Gemma/Qwen attention classes,
    so any decoder-only model works, also inside peft.
  * g is taken with `torch.autograd.grad` w.r.t. the captured outputs only, so the first pass
    writes nothing into `.grad` (the original runs `loss.backward()` and then `model.zero_grad()`,
    which wipes the gradient of earlier micro-batches when gradient accumulation is > 1).
  * The first pass runs under a forked RNG (CPU and CUDA), so the pass that updates the weights
    sees the same random state (dropout masks) as a plain SFT step: rho = 0 reproduces SFT exactly.
  * eps is added out of place (`output + eps`) instead of through `.data`; the gradient is the
    same for the linear output projections this is applied to, and autograd stays exact.

Several processes (DDP, docs/distributed.md): ||g|| and Booster's ||grad h(w)|| are norms over the
GLOBAL batch. Process r holds N_r of the N loss tokens of the global batch and its loss is the mean
over its own tokens, so its gradients are N/N_r times the single-process ones (whose loss is the mean
over all N tokens); multiplied by its `token_share` N_r/N they are exactly the single-process
gradients of its examples. Hence ||g|| = sqrt(sum_r share_r^2 ||g_r||^2) (one all-reduce of a scalar)
and eps_r = rho * share_r * g_r / (||g|| + 1e-7): each example gets the eps of a one-process run on the
whole global batch. A parameter gradient is a sum over examples, so the global one is
sum_r share_r * grad_r (an all-reduce of the weighted gradients; see booster.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from ftsafety import distributed
from ftsafety.errors import FtsafetyError

PERTURB_AT = ("attn", "layer")
# Names decoder-only models give the attention child of a block (Llama/OPT/Gemma/Qwen/Mistral/Phi:
# self_attn; GPT-2/GPT-J: attn; GPT-NeoX: attention; Falcon/Bloom: self_attention).
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")


def _num_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        n = getattr(c, "num_hidden_layers", None) if c is not None else None
        if isinstance(n, int):
            return n
    return None


def attention_child(layer: nn.Module) -> nn.Module | None:
    """The attention submodule of a decoder block, or None when it has none we can recognise."""
    children = dict(layer.named_children())
    for name in _ATTN_NAMES:
        if name in children:
            return children[name]
    for (
        name,
        child,
    ) in children.items():  # e.g. `self_attention_block`; never a norm like `post_attention_layernorm`
        low = name.lower()
        if (
            ("attn" in low or "attention" in low)
            and "norm" not in low
            and "norm" not in type(child).__name__.lower()
        ):
            return child
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: a ModuleList of same-class, non-leaf modules.

    Among candidates, prefer blocks that hold an attention child, then a list as long as
    `config.num_hidden_layers` (so a list of MoE experts is not mistaken for the layers), then the longest.
    """
    n_layers = _num_layers(model)
    best, best_key = None, None
    for mod in model.modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1 or next(mod[0].children(), None) is None:
            continue
        key = (attention_child(mod[0]) is not None, len(mod) == n_layers, len(mod))
        if best_key is None or key > best_key:
            best, best_key = mod, key
    if best is None:
        raise FtsafetyError(
            f"{type(model).__name__}: found no stack of decoder layers (an nn.ModuleList of blocks)"
        )
    return best


def perturb_targets(model: nn.Module, at: str = "attn") -> list[nn.Module]:
    """Modules whose output gets eps: each layer's attention (the authors' code) or each layer (the paper)."""
    if at not in PERTURB_AT:
        raise FtsafetyError(f"unknown perturbation site {at!r}; choose one of {', '.join(PERTURB_AT)}")
    layers = list(decoder_layers(model))
    if at == "layer":
        return layers
    attn = [attention_child(layer) for layer in layers]
    if any(a is None for a in attn):
        names = ", ".join(n for n, _ in layers[0].named_children())
        raise FtsafetyError(
            f"{type(layers[0]).__name__} has no attention child we recognise (children: {names}); "
            "use perturb_at='layer'"
        )
    return attn


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_first(output, new: torch.Tensor):
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    return new


@contextlib.contextmanager
def capture_outputs(modules: Iterable[nn.Module]) -> Iterator[dict[nn.Module, torch.Tensor]]:
    """Record each module's (first) output tensor during a forward pass, as a node autograd can
    differentiate with respect to (an output that does not require grad is replaced by a leaf that does)."""
    captured: dict[nn.Module, torch.Tensor] = {}

    def hook(module, args, output):
        if not torch.is_grad_enabled():
            return None
        h = _first(output)
        if not h.requires_grad:
            h = h.detach().requires_grad_(True)
            output = _with_first(output, h)
        captured[module] = h
        return output

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def add_to_outputs(eps: dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """Add the constant eps[m] to module m's (first) output on every forward inside the block."""

    def hook(module, args, output):
        return _with_first(output, _first(output) + eps[module])

    handles = [m.register_forward_hook(hook) for m in eps]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def global_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm of a list of tensors taken together (the norm of their per-tensor norms), in fp32."""
    norms = [t.detach().float().norm(2) for t in tensors]
    return torch.stack(norms).norm(2)


def cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def forked_rng(model: nn.Module):
    """Run a block without changing the global CPU/CUDA random state (so the next pass draws the same
    dropout masks as it would have without the block)."""
    return torch.random.fork_rng(devices=cuda_devices(model))


def refuse_sharded_training(trainer, what: str) -> None:
    """Vaccine's and Booster's extra passes take gradients with autograd.grad on the full replicated
    weights; FSDP and DeepSpeed shard those weights (and hook their gradients), so refuse them in one line."""
    for flag, name in (("is_fsdp_enabled", "FSDP"), ("is_deepspeed_enabled", "DeepSpeed")):
        if getattr(trainer, flag, False):
            raise FtsafetyError(
                f"{what} runs on one or several processes with DDP (recipes/accelerate/ddp.yaml), "
                f"not under {name}: its extra gradient passes need the full weights on every process"
            )


def loss_tokens(inputs: dict) -> torch.Tensor:
    """Tokens a causal-LM loss is averaged over: the labels after the one-position shift that are not -100."""
    labels = inputs.get("labels") if inputs is not None else None
    if labels is None:
        return torch.zeros((), dtype=torch.long)
    return labels[..., 1:].ne(-100).sum()


def token_share(inputs: dict | None, device: torch.device | None = None) -> torch.Tensor | None:
    """N_r / N: this process's share of the loss tokens of the global batch (one all-reduce), as a
    0-d fp32 tensor; None in a single process, where nothing is rescaled. `inputs` None: no examples."""
    if distributed.world_size() == 1:
        return None
    if device is None:
        device = inputs["labels"].device if inputs is not None and "labels" in inputs else torch.device("cpu")
    counts = loss_tokens(inputs).to(device=device, dtype=torch.float64).reshape(1)
    total = distributed.all_reduce_sum_(counts.clone())
    return (counts / total.clamp_min(1)).float().reshape(())


def activation_perturbation(
    model: nn.Module, modules: list[nn.Module], loss_fn: Callable[[], torch.Tensor], rho: float,
    share: torch.Tensor | None = None,
) -> tuple[dict[nn.Module, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Vaccine's inner maximisation: one normalised gradient-ascent step on the hidden states.

    Runs `loss_fn()` (a forward pass) under a forked RNG while capturing the outputs of `modules`,
    takes g_l = dL/de_l with autograd.grad (no `.grad` is written) and returns
    (eps, ||g||, loss) with eps[m] = rho * g_m / (||g|| + 1e-7), ||g|| the global norm.

    `share` (several processes: this process's `token_share` of the global batch; `loss_fn` the mean
    over its own tokens) makes ||g|| the norm over the global batch, summed over the processes, and
    eps[m] = rho * share * g_m / (||g|| + 1e-7): what one process with the whole batch computes.
    """
    with forked_rng(model), capture_outputs(modules) as captured:
        loss = loss_fn()
        missing = [m for m in modules if m not in captured]
        if missing:
            raise FtsafetyError(f"{len(missing)} perturbation site(s) were not called in the forward pass")
        grads = torch.autograd.grad(loss, [captured[m] for m in modules], allow_unused=True)
    owned, seen = [], set()
    for m, g in zip(modules, grads):
        if g is None:
            g = torch.zeros_like(captured[m])
        elif g.data_ptr() in seen or not g.is_contiguous():  # autograd may hand one tensor to two sites
            g = g.clone()
        seen.add(g.data_ptr())
        owned.append(g.detach())
    del captured, grads
    if share is None:
        norm = global_norm(owned)
        scale = rho / (norm + 1e-7)
    else:  # ||g||^2 = sum over processes of ||share_r * g_r||^2
        share = share.to(owned[0].device)
        local = (global_norm(owned) * share).square().reshape(1)
        norm = distributed.all_reduce_sum_(local).sqrt().reshape(())
        scale = rho * share / (norm + 1e-7)
    eps = {m: g.mul_(scale) for m, g in zip(modules, owned)}  # in place: eps reuses the gradients' memory
    return eps, norm, loss.detach()


class MetricSums:
    """Per-step defense terms (detached tensors), averaged when the Trainer logs: no host sync per step."""

    def __init__(self):
        self._sums: dict[str, list] = {}

    def add(self, **values: torch.Tensor | float) -> None:
        for name, v in values.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            entry = self._sums.setdefault(name, [0.0, 0])
            entry[0] = entry[0] + v
            entry[1] += 1

    def pop_means(self) -> dict[str, float]:
        out = {k: float(s) / n for k, (s, n) in self._sums.items() if n}
        self._sums.clear()
        return out
