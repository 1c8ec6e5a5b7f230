"""Benchmark: the cost of the post-fine-tuning defenses relative to the fine-tune they repair.

Run as:  python scripts/bench_post.py [--model tiny-llama] [--steps 20] [--batch-size 8]
In one process it aligns briefly, fine-tunes (p=0.1, `--steps` steps, timed), then runs Antidote
(one calibration forward pass + pruning) and rollback recovery (20 steps + task checks) on that
fine-tune, and prints each one's seconds over the fine-tune's. Use `--model smollm2-135m` for the
embedded model (minutes), or point `--finetuned RUN --aligned RUN` at existing runs to skip training.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ftsafety import data as D
from ftsafety import models
from ftsafety.defenses.antidote import AntidoteConfig, run_antidote
from ftsafety.defenses.rollback import RollbackConfig, run as run_rollback
from ftsafety.train import TrainConfig, train_lora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--finetuned", help="existing finetune run (skips training; its recorded seconds are used)")
    ap.add_argument("--aligned", help="existing aligned run/model (with --finetuned)")
    args = ap.parse_args()
    dcfg = D.DataConfig(data=args.data)
    work = Path(tempfile.mkdtemp(prefix="ftsafety-bench-post-"))
    if args.finetuned:
        finetuned, aligned = args.finetuned, args.aligned or args.model
        ft_seconds = json.loads((Path(finetuned) / "train_results.json").read_text())["seconds"]
    else:
        lora = models.LoraSettings()
        tcfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=1e-3)
        train_lora(stage="align", parent=args.model, examples=D.alignment_examples(dcfg, 8 * args.batch_size, 0.5),
                   out_dir=work / "align", data_cfg=dcfg, train_cfg=TrainConfig(max_steps=2, batch_size=args.batch_size),
                   lora=lora, quiet=True)
        aligned = str(work / "align")
        t0 = time.perf_counter()
        train_lora(stage="finetune", parent=aligned, examples=D.finetune_mix(dcfg, "sst2", args.steps * args.batch_size, 0.1),
                   out_dir=work / "ft", data_cfg=dcfg, train_cfg=tcfg, lora=lora, quiet=True)
        ft_seconds = time.perf_counter() - t0
        finetuned = str(work / "ft")
    t0 = time.perf_counter()
    anti = run_antidote(AntidoteConfig(), finetuned, dcfg, work / "antidote", quiet=True)
    anti_total = time.perf_counter() - t0
    t0 = time.perf_counter()
    rb = run_rollback(model=finetuned, aligned=aligned, out_dir=work / "rollback", dcfg=dcfg, task="sst2",
                      cfg=RollbackConfig())
    rb_total = time.perf_counter() - t0
    report = {
        "model": args.model, "threads": torch.get_num_threads(), "finetune_seconds": round(ft_seconds, 2),
        "antidote_calibration_seconds": anti["calibration_seconds"], "antidote_total_seconds": round(anti_total, 2),
        "rollback_total_seconds": round(rb_total, 2), "rollback_mode": rb.get("rollback_mode"),
        "antidote_calibration_over_finetune": round(anti["calibration_seconds"] / ft_seconds, 4),
        "antidote_total_over_finetune": round(anti_total / ft_seconds, 4),
        "rollback_over_finetune": round(rb_total / ft_seconds, 4),
    }
    print(json.dumps(report, indent=2))
    print(f"antidote calibration = {report['antidote_calibration_over_finetune']:.1%} of the fine-tune "
          f"(whole command {report['antidote_total_over_finetune']:.1%}); rollback = {report['rollback_over_finetune']:.1%}")


if __name__ == "__main__":
    main()
