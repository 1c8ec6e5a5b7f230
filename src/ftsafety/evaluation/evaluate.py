"""`ftsafety evaluate`: HS / HS+ on held-out harmful prompts, FA on the task, OR on benign instructions."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path


from ftsafety import data as D
from ftsafety import distributed, models, prompt_sets
from ftsafety.console import console, progress
from ftsafety.errors import FtsafetyError
from ftsafety.evaluation.settings import EvalSettings
from ftsafety.evaluation.generate import generate_with_counts
from ftsafety.evaluation.judges import check_judge_spec, get_judge, is_incoherent, is_refusal, judge_record
from ftsafety.evaluation.tasks import accuracy_by_label, is_correct
from ftsafety.rundir import write_run
from ftsafety.utils import (check_not_input, check_writable_dir, environment, locks_output, resolve_device,
                            resolve_precision, seed_everything, write_jsonl)

log = logging.getLogger(__name__)


@dataclass
class EvalConfig(EvalSettings):
    """An evaluation: the settings plus the model, data, task, device and seed."""

    model: str = models.DEFAULT_MODEL
    data: D.DataConfig = field(default_factory=D.DataConfig)
    task: str = "sst2"  # sst2 | ag_news | gsm8k | none
    device: str = "auto"
    dtype: str = "auto"  # auto | fp32 | bf16: the generation's arithmetic (the judge runs in fp32)
    seed: int = 42
    trust_remote_code: bool = False  # a model aligned with --trust-remote-code is evaluated with it

    def __post_init__(self):
        super().__post_init__()
        if self.task not in (*D.TASKS, "none"):
            raise FtsafetyError(f"unknown task {self.task!r}; choose one of {', '.join(D.TASKS)} or none")


def _item(p, i: int) -> dict:
    """A harmful prompt given to `evaluate(prompts=...)`: a string or a {"prompt", "category"} dict."""
    text = p.get("prompt") if isinstance(p, dict) else p
    if not isinstance(text, str) or not text.strip():
        raise FtsafetyError(f"prompts[{i - 1}]: expected a non-empty string or a dict with a 'prompt', got {p!r:.60}")
    return {"prompt": text, "category": str(p.get("category") or "unknown") if isinstance(p, dict) else "unknown"}


def score_hs(judge, items: list[dict], responses: list[str]) -> tuple[dict, list[dict]]:
    """HS (judge-flagged share), HS+ (flagged or incoherent), HS per category and, where the judge labels
    every answer refusal / compliance / harmful, the compliance rate (CR: not a refusal) and the label
    counts, with their samples."""
    verdicts = judge([it["prompt"] for it in items], responses)
    flagged = [v.flagged for v in verdicts]
    incoherent = [is_incoherent(r) for r in responses]
    n = len(items)
    part = {"hs": 100.0 * sum(flagged) / n, "hs_plus": 100.0 * sum(f or i for f, i in zip(flagged, incoherent)) / n,
            "hs_n": n, "hs_by_category": _by_category(items, flagged)}
    labels = [v.label for v in verdicts]
    if n and all(label is not None for label in labels):
        part.update({"cr": 100.0 * sum(label != "refusal" for label in labels) / n, "cr_n": n,
                     "labels": {c: labels.count(c) for c in ("refusal", "compliance", "harmful")}})
    samples = [{"kind": "harmful", "category": it["category"], "prompt": it["prompt"], "response": r,
                "flagged": v.flagged, "incoherent": inc, "verdict": v.detail,
                **({"label": v.label} if v.label is not None else {})}
               for it, r, v, inc in zip(items, responses, verdicts, incoherent)]
    return part, samples


def _score_fa(task: str, exs: list[dict], outs: list[str]) -> tuple[dict, list[dict]]:
    """FA: the task's own rule (`ftsafety.tasks`) on each answer."""
    correct = [is_correct(task, o, e["gold"]) for o, e in zip(outs, exs)]
    part = {"fa": 100.0 * sum(correct) / len(exs), "fa_n": len(exs), "task": task}
    by_gold = accuracy_by_label(task, [e["gold"] for e in exs], correct)
    if by_gold:
        part["fa_by_gold"] = by_gold
    samples = [{"kind": "task", "task": task, "prompt": e["input"] or e["instruction"], "response": o,
                "gold": e["gold"], "correct": c} for e, o, c in zip(exs, outs, correct)]
    return part, samples


def _score_or(items: list[dict], outs: list[str]) -> tuple[dict, list[dict]]:
    """OR: the share of benign instructions answered with a refusal (keyword rule)."""
    refused = [is_refusal(o) for o in outs]
    part = {"or": 100.0 * sum(refused) / len(items), "or_n": len(items)}
    samples = [{"kind": "benign", "prompt": it["prompt"], "response": o, "refused": r}
               for it, o, r in zip(items, outs, refused)]
    return part, samples


@locks_output("out_dir")
def evaluate(cfg: EvalConfig, out_dir: str | Path | None = None, model=None, tokenizer=None, quiet: bool = False,
             prompts: list | None = None) -> dict:
    """Run the evaluator; write `results.json`, `samples.jsonl`, `config.yaml` to `out_dir` (atomically).

    `model`/`tokenizer`: a model in memory instead of `cfg.model`. `prompts`: the harmful prompts to
    score, as strings or `{"prompt", "category"}` dicts, instead of `cfg.hs_prompts` (the first
    `cfg.hs_limit` of them).

    Launched with several processes (accelerate launch / torchrun): each process decodes its share of
    the generation batches (the batches of a one-process run, so the same texts), the texts are
    gathered back in order, the main process judges and writes, and every process returns its results."""
    if out_dir is not None:
        out_dir = check_writable_dir(out_dir, "evaluate")
        if model is None:
            spec = models.resolve(cfg.model)
            check_not_input(out_dir, [cfg.model, spec.base, *spec.adapters])
    seed_everything(cfg.seed)
    dev = resolve_device(cfg.device)
    precision = resolve_precision(cfg.dtype, dev)
    if distributed.launched():
        distributed.init(dev)
    main = distributed.is_main()
    quiet = quiet or not main  # one progress display and one table
    judge = get_judge(cfg.judge, device=dev)  # fail on a bad judge name before any generation
    check_judge_spec(cfg.judge)  # and on a judge directory that is not there
    # every data set is read (and checked) before the model loads: bad data fails in a second
    if prompts is not None:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise FtsafetyError(f"prompts must be a list of prompts (strings or {{'prompt', 'category'}} dicts), got "
                                f"{type(prompts).__name__}{': wrap a single prompt in a list' if isinstance(prompts, str) else ''}")
        if not prompts:
            raise FtsafetyError("prompts is an empty list: give the harmful prompts to score, or leave it out")
        hs_items = [_item(p, i) for i, p in enumerate(prompts[: cfg.hs_limit or None], 1)] if cfg.hs_limit else []
    else:
        hs_items = prompt_sets.items(cfg.hs_prompts, "harmful", cfg.data, cfg.hs_limit, cfg.prompt_field) if cfg.hs_limit else []
    fa_exs = D.task_examples(cfg.data, cfg.task, "test", cfg.fa_limit) if cfg.task != "none" and cfg.fa_limit else []
    or_items = prompt_sets.items(cfg.or_prompts, "benign", cfg.data, cfg.or_limit, cfg.prompt_field) if cfg.or_limit else []
    t_start = time.perf_counter()
    in_memory = None
    if model is None:
        model, tokenizer, _ = models.load(cfg.model, device=dev, dtype=precision.weights,
                                          trust_remote_code=cfg.trust_remote_code)
    else:  # what was scored is the model given, not cfg.model
        if tokenizer is None:
            raise FtsafetyError("evaluate(model=...) needs tokenizer=... (the model's own tokenizer)")
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        in_memory = f"in-memory {type(model).__name__}" + (f" ({name})" if name else "")
    samples: list[dict] = []
    results: dict = {"model": cfg.model if in_memory is None else in_memory, "judge": judge_record(judge), "seed": cfg.seed,
                     "hs_prompts": cfg.hs_prompts if prompts is None else f"custom prompts ({len(hs_items)})",
                     "or_prompts": cfg.or_prompts}
    timings: dict[str, float] = {}
    gen_tokens = 0
    gen_stats: dict[str, dict] = {"hs": {}, "fa": {}, "or": {}}  # which engine decoded each part, and why

    def decode(part: str, exs: list[dict], max_new: int, what: str, flag: str, label: str):
        """Completions (and generated-token counts) of one part, batched and sharded like the others."""
        prompts = [D.format_prompt(e, cfg.data.template, tokenizer) for e in exs]
        prompts = _fit_context(model, tokenizer, prompts, max_new, what, flag)
        with precision.autocast():
            return generate_with_counts(model, tokenizer, prompts, max_new, cfg.batch_size, prog, label, shard=True,
                                        stats=gen_stats[part])

    with progress(disable=quiet) as prog:
        if hs_items:
            t0 = time.perf_counter()
            responses, counts = decode("hs", [{"instruction": it["prompt"], "input": ""} for it in hs_items],
                                       cfg.max_new_tokens, "harmful prompt", "--max-new-tokens", "harmful prompts")
            gen_tokens += sum(counts)  # tokens generated before EOS, counted by generate (no re-tokenising)
            timings["hs_generation_s"] = time.perf_counter() - t0
            if main:  # the judge runs on the main process only (its results are shared at the end)
                t0 = time.perf_counter()
                part, part_samples = score_hs(judge, hs_items, responses)
                timings["hs_judge_s"] = time.perf_counter() - t0
                results.update(part)
                samples += part_samples
        judge.close()
        if fa_exs:
            t0 = time.perf_counter()
            outs, _ = decode("fa", fa_exs, cfg.fa_max_new_tokens, f"{cfg.task} test item", "--fa-max-new-tokens",
                             f"{cfg.task} test")
            part, part_samples = _score_fa(cfg.task, fa_exs, outs)
            timings["fa_s"] = time.perf_counter() - t0
            results.update(part)
            samples += part_samples
        if or_items:
            t0 = time.perf_counter()
            outs, _ = decode("or", [{"instruction": it["prompt"], "input": ""} for it in or_items],
                             cfg.max_new_tokens, "benign prompt", "--max-new-tokens", "benign prompts")
            part, part_samples = _score_or(or_items, outs)
            timings["or_s"] = time.perf_counter() - t0
            results.update(part)
            samples += part_samples
    timings["total_s"] = time.perf_counter() - t_start
    results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    results["generated_tokens_hs"] = gen_tokens
    results["generation"] = _generation_record(gen_stats)
    results["precision"] = precision.record()
    results["environment"] = environment()

    def write() -> dict:  # several processes: the main one writes, the others wait and get its results
        if out_dir is not None:
            write_run(out_dir, config=dataclasses.asdict(cfg), results_file="results.json", results=results,
                      files=lambda tmp: write_jsonl(tmp / "samples.jsonl", samples))
        return results

    results = distributed.run_on_main(write)
    if not quiet:
        print_results(results)
    return results


def _generation_record(stats: dict[str, dict]) -> dict:
    """Which engine decoded and why (`generate_from_ids` stats), one value per key where every part that
    ran agrees, else the value of each part (e.g. HS on batches of 64 by our loop, FA on 40 by generate)."""
    parts = {part: st for part, st in stats.items() if st}
    out: dict = {}
    for key in ("engine", "shared_prefix", "fallback_reason", "engine_reason"):
        values = {part: st[key] for part, st in parts.items() if key in st}
        if values:
            same = len(set(map(repr, values.values()))) == 1 and len(values) == len(parts)
            out[key] = next(iter(values.values())) if same else values
    return out


def _fit_context(model, tokenizer, prompts: list[str], max_new_tokens: int, what: str, flag: str) -> list[str]:
    """The prompts, unchanged, once each is known to fit the model's context with its answer; a prompt
    that does not is a one-line error (a learned-position model would crash mid-run; the others would
    generate past what they were trained on)."""
    ctx = models.context_length(model)
    if not ctx:
        return prompts
    for i, p in enumerate(prompts, 1):
        if len(p) > 64 * ctx:  # no token spans 64 characters: too long to fit, known without tokenising it
            raise FtsafetyError(f"{what} {i} is {len(p):,} characters, far more than the model's context of {ctx} "
                                f"tokens can hold (shorten the prompts)")
        n = len(D.encode_prompt(tokenizer, p))
        if n + max_new_tokens > ctx:
            raise FtsafetyError(
                f"{what} {i} is {n} tokens: with {flag} {max_new_tokens} it is longer than the model's context "
                f"of {ctx} tokens (shorten the prompts or lower {flag})"
            )
    return prompts


def _by_category(items: list[dict], flagged: list[bool]) -> dict[str, float]:
    tot: dict[str, list[int]] = {}
    for it, f in zip(items, flagged):
        t = tot.setdefault(it["category"], [0, 0])
        t[0] += int(f)
        t[1] += 1
    return {k: round(100.0 * a / b, 1) for k, (a, b) in sorted(tot.items())}


def print_results(results: dict) -> None:
    from rich.table import Table

    table = Table(title=f"ftsafety evaluate: {results['model']}  (judge: {results['judge']['name']})")
    for col in ("HS %", "CR %", "HS+ %", "FA %", "OR %", "n (HS/FA/OR)", "time"):
        table.add_column(col, justify="right")

    def fmt(k):
        return f"{results[k]:.1f}" if k in results else "-"

    table.add_row(
        fmt("hs"), fmt("cr"), fmt("hs_plus"), fmt("fa"), fmt("or"),
        f"{results.get('hs_n', 0)}/{results.get('fa_n', 0)}/{results.get('or_n', 0)}",
        f"{results['timings']['total_s']:.0f}s",
    )
    console.print(table)
    if results.get("labels"):
        console.print("Answers by label: " + ", ".join(f"{k} {v}" for k, v in results["labels"].items())
                      + "  (CR: compliance rate, % not refused)")
    if results.get("fa_by_gold"):
        console.print("FA by gold label: " + ", ".join(f"{label} {v['fa']:.1f}% (n={v['n']})"
                                                       for label, v in results["fa_by_gold"].items()))
