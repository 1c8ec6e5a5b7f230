"""Benchmark: the cost of the post-fine-tuning defenses relative to the fine-tune they repair.

Run as:  python scripts/bench_post.py [--model smollm2-135m] [--ft-n 1000] [--ft-epochs 1] [--batch-size 8]
         [--calibration-n 500] [--rollback-steps 20] [--val-n 100] [--threads 1] [--data builtin]

In one process it aligns briefly (--align-steps), fine-tunes (p=0.1 harmful on SST-2, --ft-n examples for
--ft-epochs epochs, no checkpoints; the training time of train_results.json), then runs Antidote (one
calibration pass over --calibration-n harmful pairs + pruning) and rollback recovery (the defaults of
`recover-rollback`: 20 steps, 5 warm-up, 64 harmful prompts, FA checks on 100 SST-2 rows) on that
fine-tune. Each ratio is the defense's time over the fine-tune's training time: Antidote's calibration
(its forward pass; the whole command with loading and saving is reported beside it) and rollback's
recovery procedure (steps + task checks, without loading and saving the models; the whole command
beside it). Point `--finetuned RUN --aligned RUN` at existing runs to skip training (the fine-tune's
recorded seconds are used).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ftsafety import data as D
from ftsafety import models
from ftsafety.defenses.antidote import AntidoteConfig, run_antidote
from ftsafety.defenses.rollback import RollbackConfig
from ftsafety.defenses.rollback import run as run_rollback
from ftsafety.train import TrainConfig, train_lora
from ftsafety.utils import resolve_device

_tokenizer_cache: dict = {}


def _tokenizer(model: str):
    if model not in _tokenizer_cache:
        _tokenizer_cache[model] = models.load(model, device="cpu")[1]
    return _tokenizer_cache[model]


def _tokens(examples: list[dict], model: str, dcfg: D.DataConfig) -> int:
    """Tokens of the examples as training sees them (prompt + answer + EOS, cut at max_length)."""
    return sum(len(x["input_ids"]) for x in D.SFTDataset(examples, _tokenizer(model), dcfg))


def _prompt_tokens(examples: list[dict], model: str, dcfg: D.DataConfig) -> int:
    """Tokens of the examples' prompts alone (what rollback's direction passes see)."""
    tok = _tokenizer(model)
    return sum(len(tok(D.format_prompt(e, dcfg.template, tok), add_special_tokens=True)["input_ids"]) for e in examples)


def _checks(rb: dict, cfg: RollbackConfig) -> int:
    """Task checks rollback ran: F's, the one after the warm-up, and one per later checkpoint (outside
    rollback mode the warm-up's check is also its first checkpoint)."""
    shared = 1 if cfg.warmup_steps and not rb["rollback_mode"] and rb["checkpoints"] else 0
    return 1 + bool(cfg.warmup_steps) + len(rb["checkpoints"]) - shared


def run(model: str = "smollm2-135m", data: str = "builtin", ft_n: int = 1000, ft_epochs: float = 1.0,
        batch_size: int = 8, harmful_ratio: float = 0.1, align_steps: int = 2, calibration_n: int = 500,
        antidote_batch_size: int = 8, rollback: RollbackConfig | None = None, val_n: int = 100,
        fa_max_new_tokens: int = 16, finetuned: str | None = None, aligned: str | None = None,
        device: str = "auto", threads: int = 0, work: str | Path | None = None) -> dict:
    """Fine-tune (or take a fine-tune), run Antidote and rollback on it, return their costs over its time."""
    if threads > 0:
        torch.set_num_threads(threads)
    rollback = rollback or RollbackConfig()
    dcfg = D.DataConfig(data=data)
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="ftsafety-bench-post-")) if own_work else Path(work)
    try:
        ft_examples = None
        if finetuned:
            aligned = aligned or model
            ft_info = json.loads((Path(finetuned) / "train_results.json").read_text())
            ft_seconds, ft_steps = float(ft_info["seconds"]), int(ft_info.get("steps", 0))
        else:
            lora = models.LoraSettings()
            train_lora(stage="align", parent=model, examples=D.alignment_examples(dcfg, 8 * batch_size, 0.5),
                       out_dir=work / "align", data_cfg=dcfg,
                       train_cfg=TrainConfig(max_steps=align_steps, batch_size=batch_size),
                       lora=lora, device=device, quiet=True, checkpoint_every=0)
            aligned = str(work / "align")
            ft_examples = D.finetune_mix(dcfg, "sst2", ft_n, harmful_ratio)
            tcfg = TrainConfig(epochs=ft_epochs, batch_size=batch_size, lr=1e-4, scheduler="constant",
                               weight_decay=0.0)
            res = train_lora(stage="finetune", parent=aligned, examples=ft_examples, out_dir=work / "ft",
                             data_cfg=dcfg, train_cfg=tcfg, lora=lora, device=device, quiet=True, checkpoint_every=0)
            ft_seconds, ft_steps = float(res["seconds"]), int(res["steps"])
            finetuned = str(work / "ft")
        t0 = time.perf_counter()
        anti = run_antidote(AntidoteConfig(calibration_n=calibration_n, batch_size=antidote_batch_size), finetuned,
                            dcfg, work / "antidote", device=device, quiet=True)
        anti_total = time.perf_counter() - t0
        t0 = time.perf_counter()
        rcfg = dataclasses.replace(rollback, val_n=val_n, fa_max_new_tokens=fa_max_new_tokens)
        rb = run_rollback(model=finetuned, aligned=aligned, out_dir=work / "rollback", dcfg=dcfg, task="sst2",
                          cfg=rcfg, device=device)
        rb_total = time.perf_counter() - t0
        cal_examples = D.harmful_examples(dcfg, "calibration")[: calibration_n]
        ft_tokens = (_tokens(ft_examples, model, dcfg) * ft_epochs) if ft_examples is not None else None
        steps_run = len(rb["steps"])
        report = {
            "model": model, "device": str(resolve_device(device)),
            "threads": torch.get_num_threads(),
            "finetune": {"n": ft_n if ft_examples is not None else None, "epochs": ft_epochs if ft_examples is not None else None,
                         "batch_size": batch_size, "steps": ft_steps, "seconds": round(ft_seconds, 3),
                         "tokens": ft_tokens, "run": None if ft_examples is not None else finetuned},
            "antidote": {"calibration_n": anti["n_calibration"], "calibration_tokens": anti["n_positions"],
                         "calibration_seconds": anti["calibration_seconds"], "prune_seconds": anti["prune_seconds"],
                         "command_seconds": round(anti_total, 3)},
            "rollback": {"steps_run": steps_run, "rollback_mode": rb["rollback_mode"], "layer": rb["layer"],
                         "num_layers": rb["num_layers"], "recovery_n": rollback.recovery_n, "val_n": val_n,
                         "fa_max_new_tokens": fa_max_new_tokens, "checks": _checks(rb, rollback),
                         "seconds": rb["seconds"], "seconds_steps": rb["seconds_steps"], "seconds_eval": rb["seconds_eval"],
                         "seconds_per_step": round(rb["seconds_steps"] / max(steps_run, 1), 4),
                         "command_seconds": round(rb_total, 3),
                         "harmful_prompt_tokens": _prompt_tokens(cal_examples[: rollback.recovery_n], model, dcfg)},
            "antidote_calibration_over_finetune": round(anti["calibration_seconds"] / ft_seconds, 5),
            "antidote_command_over_finetune": round(anti_total / ft_seconds, 5),
            "rollback_over_finetune": round(rb["seconds"] / ft_seconds, 5),
            "rollback_command_over_finetune": round(rb_total / ft_seconds, 5),
        }
        return report
    finally:
        _tokenizer_cache.clear()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--ft-n", type=int, default=1000, help="fine-tuning examples (p=0.1 of them harmful)")
    ap.add_argument("--ft-epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--align-steps", type=int, default=2)
    ap.add_argument("--calibration-n", type=int, default=500)
    ap.add_argument("--rollback-steps", type=int, default=20)
    ap.add_argument("--val-n", type=int, default=100)
    ap.add_argument("--finetuned", help="existing finetune run (skips training; its recorded seconds are used)")
    ap.add_argument("--aligned", help="existing aligned run/model (with --finetuned)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = ap.parse_args(argv)
    rcfg = RollbackConfig(steps=args.rollback_steps, warmup_steps=min(5, args.rollback_steps))
    report = run(args.model, args.data, args.ft_n, args.ft_epochs, args.batch_size, align_steps=args.align_steps,
                 calibration_n=args.calibration_n, rollback=rcfg, val_n=args.val_n, finetuned=args.finetuned,
                 aligned=args.aligned, device=args.device, threads=args.threads)
    print(json.dumps(report, indent=2))
    print(f"antidote calibration = {report['antidote_calibration_over_finetune']:.1%} of the fine-tune "
          f"(whole command {report['antidote_command_over_finetune']:.1%}); rollback = "
          f"{report['rollback_over_finetune']:.1%} (whole command {report['rollback_command_over_finetune']:.1%})")
    return report


if __name__ == "__main__":
    main()
