"""Antidote: post-fine-tuning one-shot pruning of "harmful" weights (ALGORITHMS.md §4).

Huang et al., "Antidote: Post-fine-tuning Safety Alignment for Large Language Models against
Harmful Fine-tuning", ICML 2025, arXiv 2408.09600, code `git-disl/Antidote`.

After the user's (possibly harmful) fine-tune, the Wanda importance score is computed on a
re-alignment set of harmful prompt -> harmful answer pairs and the most important weights are
zeroed (project page equations):

    [h(w, D)]_j = |w_j| * ||X_j||_2            (Wanda score; X_j = column j of the layer inputs)
    m = ArgTopK_alpha(h(w_hat, D_realign))     w_tilde = (1 - m) * w_hat

As in the authors' code (`utils.py::prune_wanda_outlier`), by default
  * the scored tensors are the lora_A / lora_B factors of the user's (last) LoRA adapter, every
    earlier adapter merged into the base; lora_A sees the layer input, lora_B sees lora_A's output;
  * ||X_j||_2^2 is Wanda's `scaler_row`: sum over all calibration tokens of X_j^2, divided by
    the number of calibration sequences (WrappedGPT.add_batch with one sequence per call);
  * the top-alpha comparison group is each output ROW of the score (Wanda's), and a row keeps its
    int(cols * (1 - alpha)) lowest-scored entries (stable ascending sort), so it zeroes
    cols - int(cols * (1 - alpha)) entries: ceil(alpha * cols) up to float rounding, not floor
    (e.g. a rank-8 lora_B row at alpha 0.1 loses 1 entry, a 64-wide row loses 7).
`scope="global"` is the paper's formula read literally (one ArgTopK over all scored weights, same
count rule on the total, ties broken like the stable sort). `target="dense"` scores the merged
weights of chosen linears instead (the code's `--full_finetuning True` uses q/k/v, our default).

Where we differ from the original code, and why:
  * One batched forward over the calibration set with hooks on every scored layer, instead of the
    layer-by-layer "Catcher" loop at batch size 1. The original never applies a mask between
    layers (masks are only collected, then applied at the end), so its per-layer inputs are those
    of the unpruned model: exactly what one forward sees. The sequences go through longest first (little
    padding) and each forward stops after the last scored layer (the LM head never runs); see `calibrate`.
  * Padding positions are not counted (the original feeds right-padded batches, so pad tokens add
    to ||X_j||); only real tokens count here.
  * Calibration size defaults to 500 (original 2000), capped by what the data source holds;
    `calibration_n=0` is the original's `--sample_num 0` fallback: magnitude |W| only.
  * The pruned adapter is written by masking the tensors of the adapter file itself (no peft
    re-save), so untouched entries keep their bytes and dtype; ratio 0 is the identity, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ftsafety import data as D
from ftsafety import distributed, models
from ftsafety.defenses.base import Defense, Paper
from ftsafety.rundir import write_run
from ftsafety.errors import FtsafetyError
from ftsafety.utils import (
    locks_output,
    check_not_input, check_writable_dir, resolve_device, seed_everything,
)

log = logging.getLogger(__name__)

PAPER = Paper("Antidote: Post-fine-tuning Safety Alignment for Large Language Models against Harmful Fine-tuning",
              "ICML 2025", "2408.09600", "git-disl/Antidote")
TARGETS = ("lora", "dense")
SCOPES = ("row", "global")
SCORES = ("wanda", "random")
MASK_FILE = "mask.safetensors"
SUMMARY_FILE = "antidote.json"
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class AntidoteConfig:
    ratio: float = field(
        default=0.1, metadata={"help": "alpha, share of weights zeroed (code dense_ratio; 0.05-0.2)"}
    )
    target: str = field(
        default="lora", metadata={"help": "lora: the user's LoRA factors (code); dense: merged (paper)"}
    )
    scope: str = field(
        default="row", metadata={"help": "row: top-alpha per output row (code); global: one ArgTopK (paper)"}
    )
    calibration_n: int = field(
        default=500, metadata={"help": "harmful calibration pairs (original 1,999: rows 5001-6999); 0 = |W| only"}
    )
    batch_size: int = field(default=8, metadata={"help": "calibration forward batch size"})
    dense_targets: str = field(
        default="qkv", metadata={"help": "linears scored with target=dense (original: q, k, v)"}
    )
    score: str = field(
        default="wanda", metadata={"key_when_set": True, "help": "wanda: |W| x input norm (the method) | random: the paper's random-"
                                           "pruning baseline, the same number of weights per row chosen at random"}
    )

    def __post_init__(self):
        if not 0.0 <= self.ratio <= 1.0:
            raise FtsafetyError(f"prune ratio must be in [0, 1], got {self.ratio}")
        if self.target not in TARGETS:
            raise FtsafetyError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.scope not in SCOPES:
            raise FtsafetyError(f"unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        if self.calibration_n < 0:
            raise FtsafetyError(f"calibration size must be >= 0, got {self.calibration_n}")
        if self.batch_size < 1:
            raise FtsafetyError(f"batch size must be >= 1, got {self.batch_size}")
        if self.score not in SCORES:
            raise FtsafetyError(f"unknown score {self.score!r}; choose one of {', '.join(SCORES)}")


# ---------------------------------------------------------------------------------------------
# Scores and masks


class _Stop(Exception):
    """Raised by the hook of the last scored layer: what the forward would compute after it is not used."""


class InputNorms:
    """Forward hooks that accumulate Wanda's `scaler_row` (sum of X_j^2 over real tokens, over the
    number of sequences) for each given Linear. Call `batch(attention_mask)` before each forward.

    Each hook adds its batch's sum in place into its own buffer; layers fed the same input tensor (q, k
    and v, or their lora_A) share one computation of that sum. With `stop_early`, the first forward records
    the order in which the layers run; when each ran exactly once, later forwards stop (`_Stop`) right
    after the last of them, so the layers after it and the LM head never run.
    """

    def __init__(self, modules: dict[str, torch.nn.Linear], stop_early: bool = False):
        self.modules = modules
        self.sumsq = {
            n: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device) for n, m in modules.items()
        }
        self.n_samples = 0
        self.n_tokens = 0
        self.stop_after: str | None = None  # the last scored layer of a forward, once known
        self._recording = stop_early
        self._order: list[str] = []  # layers in the order the first forward ran them
        self._mask: torch.Tensor | None = None
        self._keep: torch.Tensor | None = None
        self._last_input: torch.Tensor | None = None
        self._last_sum: torch.Tensor | None = None
        self._handles: list = []

    def batch(self, attention_mask: torch.Tensor) -> None:
        if self._recording and self._order:  # the first forward is over: learn where to stop
            self._recording = False
            if len(self._order) == len(set(self._order)) == len(self.modules):
                self.stop_after = self._order[-1]
        self.end_batch()
        self._mask = attention_mask.bool()
        self.n_samples += attention_mask.shape[0]
        self.n_tokens += int(self._mask.sum())

    def end_batch(self) -> None:
        """Drop the references to the last batch's tensors."""
        self._keep = self._last_input = self._last_sum = None

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            if x is self._last_input:  # the tensor the previous hook saw (q/k/v): the same sum
                part = self._last_sum
            else:
                flat = x.detach().reshape(-1, x.shape[-1])
                if self._keep is None or self._keep.device != flat.device:
                    self._keep = self._mask.reshape(-1, 1).to(flat.device)
                if flat.shape[0] != self._keep.shape[0]:
                    raise FtsafetyError(f"{name}: its input {tuple(x.shape)} does not line up with the batch's tokens")
                # padding rows weigh 0 (cheaper than boolean indexing on CPU)
                part = (flat.float().square() * self._keep).sum(0)
                self._last_input, self._last_sum = x, part
            self.sumsq[name].add_(part)
            if self._recording:
                self._order.append(name)
            elif name == self.stop_after:
                raise _Stop
        return hook

    def __enter__(self) -> InputNorms:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.end_batch()

    def scaler(self, name: str) -> torch.Tensor:
        if self.n_samples == 0:
            raise FtsafetyError("no calibration sequence was seen")
        return self.sumsq[name] / self.n_samples


def wanda_score(weight: torch.Tensor, scaler: torch.Tensor | None) -> torch.Tensor:
    """S_ij = |W_ij| * sqrt(scaler_j); magnitude |W| when there is no calibration data."""
    s = weight.detach().abs().float()
    return s if scaler is None else s * torch.sqrt(scaler.to(s.device)).reshape(1, -1)


def n_zeroed(n: int, ratio: float) -> int:
    """How many of `n` entries the original zeroes: it keeps int(n * (1 - ratio)) of them."""
    return n - int(n * (1 - ratio))


def row_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """True on the top entries of each row (the code's stable ascending sort, lowest kept)."""
    keep = int(score.shape[1] * (1 - ratio))
    mask = torch.ones_like(score, dtype=torch.bool)
    mask.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :keep], False)
    return mask


def global_masks(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """One ArgTopK over all scores (paper formula); ties resolved as a stable sort of the
    concatenation would (later positions are zeroed first)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = n_zeroed(flat.numel(), ratio)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        threshold = torch.kthvalue(flat.cpu(), flat.numel() - k + 1).values.to(flat.device)
        chosen = flat > threshold
        ties = torch.nonzero(flat == threshold).flatten()
        need = k - int(chosen.sum())
        chosen[ties[ties.numel() - need:]] = True
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = chosen[start:start + s.numel()].reshape(s.shape)
        start += s.numel()
    return out


def wanda_masks(scores: dict[str, torch.Tensor], ratio: float, scope: str = "row") -> dict[str, torch.Tensor]:
    """Boolean masks, True = weight to zero (the code's `bad_mask`)."""
    if scope == "global":
        return global_masks(scores, ratio)
    return {name: row_mask(s, ratio) for name, s in scores.items()}


# ---------------------------------------------------------------------------------------------
# The run


def calibrate(
    model, modules: dict[str, torch.nn.Linear], examples: list[dict], tokenizer, data_cfg: D.DataConfig,
    batch_size: int, quiet: bool = True, sort_by_length: bool = True, stop_early: bool = True,
    shard: bool = False,
) -> InputNorms:
    """One batched forward (no pruning in between) with input hooks on every scored Linear.

    sort_by_length: the sequences go through longest first, so similar lengths share a batch and little
    padding is computed; the sums then add the same numbers in another order, equal up to float rounding
    (a mask can only tell at an exact near-tie of two scores in a row). stop_early: each forward stops
    after the last scored layer (no later layer, no LM head); the sums are bit for bit the same.
    Both off: the sequences in their order, whole forwards (the path before these speed-ups).
    shard (several processes, every one must call): process r runs batches r, r + P, ... and the sums and
    counts are added up over the processes (one all-reduce), so every process gets the whole set's.
    """
    from ftsafety.console import progress

    dataset = D.SFTDataset(examples, tokenizer, data_cfg)
    collate = D.Collator(tokenizer.pad_token_id)
    order = list(range(len(dataset)))
    if sort_by_length:  # longest first: the first batch (which records the layers' order) is the widest
        order.sort(key=lambda i: -len(dataset[i]["input_ids"]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    sharded = shard and distributed.world_size() > 1
    if sharded:
        batches = distributed.shard(batches)
    dev = next(model.parameters()).device
    model.eval()
    with InputNorms(modules, stop_early=stop_early) as rec, torch.inference_mode(), progress(disable=quiet) as bar:
        task = bar.add_task("antidote calibration", total=len(dataset), info="")
        for idx in batches:
            batch = collate([dataset[i] for i in idx])
            rec.batch(batch["attention_mask"])
            ids, att = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
            with contextlib.suppress(_Stop):
                model(input_ids=ids, attention_mask=att, use_cache=False)
            bar.advance(task, len(idx))
    if sharded:  # each process saw its share of the batches: add up the statistics
        distributed.all_reduce_sum_tensors([rec.sumsq[n] for n in modules])
        counts = torch.tensor([rec.n_samples, rec.n_tokens], dtype=torch.long, device=dev)
        distributed.all_reduce_sum_(counts)
        rec.n_samples, rec.n_tokens = (int(c) for c in counts.tolist())
    for name in modules:
        if not bool(rec.sumsq[name].any()) and rec.n_tokens:
            log.warning("%s received no (non-zero) calibration input", name)
    return rec


def _lora_modules(peft_model, adapter_name: str = "default") -> dict[str, torch.nn.Linear]:
    ends = (f".lora_A.{adapter_name}", f".lora_B.{adapter_name}")
    return {n: m for n, m in peft_model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(ends)}


def _module_type(name: str, target: str) -> str:
    parts = name.split(".")
    return f"{parts[-3]}.{parts[-2]}" if target == "lora" else parts[-1]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def finetune_seconds(model: str) -> float | None:
    """Training seconds of the fine-tuning run `model` (its train_results.json), to compare costs."""
    path = Path(model).expanduser() / "train_results.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return float(json.loads(path.read_text())["seconds"])
    return None


def _adapter_stage(adapter: str) -> str:
    """The stage that wrote an adapter (its run's manifest), "" when it is not an ftsafety run's."""
    try:
        return str(json.loads((Path(adapter).parent / models.RUN_MANIFEST).read_text()).get("stage", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _pruned_modules(net, cfg: AntidoteConfig, what: str) -> dict[str, torch.nn.Linear]:
    """The Linear layers Antidote scores: the LoRA A/B layers of a peft model (target lora), or the base
    layers named by `dense_targets` (target dense)."""
    if cfg.target == "lora":
        modules = _lora_modules(net)
        if not modules:
            raise FtsafetyError(f"{what}: no LoRA linear layers found to prune")
        return modules
    wanted = set(models.resolve_targets(net, cfg.dense_targets))
    return {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in wanted}


def _score_and_mask(modules: dict, rec: InputNorms | None, cfg: AntidoteConfig, seed: int,
                    zero: bool) -> dict[str, torch.Tensor]:
    """Each module's mask (True = zeroed) from its scores; `zero` also zeroes those weights in place."""
    with torch.no_grad():
        if cfg.score == "random":  # seeded, so the baseline is reproducible; CPU generator on every device
            gen = torch.Generator().manual_seed(seed)
            scores = {n: torch.rand(m.weight.shape, generator=gen).to(m.weight.device) for n, m in modules.items()}
        else:
            scores = {n: wanda_score(m.weight, rec.scaler(n) if rec else None) for n, m in modules.items()}
        masks = wanda_masks(scores, cfg.ratio, cfg.scope)
        del scores
        if zero:
            for n, m in modules.items():
                m.weight.masked_fill_(masks[n].to(m.weight.device), 0)
    return masks


def prune_antidote(model, tokenizer, calibration_examples: list[dict], config: AntidoteConfig | None = None,
                   data_cfg: D.DataConfig | None = None, seed: int = 42) -> dict[str, torch.Tensor]:
    """Antidote on a model in memory: score the weights on `calibration_examples` (harmful pairs,
    `{"instruction", "input", "output"}`, e.g. `harmful_examples(data, "calibration")[:64]`), zero the
    selected ones in place and return the masks (True = zeroed) by module name. `model` is a peft model
    (target lora: its LoRA A/B weights, as `prune-antidote` prunes the last adapter) or any causal LM
    (target dense). `prune-antidote` writes the same weights to a run directory."""
    cfg = config or AntidoteConfig()
    data_cfg = data_cfg or D.DataConfig()
    seed_everything(seed)
    modules = _pruned_modules(model, cfg, type(model).__name__)
    use_data = cfg.calibration_n and cfg.score == "wanda"
    examples = list(calibration_examples)[: cfg.calibration_n] if use_data else []
    if use_data and not examples:
        raise FtsafetyError("the calibration set is empty")
    model.eval()
    rec = calibrate(model, modules, examples, tokenizer, data_cfg, cfg.batch_size) if examples else None
    return _score_and_mask(modules, rec, cfg, seed, zero=True)


@locks_output("out_dir")
def run_antidote(
    cfg: AntidoteConfig, model: str, data_cfg: D.DataConfig, out_dir: str | Path, device: str = "auto",
    seed: int = 42, trust_remote_code: bool = False, quiet: bool = False,
) -> dict:
    """Prune the fine-tuned `model` and write a run directory (atomically); returns the summary.

    lora target: `adapter/` (the pruned last adapter, peft format) and a `ftsafety_run.json` whose
    chain is the parent's with its last adapter replaced. dense target: `model/` (full model and
    tokenizer) and a manifest with that directory as base model and no adapters. Both hold
    `mask.safetensors` (True = zeroed, one tensor per pruned weight), `antidote.json`, `config.yaml`.

    Several processes (accelerate launch / torchrun): the calibration batches are split over the
    processes and the input-norm sums added up (all-reduce); every process then scores and masks the
    same numbers, the main one writes the run directory and every one returns its summary.
    """
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out_dir = check_writable_dir(out_dir, "antidote")
    seed_everything(seed)
    dev = resolve_device(device)
    if distributed.launched():
        distributed.init(dev)
    spec = models.resolve(model)
    check_not_input(out_dir, [model, spec.base, *spec.adapters])
    if cfg.target == "lora" and not spec.adapters:
        raise FtsafetyError(
            f"{model} has no LoRA adapter to prune; pass a fine-tuning run directory or use --target dense"
        )
    stage = _adapter_stage(spec.adapters[-1]) if cfg.target == "lora" else ""
    if stage.startswith("align"):
        raise FtsafetyError(
            f"{model}'s last adapter is an alignment ({stage}), not a fine-tune: Antidote "
            "prunes the fine-tuned adapter (pass the fine-tuning run, or --target dense to prune the merged model)"
        )
    use_data = cfg.calibration_n and cfg.score == "wanda"  # the random baseline reads no harmful data
    examples = D.harmful_examples(data_cfg, "calibration")[: cfg.calibration_n] if use_data else []
    if use_data and not examples:
        raise FtsafetyError("the calibration set is empty")
    t0 = time.perf_counter()
    if cfg.target == "lora":
        parent = models.ModelSpec(base=spec.base, adapters=spec.adapters[:-1], source=spec.source)
        net, tok, _ = models.load(parent, device=dev, trust_remote_code=trust_remote_code)
        last = spec.adapters[-1]
        models.check_adapter_matches(last, net)
        net = PeftModel.from_pretrained(net, last)
    else:
        net, tok, _ = models.load(spec, device=dev, trust_remote_code=trust_remote_code)
    modules = _pruned_modules(net, cfg, spec.adapters[-1] if cfg.target == "lora" else model)
    net.eval()
    load_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    rec = (calibrate(net, modules, examples, tok, data_cfg, cfg.batch_size, quiet or not distributed.is_main(),
                     shard=True) if examples else None)
    _sync(dev)
    calibration_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    masks = _score_and_mask(modules, rec, cfg, seed, zero=cfg.target == "dense")
    _sync(dev)
    prune_seconds = time.perf_counter() - t0

    # Mask keys: adapter state-dict keys (lora) or model parameter names (dense).
    keyed = {
        (n.rsplit(".", 1)[0] if cfg.target == "lora" else n) + ".weight": mk.cpu().contiguous()
        for n, mk in masks.items()
    }
    by_type: dict[str, dict[str, int]] = {}
    for n, mk in masks.items():
        entry = by_type.setdefault(_module_type(n, cfg.target), {"zeroed": 0, "numel": 0})
        entry["zeroed"] += int(mk.sum())
        entry["numel"] += mk.numel()
    zeroed, numel = sum(e["zeroed"] for e in by_type.values()), sum(e["numel"] for e in by_type.values())

    def write_on_main() -> dict:  # several processes: the main one writes, the others wait for its summary
        t0 = time.perf_counter()
        final = Path(out_dir)
        manifest = {}

        def files(tmp: Path) -> None:
            meta = {"ratio": str(cfg.ratio), "scope": cfg.scope, "target": cfg.target, "meaning": "true = zeroed"}
            save_file(keyed, str(tmp / MASK_FILE), metadata=meta)
            extra = {"stage": "antidote", "parent": model, "target": cfg.target}
            if cfg.target == "lora":
                src = Path(last) / ADAPTER_FILE
                if not src.is_file():
                    raise FtsafetyError(f"{last}: no {ADAPTER_FILE} (only safetensors adapters can be pruned)")
                shutil.copytree(last, tmp / "adapter")
                with safe_open(str(src), framework="pt") as fh:
                    file_meta = fh.metadata()
                state = load_file(str(src))
                for key, mk in keyed.items():
                    if key not in state:
                        raise FtsafetyError(f"{last}: tensor {key} of the adapter is not in {ADAPTER_FILE}")
                    state[key] = state[key].masked_fill(mk, 0)
                save_file(state, str(tmp / "adapter" / ADAPTER_FILE), metadata=file_meta)
                manifest.update(models.run_manifest(parent, tmp / "adapter", final, extra))
            else:
                net.save_pretrained(tmp / "model", safe_serialization=True)
                tok.save_pretrained(tmp / "model")
                base = str((final / "model").resolve())
                manifest.update({"base_model": base, "base_relpath": "model", "adapters": [], **extra})

        def results() -> dict:
            ft_seconds = finetune_seconds(model)
            return {
                "stage": "antidote", "paper": PAPER.asdict(), "target": cfg.target, "scope": cfg.scope, "ratio": cfg.ratio,
                "n_calibration": len(examples), "n_positions": rec.n_tokens if rec else 0,
                "zeroed": zeroed, "numel": numel, "zeroed_fraction": zeroed / numel if numel else 0.0,
                "n_tensors": len(masks), "by_type": by_type,
                "calibration_seconds": round(calibration_seconds, 4), "prune_seconds": round(prune_seconds, 4),
                "load_seconds": round(load_seconds, 4), "save_seconds": round(time.perf_counter() - t0, 4),
                "finetune_seconds": ft_seconds,
                "cost_vs_finetune": (
                    round((calibration_seconds + prune_seconds) / ft_seconds, 4) if ft_seconds else None
                ),
            }

        config = {"stage": "antidote", "parent": model, "parent_resolved": dataclasses.asdict(spec),
                  "antidote": dataclasses.asdict(cfg), "data": dataclasses.asdict(data_cfg), "device": str(dev),
                  "seed": seed}
        return write_run(final, config=config, results_file=SUMMARY_FILE, results=results, files=files,
                         manifest=lambda tmp: manifest)

    summary = distributed.run_on_main(write_on_main)
    log.info("antidote: zeroed %d of %d weights in %d tensors -> %s", zeroed, numel, len(masks), out_dir)
    return summary


def _run(cfg: AntidoteConfig, model: str, aligned: str, task: str, out, common) -> dict:
    return run_antidote(cfg, model, common.data, out, device=common.device, seed=common.seed,
                        trust_remote_code=common.trust_remote_code, quiet=common.quiet)


DEFENSE = Defense(
    name="antidote", stage="post", command="prune-antidote", config_cls=AntidoteConfig, paper=PAPER,
    summary="Zero the weights with the highest Wanda score on harmful data, after fine-tuning.",
    neutral={"ratio": 0.0}, run=_run,
    check_data=lambda cfg, common, task: D.check_rows(
        "antidote.calibration_n", cfg.calibration_n, len(D.harmful_examples(common.data, "calibration"))),
    done_line=lambda s, out: (
        f"prune-antidote: zeroed {s['zeroed']} of {s['numel']} weights ({100 * s['zeroed_fraction']:.2f}%) "
        f"in {s['n_tensors']} tensors; calibration {s['calibration_seconds']:.1f}s on {s['n_calibration']} "
        f"samples; wrote {out} (pass it as --model to evaluate)"),
)
