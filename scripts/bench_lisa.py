"""Benchmark: step time of plain `finetune` (transformers' Trainer) against Lisa (LisaTrainer with
alignment/fine-tuning switches and the proximal term on), in one run, same model, same batch.

Run as:  python scripts/bench_lisa.py [--model smollm2-135m] [--batch-size 8] [--warmup 2] [--steps 8]
         [--alignment-steps 2] [--finetune-steps 3] [--rho 1] [--device auto] [--threads 1]

Both trainers are built on the same LoRA model; each timed step is one `training_step` (forward,
backward, and for Lisa the state check, alignment-batch swap and proximal gradient) plus gradient
clipping and the optimizer/scheduler step, i.e. what the Trainer's loop does per step. The two
trainers take turns step by step (order alternating), so a load change on a shared machine hits both
alike; the figure printed is the median of the per-step ratios lisa/finetune (target <= 1.1x), with
the medians and minima of each. Every example (user and alignment set) is the same formatted sample,
so every batch has the same content and shape. The proximal term is on from the second step
(prox_start 0). The cost of the proximal-gradient update alone is also timed directly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from transformers import Trainer

from ftsafety import data as D
from ftsafety import models
from ftsafety.defenses.lisa import LisaConfig, LisaTrainer
from ftsafety.train import TrainConfig, training_args
from ftsafety.utils import resolve_device, seed_everything


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _one_step(trainer: Trainer, model, batch: dict, num_items, dev: torch.device) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    trainer.training_step(model, dict(batch), num_items)
    if trainer.args.max_grad_norm > 0:
        params = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.optimizer.zero_grad()
    _sync(dev)
    return time.perf_counter() - t0


def _time_proximal(trainer: LisaTrainer, dev: torch.device, reps: int = 20) -> float:
    """Seconds for one proximal-gradient update (foreach sub/add/norm over the LoRA tensors)."""
    for p in trainer._trainable().values():
        p.grad = torch.zeros_like(p)
    trainer._add_proximal_grad(1.0)  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        value = trainer._add_proximal_grad(1.0)
    float(value)  # waits for the device
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="Timed steps per trainer (after warm-up).")
    ap.add_argument("--alignment-steps", type=int, default=2)
    ap.add_argument("--finetune-steps", type=int, default=3)
    ap.add_argument("--rho", type=float, default=1.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (0 = torch default); 1 keeps timings steady on a shared, loaded CPU.")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    dev = resolve_device(args.device)
    seed_everything(0)
    model, tok, _ = models.load(args.model, device=dev)
    model = models.attach_lora(model, models.LoraSettings())
    model.train()
    dcfg = D.DataConfig(max_length=args.max_length)
    example = D.finetune_mix(dcfg, "sst2", 1, 0.0, 0)[0]
    dataset = D.SFTDataset([example] * (4 * args.batch_size), tok, dcfg)
    collator = D.Collator(tok.pad_token_id)
    batch = collator([dataset[i] for i in range(args.batch_size)])
    lisa_cfg = LisaConfig(
        alignment_steps=args.alignment_steps, finetune_steps=args.finetune_steps, rho=args.rho, prox_start=0.0
    )
    total = args.warmup + args.steps
    tcfg = TrainConfig(
        max_steps=total, batch_size=args.batch_size, lr=1e-4, scheduler="constant",
        warmup_ratio=0.0, weight_decay=0.0, logging_steps=10**6,
    )
    times: dict[str, list[float]] = {"finetune": [], "lisa": []}
    with tempfile.TemporaryDirectory() as scratch:
        trainers = {
            "finetune": Trainer(model=model, args=training_args(tcfg, dev, scratch), train_dataset=dataset,
                                data_collator=collator),
            "lisa": LisaTrainer(model=model, args=training_args(tcfg, dev, scratch), train_dataset=dataset,
                                data_collator=collator, alignment_dataset=dataset, lisa=lisa_cfg),
        }
        # one autocast wrap of the shared model (bf16 on CUDA), as Trainer.train() would do
        model = trainers["finetune"].accelerator.prepare_model(model)
        for tr in trainers.values():
            tr.create_optimizer_and_scheduler(num_training_steps=total)
            tr.state.max_steps = total
            tr.current_gradient_accumulation_steps = 1
        _, num_items = trainers["finetune"].get_batch_samples(iter([batch]), 1, dev)
        for i in range(total):
            order = ("finetune", "lisa") if i % 2 == 0 else ("lisa", "finetune")
            for name in order:
                secs = _one_step(trainers[name], model, batch, num_items, dev)
                if i >= args.warmup:
                    times[name].append(secs)
        prox_s = _time_proximal(trainers["lisa"], dev)
    paired = statistics.median(a / b for a, b in zip(times["lisa"], times["finetune"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    report = {
        "model": args.model, "device": str(dev), "batch_size": args.batch_size,
        "tokens_per_example": len(dataset[0]["input_ids"]),
        "trainable_tensors": len(trainers["lisa"]._trainable()),
        "trainable_params": sum(p.numel() for p in trainers["lisa"]._trainable().values()),
        "timed_steps_per_trainer": len(times["lisa"]), "threads": torch.get_num_threads(),
        "finetune_s_per_step": {"median": round(med["finetune"], 4), "min": round(low["finetune"], 4)},
        "lisa_s_per_step": {"median": round(med["lisa"], 4), "min": round(low["lisa"], 4)},
        "proximal_update_ms": round(prox_s * 1e3, 3),
        "ratio_paired_median": round(paired, 3),
        "ratio_of_medians": round(med["lisa"] / med["finetune"], 3),
    }
    print(json.dumps(report, indent=2))
    share = prox_s / low["finetune"] * 100
    print(f"lisa / finetune step time: {paired:.3f}x (median of paired steps; target <= 1.1x); "
          f"proximal update alone {prox_s * 1e3:.2f} ms = {share:.2f}% of a finetune step")


if __name__ == "__main__":
    main()
