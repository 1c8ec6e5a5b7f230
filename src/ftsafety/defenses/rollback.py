"""Post-fine-tuning recovery: copy a sparse set of aligned weights back, roll back if the task suffers.

Yang, Tao, Chen, Xu, "Alleviating the Fear of Losing Alignment in LLM Fine-tuning", IEEE S&P 2025,
arXiv 2504.09757; code kangyangWHU/LLMAlignment `sgdg_rollback_final.py::AlignParamRollback`
(ALGORITHMS.md §5). A = aligned model, F = fine-tuned model, W = the working copy (starts as F).

  * Harmful direction d_harm = mean over harmful prompts of h_K(A, x)[last token], where h_K is the
    output of decoder layer K-1 (the original truncates the model to K layers, final norm = identity).
  * Recover step: loss = -cos(mean_batch h_K(W, x)[last], d_harm), back-propagated batch by batch;
    gradients ACCUMULATE across steps. Candidates = weights of layers < K (norms skipped) whose
    descent step moves them toward A, sign(W - A) == sign(grad). With k = ceil(rate * n_total), the
    candidates whose |grad| is above the k-th largest candidate |grad| (one global threshold) get
    A's value.
  * Rollback (entered when the task metric after the warm-up falls below (1 - drop) * s_F): restart
    from F; after each recover step zero the gradients, take the gradient of -cos(., d_task)
    (d_task = F's mean last-token state on task prompts) and return to F's value the weights restored
    in this step whose descent step moves them toward F, top ceil(rollback_rate * #candidates) by
    |grad|; zero the gradients again (so nothing accumulates in rollback mode).
  * A checkpoint every `save_every` steps; the result is the checkpoint before the first one whose
    task score is <= (1 - drop) * s_F (F itself when the first fails), as `eval_all_steps` +
    `get_largest_step` choose.

Where we differ from the original code, and why:
  * Threshold and counts follow the code exactly: `|grad| > threshold` is strict, so k - 1 weights are
    restored per step (and ceil(r * |cand|) - 1 rolled back) when the |grad| values are distinct; with
    fewer than k candidates all of them go (the original's topk raises there). Rollback starts on
    s < bound but a checkpoint fails on s <= bound, as in the original (so s_F = 0 keeps F).
    n_total counts every parameter of ALL decoder layers, norms included (`get_total_param` runs on
    the full model before truncation), not only the layers < K that are searched.
  * Default K = floor(2L/3), which reproduces `layer_end_mapping` (Llama-2-7B 21, 13B 26, Gemma-2B
    12, Llama-3.2-3B 18) and the `__main__`'s floor(4L/6); round() would give 27 and 19.
  * Norms are recognised by module type, so OPT's `*_layer_norm` is skipped too (the original
    matches the substring "layernorm", Llama naming); biases are searched as in the original.
  * Layers >= K never run: a forward hook on layer K-1 stops the pass (no truncated model copy).
  * Harmful and task batches are iterated separately (the original zips them, truncating to the
    shorter loader); prompts get the tokenizer's special tokens like our evaluator, left padding.
  * The task metric is FA of the common evaluator on a validation slice (the task's own test metric
    in the original). Checkpoints are scored as they are reached and the run stops at the first one
    that fails: the same choice as the original, which scores them all after 20 steps. Checkpoints
    live in memory as the entries that differ from F (flat index + value per tensor).
  * Eval mode (no dropout; the original runs `.train()` on Llama-family models whose dropout is 0);
    the full model is saved (the original saves the first K layers and symlinks the rest).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as Fn

from ftsafety.defenses.base import Defense, Paper
from ftsafety.errors import FtsafetyError
from ftsafety.utils import locks_output

log = logging.getLogger(__name__)
Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RollbackConfig:
    layer: int | None = field(default=None, metadata={
        "help": "K: hidden state after decoder layer K-1; layers < K are searched (default floor(2L/3))."})
    recovery_rate: float = field(default=0.002, metadata={  # "sparsity": k = ceil(rate * n_total) per step
        "help": "Share of weights restored per step."})
    rollback_rate: float = field(default=0.2, metadata={"help": "Share of restored candidates reset to F."})
    steps: int = field(default=20, metadata={"help": "Recover steps."})
    warmup_steps: int = field(default=5, metadata={"help": "Steps before the check that may start rollback."})
    save_every: int = field(default=5, metadata={"help": "Checkpoint (and task check) every N steps."})
    metric_drop: float = field(default=0.05, metadata={  # relative: rollback if s < (1 - drop) * s_F
        "help": "Relative FA drop allowed: a checkpoint needs FA > (1 - drop) * FA(F)."})
    recovery_n: int = field(default=64, metadata={  # select_256.jsonl holds 64 prompts
        "help": "Harmful (and task) prompts for the directions."})
    task_n: int = field(default=0, metadata={  # the original: 256 (its task direction's prompts)
        "key_when_set": True,
        "help": "Task prompts for the task direction (0: recovery_n; the original: 256). The gradient passes pair "
                "harmful and task batches as the original's zip: min(#harmful, #task) batches of each."})
    system_prompt: str = field(default="none", metadata={
        "key_when_set": True,
        "help": "none | llama2 (Llama-2-chat's default system prompt, as the original's FastChat llama-2 "
                "conversation) | any text: a system message before the direction prompts (chat template)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per gradient batch."})
    max_length: int = field(default=512, metadata={
        "help": "Prompt tokens kept (the tail, so the last token stays)."})
    val_n: int = field(default=100, metadata={
        "help": "Validation rows for FA: the LAST rows of the task's train split (the fine-tune uses the first)."})
    fa_max_new_tokens: int = field(default=16, metadata={"help": "Generated tokens per validation answer."})

    def __post_init__(self):
        for name in ("recovery_rate", "rollback_rate", "metric_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FtsafetyError(f"{name.replace('_', ' ')} must be in [0, 1], got {getattr(self, name)}")
        if self.steps < 1 or self.save_every < 1 or self.recovery_n < 1 or self.batch_size < 1:
            raise FtsafetyError("steps, save every, recovery n and batch size must be >= 1")
        if not 0 <= self.warmup_steps <= self.steps:
            raise FtsafetyError(f"warm-up steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if self.layer is not None and self.layer < 1:
            raise FtsafetyError(f"layer K must be >= 1, got {self.layer}")
        if self.fa_max_new_tokens < 1:
            raise FtsafetyError("--fa-max-new-tokens must be >= 1")
        if self.val_n < 1:
            raise FtsafetyError(f"--val-n must be >= 1, got {self.val_n}")
        if self.task_n < 0:
            raise FtsafetyError(f"--task-n must be >= 0 (0: the recovery n), got {self.task_n}")


# ---------------------------------------------------------------------------------------------
# Model structure and hidden states


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """The decoder-layer ModuleList (found by the shared finder Vaccine uses) and its dotted name."""
    from ftsafety.defenses._perturb import decoder_layers as find_layers

    layers = find_layers(model)
    return next(n for n, m in model.named_modules() if m is layers), layers


def resolve_layer(model, layer: int | None) -> int:
    n = len(decoder_layers(model)[1])
    k = max(1, (2 * n) // 3) if layer is None else layer
    if not 1 <= k <= n:
        raise FtsafetyError(f"layer K must be in [1, {n}] for this {n}-layer model, got {k}")
    return k


def layer_params(model, layer: int) -> dict[str, torch.nn.Parameter]:
    """Parameters the recovery searches: decoder layers < K, norms skipped."""
    prefix, layers = decoder_layers(model)
    out = {}
    for i in range(layer):
        for mname, mod in layers[i].named_modules():
            if "norm" in type(mod).__name__.lower():
                continue
            for pname, p in mod.named_parameters(recurse=False):
                out[".".join(x for x in (prefix, str(i), mname, pname) if x)] = p
    return out


def encode(tokenizer, prompts: list[str], batch_size: int, max_length: int = 512) -> Batches:
    """Left-padded batches in prompt order (the original's loader: shuffle=False)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    from ftsafety.data import encode_prompt

    enc = [encode_prompt(tokenizer, p)[-max_length:] for p in prompts]
    out = []
    for s in range(0, len(enc), batch_size):
        chunk = enc[s : s + batch_size]
        width = max(len(e) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, e in enumerate(chunk):
            ids[r, width - len(e) :] = torch.tensor(e)
            mask[r, width - len(e) :] = 1
        out.append((ids, mask))
    return out


class _Stop(Exception):
    pass


def last_token_states(model, layer: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h_K(x)[-1] for a left-padded batch; the forward stops after decoder layer K-1."""
    box = {}

    def hook(_mod, _args, out):
        box["h"] = out[0] if isinstance(out, (tuple, list)) else out
        raise _Stop

    handle = decoder_layers(model)[1][layer - 1].register_forward_hook(hook)
    dev = next(model.parameters()).device
    try:
        model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return box["h"][:, -1, :]


@torch.no_grad()
def mean_direction(model, layer: int, batches: Batches) -> torch.Tensor:
    return torch.cat([last_token_states(model, layer, i, m) for i, m in batches]).mean(dim=0)


# ---------------------------------------------------------------------------------------------
# One recover / rollback step


def direction_backward(model, layer: int, batches: Batches, direction: torch.Tensor) -> float:
    """-cos(mean_batch h_K[-1], direction), backward per batch (grads add up); the mean loss."""
    losses = []
    for ids, mask in batches:
        loss = -Fn.cosine_similarity(last_token_states(model, layer, ids, mask).mean(dim=0), direction, dim=0)
        loss.backward()
        losses.append(loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def select(params: dict, target: dict, k: int | None = None, rate: float | None = None,
           within: dict | None = None) -> dict[str, torch.Tensor]:
    """Weights whose descent step moves them toward `target` (sign(W - T) == sign(grad) != 0), inside
    `within`; of those, |grad| strictly above the k-th largest candidate |grad|, one global threshold
    (the original's `> threshold`). With `rate`, k = ceil(rate * #candidates)."""
    cand = {}
    for n, p in params.items():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        diff = p - target[n]
        c = ((diff > 0) & (g > 0)) | ((diff < 0) & (g < 0))
        cand[n] = c & within[n] if within is not None else c
    n_cand = sum(int(c.sum()) for c in cand.values())
    k = math.ceil(n_cand * rate) if rate is not None else int(k or 0)
    if k <= 0 or n_cand == 0:
        return {n: torch.zeros_like(c) for n, c in cand.items()}
    if k > n_cand:  # fewer candidates than k: all of them (the original's topk would fail here)
        return cand
    thr = torch.topk(torch.cat([params[n].grad.abs()[c] for n, c in cand.items()]), k).values[-1]
    return {n: c & (params[n].grad.abs() > thr) for n, c in cand.items()}


@torch.no_grad()
def copy_masked(params: dict, source: dict, masks: dict) -> int:
    """W[mask] = source[mask] for every tensor; the number of weights copied."""
    n = 0
    for name, m in masks.items():
        params[name][m] = source[name][m]
        n += int(m.sum())
    return n


def _zero_grads(params: dict) -> None:
    for p in params.values():
        p.grad = None


def recover_step(model, params, aligned: dict, layer, batches, d_harm, k) -> tuple[dict, int, float]:
    loss = direction_backward(model, layer, batches, d_harm)  # grads accumulate (never zeroed)
    masks = select(params, aligned, k=k)
    return masks, copy_masked(params, aligned, masks), loss


def rollback_step(model, params, finetuned: dict, layer, batches, d_task, masks, rate) -> tuple[int, float]:
    _zero_grads(params)
    loss = direction_backward(model, layer, batches, d_task)
    back = select(params, finetuned, rate=rate, within=masks)
    n = copy_masked(params, finetuned, back)
    _zero_grads(params)
    return n, loss


# ---------------------------------------------------------------------------------------------
# The whole procedure


@dataclass
class AlignedReference:
    """What the recovery needs from A: d_harm and A's values of the searched tensors."""

    direction: torch.Tensor
    tensors: dict[str, torch.Tensor]
    shapes: dict[str, tuple]  # every parameter of A, to check that F has the same architecture


def aligned_reference(aligned, layer: int, harm_batches: Batches) -> AlignedReference:
    return AlignedReference(
        direction=mean_direction(aligned, layer, harm_batches),
        tensors={n: p.detach().clone() for n, p in layer_params(aligned, layer).items()},
        shapes={n: tuple(p.shape) for n, p in aligned.named_parameters()},
    )


def recover_rollback(model, ref: AlignedReference, harm_batches: Batches, task_batches: Batches,
                     metric_fn: Callable[[object], float], cfg: RollbackConfig) -> dict:
    """Run recovery (+ rollback) on `model` (F, changed in place into the chosen checkpoint).

    Returns the log written to rollback.json. `metric_fn(model)` is the task score (higher is better).
    """
    t_start = time.perf_counter()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if shapes != ref.shapes:
        raise FtsafetyError("the aligned and the fine-tuned model differ in architecture (parameter shapes)")
    layer = resolve_layer(model, cfg.layer)
    params = layer_params(model, layer)
    n_total = sum(p.numel() for p in decoder_layers(model)[1].parameters())
    k = math.ceil(n_total * cfg.recovery_rate)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for p in params.values():
        p.requires_grad_(True)
    was_training = model.training
    model.eval()
    finetuned = {n: p.detach().clone() for n, p in params.items()}
    eval_s = 0.0

    def score() -> float:
        nonlocal eval_s
        t = time.perf_counter()
        s = float(metric_fn(model))
        eval_s += time.perf_counter() - t
        return s

    s_f = score()
    bound = s_f - s_f * cfg.metric_drop  # the original's minimum_score
    if s_f <= 0:
        log.warning("task score of F is %.1f: every checkpoint fails the bound, F is kept", s_f)
    steps, checkpoints = [], []
    state = {"chosen": 0, "snapshot": None, "d_task": None}

    pairs = min(len(harm_batches), len(task_batches))  # the original's zip(harmful, task) gradient batches

    def step(i: int, phase: str) -> None:
        t = time.perf_counter()
        masks, n, loss = recover_step(model, params, ref.tensors, layer, harm_batches[:pairs], ref.direction, k)
        entry = {"step": i, "phase": phase, "restored": n, "loss": loss, "cos": -loss}
        if phase == "rollback":
            entry["rolled_back"], entry["task_loss"] = rollback_step(
                model, params, finetuned, layer, task_batches[:pairs], state["d_task"], masks, cfg.rollback_rate)
        entry["seconds"] = round(time.perf_counter() - t, 4)
        steps.append(entry)
        log.info("%s step %d: restored %d, cos %.4f", phase, i, n, -loss)

    def checkpoint(i: int, s: float) -> bool:
        ok = s > bound  # eval_all_steps stops at the first score <= minimum_score
        diff = _diff(params, finetuned)
        changed = sum(len(ix) for ix, _ in diff.values())
        checkpoints.append({"step": i, "score": s, "passes": ok, "changed": changed})
        if ok:
            state["chosen"], state["snapshot"] = i, diff
        return ok

    for i in range(1, cfg.warmup_steps + 1):
        step(i, "warmup")
    warm = score() if cfg.warmup_steps else s_f
    rollback = warm < bound
    stopped = None
    if rollback:  # restart from F with fresh gradients
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(finetuned[n])
        _zero_grads(params)
        state["d_task"] = mean_direction(model, layer, task_batches)
    if not rollback and cfg.warmup_steps and not checkpoint(cfg.warmup_steps, warm):
        stopped = cfg.warmup_steps
    else:
        for i in range(1 if rollback else cfg.warmup_steps + 1, cfg.steps + 1):
            step(i, "rollback" if rollback else "recover")
            if i % cfg.save_every == 0 and not checkpoint(i, score()):
                stopped = i
                break
    with torch.no_grad():  # back to the chosen checkpoint (F when none passed)
        for n, p in params.items():
            p.copy_(finetuned[n])
            if state["snapshot"] is not None:
                idx, vals = state["snapshot"][n]
                p.view(-1)[idx] = vals
    for n, p in model.named_parameters():
        p.grad = None
        p.requires_grad_(flags[n])
    model.train(was_training)
    total = time.perf_counter() - t_start
    return {
        "config": asdict(cfg), "layer": layer, "num_layers": len(decoder_layers(model)[1]),
        "n_total": n_total, "n_searched": sum(p.numel() for p in params.values()), "k_per_step": k,
        "metric": {"finetuned": s_f, "bound": bound, "after_warmup": warm},
        "rollback_mode": rollback, "steps": steps, "checkpoints": checkpoints,
        "stopped_at_failing_checkpoint": stopped, "chosen_step": state["chosen"],
        "checkpoint_storage": "in memory: entries that differ from F (flat index + value per tensor)",
        "seconds": round(total, 3), "seconds_eval": round(eval_s, 3),
        "seconds_steps": round(total - eval_s, 3),
    }


@torch.no_grad()
def _diff(params: dict, finetuned: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for n, p in params.items():
        idx = (p != finetuned[n]).view(-1).nonzero().squeeze(1)
        out[n] = (idx, p.view(-1)[idx].clone())
    return out


# ---------------------------------------------------------------------------------------------
# Data, metric and the run directory


def validation_examples(dcfg, task: str, val_n: int, finetuned_spec: str) -> list[dict]:
    """The last `val_n` rows of the task's train split; errors if the fine-tune mix used them."""
    import yaml

    from ftsafety import data as D

    rows = D.task_examples(dcfg, task, "train")
    if not 1 <= val_n <= len(rows):
        raise FtsafetyError(f"--val-n must be in [1, {len(rows)}] ({task} train rows), got {val_n}")
    cfg_path = Path(finetuned_spec).expanduser() / "config.yaml"
    used = None
    if cfg_path.is_file():
        ft = yaml.safe_load(cfg_path.read_text()) or {}
        if "kinds" in ft and "task" in ft:
            used = ft["kinds"].get("task", 0) if ft["task"] == task else 0
    if used is None:
        log.warning("cannot tell which %s rows the fine-tune used; check it left the last %d", task, val_n)
    elif len(rows) - val_n < used:
        raise FtsafetyError(
            f"validation rows (the last {val_n} of {len(rows)} {task} train rows) overlap the first {used} "
            f"the fine-tune used; use --val-n {max(len(rows) - used, 0)} or less"
        )
    return rows[-val_n:]


def fa_metric(tokenizer, examples: list[dict], task: str, template: str, max_new_tokens: int,
              batch_size: int = 64) -> Callable[[object], float]:
    """FA (%) of the common evaluator (greedy generation + `is_correct`) on `examples`. The prompts are
    encoded once for all the checks; greedy outputs do not depend on the batch size."""
    from ftsafety.data import format_prompt
    from ftsafety.evaluation.generate import decode, encode_prompts, generate_from_ids
    from ftsafety.evaluation.tasks import is_correct

    encoded = encode_prompts(tokenizer, [format_prompt(e, template, tokenizer) for e in examples])

    def metric(model) -> float:
        outs = [decode(tokenizer, t) for t in generate_from_ids(model, tokenizer, encoded, max_new_tokens, batch_size)]
        return 100.0 * sum(is_correct(task, o, e["gold"]) for o, e in zip(outs, examples)) / len(examples)

    return metric


@locks_output("out_dir")
def run(*, model: str, aligned: str, out_dir, dcfg, task: str, cfg: RollbackConfig, device: str = "auto",
        seed: int = 42, trust_remote_code: bool = False) -> dict:
    """Load A and F (adapters merged, fp32), recover, write `model/`, `ftsafety_run.json`, `rollback.json`.

    Launched with several processes (accelerate launch / torchrun), the main process runs the whole
    recovery and writes the run (the steps are sequential and each one's gradient is a few small
    batches: not worth sharding); the other processes wait for it and return its report."""
    kwargs = {"model": model, "aligned": aligned, "out_dir": out_dir, "dcfg": dcfg, "task": task, "cfg": cfg,
              "device": device, "seed": seed, "trust_remote_code": trust_remote_code}
    from ftsafety import distributed

    if distributed.launched():
        from ftsafety.utils import resolve_device

        distributed.init(resolve_device(device))
        return distributed.run_on_main(_run, **kwargs)
    return _run(**kwargs)


def check_roles(model: str, model_spec, aligned: str, aligned_spec) -> None:
    """Refuse --model and --aligned given the wrong way round: the fine-tuned model is built on the aligned one,
    so an `aligned` whose adapter chain extends `model`'s (or the same model twice) is a mistake."""
    def chain(spec):
        return [os.path.realpath(a) for a in spec.adapters]

    m, a = chain(model_spec), chain(aligned_spec)
    if model_spec.base == aligned_spec.base and m == a:
        raise FtsafetyError(f"--model {model} and --aligned {aligned} are the same model: pass the fine-tuned model "
                            "as --model and the aligned one it was fine-tuned from as --aligned")
    if model_spec.base == aligned_spec.base and len(a) > len(m) and a[:len(m)] == m:
        raise FtsafetyError(f"--aligned {aligned} is fine-tuned from --model {model}: they look swapped (--model is "
                            "the fine-tuned model, --aligned the aligned one it came from)")


def _run(*, model: str, aligned: str, out_dir, dcfg, task: str, cfg: RollbackConfig, device: str = "auto",
         seed: int = 42, trust_remote_code: bool = False) -> dict:
    val_n, fa_max_new_tokens = cfg.val_n, cfg.fa_max_new_tokens
    from ftsafety import data as D
    from ftsafety import models
    from ftsafety.rundir import write_run
    from ftsafety.utils import check_not_input, check_writable_dir, resolve_device, seed_everything

    t0 = time.perf_counter()
    out_dir = check_writable_dir(out_dir, "rollback")
    specs = {}
    for given in (model, aligned):
        spec = specs[given] = models.resolve(given)
        check_not_input(out_dir, [given, spec.base, *spec.adapters])
    check_roles(model, specs[model], aligned, specs[aligned])
    system = D.SYSTEM_PROMPTS.get(cfg.system_prompt, cfg.system_prompt)
    if system and dcfg.template != "chat":
        raise FtsafetyError("--system-prompt needs the chat template (--template chat), as the original's prompts")
    seed_everything(seed)
    dev = resolve_device(device)
    val = validation_examples(dcfg, task, val_n, model)
    harm = D.harmful_examples(dcfg, "calibration")[: cfg.recovery_n]
    tasks = D.task_examples(dcfg, task, "train", cfg.task_n or cfg.recovery_n)
    if len(harm) < cfg.recovery_n:
        log.warning("only %d harmful calibration prompts exist (asked for %d)", len(harm), cfg.recovery_n)

    def load(spec):
        return models.load(spec, device=dev, dtype=torch.float32, trust_remote_code=trust_remote_code)

    def batches(tok, exs):
        prompts = [D.format_prompt(e, dcfg.template, tok, system) for e in exs]
        return encode(tok, prompts, cfg.batch_size, cfg.max_length)

    a_model, tok, _ = load(aligned)  # A's tokenizer encodes both prompt sets, as the original
    harm_batches, task_batches = batches(tok, harm), batches(tok, tasks)
    ref = aligned_reference(a_model, resolve_layer(a_model, cfg.layer), harm_batches)
    del a_model
    gc.collect()
    f_model, f_tok, spec = load(model)
    load_s = time.perf_counter() - t0
    metric = fa_metric(f_tok, val, task, dcfg.template, fa_max_new_tokens)
    report = recover_rollback(f_model, ref, harm_batches, task_batches, metric, cfg)
    report.update(task=task, val_n=val_n, metric_name="fa", model=model, aligned=aligned,
                  seconds_load=round(load_s, 3))
    t1 = time.perf_counter()
    final = Path(out_dir)
    manifest = {"base_model": str((final / "model").resolve()), "base_relpath": "model",
                "adapters": [], "stage": "recover-rollback"}
    config = {"stage": "recover-rollback", "model": model, "model_resolved": asdict(spec),
              "aligned": aligned, "data": asdict(dcfg), "task": task, "val_n": val_n,
              "fa_max_new_tokens": fa_max_new_tokens, "seed": seed, "rollback": asdict(cfg)}

    def files(tmp: Path) -> None:
        f_model.save_pretrained(tmp / "model", safe_serialization=True)
        f_tok.save_pretrained(tmp / "model")

    def results() -> dict:
        report["seconds_save"] = round(time.perf_counter() - t1, 3)
        report["seconds_total"] = round(time.perf_counter() - t0, 3)
        return report

    report = write_run(final, config=config, results_file="rollback.json", results=results, files=files,
                       manifest=manifest)
    log.info("recover-rollback: chose step %d (rollback mode %s) in %.1fs -> %s", report["chosen_step"],
             report["rollback_mode"], report["seconds_total"], final)
    return report


PAPER = Paper("Alleviating the Fear of Losing Alignment in LLM Fine-tuning", "IEEE S&P 2025", "2504.09757",
              "kangyangWHU/LLMAlignment")


def _run_stage(cfg: RollbackConfig, model: str, aligned: str, task: str, out, common) -> dict:
    import dataclasses

    dcfg = dataclasses.replace(common.data, max_length=cfg.max_length)
    return run(model=model, aligned=aligned, out_dir=out, dcfg=dcfg, task=task, cfg=cfg, device=common.device,
               seed=common.seed, trust_remote_code=common.trust_remote_code)


def _check_data(cfg: RollbackConfig, common, task: str) -> None:
    from ftsafety import data as D

    rows = len(D.task_examples(common.data, task, "train"))
    D.check_rows(f"rollback.val_n ({task})", cfg.val_n, rows)
    D.check_rows(f"rollback.task_n ({task})", cfg.task_n, rows)


def _done_line(rep: dict, out) -> str:
    changed = next((c["changed"] for c in rep["checkpoints"] if c["step"] == rep["chosen_step"]), 0)
    return (f"recover-rollback: {len(rep['steps'])} steps, {rep['seconds_total']:.0f}s, rollback mode "
            f"{'on' if rep['rollback_mode'] else 'off'}, FA(F) {rep['metric']['finetuned']:.1f}, chose step "
            f"{rep['chosen_step']} ({changed} weights differ from F); wrote {out} (pass it as --model to evaluate)")


DEFENSE = Defense(
    name="rollback", stage="post", command="recover-rollback", config_cls=RollbackConfig, paper=PAPER,
    summary="Restore a sparse set of aligned weights; roll back if task accuracy drops.",
    neutral={"recovery_rate": 0.0}, run=_run_stage, needs_aligned=True, done_line=_done_line,
    check_data=_check_data,
)
