"""Benchmark: step time of plain `finetune` (transformers' Trainer) against Lisa (LisaTrainer with
alignment/fine-tuning switches and the proximal term on), in one run, same model, same batch.

Run as:  python scripts/bench_lisa.py [--model smollm2-135m] [--batch-size 8] [--warmup 2] [--steps 8]
         [--alignment-steps 2] [--finetune-steps 3] [--rho 1] [--device auto] [--threads 1]

Both trainers are built on the same LoRA model; each timed step is one `training_step` (forward,
backward, and for Lisa the state check, alignment-batch swap and proximal gradient) plus gradient
clipping and the optimizer/scheduler step, i.e. what the Trainer's loop does per step. The two
trainers take turns step by step (order alternating), so a load change on a shared machine hits both
alike; the figure printed is the median of the per-step ratios lisa/finetune (target <= 1.02x), with
the medians and minima of each. Every example (user and alignment set) is the same formatted sample,
so every batch has the same content and shape. The proximal term is on from the second step
(prox_start 0). The cost of the proximal-gradient update alone is also timed directly.

Peak memory (as scripts/bench_alignment.py measures it): on CPU each trainer runs --warmup + 1 steps
alone in a fresh subprocess, `extra` = peak RSS (VmHWM, reset through /proc/self/clear_refs after
loading) minus RSS before the first step; on CUDA torch.cuda.max_memory_allocated above the memory
allocated before the first step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ftsafety import data as D
from ftsafety import models
from ftsafety.defenses.lisa import LisaConfig, LisaTrainer
from ftsafety.train import TrainConfig, training_args
from ftsafety.trainer import FtTrainer
from ftsafety.utils import resolve_device, seed_everything


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _one_step(trainer: FtTrainer, model, batch: dict, num_items, dev: torch.device) -> float:
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


class _Setup:
    """The shared LoRA model, the fixed batch and both trainers, ready to step."""

    def __init__(self, model: str, batch_size: int, max_length: int, warmup: int, steps: int, alignment_steps: int,
                 finetune_steps: int, rho: float, device: str, scratch: str):
        self.dev = resolve_device(device)
        seed_everything(0)
        net, tok, _ = models.load(model, device=self.dev)
        net = models.attach_lora(net, models.LoraSettings())
        net.train()
        dcfg = D.DataConfig(max_length=max_length)
        example = D.finetune_mix(dcfg, "sst2", 1, 0.0, 0)[0]
        self.dataset = D.SFTDataset([example] * (4 * batch_size), tok, dcfg)
        collator = D.Collator(tok.pad_token_id)
        self.batch = collator([self.dataset[i] for i in range(batch_size)])
        lisa_cfg = LisaConfig(alignment_steps=alignment_steps, finetune_steps=finetune_steps, rho=rho, prox_start=0.0)
        total = warmup + steps
        tcfg = TrainConfig(
            max_steps=total, batch_size=batch_size, lr=1e-4, scheduler="constant",
            warmup_ratio=0.0, weight_decay=0.0, logging_steps=10**6,
        )
        self.trainers = {
            "finetune": FtTrainer(model=net, args=training_args(tcfg, self.dev, scratch), train_dataset=self.dataset,
                                data_collator=collator),
            "lisa": LisaTrainer(model=net, args=training_args(tcfg, self.dev, scratch), train_dataset=self.dataset,
                                data_collator=collator, alignment_dataset=self.dataset, lisa=lisa_cfg),
        }
        # one autocast wrap of the shared model (bf16 on CUDA), as Trainer.train() would do
        self.model = self.trainers["finetune"].accelerator.prepare_model(net)
        for tr in self.trainers.values():
            tr.create_optimizer_and_scheduler(num_training_steps=total)
            tr.state.max_steps = total
            tr.current_gradient_accumulation_steps = 1
        _, self.num_items = self.trainers["finetune"].get_batch_samples(iter([self.batch]), 1, self.dev)

    def step(self, name: str) -> float:
        return _one_step(self.trainers[name], self.model, self.batch, self.num_items, self.dev)

    def memory(self, name: str, warmup: int) -> dict:
        """Peak memory of warmup + 1 steps of `name` alone (first thing in a fresh process on CPU)."""
        from bench_alignment import peak_memory

        return peak_memory(lambda: self.step(name), warmup + 1, self.dev)


def _parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return ap


def run(model: str = "smollm2-135m", batch_size: int = 8, max_length: int = 256, warmup: int = 2, steps: int = 8,
        alignment_steps: int = 2, finetune_steps: int = 3, rho: float = 1.0, device: str = "auto", threads: int = 1,
        memory: bool = True) -> dict:
    """Paired step times of finetune and Lisa (alternating order), the proximal update alone, and peak memory."""
    import os
    import subprocess
    import sys

    if threads > 0:
        torch.set_num_threads(threads)
    times: dict[str, list[float]] = {"finetune": [], "lisa": []}
    with tempfile.TemporaryDirectory() as scratch:
        st = _Setup(model, batch_size, max_length, warmup, steps, alignment_steps, finetune_steps, rho, device, scratch)
        dev = st.dev
        for i in range(warmup + steps):
            order = ("finetune", "lisa") if i % 2 == 0 else ("lisa", "finetune")
            for name in order:
                secs = st.step(name)
                if i >= warmup:
                    times[name].append(secs)
        prox_s = _time_proximal(st.trainers["lisa"], dev)
        trainable = st.trainers["lisa"]._trainable()
        tokens = len(st.dataset[0]["input_ids"])
        mem: dict[str, dict] = {}
        if memory and dev.type == "cuda":
            mem = {name: st.memory(name, warmup) for name in ("finetune", "lisa")}
        del st
    if memory and dev.type != "cuda":
        for name in ("finetune", "lisa"):
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", name, "--model", model,
                   "--batch-size", str(batch_size), "--max-length", str(max_length), "--warmup", str(warmup),
                   "--steps", str(steps), "--alignment-steps", str(alignment_steps),
                   "--finetune-steps", str(finetune_steps), "--rho", str(rho), "--device", device,
                   "--threads", str(threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"memory run of {name} failed:\n{res.stderr[-2000:]}")
            mem[name] = json.loads(res.stdout.strip().splitlines()[-1])
    ratios = [a / b for a, b in zip(times["lisa"], times["finetune"])]
    paired = statistics.median(ratios)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [paired, paired, paired]
    report = {
        "model": model, "device": str(dev), "batch_size": batch_size,
        "tokens_per_example": tokens,
        "trainable_tensors": len(trainable),
        "trainable_params": sum(p.numel() for p in trainable.values()),
        "timed_steps_per_trainer": len(times["lisa"]), "threads": torch.get_num_threads(),
        "finetune_s_per_step": {"median": round(med["finetune"], 4), "min": round(low["finetune"], 4)},
        "lisa_s_per_step": {"median": round(med["lisa"], 4), "min": round(low["lisa"], 4)},
        "proximal_update_ms": round(prox_s * 1e3, 3),
        "proximal_share_of_step": round(prox_s / low["finetune"], 5),
        "ratio_paired_median": round(paired, 4),
        "ratio_paired_quartiles": [round(q[0], 4), round(q[2], 4)],
        "ratio_of_medians": round(med["lisa"] / med["finetune"], 4),
    }
    if mem:
        report["memory"] = mem
        base = mem["finetune"]["extra_mib"]
        report["memory_ratio"] = round(mem["lisa"]["extra_mib"] / base, 4) if base > 0 else None
    return report


def main(argv: list[str] | None = None) -> dict | None:
    args = _parser().parse_args(argv)
    if args.memory_child:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory() as scratch:
            st = _Setup(args.model, args.batch_size, args.max_length, args.warmup, args.steps, args.alignment_steps,
                        args.finetune_steps, args.rho, args.device, scratch)
            print(json.dumps(st.memory(args.memory_child, args.warmup)))
        return None
    report = run(args.model, args.batch_size, args.max_length, args.warmup, args.steps, args.alignment_steps,
                 args.finetune_steps, args.rho, args.device, args.threads, not args.no_memory)
    print(json.dumps(report, indent=2))
    share = report["proximal_share_of_step"] * 100
    print(f"lisa / finetune step time: {report['ratio_paired_median']:.3f}x (median of paired steps; target <= 1.02x); "
          f"proximal update alone {report['proximal_update_ms']:.2f} ms = {share:.2f}% of a finetune step")
    if report.get("memory_ratio") is not None:
        print(f"lisa / finetune extra peak memory: {report['memory_ratio']:.2f}x")
    return report


if __name__ == "__main__":
    main()
