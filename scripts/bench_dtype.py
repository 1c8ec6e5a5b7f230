"""bf16 against fp32 on the same machine, in one run (issue #29): GEMM rate, LoRA steps, batched generation.

Run as:  python scripts/bench_dtype.py [--model smollm2-135m] [--batch-size 8] [--max-length 128] [--steps 4]
         (or `make bench`, part `dtype`)

What is measured, all in one process, the two arithmetics taking turns so that load from other jobs hits
both alike (the order flips every round):
  gemm      a 712 x 576 x 1536 matmul (the LoRA step's MLP shape at batch 8 x 89 tokens) in fp32 and in bf16,
            GFLOP/s, median of the rounds
  step      one training step (training_step + optimizer step) of SFT, Vaccine, Booster and Lisa on the
            embedded model with a fresh LoRA, fp32 against bf16 autocast (the wrap the Trainer's
            accelerator puts around the model's forward when `--dtype bf16`); fp32 weights and AdamW state
            in both, as `ftsafety --dtype bf16` trains on CPU
  generate  our batched greedy loop (the evaluator's) on BeaverTails prompts, fp32 against bf16 autocast;
            the share of answers identical in both is reported beside the speed
The processor's bf16 flags (AVX512-BF16, AMX) and what `--dtype auto` picks on it are part of the report.
Ratios are fp32 seconds over bf16 seconds (> 1: bf16 is faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

METHODS = ("sft", "vaccine", "booster", "lisa")
GEMM_SHAPE = (712, 576, 1536)


def cpu_info() -> dict:
    from ftsafety.utils import BF16_CPU_FLAGS, cpu_flags, resolve_device, resolve_precision

    flags = cpu_flags()
    dev = resolve_device("auto")
    prec = resolve_precision("auto", dev)
    return {"bf16_flags": sorted(flags & set(BF16_CPU_FLAGS)), "avx512f": "avx512f" in flags, "avx2": "avx2" in flags,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "auto_picks": prec.ran, "auto_why": prec.why}


def gemm_rates(rounds: int = 5, reps: int = 10) -> dict:
    m, k, n = GEMM_SHAPE
    a32, b32 = torch.randn(m, k), torch.randn(k, n)
    mats = {"fp32": (a32, b32), "bf16": (a32.bfloat16(), b32.bfloat16())}
    for a, b in mats.values():
        a @ b  # warm-up
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(rounds):
        for name in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
            a, b = mats[name]
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            rates[name].append(2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"shape": list(GEMM_SHAPE), "gflops": {k: round(v, 2) for k, v in med.items()},
            "bf16_x_fp32": round(med["bf16"] / med["fp32"], 3)}


class _Side:
    """One arithmetic: its own model (fresh LoRA, same seed), batches and one trainer per method."""

    def __init__(self, dtype: str, model: str, data: str, batch_size: int, max_length: int, dev):
        from bench_alignment import fixed_batches

        from ftsafety import models
        from ftsafety.defenses.booster import BoosterTrainer
        from ftsafety.defenses.lisa import LisaConfig, LisaTrainer
        from ftsafety.defenses.vaccine import VaccineTrainer
        from ftsafety.train import TrainConfig, training_args
        from ftsafety.trainer import FtTrainer
        from ftsafety.utils import resolve_precision, seed_everything

        seed_everything(0)
        self.dev = dev
        self.precision = resolve_precision(dtype, dev)
        net, tok, _ = models.load(model, device=dev, dtype=self.precision.weights)
        net = models.attach_lora(net, models.LoraSettings())
        net.train()
        collate, align, harm, self.batch, harmful = fixed_batches(tok, data, batch_size, max_length)
        tcfg = TrainConfig(max_steps=1000, batch_size=batch_size, lr=1e-4, scheduler="constant", warmup_ratio=0.0,
                           weight_decay=0.0, logging_steps=10**6, seed=0)
        specs = {
            "sft": (FtTrainer, {}),
            "vaccine": (VaccineTrainer, {"rho": 2.0}),
            "booster": (BoosterTrainer, {"lam": 5.0, "alpha": 0.1, "harmful_dataset": harm}),
            "lisa": (LisaTrainer, {"alignment_dataset": align,
                                   "lisa": LisaConfig(alignment_steps=1, finetune_steps=1, prox_start=0.0)}),
        }
        self.trainers = {}
        with tempfile.TemporaryDirectory() as scratch:
            for name, (cls, kw) in specs.items():
                args = training_args(tcfg, dev, scratch, self.precision)
                tr = cls(model=net, args=args, train_dataset=align, data_collator=collate, **kw)
                if name == "booster":
                    tr.harmful.next = lambda h=harmful: h  # the same harmful batch every step
                tr.create_optimizer_and_scheduler(num_training_steps=tcfg.max_steps)
                tr.state.max_steps = tcfg.max_steps
                tr.current_gradient_accumulation_steps = 1
                self.trainers[name] = tr
            # the autocast wrap Trainer.train() puts around the forward (bf16), once for the shared model
            self.model = self.trainers["sft"].accelerator.prepare_model(net)
        self.net, self.tok = net, tok

    def step(self, method: str) -> float:
        tr = self.trainers[method]
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tr.training_step(self.model, dict(self.batch))
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def _generation(sides: dict, data: str, n: int, max_new: int, batch_size: int, rounds: int) -> dict:
    from ftsafety import data as D
    from ftsafety import prompt_sets
    from ftsafety.evaluation.generate import encode_prompts, generate_from_ids

    any_side = next(iter(sides.values()))
    tok = any_side.tok
    cfg = D.DataConfig(data=data)
    items = prompt_sets.items("beavertails", "harmful", cfg, n)
    encoded = encode_prompts(tok, [D.format_prompt({"instruction": p["prompt"]}, cfg.template, tok) for p in items])
    times: dict[str, list[float]] = {k: [] for k in sides}
    outs: dict[str, list] = {}
    for r in range(rounds):
        for name in (tuple(sides) if r % 2 == 0 else tuple(reversed(sides))):
            side = sides[name]
            side.net.eval()
            net = side.net.get_base_model()  # the LoRA layers stay in; the evaluator's path (KV-cached loop)
            with torch.no_grad(), side.precision.autocast():
                t0 = time.perf_counter()
                outs[name] = generate_from_ids(net, tok, encoded, max_new, batch_size)
                times[name].append(time.perf_counter() - t0)
            side.net.train()
    same = sum(a == b for a, b in zip(outs["fp32"], outs["bf16"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"prompts": len(encoded), "max_new_tokens": max_new, "batch_size": batch_size, "rounds": rounds,
            "seconds": {k: round(v, 3) for k, v in med.items()}, "identical": f"{same}/{len(encoded)}",
            "bf16_x_fp32": round(med["fp32"] / med["bf16"], 3)}


def run(model: str = "smollm2-135m", data: str = "builtin", batch_size: int = 8, max_length: int = 128,
        steps: int = 4, warmup: int = 1, gen_n: int = 64, gen_max_new: int = 32, gen_batch: int = 32,
        methods=METHODS, device: str = "auto", threads: int = 0) -> dict:
    from ftsafety.utils import resolve_device

    if threads > 0:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    t_start = time.perf_counter()
    out = {"model": model, "device": str(dev), "threads": torch.get_num_threads(), "cpu": cpu_info(),
           "gemm": gemm_rates() if dev.type == "cpu" else None}
    print(f"  bf16 flags {out['cpu']['bf16_flags'] or 'none'}; auto picks {out['cpu']['auto_picks']}", flush=True)
    if out["gemm"]:
        print(f"  GEMM {GEMM_SHAPE}: fp32 {out['gemm']['gflops']['fp32']} GFLOP/s, bf16 {out['gemm']['gflops']['bf16']} "
              f"GFLOP/s ({out['gemm']['bf16_x_fp32']}x)", flush=True)
    sides = {"fp32": _Side("fp32", model, data, batch_size, max_length, dev),
             "bf16": _Side("bf16", model, data, batch_size, max_length, dev)}
    secs: dict[str, dict[str, list[float]]] = {m: {"fp32": [], "bf16": []} for m in methods}
    for r in range(warmup + steps):
        for m in methods:
            for name in (("fp32", "bf16") if (r + methods.index(m)) % 2 == 0 else ("bf16", "fp32")):
                s = sides[name].step(m)
                if r >= warmup:
                    secs[m][name].append(s)
        print(f"  round {r + 1}/{warmup + steps}" + (" (warm-up)" if r < warmup else ""), flush=True)
    step = {}
    for m in methods:
        med = {k: statistics.median(v) for k, v in secs[m].items()}
        step[m] = {"s_per_step": {k: round(v, 4) for k, v in med.items()}, "bf16_x_fp32": round(med["fp32"] / med["bf16"], 3)}
        print(f"  {m:8s} step: fp32 {med['fp32']:.3f} s, bf16 {med['bf16']:.3f} s, bf16 speed-up "
              f"{step[m]['bf16_x_fp32']:.2f}x", flush=True)
    out["batch_shape"] = list(sides["fp32"].batch["input_ids"].shape)
    out["step"] = step
    out["generate"] = _generation(sides, data, gen_n, gen_max_new, gen_batch, rounds=max(1, min(steps, 3)))
    g = out["generate"]
    print(f"  generation ({g['prompts']} prompts x {g['max_new_tokens']} new tokens, batch {g['batch_size']}): "
          f"fp32 {g['seconds']['fp32']:.1f} s, bf16 {g['seconds']['bf16']:.1f} s, speed-up {g['bf16_x_fp32']:.2f}x, "
          f"identical answers {g['identical']}", flush=True)
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--gen-n", type=int, default=64)
    ap.add_argument("--gen-max-new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    return run(a.model, a.data, a.batch_size, a.max_length, a.steps, a.warmup, a.gen_n, a.gen_max_new,
               device=a.device, threads=a.threads)


if __name__ == "__main__":
    main()
